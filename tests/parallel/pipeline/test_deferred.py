"""Deferred weight gradients (ZB-H1's bwd/wgt split) against plain autograd, in one process."""
import contextlib
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hpcllm.model.gpt import GPT, GPTConfig, lm_loss
from hpcllm.parallel.pipeline.deferred import WeightGradDeferral

CFG = GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=64)


def run(model, xs, ys, precision, recompute, deferral=None):
    """Forward + backward of each micro-batch (weight passes left to the caller when deferring)."""
    for mb, (x, y) in enumerate(zip(xs, ys)):
        fwd = deferral.forward() if deferral else contextlib.nullcontext()
        with fwd, torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            h = model.embed(x)
            for blk in model.block_list():
                h = checkpoint(blk, h, use_reentrant=False) if recompute else blk(h)
            with deferral.routing() if deferral else contextlib.nullcontext():  # the tied head
                logits = model.logits(h)
            loss = lm_loss(logits, y) / len(xs)
        with deferral.backward(mb) if deferral else contextlib.nullcontext():
            loss.backward()


@pytest.mark.parametrize("precision", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", [False, True], ids=["", "recompute"])
def test_deferred_weight_grads_equal_autograd(precision, recompute):
    torch.manual_seed(0)
    ref = GPT(CFG)
    mod = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 64, (3, 16), generator=g) for _ in range(3)]
    ys = [torch.randint(0, 64, (3, 16), generator=g) for _ in range(3)]
    run(ref, xs, ys, precision, recompute)

    d = WeightGradDeferral()
    assert d.install(mod) == 4 * CFG.n_layer  # qkv, proj, fc, proj per block
    fired = []
    for n, p in mod.named_parameters():
        p.register_post_accumulate_grad_hook(lambda q, n=n: fired.append(n))
    run(mod, xs, ys, precision, recompute, d)
    linear = {n for n, m in mod.named_modules() if isinstance(m, torch.nn.Linear)}
    deferred = {n for n, _ in mod.named_parameters() if n.rsplit(".", 1)[0] in linear} | {"wte.weight"}
    # after the input passes only the non-linear parameters have gradients (wte from the
    # embedding; its head share is deferred), and no hook fired for a deferred one
    have = {n for n, p in mod.named_parameters() if p.grad is not None}
    assert have == {n for n, _ in mod.named_parameters() if n not in deferred} | {"wte.weight"}
    assert d.outstanding == 3
    fired.clear()
    d.apply(0, through_autograd=False)  # in place: no hooks
    d.apply(1, through_autograd=False)
    assert fired == []
    d.apply(2)  # through autograd: each deferred parameter's hook once
    assert sorted(fired) == sorted(deferred) and d.outstanding == 0
    for (n, p), q in zip(ref.named_parameters(), mod.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_keyword_arguments_and_bias_free_linear_are_deferred():
    w = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(2, 4, requires_grad=True)
    d = WeightGradDeferral()
    with d.routing():  # routes only while the deferral is active
        assert torch.nn.functional.linear(input=x, weight=w).grad_fn.name() != "_DeferredLinearBackward"
    with d.forward(), d.routing():
        out = torch.nn.functional.linear(input=x, weight=w)
    with d.backward(0):
        out.square().sum().backward()
    assert w.grad is None and x.grad is not None and d.outstanding == 1
    d.apply(0)
    torch.testing.assert_close(w.grad, (2 * out.detach()).t() @ x.detach())


def test_linear_fed_by_data_is_not_deferred():
    # an input without gradient: nothing calls the backward that would stash the weight work
    lin = torch.nn.Linear(4, 4)
    d = WeightGradDeferral()
    d.install(lin)
    x = torch.randn(2, 4)
    with d.forward():
        out = lin(x)
    with d.backward(0):
        out.sum().backward()
    assert lin.weight.grad is not None and d.outstanding == 0


def test_installed_layers_are_plain_while_the_deferral_is_inactive():
    # evaluation, or the model used outside the engine: ordinary autograd
    lin = torch.nn.Linear(4, 4)
    d = WeightGradDeferral()
    d.install(lin)
    x = torch.randn(2, 4, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad is not None and d.outstanding == 0


@pytest.mark.parametrize("recompute", [False, True], ids=["", "recompute"])
def test_engine_defers_every_linear_of_a_real_stage_including_the_tied_head(recompute):
    # what PipelineEngine wires for zbh1 on a GPT stage: its blocks' nn.Linear layers and the
    # tied head (an F.linear call) all leave their gradients to the weight pass, whose result
    # equals plain autograd's; the equivalence tests would pass even if nothing were deferred
    from hpcllm.parallel.pipeline.engine import PipelineEngine
    from hpcllm.parallel.pipeline.partition import Partition
    from hpcllm.parallel.pipeline.stage import PipelineStage

    part = Partition.from_counts([1, 1])
    ref = PipelineStage(CFG, part, 1, seed=3)
    st = PipelineStage(CFG, part, 1, seed=3, recompute=recompute)
    # the last of 2 stages: its channels only allocate buffers, no MPI call is made here
    eng = PipelineEngine(st, None, 1, 2, "zbh1", 2, (2, CFG.seq_len, CFG.d_model), torch.float32)
    d = eng.deferral
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, CFG.seq_len, CFG.d_model, generator=g)
    y = torch.randint(0, 64, (2, CFG.seq_len), generator=g)
    ref(h.clone().requires_grad_(True), y).backward()
    with d.forward():
        loss = st(h.clone().requires_grad_(True), y)
    with d.backward(0):
        loss.backward()
    linear = {n for n, m in st.gpt.named_modules() if isinstance(m, torch.nn.Linear)}
    deferred = {n for n, _ in st.named_parameters() if n.rsplit(".", 1)[0] in linear} | {"wte.weight"}
    assert {n for n, p in st.named_parameters() if p.grad is None} == deferred
    d.apply(0)
    for (n, p), q in zip(ref.named_parameters(), st.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
