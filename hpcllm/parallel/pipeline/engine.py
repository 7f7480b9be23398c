"""Execute one stage's schedule: forwards, backwards and the p2p messages between them.

The engine is given this rank's stage module and its instruction list
(:mod:`hpcllm.parallel.pipeline.schedules`) and runs one training step's forward and
backward passes over ``M`` micro-batches, leaving the stage's parameter gradients
accumulated in ``.grad`` (what ``--accum M`` leaves without stages).  Activations go to the
next stage and activation gradients to the previous one through :class:`Channel` rings of
preallocated buffers; sends are non-blocking and receives pre-posted, so transfers overlap
compute.  It knows nothing about optimizers, data parallelism or checkpoints; the one hook
for them is ``step(last_backward=...)``, a context wrapped around the stage's last backward
of the step, the pass after which every parameter gradient is final (the training loop's GradSync
arms per-parameter gradient hooks in it to start the data-parallel allreduce early).  Under
a zero-bubble schedule, whose ``bwd`` passes leave the linear layers' weight gradients to
later ``wgt`` passes (:mod:`hpcllm.parallel.pipeline.deferred`), the context wraps both the
last ``bwd`` (final gradients of the other parameters) and the last ``wgt``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from hpcllm.parallel.pipeline import schedules as S
from hpcllm.parallel.pipeline.deferred import WeightGradDeferral
from hpcllm.parallel.pipeline.transport import DEFAULT_TIMEOUT_S, Channel

TAG_FWD, TAG_BWD = 0, 1


@dataclass
class StepStats:
    """Where a stage's step time went: ``compute_s`` in forwards/backwards, ``wait_s``
    blocked on peers (the bubble, as this stage sees it), ``step_s`` in total."""

    compute_s: float = 0.0
    wait_s: float = 0.0
    step_s: float = 0.0
    peak_live: int = 0
    history: list = field(default_factory=list)

    @property
    def bubble(self) -> float:
        return 1.0 - self.compute_s / self.step_s if self.step_s else 0.0


class PipelineEngine:
    """Runs ``stage_module`` as stage ``stage`` of ``stages`` on communicator ``comm``
    (whose rank ``s`` is stage ``s`` of this pipeline).

    ``stage_module(inp)`` returns the activation to send on; on the last stage
    ``stage_module(inp, targets)`` returns the micro-batch's mean loss.  On the first stage
    ``inp`` is the token batch.  ``act_shape``/``act_dtype`` describe the activation between
    stages (also the gradient's).  ``autocast`` is a zero-argument context-manager factory
    wrapping forwards (mixed precision).
    """

    def __init__(self, stage_module, comm, stage: int, stages: int, schedule: str, microbatches: int,
                 act_shape, act_dtype, device="cpu", autocast=None, timeout: float = DEFAULT_TIMEOUT_S,
                 slots: int = 2):
        self.module, self.comm = stage_module, comm
        self.stage, self.stages, self.M = stage, stages, microbatches
        self.first, self.last = stage == 0, stage == stages - 1
        self.program = S.build_schedule(schedule, stage, stages, microbatches)
        #: indices in ``program`` of the passes that leave gradients final: the last backward,
        #: and the last weight-gradient pass when the schedule defers those
        self.final_passes = {max(k for k, ins in enumerate(self.program) if ins.op == op)
                             for op in (S.BWD, S.WGT) if any(ins.op == op for ins in self.program)}
        self.deferral = WeightGradDeferral() if S.defers_weight_grads(self.program) else None
        if self.deferral is not None:
            self.deferral.install(stage_module)
            if hasattr(stage_module, "head_context"):  # a PipelineStage: its tied head
                stage_module.head_context = self.deferral.routing
        self.device = torch.device(device)
        self.autocast = autocast or contextlib.nullcontext
        self.stats = StepStats()
        self.to_next = self.from_next = self.to_prev = self.from_prev = None
        if not self.last:
            self.to_next = Channel(comm, stage + 1, act_shape, act_dtype, device, TAG_FWD, slots, timeout)
            self.from_next = Channel(comm, stage + 1, act_shape, act_dtype, device, TAG_BWD, slots, timeout)
        if not self.first:
            self.from_prev = Channel(comm, stage - 1, act_shape, act_dtype, device, TAG_FWD, slots, timeout)
            self.to_prev = Channel(comm, stage - 1, act_shape, act_dtype, device, TAG_BWD, slots, timeout)

    def step(self, batches=None, loss_scale: float = 1.0, last_backward=None):
        """Forward and backward over the ``M`` micro-batches of one step.

        ``batches``: list of ``M`` ``(x, y)`` on the first and last stage (the first uses
        ``x``, the last ``y``), ignored elsewhere.  Each micro-batch's loss is divided by
        ``M`` and multiplied by ``loss_scale`` before backward, so gradients equal those of
        the mean loss over the step's batch (times the scale).  Returns the mean loss over
        the micro-batches on the last stage, None elsewhere.

        ``last_backward``: a zero-argument context-manager factory entered around the
        stage's last backward pass of the step (and its last weight-gradient pass under a
        zero-bubble schedule: ``program[k] for k in final_passes``), during which each
        parameter's gradient reaches its final value for the step (e.g. to arm
        ``register_post_accumulate_grad_hook`` hooks that start its allreduce).
        """
        M = self.M
        if (self.first or self.last) and (batches is None or len(batches) != M):
            raise ValueError(f"stage {self.stage} needs {M} micro-batches, got {None if batches is None else len(batches)}")
        if self.from_prev is not None:
            self.from_prev.expect(i.mb for i in self.program if i.op == S.RECV_FWD)
        if self.from_next is not None:
            self.from_next.expect(i.mb for i in self.program if i.op == S.RECV_BWD)
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        losses = []
        compute = wait = 0.0
        live = peak = 0
        deferral = self.deferral
        t_step = time.perf_counter()
        channels = [ch for ch in (self.to_next, self.from_next, self.to_prev, self.from_prev) if ch is not None]
        for k, ins in enumerate(self.program):
            op, mb = ins.op, ins.mb
            if op in (S.FWD, S.BWD, S.WGT):
                for ch in channels:  # kick pending transfers before computing for a while
                    ch.progress()
            # the passes after which gradients are final run inside last_backward
            around = last_backward if last_backward and k in self.final_passes else contextlib.nullcontext
            t0 = time.perf_counter()
            if op == S.RECV_FWD:
                buf = self.from_prev.recv(mb)
                inputs[mb] = buf.clone().requires_grad_(True)
                self.from_prev.release(mb)
                wait += time.perf_counter() - t0
            elif op == S.FWD:
                inp = batches[mb][0].to(self.device, non_blocking=True) if self.first else inputs[mb]
                with self.autocast(), deferral.forward() if deferral else contextlib.nullcontext():
                    if self.last:
                        out = self.module(inp, batches[mb][1].to(self.device, non_blocking=True))
                        losses.append(out.detach())
                    else:
                        out = self.module(inp)
                outputs[mb] = out
                live += 1
                peak = max(peak, live)
                compute += time.perf_counter() - t0
            elif op == S.SEND_FWD:
                self.to_next.send(outputs[mb], mb)
                wait += time.perf_counter() - t0
            elif op == S.RECV_BWD:
                if deferral is None:  # the ring buffer itself, released after the backward
                    grads[mb] = self.from_next.recv(mb)
                else:
                    # a deferred weight pass keeps its output gradient until ``wgt``, and that
                    # can be this very tensor (a stage ending in a linear layer, or a residual
                    # add passing it on): the ring buffer would be overwritten by then
                    grads[mb] = self.from_next.recv_owned(mb)
                wait += time.perf_counter() - t0
            elif op == S.BWD:
                out = outputs.pop(mb)
                with around(), deferral.backward(mb) if deferral else contextlib.nullcontext():
                    if self.last:
                        (out * (loss_scale / M)).backward()
                    else:
                        torch.autograd.backward(out, grads.pop(mb))
                if not self.last and deferral is None:
                    self.from_next.release(mb)
                if self.first:
                    inputs.pop(mb, None)
                if deferral is None:
                    live -= 1
                compute += time.perf_counter() - t0
            elif op == S.WGT:
                with around():
                    # the last pass through autograd: its gradient hooks (DP allreduce) fire
                    deferral.apply(mb, through_autograd=k in self.final_passes)
                live -= 1  # as schedules.peak_activations counts: until the weight pass
                compute += time.perf_counter() - t0
            elif op == S.SEND_BWD:
                inp = inputs.pop(mb)
                self.to_prev.send(inp.grad, mb)
                wait += time.perf_counter() - t0
        t0 = time.perf_counter()
        for ch in (self.to_next, self.to_prev):
            if ch is not None:
                ch.flush()
        wait += time.perf_counter() - t0
        step = time.perf_counter() - t_step
        self.stats = StepStats(compute_s=compute, wait_s=wait, step_s=step, peak_live=peak)
        assert not outputs and not inputs and not grads, "schedule left micro-batches unfinished"
        assert deferral is None or not deferral.outstanding, "schedule left weight gradients deferred"
        if self.last:
            return torch.stack(losses).float().mean().item()
        return None
