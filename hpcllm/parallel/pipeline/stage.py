"""This rank's pipeline stage: only its slice of the GPT, nothing else is ever allocated.

The stage is a :class:`hpcllm.model.gpt.GPT` built with ``layers=`` its blocks and
``embed``/``head`` for the first/last stage, so its parameter names are those of the whole
model (``blocks.5.attn.qkv.weight``) and its initial values are exactly the whole model's
(initialisation is per parameter name).  The last stage owns its own copy of the tied
embedding matrix (``wte.weight``) for the head; the pipeline sums the two copies' gradients
so they stay equal.
"""
from __future__ import annotations

import contextlib

import torch

from hpcllm.model.gpt import GPT, GPTConfig
from hpcllm.parallel.pipeline.partition import Partition
from hpcllm.parallel.recompute import apply_recompute

#: the tied embedding matrix, held by the first stage and (as the head) by the last
TIED = "wte.weight"


class PipelineStage(torch.nn.Module):
    """Stage ``stage`` of ``partition``: ``forward(tokens_or_hidden, targets=None)``.

    First stage: token ids -> embedding -> its blocks -> hidden state.  Middle stages:
    hidden -> blocks -> hidden.  Last stage: hidden -> blocks -> final norm -> head -> the
    micro-batch's mean loss.  With ``recompute`` each block's activations are recomputed
    in the backward pass (only block inputs are kept).
    """

    def __init__(self, cfg: GPTConfig, partition: Partition, stage: int, seed: int = 0,
                 recompute: bool = False, device="cpu"):
        super().__init__()
        self.cfg, self.stage, self.stages = cfg, stage, partition.stages
        self.first, self.last = stage == 0, stage == partition.stages - 1
        self.recompute = recompute
        #: zero-argument context factory the last stage's head runs under (the engine sets
        #: it when linear layers defer their weight gradients: the tied head is an
        #: ``F.linear`` call, not a module it can route)
        self.head_context = None
        #: what a stage does to the hidden state it receives and to the one it sends
        #: (sequence parallelism chunks and gathers the sequence; identities otherwise)
        self.input_fn = self.output_fn = None
        # built on the meta device then materialised: GPT.__init__ would otherwise draw a
        # throw-away initialisation on the CPU first
        with torch.device("meta"):
            self.gpt = GPT(cfg, layers=partition.blocks(stage), embed=self.first, head=self.last)
        self.gpt.to_empty(device=device)
        self.gpt.init_weights(seed)
        if recompute:
            apply_recompute(self.gpt.block_list())

    # parameter names as in the whole model (no "gpt." prefix), for checkpoints and export
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.gpt.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args, **kwargs):
        return self.gpt.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.gpt.load_state_dict(state_dict, strict=strict, assign=assign)

    def tied_parameter(self) -> torch.nn.Parameter | None:
        """The embedding/head matrix when this stage is the first or the last (P > 1)."""
        if self.stages > 1 and (self.first or self.last) and self.cfg.tie_embeddings:
            return self.gpt.wte.weight
        return None

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        g = self.gpt
        if self.first:
            x = g.embed(x)
        elif self.input_fn is not None:
            x = self.input_fn(x)
        for blk in g.block_list():
            x = blk(x)
        if not self.last:
            return self.output_fn(x) if self.output_fn is not None else x
        # an untied head is an nn.Linear, which the deferral routes without the mode
        with self.head_context() if (self.head_context and g.lm_head is None) else contextlib.nullcontext():
            logits = g.logits(x)
        return g.loss_fn(logits, targets)


def activation_dtype(cfg: GPTConfig, autocast_factory, device="cpu") -> torch.dtype:
    """The dtype of a block's output under this run's autocast: what travels between stages.

    Probed on a 1-layer, 1-token copy of a block (the residual stream usually stays fp32
    under autocast; a model run fully in bf16 sends bf16).
    """
    from dataclasses import replace

    from hpcllm.model.gpt import Block

    small = replace(cfg, n_layer=1, seq_len=2)
    blk = Block(small).to(device)
    with torch.no_grad(), autocast_factory():
        out = blk(torch.zeros(1, 2, cfg.d_model, device=device))
    return out.dtype
