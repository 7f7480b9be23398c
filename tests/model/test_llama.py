"""The Llama-style architecture: exact parameter counts of the named shapes, flags and
refusals, grouped-query attention equal to its repeated-heads form, KV cache == recompute."""
import pytest
import torch

from hpcllm.config import ModelConfig, resolve_model
from hpcllm.errors import HpcllmError
from hpcllm.model.gpt import GPT, PRESETS, flops_per_token, llama_ffn_dim, param_count, preset


@pytest.mark.parametrize("name,count", [("llama-1B", 1_235_814_400), ("llama-3B", 3_212_749_824),
                                        ("llama-8B", 8_030_261_248)])
def test_named_shapes_have_the_published_parameter_counts(name, count):
    cfg = PRESETS[name]
    assert param_count(cfg) == count
    with torch.device("meta"):
        assert GPT(cfg, init_seed=None).num_params() == count
    # 6N-style check of the FLOPs: 3 x 2 x (matmul weights) + attention
    d, L = cfg.d_model, cfg.n_layer
    matmul = L * (d * (d + 2 * cfg.kv_dim) + d * d + 3 * d * cfg.hidden_dim) + d * cfg.padded_vocab
    assert flops_per_token(cfg) == 3 * (2 * matmul + 2 * L * 2 * cfg.seq_len * d)


def test_ffn_rule_and_small_shapes():
    assert llama_ffn_dim(4096) == 11008 and llama_ffn_dim(2048) == 5632 and llama_ffn_dim(64) == 192
    for name in ("llama-tiny", "llama-mini", "llama-small"):
        cfg = PRESETS[name]
        m = GPT(cfg)
        assert m.num_params() == param_count(cfg)
        assert m.lm_head is not None and not any(n.endswith(".bias") for n, _ in m.named_parameters())


def test_flags_resolve_and_refuse():
    cfg = resolve_model(ModelConfig(model="tiny", arch="llama", n_kv_head=1), 257)
    assert cfg.arch == "llama" and cfg.pos_emb == "rope" and not cfg.bias and not cfg.tie_embeddings
    assert cfg.n_kv_head == 1 and cfg.n_layer == PRESETS["tiny"].n_layer
    tied = resolve_model(ModelConfig(model="llama-tiny", tie_embeddings=True), 257)
    assert tied.tie_embeddings and GPT(tied).lm_head is None
    with pytest.raises(HpcllmError, match=r"--n-kv-head 3 does not divide --n-head 4"):
        resolve_model(ModelConfig(model="llama-tiny", n_kv_head=3), 257)
    with pytest.raises(HpcllmError, match="needs --arch llama"):
        resolve_model(ModelConfig(model="tiny", n_kv_head=1), 257)
    with pytest.raises(HpcllmError, match="rotary"):
        resolve_model(ModelConfig(model="llama-tiny", pos_emb="learned"), 257)
    # a new head count keeps the preset's grouping
    assert resolve_model(ModelConfig(model="llama-tiny", n_head=8), 257).n_kv_head == 4


def test_grouped_query_attention_equals_repeated_heads():
    """n_kv_head 2 of 4 equals a full multi-head model whose k/v rows repeat each group's."""
    gqa = preset("llama-tiny", seq_len=32)
    mha = preset("llama-tiny", seq_len=32, n_kv_head=4)
    a, b = GPT(gqa, init_seed=3), GPT(mha, init_seed=3)
    sd = a.state_dict()
    d, hd = gqa.d_model, gqa.head_dim
    for i in range(gqa.n_layer):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w[:d], w[d:d + gqa.kv_dim], w[d + gqa.kv_dim:]
        rep = lambda t: t.view(gqa.n_kv_head, hd, d).repeat_interleave(2, dim=0).reshape(d, d)  # noqa: E731
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    b.load_state_dict(sd)
    x = torch.randint(0, 257, (2, 20))
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_kv_cache_equals_recompute(tied):
    from hpcllm.infer.generate import SampleConfig, generate_ids

    cfg = preset("llama-tiny", seq_len=96, tie_embeddings=tied)
    m = GPT(cfg, init_seed=2).eval()
    x = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        kv = m.new_kv_cache(2, 96)
        assert kv.k.shape[2] == cfg.n_kv_head  # the cache holds the key/value heads only
        parts = [m(x[:, :25], kv=kv)] + [m(x[:, t:t + 1], kv=kv) for t in range(25, 40)]
        torch.testing.assert_close(torch.cat(parts, 1), m(x), rtol=1e-5, atol=1e-5)
    for prompt in ([1, 2, 3], list(b"the scheduler trains")):
        kw = dict(seq_len=96, vocab_size=257)
        s = SampleConfig(max_new_tokens=64, temperature=0, stop_at_eod=False)
        fast = generate_ids(m, prompt, s, **kw)
        s.kv_cache = False
        assert fast == generate_ids(m, prompt, s, **kw)


def test_planner_counts_untied_heads():
    from hpcllm.plan.memory import Shape

    cfg = PRESETS["llama-8B"]
    shape = Shape.from_config(cfg)
    assert shape.params == 8_030_261_248 and not shape.tied
    assert shape.embed_params + cfg.n_layer * shape.block_params + shape.head_params == shape.params
