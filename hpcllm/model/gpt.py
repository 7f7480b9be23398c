"""A decoder-only GPT in plain PyTorch: no parallelism inside, parallel/ wraps it.

Two architectures share the module tree (and so the parameter names, the pipeline split,
ZeRO units and checkpoints):

- ``arch="gpt2"``: pre-LayerNorm blocks, GELU MLP (4x), input and output embeddings tied,
  learned or rotary positions (rotary rotates interleaved pairs), biases;
- ``arch="llama"``: RMSNorm, SwiGLU MLP (``mlp.fc`` holds gate and up rows, hidden size
  8/3 d rounded up to a multiple), rotary positions rotating halves (as Llama and
  ``transformers`` do), grouped-query attention (``n_kv_head``), no biases, an untied
  ``lm_head`` unless ``tie_embeddings``.

Causal self-attention runs through ``F.scaled_dot_product_attention``; GPT-2
initialisation, no dropout. The vocabulary is padded to a multiple of 64 (``vocab_multiple``)
so the embedding and head matmuls hit fast kernel shapes; padded ids are never targets.

Initialisation is deterministic *per parameter name*: :func:`init_parameters` draws each
parameter from its own generator seeded by ``(seed, name)``. A pipeline stage that holds only
``blocks.4`` .. ``blocks.7`` (built with ``GPT(cfg, layers=range(4, 8), ...)`` or from bare
:class:`Block` modules registered under the same names) therefore gets exactly the values the
whole model would have, without materialising the whole model.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the embedding rows are padded to a multiple of this
VOCAB_MULTIPLE = 64
#: GPT-2's BPE vocabulary, the default for the named presets' parameter counts
GPT2_VOCAB = 50257


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT. ``vocab_size`` is the tokenizer's; the model pads it."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int = GPT2_VOCAB
    pos_emb: str = "learned"
    """'learned' (GPT-2 absolute position embeddings) or 'rope' (rotary, no position table)."""
    mlp_ratio: int = 4
    bias: bool = True
    ln_eps: float = 1e-5
    rope_base: float = 10000.0
    name: str = "custom"
    """The preset this shape came from (informational)."""
    arch: str = "gpt2"
    """'gpt2' or 'llama' (see the module doc)."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention, llama only); None: n_head."""
    tie_embeddings: bool = True
    """The head reuses the input embedding matrix (False: a separate ``lm_head``)."""
    ffn_dim: int | None = None
    """Hidden size of the MLP; None: mlp_ratio x d_model (gpt2) or :func:`llama_ffn_dim`."""
    gelu_approx: str = "none"
    """GELU form of the gpt2 MLP: 'none' (exact erf, hpcllm's default) or 'tanh' (OpenAI GPT-2's)."""
    vocab_multiple: int = VOCAB_MULTIPLE
    """Embedding rows are padded to a multiple of this (1: exactly vocab_size, as imports keep)."""
    attention: str = "dense"
    """'dense' (causal SDPA), 'local' (causal window) or 'bigbird' (window + global + random
    blocks): see :mod:`hpcllm.model.attention`."""
    attention_window: int = 256
    """local/bigbird: keys per query in the causal local band (itself included)."""
    attention_global: int = 0
    """bigbird: the first G tokens are global (every query sees them; they see all earlier)."""
    attention_random: int = 0
    """bigbird: random earlier key blocks per query block."""
    attention_block: int = 64
    """local/bigbird: block size of the sparse kernel and of the random blocks."""
    attention_seed: int = 0
    """bigbird: seed of the random blocks (with the layer index and the query block)."""
    moe_experts: int = 0
    """Experts of each mixture-of-experts MLP (0: every MLP dense); see :mod:`hpcllm.model.moe`."""
    moe_top_k: int = 1
    """Experts per token (1 or 2)."""
    moe_every: int = 1
    """Block i is a mixture when (i + 1) % moe_every == 0 (1: every block)."""
    moe_capacity_factor: float = 0.0
    """Assignments an expert takes per pass: ceil(C x tokens x k / E), the rest dropped (0: dropless)."""
    moe_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss E x sum_i f_i P_i."""
    moe_z_loss_coef: float = 0.0
    """Weight of the router z-loss (0: off)."""

    def __post_init__(self):
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        for f in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "mlp_ratio", "n_kv_head",
                  "vocab_multiple") + (("ffn_dim",) if self.ffn_dim is not None else ()):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be an integer >= 1, not {v!r}")
        for f in ("ln_eps", "rope_base"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{f} must be a finite number > 0, not {v!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, not {self.bias!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, not {self.tie_embeddings!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        if self.gelu_approx not in ("none", "tanh"):
            raise ValueError(f"gelu_approx must be 'none' or 'tanh', not {self.gelu_approx!r}")
        if self.arch == "llama":
            if self.pos_emb != "rope":
                raise ValueError("arch llama uses rotary positions (pos_emb 'rope'), not learned ones")
            if self.bias:
                raise ValueError("arch llama has no biases (bias must be false)")
        elif self.n_kv_head != self.n_head:
            raise ValueError(f"grouped-query attention (n_kv_head {self.n_kv_head} < n_head {self.n_head}) "
                             "needs arch llama")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} does not divide n_head {self.n_head}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.pos_emb not in ("learned", "rope"):
            raise ValueError(f"pos_emb must be 'learned' or 'rope', not {self.pos_emb!r}")
        if self.pos_emb == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("rotary positions need an even head dimension")
        if self.attention not in ("dense", "local", "bigbird"):
            raise ValueError(f"attention must be dense, local or bigbird, not {self.attention!r}")
        for f, lo in (("attention_window", 1), ("attention_block", 1), ("attention_global", 0),
                      ("attention_random", 0), ("attention_seed", 0)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{f} must be an integer >= {lo}, not {v!r}")
        for f, lo in (("moe_experts", 0), ("moe_top_k", 1), ("moe_every", 1)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{f} must be an integer >= {lo}, not {v!r}")
        for f in ("moe_capacity_factor", "moe_aux_loss_coef", "moe_z_loss_coef"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{f} must be a finite number >= 0, not {v!r}")
        if self.moe_experts:
            if self.moe_top_k not in (1, 2):
                raise ValueError(f"moe_top_k must be 1 or 2, not {self.moe_top_k}")
            if self.moe_top_k > self.moe_experts:
                raise ValueError(f"moe_top_k {self.moe_top_k} is more than the {self.moe_experts} experts")
            if self.moe_every > self.n_layer:
                raise ValueError(f"moe_every {self.moe_every} is more than the {self.n_layer} layers (no block "
                                 "would be a mixture)")
        if self.attention == "local" and (self.attention_global or self.attention_random):
            raise ValueError("attention local is the window only: global tokens and random blocks need "
                             "attention bigbird")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): n_kv_head x head_dim."""
        return self.n_kv_head * self.head_dim

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden size (llama: of the gate and of the up projection each)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        return llama_ffn_dim(self.d_model) if self.arch == "llama" else self.mlp_ratio * self.d_model

    @property
    def norm_params(self) -> int:
        """Parameters of one LayerNorm/RMSNorm."""
        return 2 * self.d_model if (self.arch == "gpt2" and self.bias) else self.d_model

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return asdict(self)


