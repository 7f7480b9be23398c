"""Tensor parallelism (Megatron-LM style), applied to the plain GPT from outside.

:func:`apply_tensor_parallel` replaces modules of a built model (or pipeline stage) with
sharded ones registered under the same attribute names, so parameter names stay those of the
whole model (``blocks.3.attn.qkv.weight`` holds this rank's rows of that matrix) and per-name
initialisation gives every degree the same model (the whole tensor is drawn, then sliced):

- attention by heads: ``attn.qkv`` column-parallel (each rank's query heads and their key/value
  heads: rows taken from each of the q, k and v blocks), ``attn.proj`` row-parallel;
- MLP: ``mlp.fc`` column-parallel (gate and up rows alike for SwiGLU), ``mlp.proj`` row-parallel;
- the embedding vocabulary-parallel (each rank its rows; ids outside them contribute zeros,
  one all-reduce), the head on the same rows (tied) or on ``lm_head``'s rows, and the loss
  vocabulary-parallel: max, sum of exponentials and target logit reduced across ranks, so no
  rank ever holds the (tokens x vocabulary) logits.

Megatron's conjugate pair carries the activations: ``copy_to_tp`` (identity forward,
all-reduce of the gradient backward) before each column-parallel layer, ``reduce_from_tp``
(all-reduce forward, identity backward) after each row-parallel one: a block costs exactly
2 all-reduces forward and 2 backward (:attr:`TPComm.calls` counts them). Norms, row-parallel
biases and learned positions are replicated; their gradients come out identical on every
tensor-parallel rank (their inputs and upstream gradients are), so they need no reduction,
and the global norm counts them once.

Collectives run over mpi4py communicators: at the block's message sizes a 64 KiB all-reduce
took 0.03 ms through mpi4py and 0.6-3 ms through Horovod on 2 ranks of one node
(``benchmarks/tensor_parallel.py`` measures both in the same run). MPI has no 16-bit float
type, so bf16/fp16 activations travel as fp32 (twice the bytes); on CUDA tensors are staged
through host memory (NCCL is the follow-up there).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcllm.errors import HpcllmError


class TPComm:
    """The tensor-parallel group's all-reduce (mpi4py, blocking: latency decides here) and a
    per-direction call counter (``calls["fwd"]``, ``calls["bwd"]``)."""

    def __init__(self, comm=None, hvd=None, process_set=None, backend: str = "mpi4py"):
        self.comm = comm
        self.size = comm.Get_size() if comm is not None else 1
        self.rank = comm.Get_rank() if comm is not None else 0
        self.calls: collections.Counter = collections.Counter()
        self.seconds = 0.0
        self.hvd, self.process_set = hvd, process_set
        #: "mpi4py" or "horovod" (see :func:`choose_backend`)
        self.backend = backend
        self._seq = 0

    def _hvd_name(self, what: str) -> str:
        # every rank of the group issues the same collectives in the same order
        self._seq += 1
        return f"hpcllm.tp.{what}.{self._seq}"

    @torch.compiler.disable  # an MPI call: a graph break by design (--compile compiles around it)
    def allreduce_(self, t: torch.Tensor, op: str = "sum", where: str = "fwd") -> torch.Tensor:
        """Reduce ``t`` in place across the group (``op`` sum or max); returns ``t``."""
        self.calls[where] += 1
        if self.size == 1:
            return t
        import time

        from mpi4py import MPI

        start = time.perf_counter()
        if self.backend == "horovod":
            # Horovod moves 16-bit tensors as they are (and CUDA tensors through NCCL when built so)
            hvd = self.hvd
            out = hvd.allreduce(_hvd_wire(t), op=hvd.Max if op == "max" else hvd.Sum,
                                name=self._hvd_name("allreduce"), process_set=self.process_set)
            with torch.no_grad():
                t.copy_(out)
            self.seconds += time.perf_counter() - start
            return t
        wire = t.detach()
        if wire.device.type != "cpu":
            wire = wire.cpu()
        if wire.dtype not in (torch.float32, torch.float64):
            wire = wire.float()  # MPI has no 16-bit float type
        wire = wire.contiguous()
        self.comm.Allreduce(MPI.IN_PLACE, wire.numpy(), op=MPI.MAX if op == "max" else MPI.SUM)
        if wire.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(wire)
        self.seconds += time.perf_counter() - start
        return t


    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        w = t.detach()
        if w.device.type != "cpu":
            w = w.cpu()
        if w.dtype not in (torch.float32, torch.float64):
            w = w.float()
        return w.contiguous()

    @torch.compiler.disable  # an MPI call: a graph break by design (--compile compiles around it)
    def gather_seq(self, t: torch.Tensor, where: str = "fwd") -> torch.Tensor:
        """(B, t, ...) shards -> (B, T*t, ...) in rank order: sequence parallelism's all-gather."""
        self.calls[where + "_allgather"] += 1
        if self.size == 1:
            return t
        import time

        start = time.perf_counter()
        if self.backend == "horovod":
            w = _hvd_wire(t)
            out = self.hvd.allgather(w[None], name=self._hvd_name("allgather"), process_set=self.process_set)
        else:
            w = self._wire(t)
            out = torch.empty((self.size,) + tuple(w.shape), dtype=w.dtype)
            self.comm.Allgather(w.numpy(), out.numpy())
        out = out.movedim(0, 1).reshape(w.shape[0], self.size * w.shape[1], *w.shape[2:])
        self.seconds += time.perf_counter() - start
        return out.to(device=t.device, dtype=t.dtype)

    @torch.compiler.disable  # an MPI call: a graph break by design (--compile compiles around it)
    def reduce_scatter_seq(self, t: torch.Tensor, where: str = "fwd") -> torch.Tensor:
        """(B, T, ...) partial sums -> this rank's (B, T/size, ...) chunk of their sum."""
        self.calls[where + "_reduce_scatter"] += 1
        if self.size == 1:
            return t
        import time

        from mpi4py import MPI

        start = time.perf_counter()
        B, T = t.shape[0], t.shape[1]
        chunks = t.reshape(B, self.size, T // self.size, *t.shape[2:]).movedim(1, 0)
        if self.backend == "horovod":
            hvd = self.hvd
            out = hvd.reducescatter(_hvd_wire(chunks), op=hvd.Sum, name=self._hvd_name("reducescatter"),
                                    process_set=self.process_set)[0]
        else:
            w = self._wire(chunks)
            out = torch.empty(tuple(w.shape[1:]), dtype=w.dtype)
            self.comm.Reduce_scatter_block(w.numpy(), out.numpy(), op=MPI.SUM)
        self.seconds += time.perf_counter() - start
        return out.to(device=t.device, dtype=t.dtype)

    def chunk_seq(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of a (B, T, ...) tensor every rank holds whole."""
        n = t.shape[1] // self.size
        return t[:, self.rank * n:(self.rank + 1) * n]


def choose_backend(comm: TPComm, nbytes: int, device, forced: str = "auto", repeats: int = 20, groups=None) -> dict:
    """Measure the candidates for this group's all-reduces at the block's message size
    (``nbytes``: one micro-batch's activation) on this device, keep the faster (``forced``:
    mpi4py or horovod as asked), the same on every rank. Returns what was measured (median
    milliseconds) and chosen, for the run log.

    With ``groups`` holding a candidate Horovod (no dimension reduces gradients with it),
    mpi4py is timed first, before Horovod starts (Horovod's background thread slows mpi4py's
    collectives on CPU ranks), then Horovod is started and timed, and shut down again when
    mpi4py wins; the choice is then agreed over the whole world (a Horovod shutdown is every
    rank's)."""
    import statistics
    import time

    candidate = groups is not None and groups.horovod_candidate is not None and groups.hvd is None
    cands = ["mpi4py"] + (["horovod"] if comm.hvd is not None or candidate else [])
    if forced != "auto":
        if forced not in cands:
            from hpcllm.errors import HpcllmError

            raise HpcllmError(f"--tp-backend {forced}: not available here (candidates: {', '.join(cands)})")
        cands = [forced]
    probe = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    agree = groups.world if (candidate and groups.world is not None) else comm.comm
    times = {}
    for backend in cands:
        if backend == "horovod" and comm.hvd is None:
            groups.start_horovod()
            comm.hvd, comm.process_set = groups.hvd, groups.process_set.get("tp")
        comm.backend = backend
        samples = []
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            comm.allreduce_(probe, where="probe")
            if i >= 3:
                samples.append(time.perf_counter() - t0)
        # the ranks agree on the slowest rank's view (every rank must pick the same backend)
        times[backend] = agree.allreduce(statistics.median(samples), op=_mpi_max()) if agree else 0.0
    chosen = min(times, key=times.get)
    if candidate and chosen == "mpi4py" and groups.hvd is not None:
        groups.stop_horovod()
        comm.hvd, comm.process_set = None, None
    comm.backend, comm.seconds = chosen, 0.0
    comm.calls.pop("probe", None)
    return {"chosen": chosen, "bytes": int(nbytes), "median_ms": {k: round(v * 1e3, 4) for k, v in times.items()},
            "forced": forced != "auto", "horovod_stopped": bool(candidate and chosen == "mpi4py")}


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX


class _GatherSeq(torch.autograd.Function):
    """Sequence parallelism's entry to a column-parallel layer: all-gather forward,
    reduce-scatter of the gradient backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.gather_seq(x, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter_seq(grad.contiguous(), "bwd"), None


class _ScatterSeq(torch.autograd.Function):
    """Sequence parallelism's exit of a row-parallel layer: reduce-scatter forward,
    all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.reduce_scatter_seq(x, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.gather_seq(grad.contiguous(), "bwd"), None


class _ChunkSeq(torch.autograd.Function):
    """Take this rank's sequence chunk of an input every rank holds whole (a pipeline stage's
    input); the gradient is zero outside it (the sender's all-gather sums the ranks' chunks)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm, ctx.shape = comm, x.shape
        return comm.chunk_seq(x).contiguous()

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_zeros(ctx.shape)
        n = ctx.shape[1] // ctx.comm.size
        out[:, ctx.comm.rank * n:(ctx.comm.rank + 1) * n] = grad
        return out, None


def gather_seq(x, comm: TPComm):
    return _GatherSeq.apply(x, comm) if comm.size > 1 else x


def scatter_seq(x, comm: TPComm):
    return _ScatterSeq.apply(x, comm) if comm.size > 1 else x


def chunk_seq(x, comm: TPComm):
    return _ChunkSeq.apply(x, comm) if comm.size > 1 else x


def _hvd_wire(t: torch.Tensor) -> torch.Tensor:
    """What Horovod 0.28.1 can carry: it has no bf16 type (fp16 and fp32 go as they are)."""
    w = t.detach()
    return (w.float() if w.dtype == torch.bfloat16 else w).contiguous()


class _CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.allreduce_(grad.contiguous().clone(), where="bwd"), None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, comm):
        return comm.allreduce_(x.contiguous().clone(), where="fwd")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, comm: TPComm):
    return _CopyToTP.apply(x, comm) if comm.size > 1 else x


def reduce_from_tp(x, comm: TPComm):
    return _ReduceFromTP.apply(x, comm) if comm.size > 1 else x


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is cut: along ``dim``, each of the consecutive ``groups`` (sizes along
    ``dim``, e.g. the q, k and v rows of the fused projection) split evenly, rank r taking
    the r-th piece of every group."""

    dim: int
    groups: tuple[int, ...]

    def shard(self, full: torch.Tensor, size: int, rank: int) -> torch.Tensor:
        parts = full.split(list(self.groups), dim=self.dim)
        return torch.cat([p.narrow(self.dim, rank * (n // size), n // size) for p, n in zip(parts, self.groups)],
                         dim=self.dim)

    def join(self, shards: list[torch.Tensor]) -> torch.Tensor:
        size = len(shards)
        pieces = [s.split([n // size for n in self.groups], dim=self.dim) for s in shards]
        return torch.cat([torch.cat([pieces[r][g] for r in range(size)], dim=self.dim)
                          for g in range(len(self.groups))], dim=self.dim)


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r for this rank's output rows; the input's gradient is all-reduced
    (sequence parallel: the input's sequence chunks all-gathered first)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: TPComm, sequence_parallel=False):
        super().__init__()
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x):
        x = gather_seq(x, self.comm) if self.sequence_parallel else copy_to_tp(x, self.comm)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T (one all-reduce; sequence parallel: a reduce-scatter to this rank's
    sequence chunk) + b, for this rank's input columns."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: TPComm, sequence_parallel=False):
        super().__init__()
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None  # replicated, added once

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = scatter_seq(y, self.comm) if self.sequence_parallel else reduce_from_tp(y, self.comm)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding; other ids contribute zeros; one all-reduce
    (sequence parallel: a reduce-scatter to this rank's sequence chunk)."""

    def __init__(self, weight: torch.Tensor, start: int, comm: TPComm, sequence_parallel=False):
        super().__init__()
        self.comm, self.start, self.sequence_parallel = comm, start, sequence_parallel
        self.weight = nn.Parameter(weight)

    def forward(self, idx):
        n = self.weight.size(0)
        outside = (idx < self.start) | (idx >= self.start + n)
        out = F.embedding((idx - self.start).masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return scatter_seq(out, self.comm) if self.sequence_parallel else reduce_from_tp(out, self.comm)


class SequenceChunkPositions(nn.Module):
    """Learned positions under sequence parallelism: the rows of this rank's sequence chunk."""

    def __init__(self, weight: torch.Tensor, comm: TPComm):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(weight)

    def forward(self, positions):
        n = positions.shape[-1] // self.comm.size
        return F.embedding(positions[..., self.comm.rank * n:(self.comm.rank + 1) * n], self.weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split over the vocabulary: per token the global max, the
    target's logit (on the rank holding it) and the sum of exponentials are reduced (two
    all-reduces), and only this rank's (tokens x vocabulary / T) slice is ever held."""

    @staticmethod
    def forward(ctx, logits, targets, start, comm):
        x = logits.float()
        x = x.reshape(-1, x.size(-1))
        t = targets.reshape(-1)
        n = x.size(-1)
        mx = x.max(dim=-1).values
        comm.allreduce_(mx, op="max", where="fwd")
        x = x - mx[:, None]  # a new tensor: this rank's shifted logits
        outside = (t < start) | (t >= start + n)
        local = (t - start).masked_fill(outside, 0)
        both = torch.stack((x.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0), x.exp_().sum(-1)))
        comm.allreduce_(both, where="fwd")
        target_logit, sum_exp = both[0], both[1]
        loss = torch.log(sum_exp) - target_logit
        x.div_(sum_exp[:, None])  # now this rank's softmax slice, kept for backward
        ctx.save_for_backward(x, local, outside)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        g = softmax  # used once: modified in place
        g.scatter_add_(1, local[:, None], -(~outside).to(g.dtype)[:, None])
        g.mul_(grad / g.size(0))
        return g.view(ctx.shape).to(ctx.dtype), None, None, None


def vocab_parallel_loss(comm: TPComm, start: int):
    """The loss function for :attr:`GPT.loss_fn` on rows [start, ...) of the vocabulary."""
    def loss_fn(logits, targets):
        return _VocabParallelCrossEntropy.apply(logits, targets, start, comm)
    return loss_fn


def check_divisible(cfg, tp: int, sequence_parallel: bool = False) -> None:
    """One line per misfit of the model and the tensor-parallel degree."""
    if sequence_parallel and cfg.seq_len % tp:
        raise HpcllmError(f"--sequence-parallel: --seq-len {cfg.seq_len} is not divisible by --tensor-parallel {tp}")
    for what, n in (("--n-head", cfg.n_head), ("key/value heads (--n-kv-head)", cfg.n_kv_head),
                    ("the MLP hidden size", cfg.hidden_dim), ("the padded vocabulary", cfg.padded_vocab)):
        if n % tp:
            raise HpcllmError(f"--tensor-parallel {tp}: {what} {n} is not divisible by {tp}")


@torch.no_grad()
def apply_tensor_parallel(gpt, comm: TPComm, cfg, sequence_parallel: bool = False, stage=None) -> dict[str, ShardSpec]:
    """Shard ``gpt`` (a whole GPT or a pipeline stage's slice, already initialised) over
    ``comm``'s ranks in place; returns the ShardSpec of every sharded parameter by name
    (the others are replicated). ``sequence_parallel``: norms and residuals on sequence
    chunks (all-gather / reduce-scatter instead of the all-reduces); ``stage``: the
    PipelineStage holding ``gpt`` (its input is chunked, its output gathered)."""
    T, r = comm.size, comm.rank
    sp = sequence_parallel and T > 1
    check_divisible(cfg, T, sp)
    specs: dict[str, ShardSpec] = {}
    d, kvd, h = cfg.d_model, cfg.kv_dim, cfg.hidden_dim
    qkv, fc = ShardSpec(0, (d, kvd, kvd)), ShardSpec(0, (h, h) if cfg.arch == "llama" else (h,))
    rows_in = {"attn.proj": ShardSpec(1, (d,)), "mlp.proj": ShardSpec(1, (h,))}
    ids = gpt.layer_ids
    for i, blk in zip(ids, gpt.block_list()):
        p = f"blocks.{i}."
        for mod, name, spec in ((blk.attn, "qkv", qkv), (blk.mlp, "fc", fc)):
            lin = getattr(mod, name)
            w = spec.shard(lin.weight, T, r).clone()
            b = spec.shard(lin.bias, T, r).clone() if lin.bias is not None else None
            setattr(mod, name, ColumnParallelLinear(w, b, comm, sp))
            specs[p + f"{'attn' if mod is blk.attn else 'mlp'}.{name}.weight"] = spec
            if b is not None:
                specs[p + f"{'attn' if mod is blk.attn else 'mlp'}.{name}.bias"] = spec
        for mod, key in ((blk.attn, "attn.proj"), (blk.mlp, "mlp.proj")):
            lin, spec = mod.proj, rows_in[key]
            b = lin.bias.detach().clone() if lin.bias is not None else None
            mod.proj = RowParallelLinear(spec.shard(lin.weight, T, r).clone(), b, comm, sp)
            specs[p + key + ".weight"] = spec
        blk.attn.n_head //= T
        blk.attn.n_kv_head //= T
    V = cfg.padded_vocab
    vocab = ShardSpec(0, (V,))
    start = r * (V // T)
    if gpt.wte is not None:
        gpt.wte = VocabParallelEmbedding(vocab.shard(gpt.wte.weight, T, r).clone(), start, comm, sp)
        specs["wte.weight"] = vocab
    if sp and gpt.wpe is not None:
        gpt.wpe = SequenceChunkPositions(gpt.wpe.weight.detach().clone(), comm)
    if gpt.lm_head is not None:
        head = nn.Linear(d, V // T, bias=False, device=gpt.lm_head.weight.device)
        head.weight.copy_(vocab.shard(gpt.lm_head.weight, T, r))
        gpt.lm_head = head
        specs["lm_head.weight"] = vocab
    if gpt.ln_f is not None:
        # the head's input enters a column-parallel matmul: f (or the all-gather) on the final
        # norm's output
        enter = gather_seq if sp else copy_to_tp
        gpt.ln_f.register_forward_hook(lambda _m, _i, out: enter(out, comm))
        gpt.loss_fn = vocab_parallel_loss(comm, start)
    if sp and stage is not None:
        # stages exchange whole sequences: chunked on entry, gathered on exit
        if not stage.first:
            stage.input_fn = lambda x: chunk_seq(x, comm)
        if not stage.last:
            stage.output_fn = lambda x: gather_seq(x, comm)
    return specs


def gather_full(tensors: dict[str, torch.Tensor], specs: dict[str, ShardSpec], comm, root: int = 0) -> dict | None:
    """The whole tensors on tensor-parallel rank ``root`` (None elsewhere): sharded ones joined
    from every rank's shard, replicated ones as they are. Collective over ``comm``."""
    if comm is None or comm.Get_size() == 1:
        return dict(tensors)
    sharded = {k: v.detach().cpu() for k, v in tensors.items() if k in specs}
    got = comm.gather(sharded, root=root)
    if comm.Get_rank() != root:
        return None
    out = {k: v for k, v in tensors.items() if k not in specs}
    for k in sharded:
        out[k] = specs[k].join([g[k] for g in got])
    return out


def shard_tensors(full: dict[str, torch.Tensor], specs: dict[str, ShardSpec], size: int, rank: int) -> dict:
    """This rank's pieces of whole tensors (a checkpoint written under any degree)."""
    return {k: (specs[k].shard(v, size, rank).clone() if k in specs and size > 1 else v) for k, v in full.items()}
