"""Failures under real mpirun: a NaN loss stops every rank and names the step and rank; an
fp16 overflow is skipped on every rank alike; a killed rank ends the job in bounded time."""
import json
import os
import re
import signal
import time

import pytest
import torch

from hpcllm import exitcodes
from hpcllm.train import checkpoint as ckpt
from hpcllm.train.metrics import read_metrics
from tests.cluster.mpi import run_mpi
from tests.train.conftest import TINY, ckpt_model, ckpt_optim, freeze_rank_until_exit, kill_tree, mpi_popen, rank_pids, train_cmd, wait_for

pytestmark = [pytest.mark.mpi]
ENV = {"OMP_NUM_THREADS": "1"}


def _args(data, out, steps, *extra):
    return [*TINY, "--data", str(data), "--out", str(out), "--steps", str(steps), "--micro-batch", "2",
            "--accum", "1", *extra]


def test_nan_loss_on_one_rank_stops_all_with_step_and_rank(dataset, tmp_path):
    out = tmp_path / "run"
    res = run_mpi(train_cmd(*_args(dataset, out, 10, "--ckpt-every", "4")), np=2,
                  env={**ENV, "HPCLLM_TEST_NAN_AT": "6,1"}, timeout=120)
    assert res.returncode != 0 and not res.timed_out
    assert "non-finite loss at step 6 on rank 1" in res.stderr, res.output()
    # the last good checkpoint is intact and loadable; nothing was written at or after the NaN
    good = ckpt.latest_checkpoint(out)
    assert good.name == "step-00000004"
    assert [d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("step-")] == ["step-00000004"]
    state = ckpt_model(good)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert max(r["step"] for r in read_metrics(out)) == 5


def test_fp16_overflow_skips_the_step_on_every_rank(dataset, tmp_path):
    out = tmp_path / "run"
    # 2**20 overflows this model's fp16 gradients (in the backward and in the fp16 allreduce):
    # the first few steps are skipped, halving the scale each time, then training proceeds
    res = run_mpi(train_cmd(*_args(dataset, out, 7, "--precision", "fp16", "--loss-scale", str(2 ** 20),
                                   "--grad-compression", "fp16", "--ckpt-every", "1",
                                   "--keep-checkpoints", "10")),
                  np=2, env=ENV, timeout=120)
    res.check()
    recs = {r["step"]: r for r in read_metrics(out)}
    skipped = [recs[s]["skipped"] for s in range(1, 8)]
    k = skipped.index(0)
    assert k >= 1 and skipped == [1] * k + [0] * (7 - k), skipped
    assert [recs[s]["loss_scale"] for s in range(1, k + 1)] == [2.0 ** (20 - s) for s in range(1, k + 1)]
    # skipped steps really left the model and the optimizer untouched
    from hpcllm.model.gpt import GPT, GPTConfig

    cfg = json.loads((out / "config.json").read_text())["model"]
    init = GPT(GPTConfig(**cfg))
    init.init_weights(0)
    at_k = ckpt_model(out / "checkpoints" / f"step-{k:08d}")
    for name, v in init.state_dict().items():
        assert torch.equal(v, at_k[name]), name
    assert ckpt_optim(out / "checkpoints" / f"step-{k:08d}") == {}
    after = ckpt_model(out / "checkpoints" / f"step-{k + 1:08d}")
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], at_k["blocks.0.attn.qkv.weight"])
    trainer = json.loads((out / "checkpoints" / "step-00000007" / "trainer.json").read_text())
    assert trainer["loss_scaler"]["skipped"] == k and trainer["loss_scaler"]["scale"] == 2.0 ** (20 - k)
    assert all(torch.isfinite(v).all() for v in ckpt_model(out / "checkpoints" / "step-00000007").values())


def test_killed_rank_ends_the_job_in_bounded_time(dataset, tmp_path):
    out = tmp_path / "run"
    marker = f"kill-{tmp_path.name}"
    p = mpi_popen(train_cmd(*_args(dataset, out, 100000, "--ckpt-every", "0", "--stall-check-s", "10", "--stall-shutdown-s", "20")),
                  np=2, env={}, marker=marker)
    try:
        wait_for(lambda: any(r["step"] >= 3 for r in read_metrics(out)), 60, "step 3")
        pids = rank_pids(marker)
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        p.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        kill_tree(p)
    assert p.returncode not in (0, exitcodes.REQUEUE)
    assert elapsed < 30, elapsed


def test_hung_rank_is_shut_down_by_the_stall_check(dataset, tmp_path):
    """A rank that stops answering (SIGSTOP: alive, holding its sockets, never joining the next
    allreduce) is the case neither the launcher nor Horovod's stall inspector can see (Horovod's
    background thread blocks in the negotiation's own MPI collective). hpcllm's watchdog must
    warn after --stall-check-s and end the whole job after --stall-shutdown-s."""
    out = tmp_path / "run"
    marker = f"stall-{tmp_path.name}"
    check_s, shutdown_s = 2, 6
    p = mpi_popen(train_cmd(*_args(dataset, out, 100000, "--ckpt-every", "0", "--stall-check-s", str(check_s),
                                   "--stall-shutdown-s", str(shutdown_s))),
                  np=2, env={}, marker=marker)
    elapsed, err = freeze_rank_until_exit(p, marker, out, start_timeout=60, exit_timeout=90)
    assert p.returncode not in (0, exitcodes.REQUEUE), err[-3000:]
    # not before the shutdown time (the check really waited), and well before any default
    assert shutdown_s <= elapsed < shutdown_s + 40, (elapsed, err[-3000:])
    # the waiting rank names itself, what it waited in and the step, then a warning came first
    assert re.search(r"error: rank 0: stalled \d+ s waiting for the other ranks in .*\(step \d+\)", err), err[-3000:]
    assert "warning: rank 0: waiting" in err, err[-3000:]
