"""Preemption on a real Slurm: how long from the stop signal to training running again.

    .venv/bin/python benchmarks/slurm_requeue.py [--steps 24] [--stop-at 4] [--cred-expire 10]

Starts the throwaway localhost Slurm cluster (tests/cluster/slurm.py: 2 virtual nodes), submits
a 2-node x 2-rank training job written by `hpcllm slurm train` (srun --mpi=pmix, tiny model),
sends `scancel --signal=USR1 --batch` once it passes --stop-at, and times each part:

- signal -> requeued: the ranks agree on a step, write its checkpoint, exit 75, the batch
  script runs `scontrol requeue`;
- requeued -> restarted: Slurm's hold of a requeued job (AuthInfo cred_expire; 120 s by default
  on real clusters, --cred-expire here);
- restarted -> first resumed step: job start, imports, Horovod init, checkpoint load;
- for comparison, start -> first step of the same job's first run (no checkpoint to load).

Prints a table and writes benchmarks/results/slurm_requeue.json (one entry per --cred-expire).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "slurm_requeue.json"


def _metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def _corpus(d: Path) -> None:
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho".split()
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words) for _ in range(60))}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--stop-at", type=int, default=4, help="send USR1 once this step is logged")
    ap.add_argument("--cred-expire", type=int, default=10, help="AuthInfo cred_expire of the test cluster (s)")
    args = ap.parse_args(argv)

    from hpcllm.data.preprocess import run_preprocess
    from tests.cluster import slurm as S
    work = Path(tempfile.mkdtemp(prefix="hpcllm-requeue-"))
    _corpus(work)
    run_preprocess([str(work / "corpus.jsonl")], str(work / "ds"), progress=False)
    cluster = S.start_cluster(cred_expire=args.cred_expire)
    try:
        env = dict(cluster.env, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "hpcllm", "slurm", "train", "--submit", "--hpcllm-cmd",
               f"{sys.executable} -m hpcllm", "-N", "2", "--ntasks-per-node", "2", "-J", "requeue-bench",
               "--data", "ds", "--out", "run", "--model", "tiny", "--steps", str(args.steps), "--seq-len", "32",
               "--micro-batch", "2", "--ckpt-every", "1000", "--log-every", "1", "--precision", "fp32",
               "--threads", "1", "--device", "cpu"]
        res = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            return 1
        job = res.stdout.split()[0]
        run = work / "run"
        cluster.wait_until(lambda: cluster.state(job) == "RUNNING", timeout=120, poll=0.05)
        t_start = time.time()
        cluster.wait_until(lambda: any(m["step"] >= args.stop_at for m in _metrics(run)), timeout=300, poll=0.05)
        t_signal = time.time()
        cluster.run(["scancel", "--signal=USR1", "--batch", job])
        cluster.wait_until(lambda: (cluster.job(job) or [{}])[0].get("Restarts") == "1", timeout=120, poll=0.05)
        t_requeued = time.time()
        stopped = max(m["step"] for m in _metrics(run))
        cluster.wait_until(lambda: cluster.state(job) == "RUNNING", timeout=300, poll=0.05)
        t_restart = time.time()
        rec = cluster.wait(job, timeout=600)[0]
        if rec["JobState"] != "COMPLETED":
            print(f"job ended {rec['JobState']}", file=sys.stderr)
            return 1
        ms = _metrics(run)
        first = next(m for m in ms if m["step"] == 1)
        resumed = next(m for m in ms if m["step"] == stopped + 1)
    finally:
        cluster.stop()
    rows = {
        "signal -> requeued (agree, checkpoint, exit 75, scontrol requeue)": t_requeued - t_signal,
        f"requeued -> restarted (Slurm hold, cred_expire={args.cred_expire})": t_restart - t_requeued,
        "restarted -> first resumed step (start, init, load checkpoint)": resumed["time"] - t_restart,
        "signal -> first resumed step (total)": resumed["time"] - t_signal,
        "first run: start -> first step (for comparison)": first["time"] - t_start,
    }
    print(f"{'preemption of a 2-node x 2-rank job (tiny model)':70s} seconds")
    for k, v in rows.items():
        print(f"{k:70s} {v:7.2f}")
    result = {"stopped_at_step": stopped, "cred_expire_s": args.cred_expire,
              "seconds": {k: round(v, 2) for k, v in rows.items()},
              "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
              "note": "localhost Slurm, 2 virtual nodes on one machine; on a real cluster the hold is "
                      "cred_expire (default 120 s) and start-up depends on the file system"}
    # one entry per cred_expire measured (10 s as in the tests, 120 s as Slurm's default)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        runs = json.loads(RESULTS.read_text()).get("runs", {})
    except (OSError, ValueError, AttributeError):
        runs = {}
    runs[f"cred_expire={args.cred_expire}"] = result
    RESULTS.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
