"""Fixtures for the pipeline tests: a small real dataset and the single-process reference run
every pipeline layout is compared against."""
import json
from pathlib import Path

import pytest
import torch

from tests.train.conftest import build_dataset, run_train

STEPS = 4
#: a 4-block model so P=2 has 2 blocks per stage; clipping active (norms exceed 0.3)
COMMON = ["--model", "tiny", "--n-layer", "4", "--n-head", "2", "--d-model", "32", "--seq-len", "32",
          "--threads", "1", "--precision", "fp32", "--warmup", "1", "--lr", "3e-3", "--log-every", "1",
          "--micro-batch", "2", "--grad-clip", "0.3", "--seed", "3"]
ENV = {"OMP_NUM_THREADS": "1", "HPCLLM_PIPELINE_TIMEOUT": "60"}


@pytest.fixture(scope="session")
def pp_dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("ppdata") / "ds", n_docs=200)


@pytest.fixture(scope="session")
def reference(pp_dataset, tmp_path_factory):
    """Single process, `--accum 4`, STEPS steps: global batch 8 sequences; checkpoints at
    steps 2 and 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_train(["--data", str(pp_dataset), "--out", str(out), "--accum", "4", "--steps", str(STEPS),
               "--ckpt-every", "2", *COMMON])
    return out


def losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def params(run: Path, step: int = STEPS) -> dict:
    """The whole model's parameters at ``step``, whatever layout wrote them."""
    from tests.train.conftest import ckpt_model

    return ckpt_model(run / "checkpoints" / f"step-{step:08d}")


def assert_same_params(got: dict, want: dict, what: str = "") -> None:
    assert set(got) == set(want), what
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-6, msg=f"{what} {name}")
