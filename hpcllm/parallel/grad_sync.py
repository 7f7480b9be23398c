"""GradSync: the one gradient synchroniser every layout uses.

After a step's backward passes each rank holds its own gradients in ``.grad``. GradSync makes
them the layout's gradients:

1. **Average over the data-parallel replicas** (Horovod, the ``dp`` process set), overlapped
   with the backward: each trainable parameter has a ``register_post_accumulate_grad_hook``
   that is armed only inside :meth:`overlap`, the context the step runner wraps around its
   last backward pass (the last accumulation micro-batch, or the pipeline engine's last
   ``bwd``/``wgt``). When that pass has accumulated a parameter's final gradient the hook starts
   its asynchronous in-place allreduce, named ``hpcllm.grad.<parameter name>`` on every
   replica (Horovod matches tensors by name and fuses those ready in one cycle), while
   autograd goes on with earlier layers. With ``compression="fp16"`` the wire carries fp16
   (``hvd.Compression.fp16``) and the average is written back into ``.grad``.
2. :meth:`finish` starts any gradient the hooks did not see (the same order everywhere),
   polls every handle to completion (:func:`~hpcllm.parallel.data_parallel.wait_handle`),
   then **sums the tied embedding's copies** held by the first and last pipeline stage (their
   averages over D commute with the sum).
3. :meth:`norm_sq` is this rank's share of the squared global gradient norm, such that the
   sum over the world counts every parameter exactly once: a parameter replicated over the D
   data-parallel replicas contributes ``1/D`` on each, the last stage's copy of the tied
   matrix contributes nothing. (A sharded parameter, later, contributes its shard.)

Expert parallelism (X ranks per expert group): an expert's gradient already holds every
token of its group, so it is **summed** over the expert-data-parallel group (the D/X ranks
holding the same experts, process set ``edp``) and divided by D (Horovod ``Sum`` with a
post-scale; no collective when D = X); in the norm it counts X/D on each of those ranks.

A single rank, or a layout without replicas, starts no Horovod collective at all. The
per-parameter ``_start`` is where a sharded optimizer's reduce-scatter plugs in.
"""
from __future__ import annotations

import contextlib
import time

import torch


def sum_over(comm, grads) -> None:
    """Replace each of ``grads`` by its sum over the mpi4py communicator ``comm``: one
    all-reduce of one flat fp32 buffer (sequence parallelism's once-per-step gradient sum)."""
    if not grads:
        return
    from mpi4py import MPI

    flat = torch.cat([g.detach().reshape(-1).float().cpu() for g in grads])
    comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
    o = 0
    for g in grads:
        g.copy_(flat[o:o + g.numel()].view_as(g))
        o += g.numel()


def squares(grads) -> float:
    """Sum of the squares of every element of ``grads``, accumulated in float64 (each fp32
    square is exact there): the global norm, hence the clipping factor, then does not depend on
    how the elements are split into tensors (per parameter, ZeRO shards), so every layout clips
    alike. The elements pass through one reused float64 buffer (1 Mi elements on a CPU, 16 Mi
    on a GPU): ``torch._foreach_norm(..., dtype=float64)`` and ``vector_norm(dtype=...)``
    would each allocate a float64 copy of every gradient."""
    if not grads:
        return 0.0
    device = grads[0].device
    total = sum(g.numel() for g in grads)
    buf = torch.empty(min(total, 1 << (24 if device.type == "cuda" else 20)), dtype=torch.float64, device=device)
    acc = torch.zeros((), dtype=torch.float64, device=device)
    fill = 0
    for g in grads:
        flat = g.detach().reshape(-1)
        i, n = 0, flat.numel()
        while i < n:
            k = min(buf.numel() - fill, n - i)
            buf[fill:fill + k].copy_(flat[i:i + k])
            fill, i = fill + k, i + k
            if fill == buf.numel():
                acc += torch.dot(buf, buf)
                fill = 0
    if fill:
        acc += torch.dot(buf[:fill], buf[:fill])
    return float(acc)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


