"""Checkpoints written by the previous release (format version 1: `model.pt`/`optim.pt` of a
data-parallel run, `model-stage{s}.pt`/`optim-stage{s}.pt` of a pipeline) still load and
continue. The fixtures in tests/fixtures/checkpoints/ were written at step 2 of 4 by that
release, on this test's dataset and shape (the pipeline conftest's COMMON), next to the losses
of their uninterrupted runs; continuing them here reproduces steps 3 and 4."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.mpi import REPO, run_mpi
from tests.parallel.pipeline.conftest import COMMON, ENV, STEPS, assert_same_params, losses, params
from tests.train.conftest import run_train

FIXTURES = REPO / "tests" / "fixtures" / "checkpoints"
SCRIPT = Path(__file__).with_name("scripts") / "pp_train.py"


def _fixture(kind: str, tmp_path) -> Path:
    """A copy of the fixture checkpoint (the tests never write into the repository)."""
    src = FIXTURES / f"v1-{kind}" / "step-00000002"
    dst = tmp_path / f"v1-{kind}" / "step-00000002"
    shutil.copytree(src, dst)
    return dst


def _recorded(kind: str) -> list[float]:
    rec = json.loads((FIXTURES / f"v1-{kind}" / "losses.json").read_text())
    return [rec[str(s)] for s in range(3, STEPS + 1)]


@pytest.mark.parametrize("kind", ["dp", "pp"])
def test_version_1_checkpoint_continues_in_one_process(kind, reference, pp_dataset, tmp_path):
    ck = _fixture(kind, tmp_path)
    out = tmp_path / "run"
    r = run_train(["--data", str(pp_dataset), "--out", str(out), "--accum", "4", "--steps", str(STEPS),
                   "--resume", str(ck), *COMMON])
    assert f"resumed from {ck} at step 2" in r.stdout
    assert losses(out) == pytest.approx(_recorded(kind), rel=1e-5, abs=1e-6)
    # and equal to this release's uninterrupted run
    assert losses(out) == pytest.approx(losses(reference)[2:], rel=1e-5, abs=1e-6)
    assert_same_params(params(out), params(reference), f"v1-{kind} -> 1 process")


@pytest.mark.mpi
def test_version_1_pipeline_checkpoint_continues_as_pipeline(reference, pp_dataset, tmp_path):
    ck = _fixture("pp", tmp_path)
    base = tmp_path / "run"
    run_mpi([sys.executable, SCRIPT, base, "1f1b", "--", "--data", pp_dataset, "--pipeline-stages", "2", *COMMON,
             "--microbatches", "4", "--steps", str(STEPS), "--resume", ck], np=2, env=ENV, timeout=150).check()
    run = Path(f"{base}-1f1b")
    assert losses(run) == pytest.approx(_recorded("pp"), rel=1e-5, abs=1e-6)
    assert_same_params(params(run), params(reference), "v1-pp -> P2")


@pytest.mark.parametrize("kind", ["dp", "pp"])
def test_version_1_checkpoint_generates_and_exports(kind, tmp_path):
    ck = _fixture(kind, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    gen = [sys.executable, "-m", "hpcllm", "generate", "--prompt", "the ", "--max-new-tokens", "6",
           "--temperature", "0"]
    direct = subprocess.run(gen[:4] + [str(ck)] + gen[4:], capture_output=True, text=True, env=env, timeout=120)
    assert direct.returncode == 0, direct.stderr
    out = tmp_path / "model.pt"
    r = subprocess.run([sys.executable, "-m", "hpcllm", "export", str(ck), "--out", str(out)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    exported = subprocess.run(gen[:4] + [str(out)] + gen[4:], capture_output=True, text=True, env=env, timeout=120)
    assert exported.returncode == 0 and exported.stdout == direct.stdout and direct.stdout.startswith("the ")
