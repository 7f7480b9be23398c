"""`hpcllm slurm` scripts submitted to the real localhost Slurm cluster (2 virtual nodes).

- `chain --submit`: a 2-task preprocessing array + merge + training chained by afterok; the
  array + merge dataset == a single-process run;
- 2-node training under `mpirun` (the chain's) and under `srun --mpi=pmix`: Horovod sees 2
  nodes, checkpoints;
- preemption of the srun job: `scancel --signal=USR1 --batch` -> checkpoint, exit 75, requeue,
  resume, and the final loss equals the uninterrupted (mpirun) run's;
- requeue only on 75, at most --max-requeues times; injected shell in names/paths never runs.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.conftest import HPCLLM_CMD, REPO, hpcllm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

#: a tiny model: the jobs are about the launch machinery, not the model
TRAIN = ["--model", "tiny", "--steps", "16", "--seq-len", "32", "--micro-batch", "2", "--ckpt-every", "8",
         "--log-every", "1", "--precision", "fp32", "--threads", "1", "--device", "cpu", "--warmup", "2"]


@pytest.fixture(scope="module")
def job_env(slurm_cluster):
    env = dict(slurm_cluster.env)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return env


def submit(env, cwd, args) -> list[str]:
    """`hpcllm slurm ARGS --submit`; returns the job ids it printed."""
    res = hpcllm(["slurm", args[0], "--submit", "--hpcllm-cmd", HPCLLM_CMD, *args[1:]], env=env, cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = [line.split("\t")[0] for line in res.stdout.splitlines() if line.strip()]
    assert ids and all(i.isdigit() for i in ids), res.stdout
    return ids


def job_log(cwd: Path, name: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(cwd.glob(f"{name}-[0-9]*.out")))


def metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def final_loss(run: Path) -> float:
    return [m for m in metrics(run) if m["step"] == 16][-1]["loss"]


def _dataset_content(d: Path) -> dict:
    m = json.loads((d / "manifest.json").read_text())
    return {"tokenizer": m["tokenizer"], "corpora": m["corpora"], "dropped": m["dropped"],
            "splits": {k: {"tokens": v["tokens"], "documents": v["documents"],
                           "shards": [(s["path"], s["tokens"], s["documents"], s["sha256"]) for s in v["shards"]]}
                       for k, v in m["splits"].items()}}


# --------------------------------------------------------------------------- chain: array -> merge -> training


@pytest.fixture(scope="module")
def chain_run(slurm_cluster, job_env, corpus, tmp_path_factory):
    """`hpcllm slurm chain --submit`: a 2-task preprocessing array, the merge (afterok) and a
    2-node x 2-rank training under mpirun inside the allocation (afterok); the training is also
    the uninterrupted reference for the preemption test (which runs under srun)."""
    cwd = tmp_path_factory.mktemp("chain")
    t0 = time.monotonic()
    ids = submit(job_env, cwd, ["chain", "-o", "jobs", "--tasks", "2", "--max-parallel", "2",
                                "--preprocess", f"'{corpus}/*.jsonl' --out ds --item-bytes 4096",
                                "-N", "2", "--ntasks-per-node", "2", "--launcher", "mpirun", "-J", "ref",
                                "--out", "run", *TRAIN])
    assert len(ids) == 3
    recs = {"array": slurm_cluster.wait(ids[0], timeout=120), "merge": slurm_cluster.wait(ids[1], timeout=120)}
    recs["train"] = slurm_cluster.wait(ids[2], timeout=300)
    return {"cwd": cwd, "recs": recs, "rec": recs["train"][0], "run": cwd / "run", "log": job_log(cwd, "ref"),
            "seconds": time.monotonic() - t0}


def test_chain_array_and_merge_equal_single_run(chain_run, dataset):
    cwd, recs = chain_run["cwd"], chain_run["recs"]
    logs = job_log(cwd, "ref-prep")
    assert sorted(r["JobState"] for r in recs["array"]) == ["COMPLETED", "COMPLETED"], logs
    assert recs["merge"][0]["JobState"] == "COMPLETED", logs
    # afterok: the merge started once both tasks had ended, the training once the merge had
    assert recs["merge"][0]["StartTime"] >= max(r["EndTime"] for r in recs["array"])
    assert recs["train"][0]["StartTime"] >= recs["merge"][0]["EndTime"]
    # each task did its share, then the merge combined them into the single-process dataset
    assert "task 0/2" in logs and "task 1/2" in logs
    assert _dataset_content(cwd / "ds") == _dataset_content(dataset)
    assert sorted(p.name for p in (cwd / "jobs").iterdir()) == ["preprocess-merge.sbatch", "preprocess.sbatch",
                                                                "train.sbatch"]


def test_injection_in_names_and_paths_never_runs(slurm_cluster, job_env, corpus, tmp_path):
    name = "inj $(touch PWNED1) `touch PWNED2` 'q' ;touch PWNED3"
    out = "ds $(touch PWNED4) ';touch PWNED5;' \"dq\""
    ids = submit(job_env, tmp_path, ["preprocess", "--tasks", "1", "-J", name, "--env", "NOTE=$(touch PWNED6)",
                                     "-o", "jobs/inj.sbatch", "--", str(corpus / "part0.jsonl"), "--out", out])
    assert len(ids) == 1  # one task writes the dataset itself: no merge job
    recs = [slurm_cluster.wait(i, timeout=120)[0] for i in ids]
    assert [r["JobState"] for r in recs] == ["COMPLETED"], list(tmp_path.glob("*.out"))
    assert recs[0]["JobName"] == name
    # the crafted path arrived literally: the dataset is in a directory with exactly that name
    assert (tmp_path / out / "manifest.json").is_file()
    found = [p for p in tmp_path.rglob("PWNED*")] + [p for p in Path.cwd().glob("PWNED*")]
    assert found == []


# --------------------------------------------------------------------------- training


def _check_two_node_run(res):
    assert res["rec"]["JobState"] == "COMPLETED", res["log"]
    assert res["rec"]["NodeList"] == "node[1-2]"
    cfg = json.loads((res["run"] / "config.json").read_text())
    # Horovod's own view: 4 ranks, 2 per node, 2 nodes
    assert (cfg["world"]["size"], cfg["world"]["local_size"], cfg["world"]["cross_size"]) == (4, 2, 2)
    assert (res["run"] / "checkpoints" / "step-00000016").is_dir()
    assert (res["run"] / "checkpoints" / "latest").exists()
    assert [m["step"] for m in metrics(res["run"])] == list(range(1, 17))


def test_train_two_nodes_mpirun(chain_run):
    _check_two_node_run(chain_run)
    assert 'mpirun -np "$SLURM_NTASKS"' in (chain_run["cwd"] / "jobs" / "train.sbatch").read_text()


@pytest.fixture(scope="module")
def preempted_run(slurm_cluster, job_env, dataset, tmp_path_factory):
    """The same training under srun --mpi=pmix, stopped with `scancel --signal=USR1 --batch`
    after step 3: it checkpoints, exits 75, requeues itself, and the requeued job resumes."""
    cwd = tmp_path_factory.mktemp("preempt")
    name = "pre'empt $(touch PWNED)"
    (job_id,) = submit(job_env, cwd, ["train", "-N", "2", "--ntasks-per-node", "2", "--launcher", "srun", "-J", name,
                                      "--max-requeues", "2", "--output", "preempt-%j.out", "-o", "train.sbatch",
                                      "--data", dataset, "--out", "run", *TRAIN])
    run = cwd / "run"
    slurm_cluster.wait_until(lambda: any(m["step"] >= 3 for m in metrics(run)), timeout=240, poll=0.1,
                             what="training reached step 3")
    t_signal = time.time()
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])

    def requeued():
        recs = slurm_cluster.job(job_id)
        return recs and recs[0].get("Restarts") == "1" and recs[0]["JobState"] in ("PENDING", "REQUEUED")

    slurm_cluster.wait_until(requeued, timeout=120, poll=0.1, what="job requeued")
    t_requeued = time.time()
    stopped_at = max(m["step"] for m in metrics(run))
    # Slurm holds a requeued job for AuthInfo's cred_expire (120 s by default, 10 s on the test
    # cluster) while its old credentials are revoked on the nodes; it then starts by itself.
    slurm_cluster.wait_until(lambda: (slurm_cluster.job(job_id) or [{}])[0].get("JobState") not in ("PENDING", "REQUEUED"),
                             timeout=120, poll=0.1, what="requeued job started")
    t_restart = time.time()
    rec = slurm_cluster.wait(job_id, timeout=300)[0]
    return {"cwd": cwd, "rec": rec, "run": run, "log": job_log(cwd, "preempt"), "name": name,
            "stopped_at": stopped_at, "t_signal": t_signal, "t_requeued": t_requeued, "t_restart": t_restart}


def test_train_two_nodes_srun_pmix(preempted_run):
    _check_two_node_run(preempted_run)
    assert "srun --mpi=pmix" in (preempted_run["cwd"] / "train.sbatch").read_text()


def test_preemption_checkpoints_requeues_and_resumes_exactly(preempted_run, chain_run, slurm_cluster):
    p = preempted_run
    run, log, stopped_at = p["run"], p["log"], p["stopped_at"]
    assert p["rec"]["JobState"] == "COMPLETED" and p["rec"]["Restarts"] == "1", log
    assert p["rec"]["JobName"] == p["name"]
    assert stopped_at < 16

    # the stop: a checkpoint at the agreed step, exit 75, requeue; then a resume from it
    assert (run / "checkpoints" / f"step-{stopped_at:08d}").is_dir(), sorted(os.listdir(run / "checkpoints"))
    assert "hpcllm: SIGUSR1" in log and "training exited with status 75" in log and "requeuing job" in log
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log
    assert "training exited with status 0" in log
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(range(1, 17)), steps  # no step lost or repeated
    # exact resume: the same final loss as the uninterrupted run (which ran under mpirun)
    assert final_loss(run) == final_loss(chain_run["run"])
    assert not list(p["cwd"].rglob("PWNED*"))

    # requeue-to-resume, in parts: stop + checkpoint + requeue, Slurm's hold, restart + resume
    resumed = next(m for m in metrics(run) if m["step"] == stopped_at + 1)
    timing = {
        "stopped_at_step": stopped_at,
        "signal_to_requeued_s": round(p["t_requeued"] - p["t_signal"], 2),
        "requeued_to_restart_s": round(p["t_restart"] - p["t_requeued"], 2),
        "restart_to_first_resumed_step_s": round(resumed["time"] - p["t_restart"], 2),
        "signal_to_first_resumed_step_s": round(resumed["time"] - p["t_signal"], 2),
        "cred_expire_s": slurm_cluster.layout.cred_expire,
        "job_starts": re.findall(r"start=(\S+ \S+)", log),
    }
    # shown with -s or on failure; benchmarks/slurm_requeue.py measures it on its own
    print("requeue timing:", json.dumps(timing))
    (p["cwd"] / "requeue_timing.json").write_text(json.dumps(timing, indent=2) + "\n")


# --------------------------------------------------------------------------- requeue policy


def test_real_failure_is_not_requeued(slurm_cluster, job_env, dataset, tmp_path):
    (job_id,) = submit(job_env, tmp_path, ["train", "-N", "1", "-J", "fail", "-o", "t.sbatch", "--data", dataset,
                                           "--out", "run", "--model", "tiny", "--steps", "2", "--n-head", "3"])
    rec = slurm_cluster.wait(job_id, timeout=120)[0]
    log = job_log(tmp_path, "fail")
    assert rec["JobState"] == "FAILED" and rec["Restarts"] == "0", log
    assert rec["ExitCode"].split(":")[0] not in ("0", "75") and "requeuing" not in log


def test_max_requeues_caps_the_loop(slurm_cluster, job_env, dataset, tmp_path):
    # a launcher whose "training" always asks to be requeued (status 75)
    res = hpcllm(["slurm", "train", "-N", "1", "-J", "loop", "--max-requeues", "1", "-o", "t.sbatch", "--submit",
                  "--hpcllm-cmd", "bash -c 'exit 75'", "--data", dataset, "--out", "run"], env=job_env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.split()[0]
    # requeued once (held cred_expire = 10 s, then restarted), then not again
    rec = slurm_cluster.wait(job_id, timeout=120)[0]
    log = job_log(tmp_path, "loop")
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "75:0" and rec["Restarts"] == "1", log
    assert log.count("requeuing job") == 1 and "already requeued 1 times (--max-requeues 1)" in log
