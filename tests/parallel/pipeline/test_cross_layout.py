"""One checkpoint format for every layout: a run checkpointed under one layout continues under
another with the losses of the uninterrupted run (fp32), in both directions: data parallel
<-> pipeline, P x D -> DP on 4 ranks and -> 1 process, and a pipeline whose blocks move
between stages. The uninterrupted run is the single-process reference (`--accum 4`); every
layout sees the same global batch of 8 sequences per step."""
import sys
from pathlib import Path

import pytest

from tests.cluster.mpi import run_mpi
from tests.parallel.pipeline.conftest import COMMON, ENV, STEPS, assert_same_params, losses, params
from tests.train.conftest import run_train, train_cmd

SCRIPT = Path(__file__).with_name("scripts") / "pp_train.py"
pytestmark = [pytest.mark.mpi, pytest.mark.slow]
#: both halves of an interrupted run use the uninterrupted run's LR schedule
SCHED = ["--decay-steps", str(STEPS)]
HALF = STEPS // 2


def _dp(np_, data, out, steps, *extra, accum):
    args = ["--data", str(data), "--out", str(out), "--steps", str(steps), "--accum", str(accum),
            "--ckpt-every", str(HALF), *SCHED, *COMMON, *extra]
    if np_ == 1:
        run_train(args)
    else:
        run_mpi(train_cmd(*args), np=np_, env=ENV, timeout=150).check()


def _pp(np_, data, base, steps, *extra, microbatches):
    """A pipeline run ``{base}-1f1b``; returns its directory."""
    run_mpi([sys.executable, SCRIPT, base, "1f1b", "--", "--data", str(data), "--pipeline-stages", "2",
             "--steps", str(steps), "--microbatches", str(microbatches), "--ckpt-every", str(HALF), *SCHED,
             *COMMON, *extra], np=np_, env=ENV, timeout=150).check()
    return Path(f"{base}-1f1b")


def _assert_continues_uninterrupted(run, reference, what):
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6), what
    assert len(losses(run)) == STEPS
    assert_same_params(params(run), params(reference), what)


def test_data_parallel_checkpoint_continues_as_pipeline(reference, pp_dataset, tmp_path):
    base = tmp_path / "run"
    run = Path(f"{base}-1f1b")
    _dp(2, pp_dataset, run, HALF, accum=2)                              # DP on 2 ranks
    _pp(2, pp_dataset, base, STEPS, "--resume", "auto", microbatches=4)  # P=2 on 2 ranks
    _assert_continues_uninterrupted(run, reference, "DP2 -> P2")


def test_pipeline_replicas_checkpoint_continues_as_data_parallel_and_alone(reference, pp_dataset, tmp_path):
    base = tmp_path / "run"
    pp = _pp(4, pp_dataset, base, HALF, microbatches=2)                 # P=2 x D=2
    ck = pp / "checkpoints" / f"step-{HALF:08d}"
    dp4 = tmp_path / "dp4"
    _dp(4, pp_dataset, dp4, STEPS, "--resume", str(ck), accum=1)       # -> DP on 4 ranks
    alone = tmp_path / "alone"
    _dp(1, pp_dataset, alone, STEPS, "--resume", str(ck), accum=4)     # -> 1 process
    for run, what in ((dp4, "P2xD2 -> DP4"), (alone, "P2xD2 -> 1 process")):
        assert losses(run) == pytest.approx(losses(reference)[HALF:], rel=1e-5, abs=1e-6), what
        assert_same_params(params(run), params(reference), what)


def test_pipeline_blocks_move_between_stages(reference, pp_dataset, tmp_path):
    base = tmp_path / "run"
    run = _pp(2, pp_dataset, base, HALF, "--balance", "1,3", microbatches=4)
    _pp(2, pp_dataset, base, STEPS, "--balance", "3,1", "--resume", "auto", microbatches=4)
    _assert_continues_uninterrupted(run, reference, "P2 1,3 -> 3,1")
    import json

    trainer = json.loads((run / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert trainer["layout"]["bounds"] == [[0, 3], [3, 4]] and trainer["layout"]["pp"] == 2