class GradSync:
    """``named_params``: this rank's (full-model-named) parameters; ``groups`` a
    :class:`~hpcllm.parallel.groups.ParallelGroups`; ``tied``: the name of this rank's copy of a
    matrix shared with another stage (summed over ``groups.tie``), or None."""

    def __init__(self, named_params, groups, compression: str = "none", tied: str | None = None,
                 tp_replicated=frozenset(), tp_partial: bool = False, expert_names=frozenset()):
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.groups = groups
        self.dp_size = groups.dims.dp
        #: names held whole by every tensor-parallel rank (empty without tensor parallelism)
        self.tp_replicated = set(tp_replicated)
        #: sequence parallelism: each tensor-parallel rank holds only its sequence chunk's
        #: share of those parameters' gradients; finish() sums them over the group
        self.tp_partial = tp_partial
        #: expert parallelism: this rank's expert parameters, and their group of replicas
        self.expert_names = set(expert_names)
        self.ep_size = groups.dims.ep
        self.edp_set = groups.process_set.get("edp")
        self.tied = tied if groups.tie is not None else None
        self.tied_param = dict(self.params).get(self.tied) if self.tied else None
        #: names whose gradient is a duplicate of one counted elsewhere (norm counts it once)
        self.duplicate = {self.tied} if (self.tied and groups.last_stage) else set()
        self.hvd = groups.hvd if self.dp_size > 1 else None
        self.process_set = groups.process_set.get("dp")
        self.compression = None
        #: in flight this step: name -> (handle, parameter, tensor on the wire, compression ctx)
        self.inflight: dict = {}
        #: expert gradients already divided by D this step (no collective: D = X)
        self.scaled: set = set()
        self.armed = False
        #: of the last step: allreduces started inside the last backward, of those the ones
        #: already complete when it ended, all started, and seconds :meth:`finish` waited
        self.started_in_backward = self.done_in_backward = self.started = 0
        self.wait_s = 0.0
        self.hooks = []
        if self.hvd is not None:
            hvd = self.hvd
            self.compression = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
            self.hooks = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in self.params]

    # ---- during the last backward
    @contextlib.contextmanager
    def overlap(self):
        """Wrap the step's last backward pass: gradient hooks start allreduces while inside."""
        if self.hvd is None:
            yield
            return
        self.armed = True
        try:
            yield
        finally:
            self.armed = False
            self.started_in_backward = len(self.inflight)
            self.done_in_backward = sum(1 for h, *_ in self.inflight.values() if self.hvd.poll(h))

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.armed:
                self._start(name, p)
        return hook

    def _start(self, name: str, p: torch.Tensor) -> None:
        if name in self.inflight:  # a second accumulation after the allreduce began
            raise RuntimeError(f"gradient of {name} accumulated twice in the last backward pass")
        g = p.grad
        if name in self.expert_names and self.edp_set is None:  # D = X: nobody else holds these experts
            if name in self.scaled:
                raise RuntimeError(f"gradient of {name} accumulated twice in the last backward pass")
            g.mul_(1.0 / self.dp_size)
            self.scaled.add(name)
            return
        wire, ctx = self.compression.compress(g if g.is_contiguous() else g.contiguous())
        # an expert: the sum over its replicas (its gradient holds their expert groups' tokens) / D
        expert = name in self.expert_names
        handle = self.hvd.allreduce_async_(wire, name=f"hpcllm.grad.{name}",
                                           op=self.hvd.Sum if expert else self.hvd.Average,
                                           postscale_factor=1.0 / self.dp_size if expert else 1.0,
                                           process_set=self.edp_set if expert else self.process_set)
        self.inflight[name] = (handle, p, wire, ctx)

    # ---- after the backward
    def finish(self) -> None:
        """Every gradient is the layout's (averaged over replicas, tied copies summed) when
        this returns."""
        t0 = time.perf_counter()
        if self.hvd is not None:
            from hpcllm.parallel.data_parallel import wait_handle

            for name, p in self.params:  # gradients the hooks missed, in the same order everywhere
                if p.grad is not None and name not in self.inflight and name not in self.scaled:
                    self._start(name, p)
            self.started = len(self.inflight)
            with self.groups.waiting("the data-parallel gradient allreduce"):
                for handle, p, wire, ctx in self.inflight.values():
                    wait_handle(self.hvd, handle)  # rather than hvd.synchronize's 1 ms sleeps
                    out = self.compression.decompress(self.hvd.synchronize(handle), ctx)
                    if out is not p.grad:  # compressed or made contiguous: write the average back
                        p.grad.copy_(out)
            self.inflight.clear()
            self.scaled.clear()
        if self.tied is not None:
            with self.groups.waiting("the tied-embedding gradient sum"):
                self._sum_tied()
        if self.tp_partial:
            with self.groups.waiting("the sequence-parallel gradient sum"):
                self._sum_tp_partial()
        self.wait_s = time.perf_counter() - t0

    def _sum_tp_partial(self) -> None:
        """Sum the replicated parameters' gradients over the tensor-parallel group."""
        sum_over(self.groups.comm["tp"], [p.grad for n, p in self.params if n in self.tp_replicated
                                          and p.grad is not None])

    def _sum_tied(self) -> None:
        """First and last stage add their copies' gradients, so both hold the whole model's."""
        from mpi4py import MPI

        p = self.tied_param
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        host = g if g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) else g.float().cpu()
        self.groups.tie.Allreduce(MPI.IN_PLACE, host.detach().numpy(), op=MPI.SUM)
        if host is not g:
            g.copy_(host)

    @torch.no_grad()
    def norm_sq(self) -> float:
        """This rank's share of the squared global gradient norm (see the module doc); with
        tensor parallelism, shards count whole, parameters every tensor-parallel rank holds
        alike (norms, row biases) 1/T each."""
        grads = [p.grad for n, p in self.params if p.grad is not None and n not in self.duplicate
                 and n not in self.tp_replicated and n not in self.expert_names]
        total = squares(grads)
        if self.expert_names:  # distinct across an expert group: each of D/X holders counts X/D
            experts = [p.grad for n, p in self.params if p.grad is not None and n in self.expert_names]
            total += squares(experts) * self.ep_size
        if self.tp_replicated:
            rep = [p.grad for n, p in self.params if p.grad is not None and n not in self.duplicate
                   and n in self.tp_replicated]
            total += squares(rep) / self.groups.dims.tp
        return total / self.dp_size

    # ---- the interface ZeroSync shares (the trainer calls these whatever the stage)
    @property
    def replicated(self) -> bool:
        """Every replica holds the whole of its part (ZeRO: shards)."""
        return True

    def optimizer_params(self):
        """(name, tensor) pairs the optimizer steps: the parameters themselves."""
        return list(self.params)

    def decay_names(self):
        return None  # by shape

    def step_params(self) -> list:
        """The tensors whose ``.grad`` unscaling and clipping act on."""
        return [p for _, p in self.params]

    def after_step(self) -> None:
        pass

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def drain(self) -> None:
        pass

    def comm_record(self) -> dict:
        return {"allreduce_s": round(self.wait_s, 6)} if self.hvd is not None else {}

    def model_state_bytes(self, optimizer) -> int:
        """Bytes of parameters, gradients and optimizer states this rank holds now."""
        tensors = [t for _, p in self.params for t in (p, p.grad)]
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return storage_bytes(tensors)

    def overlap_shares(self) -> tuple[float, float]:
        """Of the last step's allreduces: the share started inside the last backward, and the
        share already complete when it ended (0, 0 without allreduces)."""
        if not self.started:
            return 0.0, 0.0
        return self.started_in_backward / self.started, self.done_in_backward / self.started
