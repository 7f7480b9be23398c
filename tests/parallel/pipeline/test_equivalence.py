"""Pipeline training under real mpirun equals single-process training (fp32, tight tolerance).

The single-process reference trains with `--accum 4`; the pipelines see the same global
batch: P=2 with 4 micro-batches, and P=2 x D=2 with 2 micro-batches per replica.  Losses of
every step and the parameters after the last step must match, for both schedules.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.cluster.mpi import run_mpi
from tests.train.conftest import run_train

SCRIPT = Path(__file__).with_name("scripts") / "pp_train.py"
pytestmark = pytest.mark.mpi

STEPS = 3
COMMON = ["--model", "tiny", "--n-layer", "4", "--n-head", "2", "--d-model", "32", "--seq-len", "32",
          "--threads", "1", "--precision", "fp32", "--warmup", "1", "--lr", "3e-3", "--log-every", "1",
          "--micro-batch", "2", "--steps", str(STEPS), "--grad-clip", "0.3", "--seed", "3"]
ENV = {"OMP_NUM_THREADS": "1", "HPCLLM_PIPELINE_TIMEOUT": "60"}


def losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def params(run: Path) -> dict:
    ck = run / "checkpoints" / f"step-{STEPS:08d}"
    if (ck / "model.pt").exists():
        return torch.load(ck / "model.pt", weights_only=True)
    out = {}
    for f in sorted(ck.glob("model-stage*.pt")):
        out.update(torch.load(f, weights_only=True))
    return out


@pytest.fixture(scope="module")
def reference(pp_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_train(["--data", str(pp_dataset), "--out", str(out), "--accum", "4", *COMMON])
    return out


@pytest.mark.parametrize("np_,dp_args", [(2, ["--microbatches", "4"]), (4, ["--microbatches", "2"])],
                         ids=["P2", "P2xD2"])
def test_pipeline_matches_single_process(reference, pp_dataset, tmp_path, np_, dp_args):
    base = tmp_path / "pp"
    res = run_mpi([sys.executable, SCRIPT, base, "1f1b,gpipe", "--", "--data", pp_dataset, "--pipeline-stages", "2",
                   *dp_args, *COMMON], np=np_, env=ENV, timeout=150)
    res.check()
    ref_losses, ref_params = losses(reference), params(reference)
    assert len(ref_losses) == STEPS
    for sched in ("1f1b", "gpipe"):
        run = Path(f"{base}-{sched}")
        assert losses(run) == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), sched
        got = params(run)
        assert set(got) == set(ref_params)
        for name, want in ref_params.items():
            torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=f"{sched} {name}")
        # the parameters moved: the comparison is not between two untouched initialisations
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["pipeline"]["stages"] == 2 and cfg["pipeline"]["schedule"] == sched
    assert ref_losses[-1] < ref_losses[0]
