"""The GPT: exact parameter counts, per-name initialisation, slices, causality, FLOPs."""
import pytest
import torch
import torch.nn.functional as F

from hpcllm.model.gpt import (CPU_MATMUL_ATTENTION_MAX_T, GPT, PRESETS, Block, GPTConfig, causal_attention,
                              flops_per_token, param_count, preset)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_param_count_matches_module(pos_emb):
    for name in ("tiny", "mini", "small"):
        cfg = preset(name, pos_emb=pos_emb)
        assert GPT(cfg).num_params() == param_count(cfg)


def test_param_count_of_large_presets_on_meta():
    # the big shapes are counted without allocating memory
    for name in ("124M", "1.3B"):
        with torch.device("meta"):
            m = GPT(PRESETS[name])
        assert m.num_params() == param_count(PRESETS[name])
    # GPT-2 small with its vocabulary padded to 50304: the well-known 124M
    assert param_count(PRESETS["124M"]) == 124_475_904
    assert 170e9 < param_count(PRESETS["175B"]) < 180e9


def test_vocab_padded_to_64_and_head_tied():
    cfg = preset("tiny", vocab_size=257)
    m = GPT(cfg)
    assert cfg.padded_vocab == 320 and m.wte.weight.shape == (320, cfg.d_model)
    logits = m(torch.randint(0, 257, (2, 8)))
    assert logits.shape == (2, 8, 320)
    loss = m(torch.randint(0, 257, (2, 8)), torch.randint(0, 257, (2, 8)))
    loss.backward()
    # the head shares the embedding: the grad reaches wte through the logits
    assert m.wte.weight.grad is not None and m.wte.weight.grad[:257].abs().sum() > 0


def test_flops_per_token_is_6n_plus_attention():
    cfg = PRESETS["124M"]
    n = param_count(cfg, embeddings=False) - 2 * cfg.d_model - cfg.n_layer * (4 * cfg.d_model + 9 * cfg.d_model)
    expected = 6 * (n + cfg.d_model * cfg.padded_vocab) + 12 * cfg.n_layer * cfg.seq_len * cfg.d_model
    assert flops_per_token(cfg) == expected


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_init_is_per_name_so_slices_match_the_whole(pos_emb):
    cfg = GPTConfig(n_layer=4, n_head=2, d_model=32, seq_len=16, vocab_size=100, pos_emb=pos_emb)
    whole = GPT(cfg)
    whole.init_weights(7)
    stage = GPT(cfg, layers=range(2, 4), embed=False, head=True)
    stage.init_weights(7)
    ws = whole.state_dict()
    for k, v in stage.state_dict().items():
        assert torch.equal(v, ws[k]), k
    # a different seed gives different weights; same seed same weights
    other = GPT(cfg)
    other.init_weights(8)
    assert not torch.equal(other.wte.weight, whole.wte.weight)
    # the slices compose to the whole model's forward
    first = GPT(cfg, layers=range(0, 2), embed=True, head=False)
    first.init_weights(7)
    idx = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(stage(first(idx)), whole(idx), rtol=0, atol=0)


def test_gpt2_init_statistics():
    cfg = preset("small")
    m = GPT(cfg)
    m.init_weights(0)
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - 0.02 / (2 * cfg.n_layer) ** 0.5) < 1e-3
    assert torch.all(m.blocks[0].ln_1.weight == 1) and torch.all(m.blocks[0].attn.qkv.bias == 0)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_causal(pos_emb):
    cfg = preset("tiny", pos_emb=pos_emb)
    m = GPT(cfg)
    idx = torch.randint(0, 257, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % 257
    a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_block_is_standalone():
    cfg = preset("tiny")
    blk = Block(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    assert blk(x).shape == x.shape


def test_overfits_a_batch():
    torch.manual_seed(0)
    cfg = preset("tiny")
    m = GPT(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 257, (4, 32))
    y = torch.roll(x, -1, 1)
    first = None
    for _ in range(60):
        loss = m(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


@pytest.mark.parametrize("T", [7, 64, CPU_MATMUL_ATTENTION_MAX_T])
def test_cpu_matmul_attention_matches_sdpa(T):
    """The explicit bf16 attention used on CPUs for short sequences computes what SDPA does
    (causal: no position sees a later one), forward and backward, within bf16 rounding."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16) for _ in range(3))
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref.square().sum().backward()
    lp_in = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    out = causal_attention(*lp_in)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(lp_in, ref_in):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=1e-1, rtol=5e-2)
    # causality: changing the last position's key and value changes no earlier output
    k2, v2 = lp_in[1].detach().clone(), lp_in[2].detach().clone()
    k2[..., -1, :] += 1
    v2[..., -1, :] += 1
    out2 = causal_attention(lp_in[0].detach(), k2, v2)
    assert torch.equal(out2[..., :-1, :], out.detach()[..., :-1, :])
