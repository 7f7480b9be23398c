"""The pipeline's step for the one training loop: forward and backward through the engine,
and the validation pass through the stages.

The training loop (:mod:`hpcllm.train.trainer`) is the same for every layout; what a
pipeline changes is only how a step's forward and backward run (:meth:`PipelineRunner.
forward_backward`: the schedule's passes over M micro-batches, p2p between stages, the
gradient synchroniser's allreduces armed inside the stage's last backward) and how a
validation loss is computed (:meth:`PipelineRunner.eval_sums`: forwards only, micro-batch by
micro-batch through the stages). Only the first and the last stage read data.
"""
from __future__ import annotations

import os

import torch

from hpcllm.parallel.pipeline.engine import PipelineEngine
from hpcllm.parallel.pipeline.stage import PipelineStage, activation_dtype
from hpcllm.parallel.pipeline.transport import wire_view

#: the tag of validation activations between stages (training uses the engine's tags)
EVAL_TAG = 7777


class PipelineRunner:
    """Stage ``groups.stage`` of ``stage`` module's pipeline, running ``schedule`` over
    ``microbatches`` per step on ``groups.comm['pp']``."""

    def __init__(self, stage: PipelineStage, groups, schedule: str, microbatches: int, micro_batch: int,
                 device, autocast, timeout_s: float):
        self.module, self.groups = stage, groups
        self.device, self.autocast = device, autocast
        self.first, self.last = groups.first_stage, groups.last_stage
        self.microbatches = microbatches
        from hpcllm.model.moe import moe_modules

        self.moe = bool(moe_modules(stage))
        cfg = stage.cfg
        self.act_shape = (micro_batch, cfg.seq_len, cfg.d_model)
        self.act_dtype = activation_dtype(cfg, autocast, device)
        # a peer stage silent for --stall-shutdown-s is presumed dead (HPCLLM_PIPELINE_TIMEOUT overrides)
        timeout = float(os.environ.get("HPCLLM_PIPELINE_TIMEOUT", timeout_s))
        self.engine = PipelineEngine(stage, groups.comm["pp"], groups.stage, groups.dims.pp, schedule, microbatches,
                                     self.act_shape, self.act_dtype, device=device, autocast=autocast,
                                     timeout=timeout)

    @property
    def reads_data(self) -> bool:
        return self.first or self.last

    def forward_backward(self, batches, loss_scale: float, last_backward) -> float | None:
        """One step's passes; gradients accumulated in ``.grad``; the mean loss on the last
        stage, None elsewhere."""
        if self.moe:  # the mixtures' auxiliary losses are scaled as the engine scales each loss
            from hpcllm.model.moe import set_grad_scale

            set_grad_scale(self.module, loss_scale / self.microbatches)
        return self.engine.step(batches, loss_scale=loss_scale, last_backward=last_backward)

    def step_record(self) -> dict:
        """What the log line adds for a pipeline: the bubble this stage saw."""
        return {"bubble": self.engine.stats.bubble}

    @torch.no_grad()
    def eval_sums(self, batches) -> tuple[float, int]:
        """(sum of losses, count) of this rank's share of a validation pass (the last stage
        holds the losses)."""
        pipe = self.groups.comm["pp"]
        stage = self.module
        was = stage.training
        stage.eval()
        buf = torch.empty(self.act_shape, dtype=self.act_dtype)
        total, n = 0.0, 0
        try:
            it = iter(batches) if batches is not None else None
            count = pipe.bcast(len(batches) if batches is not None else 0, root=0)
            for _ in range(count):
                x, y = next(it) if it is not None else (None, None)
                if self.first:
                    inp = x.to(self.device)
                else:
                    pipe.Recv(wire_view(buf), source=self.groups.stage - 1, tag=EVAL_TAG)
                    inp = buf.to(self.device)
                with self.autocast():
                    out = stage(inp, y.to(self.device) if self.last else None)
                if self.last:
                    total += float(out)
                    n += 1
                else:
                    buf.copy_(out.detach())
                    pipe.Send(wire_view(buf), dest=self.groups.stage + 1, tag=EVAL_TAG)
        finally:
            stage.train(was)
        return total, n
