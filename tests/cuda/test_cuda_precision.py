"""Precision on CUDA: --precision auto picks bf16 where the GPU has it, and fp16's dynamic loss
scaler finds an overflow in CUDA gradients, skips the step and halves the scale, in the library
and in a real `hpcllm train --device cuda --precision fp16` run."""
import json
import math

import pytest
import torch

from hpcllm.model.gpt import GPT, preset
from hpcllm.train.precision import LossScaler, autocast, grad_norm, resolve_precision

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")


def test_auto_precision_on_cuda_is_bf16_where_supported():
    p, why = resolve_precision("auto", DEV)
    if torch.cuda.is_bf16_supported():
        assert (p, why) == ("bf16", "the GPU supports bf16")
    else:
        assert p == "fp32"
    assert resolve_precision("fp16", DEV) == ("fp16", "as asked")


def _tiny():
    cfg = preset("tiny", n_layer=2, n_head=2, d_model=32, seq_len=32, vocab_size=257)
    return GPT(cfg, init_seed=0).to(DEV), cfg


def _backward(model, cfg, scaler):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 257, (4, cfg.seq_len), generator=g).to(DEV)
    y = torch.randint(0, 257, (4, cfg.seq_len), generator=g).to(DEV)
    model.zero_grad(set_to_none=True)
    with autocast("fp16", DEV):
        loss = model(x, y)
    scaler.scale_loss(loss).backward()
    return loss


def test_loss_scaler_skips_an_overflowing_cuda_step_and_halves_the_scale():
    model, cfg = _tiny()
    params = [p for p in model.parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = LossScaler(True, init_scale=2.0 ** 100)  # fp16 activation gradients overflow
    _backward(model, cfg, scaler)
    scaler.unscale_(params)
    norm = grad_norm(params)
    assert not math.isfinite(norm)
    overflow = not math.isfinite(norm)
    if not overflow:
        opt.step()
    scaler.update(overflow)
    assert scaler.scale == 2.0 ** 99 and scaler.skipped == 1 and scaler.good_steps == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed in a skipped step"


def test_unscaled_cuda_gradients_equal_the_unscaled_backward():
    model, cfg = _tiny()
    params = list(model.parameters())
    _backward(model, cfg, LossScaler(False))
    ref = [p.grad.clone() for p in params]
    scaler = LossScaler(True, init_scale=2.0 ** 10)
    _backward(model, cfg, scaler)
    scaler.unscale_(params)
    assert math.isfinite(grad_norm(params))
    for p, r in zip(params, ref):
        # fp16 rounding of the scaled activation gradients differs; power-of-two unscaling is exact
        torch.testing.assert_close(p.grad, r, rtol=2e-2, atol=1e-4)
    scaler.update(False)
    assert scaler.scale == 2.0 ** 10 and scaler.good_steps == 1


def test_cli_fp16_on_cuda_skips_overflowing_steps_and_keeps_the_weights(cuda_dataset, tmp_path):
    from tests.train.conftest import TINY, ckpt_model, run_train

    args = [a for a in TINY]
    args[args.index("--precision") + 1] = "fp16"
    run = tmp_path / "run"
    r = run_train(["--data", str(cuda_dataset), "--out", str(run), "--steps", "3", "--device", "cuda",
                   "--loss-scale", "1e30", "--ckpt-every", "0", *args])
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in recs if "loss" in x]
    assert [x["skipped"] for x in recs] == [1, 1, 1], r.stdout
    assert recs[-1]["loss_scale"] == pytest.approx(1e30 / 8)
    assert all(math.isfinite(x["loss"]) for x in recs)
    # no step was taken: the final checkpoint holds the initial weights
    config = json.loads((run / "config.json").read_text())
    from hpcllm.model.gpt import GPTConfig

    init = GPT(GPTConfig(**config["model"]), init_seed=0).state_dict()
    saved = ckpt_model(run / "checkpoints" / "step-00000003")
    for n, v in saved.items():
        assert torch.equal(v, init[n]), n


def test_cli_fp16_on_cuda_trains_with_the_default_scale(cuda_dataset, tmp_path):
    from tests.train.conftest import TINY, run_train

    args = [a for a in TINY]
    args[args.index("--precision") + 1] = "fp16"
    run = tmp_path / "run"
    run_train(["--data", str(cuda_dataset), "--out", str(run), "--steps", "6", "--device", "cuda",
               "--ckpt-every", "0", "--seed", "0", *args])
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in recs if "loss" in x]
    assert len(recs) == 6 and sum(x["skipped"] for x in recs) == 0
    assert recs[-1]["loss_scale"] == 65536.0
    assert recs[-1]["loss"] < recs[0]["loss"]
