"""Checkpoint/resume: a resumed run reproduces the uninterrupted run exactly, after a
stop request (2 ranks under mpirun, signal to one rank only) and after kill -9 during a
checkpoint write."""
import os
import signal
import subprocess
import time

import pytest
import torch

from hpcllm import exitcodes
from hpcllm.train import checkpoint as ckpt
from hpcllm.train.metrics import read_metrics
from tests.cluster.mpi import run_mpi
from tests.train.conftest import (TINY, ckpt_model, ckpt_optim, kill_tree, losses, mpi_popen, rank_pids, run_train, train_cmd,
                                  wait_for)


def _args(data, out, steps, ckpt_every, micro=2, accum=2):
    return [*TINY, "--data", str(data), "--out", str(out), "--steps", str(steps), "--micro-batch", str(micro),
            "--accum", str(accum), "--ckpt-every", str(ckpt_every), "--keep-checkpoints", "2"]


def _assert_identical_runs(ref, resumed, steps):
    la, lb = losses(ref), losses(resumed)
    assert sorted(lb) == list(range(1, steps + 1)), sorted(lb)
    assert la == lb  # exact, not approximately
    wa = ckpt_model(ref / "checkpoints" / f"step-{steps:08d}")
    wb = ckpt_model(resumed / "checkpoints" / f"step-{steps:08d}")
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = ckpt_optim(ref / "checkpoints" / f"step-{steps:08d}")
    ob = ckpt_optim(resumed / "checkpoints" / f"step-{steps:08d}")
    assert set(oa) == set(ob) and oa
    for i in oa:
        for key in oa[i]:
            assert torch.equal(oa[i][key], ob[i][key]), (i, key)


@pytest.mark.mpi
@pytest.mark.parametrize("zero", ["0", "3"])
def test_stop_request_on_one_rank_checkpoints_exits_75_and_resume_is_exact(dataset, tmp_path, zero):
    steps = 50
    out = tmp_path / "run"
    marker = f"stop-{tmp_path.name}"
    z = ["--zero-stage", zero]  # ZeRO-3: the stop's checkpoint is every rank's shards
    p = mpi_popen(train_cmd(*_args(dataset, out, steps, 25, accum=1), *z), np=2, env={}, marker=marker)
    try:
        wait_for(lambda: any(rec["step"] >= 3 for rec in read_metrics(out)), 60, "step 3")
        pids = rank_pids(marker)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGUSR1)  # only rank 1: the ranks must agree to stop together
        stdout, stderr = p.communicate(timeout=60)
    finally:
        kill_tree(p)
    assert p.returncode == exitcodes.REQUEUE, stdout + stderr
    stopped = ckpt.latest_checkpoint(out)
    stopped_at = int(stopped.name[5:])
    assert 3 <= stopped_at < steps and "stop requested (on another rank)" in stdout
    assert max(losses(out)) == stopped_at

    res = run_mpi(train_cmd(*_args(dataset, out, steps, 25, accum=1), "--resume", "auto", *z), np=2,
                  env={"OMP_NUM_THREADS": "1"}, timeout=120)
    res.check()
    assert f"resumed from {stopped} at step {stopped_at}" in res.stdout
    ref = tmp_path / "ref"
    run_mpi(train_cmd(*_args(dataset, ref, steps, 25, accum=1), *z), np=2, env={"OMP_NUM_THREADS": "1"},
            timeout=120).check()
    _assert_identical_runs(ref, out, steps)


def test_kill_9_during_checkpoint_write_then_resume_is_exact(dataset, tmp_path):
    steps = 12
    ref = tmp_path / "ref"
    run_train(_args(dataset, ref, steps, 4))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ckpt.Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1",
               HPCLLM_TEST_CKPT_SLEEP="8:60")
    p = subprocess.Popen(train_cmd(*_args(dataset, out, steps, 4)), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        tmpdir = out / "checkpoints" / "step-00000008.tmp"
        wait_for(lambda: (tmpdir / "model-00000.pt").is_file(), 60, "the half-written checkpoint")
        time.sleep(0.2)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
    finally:
        kill_tree(p)
    assert p.returncode == -signal.SIGKILL
    # the half-written step 8 is not visible; latest still names the complete step 4
    assert tmpdir.is_dir() and not (tmpdir / "trainer.json").exists()
    assert ckpt.latest_checkpoint(out).name == "step-00000004"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert max(losses(out)) == 8  # the killed run had logged past its last checkpoint

    r = run_train(_args(dataset, out, steps, 4) + ["--resume", "auto"])
    assert "at step 4" in r.stdout
    assert not tmpdir.exists()  # the stale .tmp was cleaned
    _assert_identical_runs(ref, out, steps)
    # retention: only the newest 2 remain
    assert [d.name for d in ckpt.list_checkpoints(out)] == ["step-00000008", "step-00000012"]
