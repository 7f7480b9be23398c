"""``--compile``: torch.compile the transformer blocks.

Each block is compiled on its own (``Block.compile()``), not the whole model: the blocks are
identical modules, so Dynamo traces one and reuses the code for the others (compile time does
not grow with depth), a pipeline stage compiles exactly the blocks it holds, parameter names
and checkpoints are unchanged, and the embedding, head and loss stay eager. Inductor fuses
the LayerNorms, GELU, residual adds and autocast casts around the matmuls, for about 15-60 s
of compilation at the first step of every process. Off by default: on the 2-core AVX512-BF16
CPU the bf16 step of the benchmark shape was 3-4% *slower* compiled than eager once the eager
path had fused AdamW, exact GELU and matmul attention (benchmarks/train.py); it is there for
devices and shapes where the elementwise work matters more. Horovod's gradient hooks and
activation recomputation work unchanged: the compiled backward still accumulates into each
parameter's ``.grad``.
"""
from __future__ import annotations

import torch

from hpcllm.errors import HpcllmError


def compile_blocks(blocks) -> int:
    """Compile each module of ``blocks`` in place; returns how many."""
    if not hasattr(torch, "compile"):
        raise HpcllmError("--compile needs PyTorch >= 2.0")
    n = 0
    for blk in blocks:
        blk.compile()
        n += 1
    return n


def compile_report() -> str:
    """What Dynamo compiled in this process so far, for the log after the first step: a run
    that asked for ``--compile`` and compiled nothing (0 graphs) or broke its graphs shows
    it here rather than only in its tokens/s."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    return f"{graphs} graph{'s' if graphs != 1 else ''} compiled, {breaks} graph break{'s' if breaks != 1 else ''}"
