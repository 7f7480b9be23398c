"""ZeRO-1/2/3 over Horovod: parameters, gradients and AdamW states sharded over the ``dp`` group.

    mpirun -np 4 hpcllm train --data data/stdlib --out runs/z3 --zero-stage 3

:class:`ZeroSync` takes :class:`~hpcllm.parallel.grad_sync.GradSync`'s place (same methods,
the one training loop does not change) and owns the parameters' storage:

- **Units and flat buffers.** Each transformer block is a *unit*, and everything else this
  rank holds (embeddings, final LayerNorm; with stages, what the stage holds outside blocks)
  is the *root* unit. A unit's parameters live in flat fp32 buffers, one per optimizer group
  (``decay``: matrices, ``no_decay``: biases and norms; with stages ``tied``: the embedding
  shared by first and last stage, alone so both stages shard it alike), each padded to a
  multiple of N (the dp degree). Rank r owns elements ``[r*S, (r+1)*S)``, S = padded/N: with
  the padding, Horovod's ``reducescatter`` (dim 0, the first ``d0 % N`` ranks get one more
  row) splits evenly. The module's parameters are views into the buffers, so the model stays
  plain PyTorch with its full names.
- **Optimizer.** AdamW steps the shards (1-D tensors, one per buffer): each rank keeps
  ``exp_avg``/``exp_avg_sq`` for 1/N of the parameters. Parameters are fp32 (autocast makes the
  16-bit copies), so the parameter shard is the master copy.
- **Gradients.** In the last backward pass of a step (:meth:`overlap`), a unit whose every
  parameter has accumulated its gradient starts one ``hvd.grouped_reducescatter_async``
  (Average, ``hpcllm.zero.rs.<unit>``) over its buffers: the reduction overlaps the rest of
  the backward, once per optimizer step whatever ``--accum``. Stage 1 keeps full gradient
  buffers (``.grad`` are views into them, autograd accumulates in place; the reduced shard is
  written into the rank's own range). Stages 2 and 3 copy a ready unit's gradients into a
  temporary flat buffer, drop the per-parameter ``.grad`` and keep only the reduced shard.
- **Parameters.** Stages 1 and 2: after ``optimizer.step()`` one
  ``hvd.grouped_allgather_async`` per unit (``hpcllm.zero.ag.<unit>``) refills the full
  buffers: the first unit's at once, each next one's when the unit before it is called, and
  each waited for only when its own unit is called, so the gathers overlap the next forward
  (all at once after the step, Horovod fused them into one transfer the first unit waited for).
  Stage 3 keeps only the shard: a unit's buffers are allocated and gathered just before its
  forward, freed after it (storage resized to 0; autograd's saved views come back with the
  storage), gathered again when the gradient of its output arrives (before its backward) and
  freed when its last gradient has accumulated. The next unit's gather (forward order; in the
  backward the previous unit's) is started while the current one computes. The root unit
  stays gathered from the forward until its backward is done (the tied head is used last).
- **Norm.** Each rank's shards hold distinct elements: the sum over ranks of
  :meth:`norm_sq` counts every parameter once (the last stage's tied shard counts nothing).
- **Experts** (expert parallelism, X ranks per expert group): a rank's experts are held by
  its expert-data-parallel group only (the D/X ranks with the same ``dp % X``), so their
  flats (kinds ``expert_decay``/``expert_no_decay``) are sharded over that group: its own
  grouped reduce-scatter (``Sum`` post-scaled by 1/D: an expert's gradient already holds
  every token of its expert group) and all-gather, in the ``edp`` process set; with D = X
  nobody shares them and the shard is the whole buffer (the gradient divided by D locally).

The unit hooks wrap the module's ``__call__`` (a class swap, as ``--recompute`` does), outside
``torch.utils.checkpoint`` and ``torch.compile``: recomputation and compiled code never see them.
With one data-parallel rank (N = 1) the same code runs with no collective (the resharding
tests and a replicated-on-1 resume use it).
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import torch

from hpcllm.errors import HpcllmError
from hpcllm.parallel.grad_sync import squares, storage_bytes, sum_over

#: Horovod's MPI path counts elements in 32 bits
MAX_CALL_ELEMENTS = 2 ** 31 - 1
#: test hook "K,RANK": SIGKILL rank RANK as it starts its K-th reduce-scatter (1-based), so a
#: test can check that a rank dying inside a reduce-scatter ends the job in bounded time
KILL_ENV = "HPCLLM_TEST_KILL_IN_REDUCE_SCATTER"
#: parameter offsets in a flat buffer are multiples of this many elements (64 bytes of fp32)
ALIGN = 16


class Flat:
    """One optimizer group of one unit: its parameters as views into a flat fp32 buffer
    padded to a multiple of ``n``; this rank's range is ``[lo, hi)``."""

    def __init__(self, unit: str, kind: str, named, n: int, rank: int, device):
        self.key = f"{unit}.{kind}"
        self.kind = kind
        self.names = [nm for nm, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        # each parameter starts on a 64-byte boundary: matmul kernels round differently on
        # unaligned data, and ZeRO must compute what the replicated run computes
        self.offsets, total = [], 0
        for k in self.numels:
            self.offsets.append(total)
            total += -(-k // ALIGN) * ALIGN
        self.numel = sum(self.numels)
        self.padded = -(-total // n) * n
        if self.padded > MAX_CALL_ELEMENTS:
            raise HpcllmError(f"--zero-stage: unit {unit} holds {self.numel} {kind} parameters, more than a Horovod "
                              f"collective can move in one call (2^31 - 1 elements)")
        size = self.padded // n
        self.lo, self.hi = rank * size, (rank + 1) * size
        self._pieces: list[tuple] | None = None
        self.full = torch.zeros(self.padded, dtype=torch.float32, device=device)
        self.params: list[torch.nn.Parameter] = []
        self.shard: torch.Tensor | None = None      # this rank's range of the buffer
        #: what the optimizer steps: one view of the shard per parameter piece, so that with one
        #: rank each is the whole parameter and AdamW computes bit for bit what it computes
        #: replicated (its kernels round a tensor's tail differently from its body)
        self.piece_names: list[str] = []
        self.piece_tensors: list[torch.Tensor] = []
        self.grad_full: torch.Tensor | None = None  # stage 1: the full gradient buffer

    @property
    def expert(self) -> bool:
        """Expert parameters: sharded over the expert-data-parallel group."""
        return self.kind.startswith("expert_")

    def view(self, i: int) -> torch.Tensor:
        o = self.offsets[i]
        return self.full[o:o + self.numels[i]].view(self.shapes[i])

    def pieces(self) -> list[tuple]:
        """(name, shape, start, stop in the flattened parameter, start, stop in the shard)
        of each parameter overlapping this rank's range (computed once: the step uses them)."""
        if self._pieces is None:
            self._pieces = []
            for name, shape, o, k in zip(self.names, self.shapes, self.offsets, self.numels):
                a, b = max(o, self.lo), min(o + k, self.hi)
                if a < b:
                    self._pieces.append((name, shape, a - o, b - o, a - self.lo, b - self.lo))
        return self._pieces

    # ---- stage 3: the full buffer exists only while gathered
    def allocate(self) -> None:
        st = self.full.untyped_storage()
        if st.nbytes() == 0:
            st.resize_(self.padded * self.full.element_size())

    def free(self) -> None:
        self.full.untyped_storage().resize_(0)


class Unit:
    """Parameters gathered and reduced together: a block, or the root (the rest)."""

    def __init__(self, name: str):
        self.name = name
        self.index = 0        # position in ZeroSync.units (forward order)
        self.flats: list[Flat] = []
        self.gathered = True
        self.pending = None   # an all-gather in flight: Horovod handle
        self.seen = 0         # parameters whose gradient has accumulated in this backward pass
        self.n_params = 0


_ZERO_CLASSES: dict[type, type] = {}


def _zero_class(cls: type) -> type:
    """A subclass of ``cls`` whose call runs the unit's before/after hooks around it."""
    if cls not in _ZERO_CLASSES:
        def __call__(self, *args, **kwargs):
            hooks = self.__dict__.get("_hpcllm_zero_call")
            if hooks is None:
                return super(sub, self).__call__(*args, **kwargs)
            before, after = hooks
            before()
            return after(super(sub, self).__call__(*args, **kwargs))

        sub = type(f"Zero{cls.__name__}", (cls,), {"__call__": __call__})
        _ZERO_CLASSES[cls] = sub
    return _ZERO_CLASSES[cls]


def _owners(module) -> dict[int, tuple]:
    """id(parameter) -> (owning module, attribute name), for replacing parameters."""
    out = {}
    for mod in module.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), (mod, attr))
    return out


class ZeroSync:
    """``module``: this rank's model (its parameters may be on the meta device, then
    ``init_fn(named_params)`` initialises each unit's); ``blocks``: its transformer blocks;
    ``stage``: 1, 2 or 3; ``tied``: the name of the matrix shared with another pipeline stage."""

    def __init__(self, module, blocks, groups, stage: int, *, device, init_fn=None, compression: str = "none",
                 tied: str | None = None, tp_specs=None, tp_partial: bool = False, expert_names=()):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage {stage}")
        self.stage, self.groups, self.device = stage, groups, device
        #: tensor parallelism: the ShardSpec of each sharded parameter; the others are held
        #: alike by every tensor-parallel rank (counted 1/T in the norm; tensor-parallel rank 0
        #: writes them); with sequence parallelism their gradients are per-rank shares (summed)
        self.tp_specs = dict(tp_specs or {})
        self.tp_size, self.tp_rank = groups.dims.tp, groups.coords.get("tp", 0)
        self.tp_partial = tp_partial
        self.n = groups.dims.dp
        self.rank_in_dp = groups.dp_rank
        self.hvd = groups.hvd if self.n > 1 else None
        self.process_set = groups.process_set.get("dp")
        self.compression = None
        if self.hvd is not None:
            self.compression = self.hvd.Compression.fp16 if compression == "fp16" else self.hvd.Compression.none
        self.tied = tied if groups.tie is not None else None
        self.duplicate = {self.tied} if (self.tied and groups.last_stage) else set()
        self.units: list[Unit] = []
        self.armed = False
        #: all-gathers and reduce-scatters in flight / statistics of the last step
        self.rs_inflight: dict[str, tuple] = {}
        self.started_in_backward = self.done_in_backward = self.started = 0
        self.wait_s = self.rs_wait_s = self.ag_wait_s = self.last_ag_s = 0.0
        self.reduces = 0
        kill = os.environ.get(KILL_ENV, "")
        at, _, who = kill.partition(",")
        self.kill_at = int(at) if kill and int(who or 0) == groups.rank else None
        #: expert parallelism: this rank's expert parameters and the group sharing them
        self.expert_names = set(expert_names or ())
        X = groups.dims.ep
        self.edp_n, self.edp_rank = self.n // X, self.rank_in_dp // X
        self.edp_set = groups.process_set.get("edp")
        self._build(module, blocks, init_fn)

    # ---------------------------------------------------------------- construction
    def _build(self, module, blocks, init_fn) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if any(not p.requires_grad for _, p in module.named_parameters()):
            raise HpcllmError("--zero-stage: frozen parameters are not supported")
        owner_of = _owners(module)
        in_block = {}
        for i, blk in enumerate(blocks):
            for p in blk.parameters():
                in_block[id(p)] = i
        specs = [("root", module, [(n, p) for n, p in named if id(p) not in in_block])]
        for i, blk in enumerate(blocks):
            specs.append((f"block{i}", blk, [(n, p) for n, p in named if in_block.get(id(p)) == i]))
        for uname, call_module, params in specs:
            if not params:
                continue
            unit = Unit(uname)
            by_kind = {"decay": [], "no_decay": [], "tied": [], "expert_decay": [], "expert_no_decay": []}
            for n, p in params:
                kind = "tied" if n == self.tied else ("decay" if p.dim() >= 2 else "no_decay")
                if n in self.expert_names:
                    kind = "expert_" + kind
                by_kind[kind].append((n, p))
            for kind, members in by_kind.items():
                if not members:
                    continue
                expert = kind.startswith("expert_")
                flat = Flat(uname, kind, members, self.edp_n if expert else self.n,
                            self.edp_rank if expert else self.rank_in_dp, self.device)
                fresh = []
                for i, (n, old) in enumerate(members):
                    new = torch.nn.Parameter(flat.view(i), requires_grad=True)
                    if old.device.type != "meta":
                        with torch.no_grad():
                            new.copy_(old)
                    mod, attr = owner_of[id(old)]
                    mod._parameters[attr] = new
                    flat.params.append(new)
                    fresh.append((n, new))
                if init_fn is not None and members[0][1].device.type == "meta":
                    init_fn(fresh)
                if self.stage == 3:
                    flat.shard = flat.full[flat.lo:flat.hi].clone()
                else:
                    flat.shard = flat.full[flat.lo:flat.hi]
                for name, _, a, b, sa, sb in flat.pieces():
                    flat.piece_names.append(f"{name}[{a}:{b}]")
                    flat.piece_tensors.append(flat.shard[sa:sb])
                if self.stage == 1:
                    flat.grad_full = torch.zeros_like(flat.full)
                    for i, p in enumerate(flat.params):
                        o = flat.offsets[i]
                        p.grad = flat.grad_full[o:o + flat.numels[i]].view(flat.shapes[i])
                    self._set_shard_grad(flat, flat.grad_full[flat.lo:flat.hi])
                unit.flats.append(flat)
            unit.n_params = sum(len(f.params) for f in unit.flats)
            for f in unit.flats:
                for p in f.params:
                    p.register_post_accumulate_grad_hook(self._grad_hook(unit))
            call_module.__class__ = _zero_class(type(call_module))
            call_module.__dict__["_hpcllm_zero_call"] = (self._before(unit), self._after(unit))
            if self.stage == 3:
                for f in unit.flats:
                    f.free()
                unit.gathered = False
            unit.index = len(self.units)
            self.units.append(unit)
        if not any(u.name == "root" for u in self.units):  # a middle pipeline stage: nothing outside blocks
            module.__class__ = _zero_class(type(module))
            module.__dict__["_hpcllm_zero_call"] = (lambda: None, lambda out: out)

    # ---------------------------------------------------------------- what the trainer asks
    def optimizer_params(self):
        """(name, tensor) pairs the optimizer steps: ``NAME[start:stop]``, this rank's piece
        of each parameter (a view of its shard)."""
        return [pair for u in self.units for f in u.flats for pair in zip(f.piece_names, f.piece_tensors)]

    def decay_names(self) -> set[str]:
        return {n for u in self.units for f in u.flats if not f.kind.endswith("no_decay") for n in f.piece_names}

    def step_params(self) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` unscale and clipping act on."""
        return [t for u in self.units for f in u.flats for t in f.piece_tensors]

    @staticmethod
    def _set_shard_grad(f: Flat, grad) -> None:
        f.shard.grad = grad
        for t, (_, _, _, _, sa, sb) in zip(f.piece_tensors, f.pieces()):
            t.grad = None if grad is None else grad[sa:sb]

    @property
    def replicated(self) -> bool:
        return False

    # ---------------------------------------------------------------- gathers
    def _parts(self, unit: Unit) -> list[tuple]:
        """(name suffix, flats, ranks sharing them, process set, experts?) of a unit: its dense
        flats over the dp group, its experts' over the expert-data-parallel group."""
        dense = [f for f in unit.flats if not f.expert]
        experts = [f for f in unit.flats if f.expert]
        out = []
        if dense:
            out.append(("", dense, self.n, self.process_set, False))
        if experts:
            out.append((".experts", experts, self.edp_n, self.edp_set, True))
        return out

    def _start_gather(self, unit: Unit) -> None:
        if unit.gathered or unit.pending is not None:
            return
        if self.stage == 3:
            for f in unit.flats:
                f.allocate()
        pending = []
        for key, flats, n, ps, _ in self._parts(unit):
            if n == 1 or self.hvd is None:  # nobody shares these: the shard is the whole buffer
                if self.stage == 3:
                    for f in flats:
                        f.full.data.copy_(f.shard)
                continue
            pending.append((self.hvd.grouped_allgather_async([f.shard for f in flats],
                                                             name=f"hpcllm.zero.ag.{unit.name}{key}",
                                                             process_set=ps), flats))
        if not pending:
            unit.gathered = True
            return
        unit.pending = pending

    def _wait_gather(self, unit: Unit) -> None:
        if unit.gathered:
            return
        if unit.pending is None:
            self._start_gather(unit)
            if unit.gathered:
                return
        from hpcllm.parallel.data_parallel import wait_handle

        t0 = time.perf_counter()
        with self.groups.waiting(f"the ZeRO parameter all-gather of {unit.name}"):
            for handle, flats in unit.pending:
                wait_handle(self.hvd, handle)
                outs = self.hvd.synchronize(handle)
                for f, out in zip(flats, outs):
                    # .data: a write autograd does not count against the views it saved for backward
                    f.full.data.copy_(out)
        unit.pending = None
        unit.gathered = True
        self.ag_wait_s += time.perf_counter() - t0

    def _free(self, unit: Unit) -> None:
        if self.stage == 3 and unit.gathered:
            for f in unit.flats:
                f.free()
            unit.gathered = False

    def _neighbour(self, unit: Unit, step: int) -> Unit | None:
        i = unit.index + step
        if 0 <= i < len(self.units) and self.units[i].name != "root":
            return self.units[i]
        return None

    def _before(self, unit: Unit):
        def before():
            self._wait_gather(unit)
            nxt = self._neighbour(unit, 1)
            if nxt is not None:  # prefetch: the next unit's gather runs while this one computes
                self._start_gather(nxt)
        return before

    def _after(self, unit: Unit):
        def after(out):
            if self.stage != 3:
                return out
            if unit.name == "root":
                if not torch.is_grad_enabled():  # evaluation: nothing will come back for it
                    self._free(unit)
                return out
            self._free(unit)
            if torch.is_grad_enabled() and torch.is_tensor(out) and out.requires_grad:
                out.register_hook(self._pre_backward(unit))
            return out
        return after

    def _pre_backward(self, unit: Unit):
        def hook(grad):
            self._wait_gather(unit)
            prev = self._neighbour(unit, -1)
            if prev is not None:
                self._start_gather(prev)
            return grad
        return hook

    # ---------------------------------------------------------------- gradients
    @contextlib.contextmanager
    def overlap(self):
        """Wrap the step's last backward pass: a unit's reduce-scatter starts when its last
        gradient has accumulated."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False
            self.started_in_backward = len(self.rs_inflight)
            self.done_in_backward = (sum(1 for entries in self.rs_inflight.values()
                                         if all(h is None or self.hvd.poll(h) for h, *_ in entries))
                                     if self.hvd is not None else self.started_in_backward)

    def _grad_hook(self, unit: Unit):
        def hook(p):
            unit.seen += 1
            if unit.seen < unit.n_params:
                return
            unit.seen = 0
            if self.armed:
                self._start_reduce(unit)
            self._free(unit)  # stage 3: every use of the unit's parameters is behind us
        return hook

    def _start_reduce(self, unit: Unit) -> None:
        if unit.name in self.rs_inflight:
            raise RuntimeError(f"gradients of {unit.name} accumulated twice in the last backward pass")
        flats = []
        for f in unit.flats:
            if self.stage == 1:
                flats.append(f.grad_full)
                continue
            flat = torch.zeros(f.padded, dtype=torch.float32, device=self.device)
            for i, p in enumerate(f.params):
                if p.grad is not None:
                    o = f.offsets[i]
                    flat[o:o + f.numels[i]].view(f.shapes[i]).copy_(p.grad)
                p.grad = None  # only the shard is kept
            flats.append(flat)
        if self.hvd is None:
            self.rs_inflight[unit.name] = [(None, unit.flats, flats, None)]
            return
        grads = dict(zip(map(id, unit.flats), flats))
        entries = []
        for key, fl, n, ps, expert in self._parts(unit):
            gs = [grads[id(f)] for f in fl]
            if n == 1:  # experts nobody else holds (D = X): their gradient over all D replicas' tokens
                for g in gs:
                    g.mul_(1.0 / self.n)
                entries.append((None, fl, gs, None))
                continue
            wires, ctxs = zip(*(self.compression.compress(g) for g in gs))
            handle = self.hvd.grouped_reducescatter_async(list(wires), name=f"hpcllm.zero.rs.{unit.name}{key}",
                                                          op=self.hvd.Sum if expert else self.hvd.Average,
                                                          postscale_factor=1.0 / self.n if expert else 1.0,
                                                          process_set=ps)
            entries.append((handle, fl, list(wires), list(ctxs)))
            self.reduces += 1
            if self.reduces == self.kill_at:  # the test hook: die with the collective under way
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
        self.rs_inflight[unit.name] = entries

    def finish(self) -> None:
        """Every shard's ``.grad`` holds the layout's gradient (averaged over the dp group,
        tied copies summed) when this returns."""
        t0 = time.perf_counter()
        for unit in self.units:  # units the hooks did not see (same order everywhere)
            if unit.name not in self.rs_inflight and any(p.grad is not None for f in unit.flats for p in f.params):
                self._start_reduce(unit)
            unit.seen = 0
        self.started = len(self.rs_inflight)
        from hpcllm.parallel.data_parallel import wait_handle

        with self.groups.waiting("the ZeRO gradient reduce-scatter"):
            for entries in self.rs_inflight.values():
                for handle, flats, wires, ctxs in entries:
                    if handle is None:
                        outs = wires
                    else:
                        wait_handle(self.hvd, handle)
                        outs = [self.compression.decompress(o, c) for o, c in zip(self.hvd.synchronize(handle), ctxs)]
                    for f, out in zip(flats, outs):
                        if self.stage == 1:
                            if out is not f.grad_full:
                                f.grad_full[f.lo:f.hi].copy_(out)
                        else:
                            self._set_shard_grad(f, out.float() if out.dtype != torch.float32 else out)
        self.rs_inflight.clear()
        self.rs_wait_s = time.perf_counter() - t0
        if self.tied is not None:
            with self.groups.waiting("the tied-embedding gradient sum"):
                self._sum_tied()
        if self.tp_partial:
            with self.groups.waiting("the sequence-parallel gradient sum"):
                self._sum_tp_partial()
        self.wait_s = time.perf_counter() - t0

    def _replicated_pieces(self):
        """(piece tensor, flat) of the parameters every tensor-parallel rank holds alike."""
        for u in self.units:
            for f in u.flats:
                for pname, t in zip(f.piece_names, f.piece_tensors):
                    if pname.split("[", 1)[0] not in self.tp_specs:
                        yield t, f

    def _sum_tp_partial(self) -> None:
        sum_over(self.groups.comm["tp"], [t.grad for t, _ in self._replicated_pieces() if t.grad is not None])

    def _sum_tied(self) -> None:
        from mpi4py import MPI

        for u in self.units:
            for f in u.flats:
                if f.kind != "tied":
                    continue
                if f.shard.grad is None:
                    self._set_shard_grad(f, torch.zeros_like(f.shard))
                g = f.shard.grad
                host = g if g.device.type == "cpu" else g.cpu()
                self.groups.tie.Allreduce(MPI.IN_PLACE, host.detach().numpy(), op=MPI.SUM)
                if host is not g:
                    g.copy_(host)

    @torch.no_grad()
    def norm_sq(self) -> float:
        keep = [f for u in self.units for f in u.flats if f.shard.grad is not None
                and not (f.kind == "tied" and self.duplicate)]
        if not self.tp_specs:
            return squares([f.shard.grad for f in keep])
        # tensor parallelism: shards whole, what every tensor-parallel rank holds 1/T each
        # (the shard's padding has zero gradient, so pieces cover every counted element)
        whole, rep = [], []
        for f in keep:
            for pname, t in zip(f.piece_names, f.piece_tensors):
                if t.grad is not None:
                    (whole if pname.split("[", 1)[0] in self.tp_specs else rep).append(t.grad)
        return squares(whole) + squares(rep) / self.tp_size

    def overlap_shares(self) -> tuple[float, float]:
        if not self.started or self.hvd is None:
            return 0.0, 0.0
        return self.started_in_backward / self.started, self.done_in_backward / self.started

    # ---------------------------------------------------------------- after the step
    def after_step(self) -> None:
        """Stages 1 and 2: the full buffers are stale; start refilling the first unit the next
        forward needs (each unit's call then starts the next one's gather)."""
        self.last_ag_s, self.ag_wait_s = self.ag_wait_s, 0.0
        if self.stage == 3 or self.hvd is None:
            return
        for unit in self.units:
            unit.gathered = False
        self._start_gather(self.units[0])

    def zero_grad(self, optimizer) -> None:
        if self.stage == 1:
            for u in self.units:
                for f in u.flats:
                    f.grad_full.zero_()
            return
        for u in self.units:
            for f in u.flats:
                self._set_shard_grad(f, None)
                for p in f.params:
                    p.grad = None

    def drain(self) -> None:
        """Complete every gather in flight, and (stages 1-2) refill every stale full buffer: the
        module's parameters are then current for any code that uses them (the end, a stop)."""
        for unit in self.units:
            if unit.pending is not None or (self.stage != 3 and not unit.gathered):
                self._wait_gather(unit)

    def comm_record(self) -> dict:
        """Seconds the last step waited for its reduce-scatters and its all-gathers."""
        return {"reduce_scatter_s": round(self.rs_wait_s, 6), "all_gather_s": round(self.last_ag_s, 6)}

    def model_state_bytes(self, optimizer) -> int:
        """Bytes of parameters, gradients and optimizer states this rank holds now (distinct
        storages: the views into a flat buffer count once)."""
        tensors = []
        for u in self.units:
            for f in u.flats:
                tensors += [f.full, f.shard, f.grad_full, f.shard.grad]
                tensors += [p.grad for p in f.params]
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return storage_bytes(tensors)

    # ---------------------------------------------------------------- checkpoints
    def shard_pieces(self, optimizer) -> dict:
        """Each parameter piece this rank owns with its AdamW state (a checkpoint's ``zero-*.pt``)."""
        pieces = {}
        for u in self.units:
            for f in u.flats:
                if f.kind == "tied" and self.duplicate:  # stage 0 of the pipeline writes it
                    continue
                for t, (name, shape, a, b, sa, sb) in zip(f.piece_tensors, f.pieces()):
                    spec = self.tp_specs.get(name)
                    if self.tp_size > 1 and spec is None and self.tp_rank != 0:
                        continue  # held alike by every tensor-parallel rank: the first writes it
                    st = optimizer.state.get(t, {})
                    rec = {"shape": list(shape), "start": a, "stop": b, "value": t.detach().cpu().clone()}
                    if spec is not None and self.tp_size > 1:  # a piece of this rank's shard
                        rec["tp"] = {"rank": self.tp_rank, "size": self.tp_size, "dim": spec.dim,
                                     "groups": list(spec.groups)}
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in st:
                            rec[k] = st[k].detach().cpu().clone()
                    if "step" in st:
                        rec["step"] = st["step"].detach().cpu().clone()
                    pieces[name] = rec
        return pieces

    def load(self, reader) -> dict:
        """This rank's shards (and, stages 1-2, full buffers) from any checkpoint's
        ``reader`` (a :class:`~hpcllm.train.checkpoint.CheckpointReader`), one unit at a time;
        returns the shards' AdamW states by :meth:`optimizer_params` name."""
        states = {}
        for u in self.units:
            names = [n for f in u.flats for n in f.names]
            values = reader.model_state(names)
            optim = reader.optim_state(names)
            for f in u.flats:
                flat = torch.zeros(f.padded, dtype=torch.float32)
                ea, eas = torch.zeros(f.padded), torch.zeros(f.padded)
                have, step = 0, None
                for name, shape, o, k in zip(f.names, f.shapes, f.offsets, f.numels):
                    v = values[name]
                    if tuple(v.shape) != shape:
                        raise HpcllmError(f"{reader.dir}: {name} has shape {tuple(v.shape)}, the model {shape}")
                    flat[o:o + k] = v.reshape(-1).float()
                    s = optim.get(name)
                    if s and "exp_avg" in s:
                        ea[o:o + k] = s["exp_avg"].reshape(-1).float()
                        eas[o:o + k] = s["exp_avg_sq"].reshape(-1).float()
                        step = s.get("step", step)
                        have += 1
                with torch.no_grad():
                    f.shard.copy_(flat[f.lo:f.hi])
                    if self.stage != 3:
                        f.full.copy_(flat.to(f.full.device))
                if have:
                    if have != len(f.names):
                        raise HpcllmError(f"{reader.dir}: optimizer state for only {have} of the {len(f.names)} "
                                          f"parameters of {f.key} (a damaged checkpoint)")
                    step = step if torch.is_tensor(step) else torch.tensor(float(step))
                    for pname, (_, _, _, _, sa, sb) in zip(f.piece_names, f.pieces()):
                        states[pname] = {"step": step.clone(), "exp_avg": ea[f.lo + sa:f.lo + sb].clone(),
                                         "exp_avg_sq": eas[f.lo + sa:f.lo + sb].clone()}
        return states
