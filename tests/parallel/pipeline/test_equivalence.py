"""Pipeline training under real mpirun equals single-process training (fp32, tight tolerance).

The single-process reference trains with `--accum 4`; the pipelines see the same global
batch: P=2 with 4 micro-batches, and P=2 x D=2 with 2 micro-batches per replica.  Losses of
every step and the parameters after the last step must match, for both schedules.
"""
import json
import sys
from pathlib import Path

import pytest

from tests.cluster.mpi import run_mpi
from tests.parallel.pipeline.conftest import COMMON, ENV, STEPS, assert_same_params, losses, params

SCRIPT = Path(__file__).with_name("scripts") / "pp_train.py"
pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("np_,dp_args", [(2, ["--microbatches", "4"]), (4, ["--microbatches", "2"])],
                         ids=["P2", "P2xD2"])
def test_pipeline_matches_single_process(reference, pp_dataset, tmp_path, np_, dp_args):
    base = tmp_path / "pp"
    res = run_mpi([sys.executable, SCRIPT, base, "1f1b,gpipe", "--", "--data", pp_dataset, "--pipeline-stages", "2",
                   "--steps", STEPS, *dp_args, *COMMON], np=np_, env=ENV, timeout=150)
    res.check()
    ref_losses = losses(reference)
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    for sched in ("1f1b", "gpipe"):
        run = Path(f"{base}-{sched}")
        assert losses(run) == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), sched
        assert_same_params(params(run), params(reference), sched)
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["pipeline"]["stages"] == 2 and cfg["pipeline"]["schedule"] == sched
        assert cfg["pipeline"]["dp_size"] == np_ // 2
