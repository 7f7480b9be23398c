"""INT8 weight-only quantization for inference (``hpcllm generate/export/eval --int8``).

Every matrix the model multiplies by (the blocks' ``nn.Linear`` weights, the head, and the
token embedding, which is the head when tied) is stored as int8 per output channel,
symmetric, with one fp32 scale per row: ``scale = max|w_row| / 127``, ``q = round(w /
scale)`` clamped to [-127, 127], so ``|w - q * scale| <= scale / 2``. Activations are not
quantized: each layer takes and returns the compute dtype. Norms, biases and learned
position embeddings stay as they are (a fraction of a percent of the weights).

A tied embedding is stored once: the int8 matrix and its scales serve the lookup (rows
dequantized on lookup, :class:`Int8Embedding`) and the head (:class:`Int8Linear` holding the
same tensors), so a tied GPT-2 shape needs about 26% of its fp32 bytes (:func:`weight_bytes`).

The model file stays plain: :func:`quantize_int8` swaps modules from outside, relying only
on ``GPT.embed`` calling ``self.wte(idx)`` and ``GPT.logits`` calling ``self.lm_head`` when
it is set. Works for any architecture whose matrices are ``nn.Linear`` (gpt2, llama).

The matmul (:func:`int8_linear`), measured on this repository's 2-core AVX-512 CPU (torch
2.13, one thread, milliseconds for one forward through the twelve blocks' four matrices
plus the 768 x 50304 head of the 124M shape; 2 threads give the same ranking)::

    rows M                                 1      8     16     32     48    128   1024
    fp32 F.linear (the fp32 model)      19.2   62.4   87.6    158    167    566   2827
    _weight_int8pack_mm, fp32 input      110    908      -      -      -      -      -
    _weight_int8pack_mm, bf16 input     11.1   35.1   67.4    165    200    797   4740
    int8 -> fp32, fp32 F.linear          188    258    290    452    340    732   2994
    int8 -> bf16, bf16 F.linear          133    146    148    249    184    331   1555

``torch._weight_int8pack_mm(x, w, scales)`` takes x (M, K) in fp32/bf16/fp16, w (N, K) int8
and scales (N,) in x's dtype. Only bf16 input runs a vectorised kernel here (fp32 and fp16
fall to a path 6-10x slower than fp32 ``F.linear``), and with K not a multiple of 16 it
returns garbage or crashes the process (measured for K = 8, 24, ..., 120), so:

- CPU, M <= :data:`CPU_INT8PACK_MAX_ROWS` and K % 16 == 0 (decoding): the activations are
  rounded to bf16 for the kernel, which accumulates in fp32; its scales are ones and the
  fp32 scales multiply its output, so the scales are exact fp32 (1.7x faster than fp32 at
  M = 1, 1.8x at M = 8);
- CPU otherwise (prompt encoding, evaluation): int8 -> bf16 (exact for |q| <= 127) and a
  bf16 GEMM, scales on the output (1.8x faster than fp32 at M = 1024);
- CUDA (and any other device): int8 -> the compute dtype and one GEMM, scales on the output
  (weights scaled first in fp16, where the unscaled sums could overflow): the formulation
  gpt-fast uses, which cuBLAS runs at full rate (and ``torch.compile`` fuses into one
  kernel); measured on no GPU here.

The output is returned in the input's dtype. Rounding the activations to bf16 on the CPU adds
a relative error of about 2^-9 per element, under the weights' own int8 error (about 1% of a
row's largest weight); the effect on perplexity is what ``hpcllm eval --int8`` reports.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the ``quantization`` field of an INT8 export and the marker :func:`quantize_int8` sets
METHOD = "int8-weight-per-channel"
#: CPU rows up to which ``torch._weight_int8pack_mm`` wins (measured crossover: 32-48 rows)
CPU_INT8PACK_MAX_ROWS = 32
#: the kernel's contraction dimension must be a multiple of this (else wrong results or a crash)
INT8PACK_K_MULTIPLE = 16

_ONES: dict = {}


@torch.no_grad()
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 scale per row) of a 2-D weight; an all-zero row gets scale 1 (q = 0)."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales.float()[:, None]).to(dtype)


def _ones(n: int) -> torch.Tensor:
    t = _ONES.get(n)
    if t is None:
        t = _ONES[n] = torch.ones(n, dtype=torch.bfloat16)
    return t


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scales[:, None]).T + bias`` in x's dtype (the kernels: see the module doc)."""
    N, K = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x.device.type == "cpu":
        xb = x2.to(torch.bfloat16).contiguous()
        if xb.size(0) <= CPU_INT8PACK_MAX_ROWS and K % INT8PACK_K_MULTIPLE == 0:
            y = torch._weight_int8pack_mm(xb, q, _ones(N))
        else:
            y = F.linear(xb, q.to(torch.bfloat16))
        y = (y * scales).to(x.dtype)  # bf16 * fp32 -> fp32: the scales stay exact
    elif x.dtype == torch.float16:
        y = F.linear(x2, q.to(x.dtype) * scales.to(x.dtype)[:, None])
    else:
        y = (F.linear(x2, q.to(x.dtype)) * scales).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, N)


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight (``weight_int8`` (out, in)) and fp32 per-row ``scales``."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        # a parameter, as in nn.Linear: callers find the model's device from its parameters
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_weight(linear.weight)
        return cls(q, s, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """``nn.Embedding`` over int8 rows with fp32 scales: looked-up rows are dequantized to the
    scales' dtype (the compute dtype)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        return cls(*quantize_weight(emb.weight))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_int8).to(self.scales.dtype) * F.embedding(idx, self.scales[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) == METHOD


def tied(model: nn.Module) -> bool:
    """True when the model's head is (or, quantized, shares the tensors of) its embedding."""
    cfg = getattr(model, "cfg", None)
    return bool(getattr(cfg, "tie_embeddings", True))


def tie_head(model: nn.Module) -> None:
    """Point a quantized tied model's head at its embedding's int8 matrix and scales (after
    the embedding's tensors were replaced, e.g. by ``load_state_dict(assign=True)``)."""
    wte = getattr(model, "wte", None)
    if isinstance(wte, Int8Embedding) and tied(model) and getattr(model, "ln_f", None) is not None:
        model.lm_head = Int8Linear(wte.weight_int8, wte.scales)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize ``model`` in place (and return it): every ``nn.Linear`` but a router becomes an
    :class:`Int8Linear`, ``wte`` an :class:`Int8Embedding`, and a tied model's ``lm_head``
    (None before) an :class:`Int8Linear` sharing the embedding's int8 matrix and scales.
    Works on the meta device too (shapes only, to build a model an INT8 export then fills)."""
    if is_quantized(model):
        return model
    # collect first: replacing children while iterating named_modules would skip some
    # (a mixture's router stays fp32: it is tiny, and a rounded router logit can send a token
    # to another expert)
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear) and name != "router"]
    for parent, name, child in linears:
        setattr(parent, name, Int8Linear.from_linear(child))
    if isinstance(getattr(model, "wte", None), nn.Embedding):
        model.wte = Int8Embedding.from_embedding(model.wte)
        if getattr(model, "lm_head", None) is None:
            tie_head(model)
    model.quantization = METHOD
    return model


def quantized_state_dict(model: nn.Module) -> dict:
    """The state of a quantized model with each tensor once: a tied head's entries (the
    embedding's tensors under a second name) are left out; :func:`tie_head` restores them."""
    state = model.state_dict()
    if tied(model) and isinstance(getattr(model, "wte", None), Int8Embedding):
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    return state


def dequantized_state_dict(model: nn.Module, dtype=torch.float32) -> dict:
    """A quantized model's state under the plain model's names (``P.weight`` = the
    dequantized ``P.weight_int8 * P.scales``; a tied head left out, as the plain model has
    none), for writers of unquantized formats (e.g. an HF export of an INT8 file)."""
    state = {}
    for name, t in quantized_state_dict(model).items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "scales":
            continue
        if leaf == "weight_int8":
            state[f"{prefix}.weight"] = dequantize(t, model.get_submodule(prefix).scales, dtype)
        else:
            state[name] = t
    return state


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (a tied
    embedding and head, fp32 or int8, count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":  # shapes only (no storage): one count per tensor object
            key, n = id(t), t.numel() * t.element_size()
        else:
            s = t.untyped_storage()
            key, n = (s.data_ptr(), t.device), s.nbytes()
        if key not in seen:
            seen.add(key)
            total += n
    return total