ARCHS = ("gpt2", "llama")
#: Llama 3's vocabulary, the default of the llama presets
LLAMA3_VOCAB = 128256


def llama_ffn_dim(d_model: int) -> int:
    """Llama's MLP hidden size rule: 8/3 d rounded up to a multiple of min(256, d)
    (d 4096 -> 11008, as Llama 2 7B; d 2048 -> 5632, as TinyLlama)."""
    multiple = min(256, d_model)
    return -(-int(8 * d_model / 3) // multiple) * multiple


def _preset(name, n_layer, n_head, d_model, seq_len, vocab_size=GPT2_VOCAB, **kw):
    return GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, seq_len=seq_len,
                     vocab_size=vocab_size, name=name, **kw)


def _llama(name, n_layer, n_head, n_kv_head, d_model, seq_len, vocab_size=LLAMA3_VOCAB, **kw):
    return _preset(name, n_layer, n_head, d_model, seq_len, vocab_size, arch="llama", pos_emb="rope",
                   bias=False, n_kv_head=n_kv_head, tie_embeddings=kw.pop("tie_embeddings", False), **kw)


#: what ``arch="llama"`` changes when a gpt2 preset is trained as a Llama (``--arch llama``)
LLAMA_DEFAULTS = {"arch": "llama", "pos_emb": "rope", "bias": False, "tie_embeddings": False}


