"""The mixture-of-experts MLP on one process: routing and capacity by hand, the auxiliary
loss's formula (a uniform router gives 1.0) and its gradient, parameter and FLOP counts, one
expert == the dense MLP, generation with the KV cache == recomputing, flag errors, and a tiny
MoE whose load balance falls below 1.5 max/mean within 200 steps on the built-in corpus."""
import json
import math

import pytest
import torch

from hpcllm.model import moe
from hpcllm.model.gpt import GPT, GPTConfig, flops_per_token, param_count

CFG = dict(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=257)


def test_top1_and_top2_routing_and_capacity_drop_order_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.8, 0.1, 0.1]])
    r = moe.route(probs, 1)
    assert r.expert.tolist() == [0, 0, 0, 1] and r.token.tolist() == [0, 1, 3, 2]
    assert r.counts.tolist() == [3, 1, 0] and r.dropped == 0
    torch.testing.assert_close(r.gate, torch.tensor([0.7, 0.6, 0.8, 0.5]))
    # capacity ceil(0.75 * 4 * 1 / 3) = 1: expert 0 keeps its earliest token only
    r = moe.route(probs, 1, capacity_factor=0.75)
    assert r.token.tolist() == [0, 2] and r.expert.tolist() == [0, 1] and r.dropped == 2
    assert r.wanted.tolist() == [3, 1, 0] and r.counts.tolist() == [1, 1, 0]
    # top-2: gates renormalised; capacity ceil(0.75 * 4 * 2 / 3) = 2: first choices before second
    r = moe.route(probs, 2, capacity_factor=0.75)
    assert r.wanted.tolist() == [3, 4, 1]
    kept = list(zip(r.expert.tolist(), r.token.tolist()))
    assert kept == [(0, 0), (0, 1), (1, 2), (1, 0), (2, 2)]  # expert 1: token 2's first choice, then 0's second
    assert r.dropped == 3
    torch.testing.assert_close(r.gate[:2], torch.tensor([0.7 / 0.9, 0.6 / 0.9]))


def test_aux_loss_is_the_formula_and_uniform_router_gives_one():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.8, 0.1, 0.1]])
    wanted = moe.route(probs, 1).wanted  # f = [3/4, 1/4, 0]
    P = probs.mean(0)
    want = 3 * (0.75 * P[0] + 0.25 * P[1] + 0 * P[2])
    assert float(moe.load_balancing_loss(probs, wanted, 1)) == pytest.approx(float(want), rel=1e-6)
    for k in (1, 2):
        uniform = torch.full((10, 4), 0.25)
        w = moe.route(uniform, k).wanted
        assert float(moe.load_balancing_loss(uniform, w, k)) == pytest.approx(1.0, rel=1e-6)
    logits = torch.randn(5, 4)
    assert float(moe.z_loss(logits)) == pytest.approx(float((logits.exp().sum(-1).log() ** 2).mean()), rel=1e-5)


def test_aux_loss_gradient_enters_the_router_with_its_coefficient_and_scale():
    torch.manual_seed(0)
    x = torch.randint(0, 257, (2, 16))
    grads = {}
    for coef in (0.0, 0.5):
        cfg = GPTConfig(**{**CFG, "n_layer": 1}, moe_experts=4, moe_top_k=2, moe_aux_loss_coef=coef)
        m = GPT(cfg)
        seen = {}
        m.blocks[0].mlp.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0].detach()))
        moe.set_grad_scale(m, 0.25)
        (m(x, x) * 0.25).backward()
        grads[coef] = m.blocks[0].mlp.router.weight.grad.clone()
    w = m.blocks[0].mlp.router.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(seen["x"].reshape(-1, 32) @ w.t(), -1)
    aux = moe.load_balancing_loss(probs, moe.route(probs.detach(), 2).wanted, 2)
    (g_aux,) = torch.autograd.grad(aux, w)
    torch.testing.assert_close(grads[0.5], grads[0.0] + 0.5 * 0.25 * g_aux, rtol=1e-5, atol=1e-7)


def test_parameter_and_flop_counts_total_and_active():
    for kw in (dict(moe_experts=4), dict(moe_experts=8, moe_top_k=2, moe_every=2), dict(moe_experts=3, bias=False)):
        cfg = GPTConfig(**{**CFG, "n_layer": 4}, **kw)
        m = GPT(cfg)
        assert param_count(cfg) == m.num_params()
        dense = GPTConfig(**{**CFG, "n_layer": 4}, bias=kw.get("bias", True))
        d, h = cfg.d_model, cfg.hidden_dim
        mlp = 2 * d * h + (h + d if cfg.bias else 0)
        layers = len(moe.moe_layers(cfg))
        assert layers == (2 if kw.get("moe_every") == 2 else 4)
        assert param_count(cfg, active=True) == param_count(dense) + layers * ((cfg.moe_top_k - 1) * mlp + d * cfg.moe_experts)
        assert param_count(cfg) == param_count(dense) + layers * ((cfg.moe_experts - 1) * mlp + d * cfg.moe_experts)
        extra = layers * ((cfg.moe_top_k - 1) * 2 * d * h + d * cfg.moe_experts)
        assert flops_per_token(cfg) == flops_per_token(dense) + 6 * extra
    assert moe.moe_layers(GPTConfig(**{**CFG, "n_layer": 4}, moe_experts=2, moe_every=2)) == [1, 3]


