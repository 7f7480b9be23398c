"""A pipeline stage that freezes (SIGSTOP: alive, never sending again) ends the whole job
after --stall-shutdown-s under real mpirun, through the stage transfer timeout."""
import pytest

from hpcllm import exitcodes
from tests.parallel.pipeline.conftest import COMMON
from tests.train.conftest import freeze_rank_until_exit, mpi_popen, train_cmd

pytestmark = [pytest.mark.mpi]


def test_frozen_stage_ends_the_job_after_stall_shutdown(pp_dataset, tmp_path):
    out = tmp_path / "run"
    marker = f"ppstall-{tmp_path.name}"
    shutdown_s = 5
    # no HPCLLM_PIPELINE_TIMEOUT: the transfer timeout must come from --stall-shutdown-s
    env = {"OMP_NUM_THREADS": "1"}
    p = mpi_popen(train_cmd("--data", str(pp_dataset), "--out", str(out), "--steps", "100000",
                            "--pipeline-stages", "2", "--microbatches", "2", "--ckpt-every", "0",
                            "--stall-check-s", "2", "--stall-shutdown-s", str(shutdown_s), *COMMON),
                  np=2, env=env, marker=marker)
    elapsed, err = freeze_rank_until_exit(p, marker, out, start_timeout=90, exit_timeout=120)
    assert p.returncode not in (0, exitcodes.REQUEUE), err[-3000:]
    assert shutdown_s <= elapsed < shutdown_s + 45, (elapsed, err[-3000:])
    # stage 0 names what it waited for: the frozen stage's transfer, or a collective
    assert "presumed dead" in err or "error: rank 0: stalled" in err, err[-3000:]