#: Named shapes. The test presets use the byte vocabulary (257); the others are the GPT-2
#: small (124M, context 1024) and GPT-3 paper shapes (context 2048; 1.3B uses 16 heads and
#: 13B d_model 5120 so heads divide d_model, as in common reimplementations). Training
#: replaces ``vocab_size`` with the dataset's, so the counts below are for GPT-2's vocabulary.
PRESETS: dict[str, GPTConfig] = {p.name: p for p in [
    _preset("tiny", 2, 2, 64, 128, 257),
    _preset("mini", 4, 4, 128, 256, 257),
    _preset("small", 4, 4, 256, 256, 257),
    _preset("124M", 12, 12, 768, 1024),
    _preset("350M", 24, 16, 1024, 2048),
    _preset("760M", 24, 16, 1536, 2048),
    _preset("1.3B", 24, 16, 2048, 2048),
    _preset("2.7B", 32, 32, 2560, 2048),
    _preset("6.7B", 32, 32, 4096, 2048),
    _preset("13B", 40, 40, 5120, 2048),
    _preset("175B", 96, 96, 12288, 2048),
    # Llama-style: test shapes on the byte vocabulary, then the Llama 3.2 1B / 3B and
    # Llama 3.1 8B shapes (parameter counts 1,235,814,400 / 3,212,749,824 / 8,030,261,248)
    _llama("llama-tiny", 2, 4, 2, 64, 128, 257),
    _llama("llama-mini", 4, 4, 2, 128, 256, 257),
    _llama("llama-small", 4, 4, 2, 256, 256, 257),
    _llama("llama-1B", 16, 32, 8, 2048, 8192, ffn_dim=8192, rope_base=500000.0, tie_embeddings=True),
    _llama("llama-3B", 28, 24, 8, 3072, 8192, ffn_dim=8192, rope_base=500000.0, tie_embeddings=True),
    _llama("llama-8B", 32, 32, 8, 4096, 8192, ffn_dim=14336, rope_base=500000.0),
]}