def test_one_expert_is_the_dense_mlp():
    x = torch.randint(0, 257, (2, 16))
    a = GPT(GPTConfig(**CFG, moe_experts=1))
    b = GPT(GPTConfig(**CFG))
    b.load_state_dict({k.replace("experts.0.", ""): v for k, v in a.state_dict().items() if "router" not in k})
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_capacity_drops_in_training_only_and_stats():
    cfg = GPTConfig(**CFG, moe_experts=4, moe_capacity_factor=0.5)
    m = GPT(cfg)
    x = torch.randint(0, 257, (4, 16))
    m(x, x).backward()
    s = moe.summarize([moe.take_stats(m)])
    assert s["moe_dropped"] > 0.4 and sum(s["moe_tokens_per_expert"]) == 2 * 64
    m.eval()
    with torch.no_grad():
        full = m(x)
    m2 = GPT(GPTConfig(**CFG, moe_experts=4)).eval()
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(full, m2(x))  # evaluation never drops
    assert moe.take_stats(m) == {0: moe.MoEStats(4).take(), 1: moe.MoEStats(4).take()}  # eval records nothing


def test_kv_cache_generation_equals_recomputing():
    torch.manual_seed(1)
    m = GPT(GPTConfig(**{**CFG, "seq_len": 32}, moe_experts=4, moe_top_k=2, moe_capacity_factor=1.0)).eval()
    ids = torch.randint(0, 257, (1, 5))
    cache = m.new_kv_cache(1)
    with torch.no_grad():
        out = m(ids, kv=cache)
        seq = ids
        for _ in range(12):
            nxt = out[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            out = m(nxt, kv=cache)
            torch.testing.assert_close(out[:, -1], m(seq)[:, -1], rtol=1e-5, atol=1e-5)


def test_moe_flags_errors_are_one_line(tmp_path):
    from hpcllm.config import build_config, validate
    from hpcllm.errors import HpcllmError

    cases = [({"moe_top_k": 2}, "--moe-top-k: mixture-of-experts options need --moe-experts"),
             ({"expert_parallel": 2}, "--expert-parallel 2 splits the experts"),
             ({"moe_experts": 3, "expert_parallel": 2}, "--expert-parallel 2: does not divide --moe-experts 3"),
             ({"moe_experts": 4, "expert_parallel": 2, "tensor_parallel": 2}, "does not combine with --tensor-parallel"),
             ({"moe_experts": 4, "tensor_parallel": 2}, "--moe-experts does not combine with --tensor-parallel 2"),
             ({"ep_backend": "mpi4py"}, "--ep-backend applies to expert parallelism only")]
    for flags, msg in cases:
        with pytest.raises(HpcllmError, match=msg.replace("(", r"\(")):
            validate(build_config(**flags))
    from hpcllm.config import ModelConfig, resolve_model

    with pytest.raises(HpcllmError, match="--moe-top-k must be 1 or 2|more than the 1 experts"):
        resolve_model(ModelConfig(moe_experts=1, moe_top_k=2), 257)


def test_tiny_moe_balances_its_load_on_the_builtin_corpus(tmp_path):
    from tests.infer.conftest import stdlib_dataset
    from tests.train.conftest import run_train

    data = stdlib_dataset(tmp_path / "stdlib")
    out = tmp_path / "run"
    run_train(["--data", str(data), "--out", str(out), "--steps", "200", "--model", "tiny", "--seq-len", "64",
               "--micro-batch", "8", "--moe-experts", "4", "--moe-top-k", "2", "--moe-aux-loss-coef", "0.01",
               "--precision", "fp32", "--threads", "1", "--log-every", "20", "--eval-every", "0",
               "--ckpt-every", "0", "--lr", "3e-3", "--warmup", "20"], timeout=300)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    loads = [r["moe_load_max_mean"] for r in rows if "moe_load_max_mean" in r]
    assert len(loads) == 10 and loads[-1] < 1.5, loads
    assert all(math.isfinite(r["moe_aux_loss"]) and r["moe_aux_loss"] >= 1.0 - 1e-6 for r in rows if "moe_aux_loss" in r)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0


def test_plan_counts_every_expert_in_memory_and_the_active_ones_in_time():
    import subprocess
    import sys

    def plan(*extra):
        r = subprocess.run([sys.executable, "-m", "hpcllm", "plan", "--params", "1B", "--model", "124M", "--top", "1",
                            "--pipeline-stages", "1", "--micro-batch", "8", "--zero-stage", "0", "--no-recompute",
                            "--json", *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    dense, mix = plan(), plan("--moe-experts", "8")
    from hpcllm.model.gpt import PRESETS

    cfg = PRESETS["124M"]
    router = cfg.n_layer * cfg.d_model * 8
    assert mix["preset"]["params"] == pytest.approx(dense["preset"]["params"] + router)  # top-1: active
    mlp = 2 * cfg.d_model * 4 * cfg.d_model + 5 * cfg.d_model
    assert mix["preset"]["total_params"] == pytest.approx(dense["preset"]["params"] + router + cfg.n_layer * 7 * mlp)
    a, b = dense["layouts"][0], mix["layouts"][0]
    assert b["memory"]["params_count"] == pytest.approx(mix["preset"]["total_params"], rel=1e-3)
    assert b["time"]["compute"] == pytest.approx(a["time"]["compute"], rel=0.02)  # same active FLOPs (+ router)
    r = subprocess.run([sys.executable, "-m", "hpcllm", "plan", "--params", "1B", "--model", "124M", "--moe-experts", "1",
                        "--moe-top-k", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "more than the 1 experts" in r.stderr


def test_int8_quantized_moe_keeps_the_router_and_stays_close():
    from hpcllm.infer.quantize import quantize_int8

    torch.manual_seed(2)
    m = GPT(GPTConfig(**CFG, moe_experts=4, moe_top_k=2)).eval()
    x = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        want = m(x)
        q = quantize_int8(m)
        assert isinstance(q.blocks[0].mlp.router, torch.nn.Linear)
        got = q(x)
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
