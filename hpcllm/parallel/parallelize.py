"""Apply a parallel layout to the plain GPT, from outside, in one order:

    pipeline split -> activation recomputation -> torch.compile -> gradient synchroniser
                                                                    (GradSync, or ZeRO's ZeroSync)

(``apply_recompute`` is in :mod:`hpcllm.parallel.recompute`.)

:func:`parallelize` returns what the one training loop needs: this rank's ``module`` (the
whole :class:`~hpcllm.model.gpt.GPT`, or its pipeline stage), a ``runner`` that runs one
step's forward and backward passes (:class:`AccumulationRunner`, or the pipeline's
:class:`~hpcllm.parallel.pipeline.runner.PipelineRunner`) and a validation pass, and the
:class:`~hpcllm.parallel.grad_sync.GradSync` that turns the rank's gradients into the
layout's. The model never knows about ranks: parameter names are the whole model's in every
layout, and initialisation per parameter name gives every layout the same starting weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from hpcllm.parallel.grad_sync import GradSync
from hpcllm.parallel.recompute import apply_recompute
from hpcllm.parallel.pipeline.stage import TIED


# --------------------------------------------------------------------------- data parallel step


class AccumulationRunner:
    """One step without stages: ``accum`` micro-batches, each forward under autocast and its
    (scaled) loss / accum backward; the gradient synchroniser's context wraps the last."""

    reads_data = True

    def __init__(self, model, device, autocast):
        from hpcllm.model.moe import moe_modules

        self.module, self.device, self.autocast = model, device, autocast
        self.moe = bool(moe_modules(model))

    def forward_backward(self, batches, loss_scale: float, last_backward) -> float:
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        n = len(batches)
        if self.moe:  # the mixtures' auxiliary losses get the gradient factor of each loss
            from hpcllm.model.moe import set_grad_scale

            set_grad_scale(self.module, loss_scale / n)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                loss = self.module(x, y) / n
            with last_backward() if i == n - 1 else contextlib.nullcontext():
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            loss_sum += loss.detach().float()
        return float(loss_sum)

    def step_record(self) -> dict:
        return {}

    @torch.no_grad()
    def eval_sums(self, batches) -> tuple[float, int]:
        was = self.module.training
        self.module.eval()
        total, n = 0.0, 0
        try:
            for x, y in batches:
                with self.autocast():
                    loss = self.module(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                total += float(loss)
                n += 1
        finally:
            self.module.train(was)
        return total, n


# --------------------------------------------------------------------------- the layout applied


@dataclass
class Parallelized:
    module: torch.nn.Module      # GPT, or this rank's PipelineStage (same parameter names)
    runner: object               # AccumulationRunner | PipelineRunner
    grad_sync: object            # GradSync | ZeroSync (the same interface)
    partition: object = None     # the pipeline's Partition, or None
    compiled_blocks: int = 0
    zero_stage: int = 0
    tp_specs: dict = None        # name -> ShardSpec of tensor-parallel shards ({} without)
    tp_comm: object = None       # TPComm of the tensor-parallel group (None without)
    ep_comm: object = None       # EPComm of the expert group (None without expert parallelism)
    expert_names: frozenset = frozenset()  # this rank's expert parameters (expert parallelism)

    def owned_names(self) -> set[str]:
        """Names this rank's module holds whose values it alone writes to a checkpoint (the last
        stage's copy of the tied matrix is stage 0's)."""
        dup = self.grad_sync.duplicate
        return {n for n in self.module.state_dict() if n not in dup}




def parallelize(gpt_cfg, groups, pcfg, *, seed: int, device, autocast, micro_batch: int, microbatches: int,
                partition=None) -> Parallelized:
    """Build this rank's part of the model for ``groups``' layout (see the module doc);
    ``partition`` is the pipeline's (required with stages)."""
    from hpcllm.model.gpt import GPT

    zero = getattr(pcfg, "zero_stage", 0)
    if groups.dims.pp > 1:
        from hpcllm.parallel.pipeline.stage import PipelineStage

        module = PipelineStage(gpt_cfg, partition, groups.stage, seed=seed, device=device)
    elif zero:  # ZeroSync materialises and initialises each unit into its flat buffers
        with torch.device("meta"):
            module = GPT(gpt_cfg, init_seed=None)
    else:
        module = GPT(gpt_cfg, init_seed=seed).to(device)
    gpt = getattr(module, "gpt", module)
    tp_specs, tp_comm = {}, None
    full_shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    if groups.dims.tp > 1:
        from hpcllm.parallel.tensor_parallel import TPComm, apply_tensor_parallel

        from hpcllm.parallel.tensor_parallel import choose_backend

        tp_comm = TPComm(groups.comm.get("tp"), hvd=groups.hvd, process_set=groups.process_set.get("tp"))
        act = micro_batch * gpt_cfg.seq_len * gpt_cfg.d_model * 4
        tp_comm.choice = choose_backend(tp_comm, act, device, getattr(pcfg, "tp_backend", "auto"), groups=groups)
        tp_specs = apply_tensor_parallel(gpt, tp_comm, gpt_cfg, getattr(pcfg, "sequence_parallel", False),
                                         stage=module if module is not gpt else None)
    ep_comm, expert_names = None, frozenset()
    if groups.dims.ep > 1:
        from hpcllm.parallel.expert_parallel import EPComm, apply_expert_parallel
        from hpcllm.parallel.expert_parallel import choose_backend as choose_ep_backend

        ep_comm = EPComm(groups.comm["ep"], hvd=groups.hvd, process_set=groups.process_set.get("ep"))
        rows = max(1, micro_batch * gpt_cfg.seq_len * gpt_cfg.moe_top_k // groups.dims.ep)
        ep_comm.choice = choose_ep_backend(ep_comm, rows, gpt_cfg.d_model, device, getattr(pcfg, "ep_backend", "auto"))
        expert_names = frozenset(apply_expert_parallel(gpt, ep_comm))
    if pcfg.recompute:
        apply_recompute(gpt.block_list())
    compiled = 0
    if pcfg.compile:
        from hpcllm.parallel.compile import compile_blocks

        compiled = compile_blocks(gpt.block_list())
    if groups.dims.pp > 1:
        from hpcllm.parallel.pipeline.runner import PipelineRunner

        runner = PipelineRunner(module, groups, pcfg.schedule, microbatches, micro_batch, device, autocast,
                                timeout_s=pcfg.stall_shutdown_s)
    else:
        runner = AccumulationRunner(module, device, autocast)
    tied = TIED if (groups.dims.pp > 1 and gpt_cfg.tie_embeddings and (groups.first_stage or groups.last_stage)) \
        else None
    if zero:
        from hpcllm.model.gpt import init_parameters
        from hpcllm.parallel.zero import ZeroSync

        if tp_specs:
            from hpcllm.parallel.tensor_parallel import shard_tensors

            @torch.no_grad()
            def init_fn(named):
                # each shard is its slice of the whole parameter drawn by name: every T alike
                for n, p in named:
                    if n in tp_specs:
                        whole = torch.empty(full_shapes[n])
                        init_parameters([(n, whole)], seed, gpt_cfg.n_layer)
                        p.copy_(shard_tensors({n: whole}, tp_specs, groups.dims.tp, groups.tp_rank)[n])
                    else:
                        init_parameters([(n, p)], seed, gpt_cfg.n_layer)
        else:
            def init_fn(named):
                init_parameters(named, seed, gpt_cfg.n_layer)
        sync = ZeroSync(module, gpt.block_list(), groups, zero, device=device, compression=pcfg.grad_compression,
                        tied=tied, init_fn=init_fn, tp_specs=tp_specs,
                        tp_partial=getattr(pcfg, "sequence_parallel", False) and groups.dims.tp > 1,
                        expert_names=expert_names)
    else:
        replicated = {n for n, _ in module.named_parameters() if n not in tp_specs} if tp_specs else set()
        sync = GradSync(module.named_parameters(), groups, pcfg.grad_compression, tied=tied,
                        tp_replicated=replicated,
                        tp_partial=getattr(pcfg, "sequence_parallel", False) and groups.dims.tp > 1,
                        expert_names=expert_names)
    return Parallelized(module, runner, sync, partition, compiled, zero, tp_specs, tp_comm, ep_comm, expert_names)
