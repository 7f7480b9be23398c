"""Fixtures for training tests: small real datasets and a way to run `hpcllm train`."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: small and fast: every training test uses this shape unless it says otherwise
TINY = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--seq-len", "32",
        "--threads", "1", "--precision", "fp32", "--warmup", "2", "--lr", "3e-3", "--log-every", "1"]


def make_text(n_docs: int = 400, seed: int = 0) -> list[str]:
    """Documents with learnable structure: templated sentences over a small vocabulary."""
    rng = random.Random(seed)
    subjects = ["the cluster", "a rank", "the scheduler", "each node", "the model", "our job"]
    verbs = ["allreduces", "checkpoints", "trains", "requeues", "broadcasts", "samples"]
    objects = ["the gradients", "its weights", "a batch", "the shards", "every token", "the loss"]
    docs = []
    for _ in range(n_docs):
        sents = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(sents).capitalize())
    return docs


def build_dataset(out: Path, n_docs: int = 400, seed: int = 0, val_fraction: float = 0.1) -> Path:
    """A real dataset directory (byte tokenizer) made by run_preprocess from generated text."""
    src = out.parent / (out.name + "-src.jsonl")
    with open(src, "w") as f:
        for d in make_text(n_docs, seed):
            f.write(json.dumps({"text": d}) + "\n")
    from hpcllm.data.preprocess import run_preprocess

    run_preprocess([str(src)], str(out), tokenizer="byte", val_fraction=val_fraction, workers=1)
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("data") / "ds")


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "hpcllm", "train", *args]


def run_train(args, env=None, timeout=120, check=True) -> subprocess.CompletedProcess:
    """`python -m hpcllm train ARGS` as one process (no mpirun)."""
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    e.update(env or {})
    r = subprocess.run(train_cmd(*args), env=e, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"train exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def ckpt_model(ck) -> dict:
    """The whole model's tensors in checkpoint directory ``ck`` (any layout, any version)."""
    from hpcllm.train.checkpoint import CheckpointReader

    return CheckpointReader(ck).model_state()


def ckpt_optim(ck) -> dict:
    """name -> AdamW state of every parameter in checkpoint directory ``ck``."""
    from hpcllm.train.checkpoint import CheckpointReader

    r = CheckpointReader(ck)
    return r.optim_state(r.names())


def losses(run_dir) -> dict[int, float]:
    """step -> loss from RUN/metrics.jsonl."""
    from hpcllm.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def mpi_popen(cmd, np: int, env: dict, marker: str) -> subprocess.Popen:
    """Start ``cmd`` under real mpirun without waiting (for tests that signal or kill ranks).

    ``marker`` goes into every rank's environment so :func:`rank_pids` can find them.
    """
    from tests.cluster.mpi import mpirun_command

    full = dict(os.environ)
    full.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HPCLLM_TEST_MARKER": marker, **env})
    exports = []
    for k in sorted({*env, "PYTHONPATH", "OMP_NUM_THREADS", "HPCLLM_TEST_MARKER"}):
        exports += ["-x", k]
    return subprocess.Popen(mpirun_command(np) + exports + list(cmd), env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO)


def rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the Python ranks started by :func:`mpi_popen` with ``marker``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HPCLLM_TEST_MARKER={marker}".encode() not in env:
            continue
        try:
            exe = os.readlink(d / "exe")
        except OSError:
            continue
        if "python" not in os.path.basename(exe):
            continue
        for e in env:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(e.split(b"=")[1])] = int(d.name)
    return out


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_tree(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def freeze_rank_until_exit(proc, marker: str, run_dir, rank: int = 1, start_timeout: float = 60,
                           exit_timeout: float = 90) -> tuple[float, str]:
    """Once ``run_dir`` logged step 3, SIGSTOP ``rank`` of the job ``proc`` (from
    :func:`mpi_popen` with ``marker``) and wait for the job to end. Returns (seconds from the
    freeze to the job's end, its stderr); the frozen rank is resumed and the job killed
    whatever happens."""
    import signal
    import time

    from hpcllm.train.metrics import read_metrics

    stopped = None
    try:
        wait_for(lambda: any(r["step"] >= 3 for r in read_metrics(run_dir)), start_timeout, "step 3")
        stopped = rank_pids(marker)[rank]
        t0 = time.monotonic()
        os.kill(stopped, signal.SIGSTOP)
        _, err = proc.communicate(timeout=exit_timeout)
        return time.monotonic() - t0, err
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        kill_tree(proc)