def preset(name: str, **overrides) -> GPTConfig:
    """A preset's config with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise KeyError(name)
    base = PRESETS[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "n_head" in changes and "n_kv_head" not in changes:
        # a new head count keeps the preset's grouping where it divides (plain attention: n_kv_head = n_head)
        group = base.n_head // base.n_kv_head
        changes["n_kv_head"] = changes["n_head"] // group if changes["n_head"] % group == 0 else changes["n_head"]
    return replace(base, **changes)


# --------------------------------------------------------------------------- counting


def _mlp_weights(cfg: GPTConfig) -> int:
    return (3 if cfg.arch == "llama" else 2) * cfg.d_model * cfg.hidden_dim


def _mlp_params(cfg: GPTConfig) -> int:
    return _mlp_weights(cfg) + ((cfg.hidden_dim + cfg.d_model) if cfg.bias else 0)


def _block_matmul_weights(cfg: GPTConfig, layer: int | None = None, active: bool = True) -> int:
    """Matmul weights of block ``layer`` (None: a dense block); a mixture counts its router and
    the k experts a token uses (``active``) or all E."""
    d, qkv = cfg.d_model, cfg.d_model + 2 * cfg.kv_dim
    mlp = _mlp_weights(cfg)
    if layer is not None and _is_moe(cfg, layer):
        mlp = mlp * (cfg.moe_top_k if active else cfg.moe_experts) + d * cfg.moe_experts
    return d * qkv + d * d + mlp


def _is_moe(cfg: GPTConfig, layer: int) -> bool:
    return cfg.moe_experts > 0 and (layer + 1) % cfg.moe_every == 0


def block_param_count(cfg: GPTConfig, layer: int | None = None, active: bool = False) -> int:
    """Parameters of one transformer block (``layer``: its global index, which tells a mixture
    of experts from a dense block; ``active``: a mixture's router and the k experts a token uses)."""
    d, qkv = cfg.d_model, cfg.d_model + 2 * cfg.kv_dim
    attn = d * qkv + d * d + ((qkv + d) if cfg.bias else 0)
    mlp = _mlp_params(cfg)
    if layer is not None and _is_moe(cfg, layer):
        mlp = mlp * (cfg.moe_top_k if active else cfg.moe_experts) + d * cfg.moe_experts
    return 2 * cfg.norm_params + attn + mlp


def param_count(cfg: GPTConfig, embeddings: bool = True, active: bool = False) -> int:
    """Exact number of parameters of ``GPT(cfg)`` (a tied head counted once).

    With ``embeddings=False``: the non-embedding count (blocks and final norm). With
    ``active``: the parameters one token uses (a mixture's router and k of its E experts).
    """
    n = sum(block_param_count(cfg, i, active) for i in range(cfg.n_layer)) + cfg.norm_params
    if embeddings:
        n += cfg.padded_vocab * cfg.d_model * (1 if cfg.tie_embeddings else 2)
        if cfg.pos_emb == "learned":
            n += cfg.seq_len * cfg.d_model
    return n


def attended_keys(cfg: GPTConfig) -> float:
    """Keys one query attends to on average at seq_len: seq_len for dense attention (the
    FLOPs convention counts it without the causal half-saving), else the sparse pattern's
    allowed (query, key) pairs over seq_len (the same for every layer)."""
    if cfg.attention == "dense":
        return cfg.seq_len
    from hpcllm.model.attention import pattern_for
    return pattern_for(cfg, cfg.seq_len, 0).attended_pairs() / cfg.seq_len


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM's MFU convention.

    Forward: 2 FLOPs per multiply-add for every matmul weight of the blocks, plus the
    output head (d_model x padded vocab), plus attention scores and weighted values
    (2 x 2 x seq_len x d_model per layer, counted without the causal half-saving; sparse
    attention: 2 x 2 x :func:`attended_keys` x d_model, the keys actually allowed).
    Embedding lookups, norms, biases, activations and softmax are not counted. A mixture of
    experts counts the weights a token uses: its router and k experts (the active parameters).
    """
    d = cfg.d_model
    matmul_weights = sum(_block_matmul_weights(cfg, i) for i in range(cfg.n_layer)) + d * cfg.padded_vocab
    if cfg.attention == "dense":
        attention = cfg.n_layer * 2 * cfg.seq_len * d
    else:
        attention = round(cfg.n_layer * 2 * attended_keys(cfg) * d)
    return 3 * (2 * matmul_weights + 2 * attention)


# --------------------------------------------------------------------------- modules


def _rope_cos_sin(seq_len: int, head_dim: int, base: float, device, dtype):
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # (T, hd/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (even, odd) of the last dim of ``x`` (B, H, T, hd): gpt2's rotary."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate element i with element i + hd/2 (Llama's and ``transformers``' convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys and values of the positions decoded so far, for generation: one preallocated
    (B, H, max_len, hd) buffer pair per layer; ``pos`` positions are filled. A forward pass
    given the cache attends to them and appends its own (training never passes one).

    ``window`` W (local attention, where no query sees a key W or more positions back): the
    buffers hold only the last W positions, a ring (slot = position % W), so the cache's
    memory is W, not max_len, positions; keys are stored after the rotary rotation, so a
    slot's order does not matter."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype,
                 window: int | None = None):
        # n_head: the key/value heads (fewer than the query heads with grouped-query attention)
        self.window = window if window is not None and window < max_len else None
        slots = self.window or max_len
        self.k = torch.zeros(n_layer, batch, n_head, slots, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.max_len, self.pos = max_len, 0
        #: (B, max_len): False at left-padding positions, which no real token attends to
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)

    def layer(self, i: int) -> "_LayerKV":
        return _LayerKV(self, i)

    def reset(self) -> None:
        self.pos = 0
        self.valid.fill_(True)


class _LayerKV:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store this call's keys/values at the next positions; the keys/values to attend to
        and their positions (None: all positions 0 .. pos + T - 1, in order)."""
        c, p, T = self.cache, self.cache.pos, k.size(-2)
        if p + T > c.max_len:
            raise ValueError(f"KV cache of {c.max_len} positions cannot take {T} more after {p}")
        if c.window is None:
            c.k[self.i, :, :, p:p + T] = k
            c.v[self.i, :, :, p:p + T] = v
            return c.k[self.i, :, :, :p + T], c.v[self.i, :, :, :p + T], None
        W = c.window
        held = torch.arange(max(0, p - W), p, device=k.device)  # the ring's positions, oldest first
        keys = torch.cat([c.k[self.i, :, :, held % W], k], dim=2)
        values = torch.cat([c.v[self.i, :, :, held % W], v], dim=2)
        new = torch.arange(max(p, p + T - W), p + T, device=k.device)  # the last W of this call's
        c.k[self.i].index_copy_(2, new % W, k[:, :, new - p])
        c.v[self.i].index_copy_(2, new % W, v[:, :, new - p])
        return keys, values, torch.cat([held, torch.arange(p, p + T, device=k.device)])


class CausalSelfAttention(nn.Module):
    """Fused q/k/v projection (rows: the n_head query heads, then the n_kv_head key heads,
    then the value heads), rotary or no positions, output projection."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        #: dense, or the sparse pattern's config and this block's global index (its random blocks' seed)
        self.sparse = cfg if cfg.attention != "dense" else None
        self.layer = layer
        self.rope = cfg.pos_emb == "rope"
        self.rotate = apply_rope_half if cfg.arch == "llama" else apply_rope
        self.rope_base = cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * cfg.kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, kv: "_LayerKV | None" = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        # sizes from the projection's output and the head counts, not from x: a tensor-parallel
        # rank holds some of the heads (and, sequence-parallel, x is its chunk of the sequence)
        qkv = self.qkv(x)
        B, T, _ = qkv.shape
        qd, kvd = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = qkv.split((qd, kvd, kvd), dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        start = kv.cache.pos if kv is not None else 0
        if self.rope:
            # recomputed per call (cheap next to the matmuls) so no state sits outside the
            # parameters and a stage needs nothing but its own blocks
            if positions is None:
                cos, sin = _rope_cos_sin(start + T, self.head_dim, self.rope_base, x.device, q.dtype)
                cos, sin = cos[start:], sin[start:]
            else:  # per-row positions (left-padded batches): (B, 1, T, hd/2)
                cos, sin = _rope_cos_sin(int(positions.max()) + 1, self.head_dim, self.rope_base, x.device, q.dtype)
                cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        key_pos = None
        if kv is not None:  # the cache keeps the n_kv_head heads only
            k, v, key_pos = kv.update(k, v)
        if self.n_kv_head != self.n_head:  # query head h reads key/value head h // group
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if kv is None:
            if self.sparse is None:
                y = causal_attention(q, k, v)
            else:
                from hpcllm.model.attention import pattern_for, sparse_attention
                y = sparse_attention(q, k, v, pattern_for(self.sparse, T, self.layer))
        else:  # generation: the new positions attend to every cached one and causally among themselves
            keys = (torch.arange(start + T, device=x.device) if key_pos is None else key_pos)[None, :]
            queries = torch.arange(start, start + T, device=x.device)[:, None]
            # real keys only (a padding query sees itself, so no row is all -inf)
            valid = kv.cache.valid[:, :start + T] if key_pos is None else kv.cache.valid[:, key_pos]
            mask = (keys <= queries) & (valid[:, None, None, :] | (keys == queries))
            if self.sparse is not None:  # the pattern's element rule over the tokens' positions: exact
                from hpcllm.model.attention import pattern_for
                pat = pattern_for(self.sparse, kv.cache.max_len, self.layer)
                if positions is None:
                    mask = mask & pat.allowed(queries, keys)
                else:  # left-padded rows: cache slot - position is each row's padding
                    shift = queries[-1:] - positions[:, -1:]  # (B, 1): the last token is real
                    qpos, kpos = positions.clamp(min=0), (keys - shift).clamp(min=0)
                    rule = pat.allowed(qpos[:, :, None], kpos[:, None, :])  # (B, T, S)
                    mask = mask & (rule[:, None] | (keys == queries))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, qd))


#: On a CPU, sequences up to this length use explicit matmul attention in bf16/fp16 (see
#: :func:`causal_attention`); longer ones use SDPA's flash kernel (memory linear in T).
CPU_MATMUL_ATTENTION_MAX_T = 512


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for (B, H, T, hd) tensors.

    ``F.scaled_dot_product_attention`` everywhere except one case: on a CPU in 16-bit
    precision with T <= :data:`CPU_MATMUL_ATTENTION_MAX_T`, the two batched matmuls run on
    the bf16 matmul units while PyTorch's CPU flash kernel does not: at T=256, forward plus
    backward took 16-22 ms against 34-42 ms for SDPA (4 heads x 64, 16 sequences, 2 cores with
    AVX512-BF16; ``benchmarks/train.py --parts kernels``). It materialises the (T, T) scores, hence the length limit; in fp32 the flash
    kernel is faster at every length measured, so it is kept.
    """
    T = q.size(-2)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and T <= CPU_MATMUL_ATTENTION_MAX_T:
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.size(-1) ** -0.5)
        mask = torch.full((T, T), float("-inf"), dtype=scores.dtype, device=q.device).triu_(1)
        # softmax of 16-bit input accumulates in fp32 inside the kernel; only its output is rounded
        return torch.matmul(torch.softmax(scores + mask, dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MLP(nn.Module):
    """gpt2: proj(gelu(fc(x))). llama (SwiGLU): ``fc`` yields gate and up (rows [gate; up]),
    proj(silu(gate) * up)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.approximate = cfg.gelu_approx
        h = cfg.hidden_dim
        self.fc = nn.Linear(cfg.d_model, 2 * h if self.swiglu else h, bias=cfg.bias)
        self.proj = nn.Linear(h, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        # exact (erf) GELU by default: on CPUs twice as fast as GPT-2's tanh approximation (forward +
        # backward of 4096 x 1024 in bf16: 4.1-4.9 vs 10.1 ms, benchmarks/train.py --parts kernels)
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


def norm(cfg: GPTConfig) -> nn.Module:
    """The block's and the final norm: LayerNorm (gpt2) or RMSNorm (llama)."""
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.d_model, eps=cfg.ln_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = norm(cfg)
        if _is_moe(cfg, layer):
            from hpcllm.model.moe import MoEMLP

            self.mlp = MoEMLP(cfg, layer, make_expert=lambda: MLP(cfg))
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, kv=None, positions=None):
        x = x + self.attn(self.ln_1(x), kv, positions)
        return x + self.mlp(self.ln_2(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class GPT(nn.Module):
    """The whole model, or a contiguous slice of it for a pipeline stage.

    ``layers`` (a range) selects the blocks held; ``embed``/``head`` whether this module holds
    the token (and position) embeddings and the final LayerNorm + tied head. With a slice,
    ``blocks`` is a ModuleDict keyed by the global block index, so parameter names
    (``blocks.5.attn.qkv.weight``) are those of the whole model. With tied embeddings a
    module with ``head`` but not ``embed`` still owns a ``wte`` (the tied head weight);
    keeping the two copies equal is the pipeline's job. Untied, the head is ``lm_head``
    (``lm_head`` is None when tied). ``init_seed`` is passed to :meth:`init_weights` (None: leave
    PyTorch's default initialisation, e.g. before loading a checkpoint).
    """

    def __init__(self, cfg: GPTConfig, layers: Iterable[int] | None = None, embed: bool = True,
                 head: bool = True, init_seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        self.has_embed, self.has_head = embed, head
        whole = layers is None
        self.layer_ids = list(range(cfg.n_layer)) if whole else list(layers)
        tied = cfg.tie_embeddings
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.d_model) if (embed or (head and tied)) else None
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model) if (embed and cfg.pos_emb == "learned") else None
        if whole:
            self.blocks = nn.ModuleList(Block(cfg, i) for i in self.layer_ids)
        else:  # the global block index: a pipeline slice's blocks draw the whole model's patterns
            self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in self.layer_ids})
        self.ln_f = norm(cfg) if head else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False) if (head and not tied) else None
        #: the loss of logits and targets (tensor parallelism swaps in its vocabulary-parallel one)
        self.loss_fn = lm_loss
        if init_seed is not None:  # None: the caller loads or initialises the weights itself
            self.init_weights(init_seed)

    # the pieces, so a pipeline stage can run exactly its part
    def block_list(self) -> list[Block]:
        return list(self.blocks) if isinstance(self.blocks, nn.ModuleList) else list(self.blocks.values())

    def embed(self, idx: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.size(1)
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than seq_len {self.cfg.seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device) if positions is None else positions)
        return x

    def run_blocks(self, x: torch.Tensor, kv: KVCache | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
        for i, blk in enumerate(self.block_list()):
            x = blk(x) if kv is None else blk(x, kv.layer(i), positions)
        return x

    def new_kv_cache(self, batch: int = 1, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty cache for generating with this (whole) model."""
        w = self.ln_f.weight
        # local attention: no query sees W or more positions back, so the cache is a ring of W
        window = self.cfg.attention_window if self.cfg.attention == "local" else None
        return KVCache(len(self.block_list()), batch, self.cfg.n_kv_head, max_len or self.cfg.seq_len,
                       self.cfg.head_dim, device or w.device, dtype or w.dtype, window=window)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.wte.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv: KVCache | None = None,
                positions: torch.Tensor | None = None):
        """Logits (B, T, padded_vocab) for token ids ``idx``, or the mean loss given targets.

        For a slice without the embedding, ``idx`` is the hidden state (B, T, d_model); for a
        slice without the head, the hidden state is returned. ``kv`` (generation): ``idx``
        continues the positions the cache holds, and its keys/values are appended to it;
        ``positions`` (B, T): each token's position (left-padded batches; default: the cache's).
        """
        x = self.embed(idx, kv.pos if kv is not None else 0, positions) if self.has_embed else idx
        x = self.run_blocks(x, kv, positions)
        if kv is not None:
            kv.pos += idx.size(1)
        if not self.has_head:
            return x
        logits = self.logits(x)
        return logits if targets is None else self.loss_fn(logits, targets)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 initialisation, each parameter from a generator seeded by (seed, name)."""
        init_parameters(self.named_parameters(), seed, self.cfg.n_layer)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters(named_params, seed: int, n_layer: int) -> None:
    """GPT-2 init by name: norm weights 1, biases 0, residual output projections
    (``attn.proj``, ``mlp.proj``) N(0, 0.02/sqrt(2 n_layer)), everything else N(0, 0.02).

    Values are drawn on the CPU in fp32 from a generator seeded by ``(seed, name)`` and then
    copied, so they do not depend on the device, dtype, or which other parameters exist.
    """
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in named_params:
        if p.device.type == "meta":
            continue
        leaf = name.rsplit(".", 2)
        if name.endswith(".bias"):
            p.zero_()
        elif len(leaf) >= 2 and leaf[-2].startswith("ln_"):
            p.fill_(1.0)
        else:
            # residual output projections: attn.proj, mlp.proj and each expert's mlp.experts.N.proj
            std = resid_std if name.endswith("proj.weight") else 0.02
            g = torch.Generator(device="cpu").manual_seed(_name_seed(seed, name))
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
