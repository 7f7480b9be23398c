"""The p2p engine under real mpirun, on a toy model (no GPT needed)."""
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.mpi import run_mpi

SCRIPT = Path(__file__).with_name("scripts") / "toy_engine.py"
pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("P,schedule,M", [(3, "1f1b", 5)])
def test_toy_pipeline_matches_single_process(P, schedule, M):
    res = run_mpi([sys.executable, SCRIPT, "--schedule", schedule, "--microbatches", M], np=P, timeout=90).check()
    last = res.results[-1]
    assert last["losses"][0] == pytest.approx(last["ref_loss"], rel=1e-6, abs=1e-7)
    assert last["losses"][1] == pytest.approx(last["losses"][0], rel=1e-6)
    for s, r in enumerate(res.results):
        assert r["max_grad_diff"] < 1e-6, (s, r)
        # 1F1B holds at most P - s micro-batches of activations, GPipe all M
        assert r["peak_live"] == (min(P - s, M) if schedule == "1f1b" else M)
        # last_backward wraps the one backward after which all gradients are final
        assert r["last_backward_ok"], s
    assert res.results[1]["bits_ok"] == {"torch.bfloat16": True, "torch.float16": True}


@pytest.mark.parametrize("how", ["kill"])  # "exit" (os._exit) behaves the same
def test_dead_stage_ends_job(how):
    # rank 1 vanishes mid-run (os._exit or SIGKILL) while rank 0 waits for its messages
    t = time.monotonic()
    res = run_mpi([sys.executable, SCRIPT, "--die-at", 1, "--die-how", how, "--timeout", 20], np=2, timeout=90)
    assert not res.timed_out and res.returncode != 0
    assert time.monotonic() - t < 60


def test_hung_stage_times_out_and_aborts():
    # rank 1 stays alive but silent: rank 0's wait times out and MPI_Abort ends the job
    t = time.monotonic()
    res = run_mpi([sys.executable, SCRIPT, "--hang", 1, "--timeout", 3], np=2, timeout=90)
    assert not res.timed_out and res.returncode != 0
    assert "presumed dead" in res.stderr
    assert time.monotonic() - t < 60
