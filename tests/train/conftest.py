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


def losses(run_dir) -> dict[int, float]:
    """step -> loss from RUN/metrics.jsonl."""
    from hpcllm.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
