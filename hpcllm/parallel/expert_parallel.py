"""Expert parallelism: each mixture's E experts split over the X ranks of an expert group.

Expert parallelism divides the data-parallel ranks (as in Megatron): the D replicas each
read their own batch as before, and each group of X consecutive data-parallel ranks shares
one copy of the experts, E/X on each rank. :func:`apply_expert_parallel` keeps a rank's
experts in every mixture (names unchanged: ``mlp.experts.<global index>``) and installs an
:class:`ExpertDispatcher`, which per forward pass:

1. takes the router's kept assignments, already permuted by expert (:func:`hpcllm.model.moe.route`);
2. exchanges the per-expert counts with the group (one small mpi4py all-to-all of E/X
   integers per peer);
3. sends each rank the rows of its experts with one variable-size all-to-all
   (:class:`EPComm`: ``hvd.alltoall`` with ``splits`` in the group's process set, or mpi4py's
   ``Alltoallv``; ``--ep-backend auto`` measures both at startup at one micro-batch's message
   size and keeps the faster: Horovod's negotiation cycle costs milliseconds per collective on
   CPU ranks, and a step runs four all-to-alls per mixture), regroups the received rows by local expert, runs each expert once over
   its rows, and sends the outputs back with the reverse all-to-all;

the backward pass runs the same two exchanges in reverse (:class:`_AllToAll`). No (tokens x
experts x capacity) tensor exists anywhere. Gradients: an expert's gradient already holds
the contributions of every token of its group; :class:`~hpcllm.parallel.grad_sync.GradSync`
sums it over the expert-data-parallel group (the D/X ranks holding the same experts) and
divides by D, while dense parameters are averaged over all D replicas.
"""
from __future__ import annotations

import time

import torch

from hpcllm.errors import HpcllmError


class EPComm:
    """The collectives of one expert group: ``comm`` (mpi4py), and Horovod's ``alltoall`` in
    ``process_set`` when ``backend`` is horovod. ``seconds``: time spent in the token
    all-to-alls (and their count exchange) since the trainer last reset it."""

    def __init__(self, comm, hvd=None, process_set=None, backend: str = "mpi4py"):
        self.comm, self.hvd, self.process_set = comm, hvd, process_set
        self.size = comm.Get_size() if comm is not None else 1
        self.rank = comm.Get_rank() if comm is not None else 0
        if backend == "horovod" and hvd is None and self.size > 1:
            raise HpcllmError("--ep-backend horovod: Horovod is not available in this job")
        self.backend = backend if self.size > 1 else "none"
        #: what choose_backend measured (for the run log)
        self.choice = None
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """``send`` (X, k) int64: row r for rank r; returns (X, k): row s what rank s sent here."""
        if self.size == 1:
            return send.clone()
        from mpi4py import MPI

        from hpcllm.parallel.groups import wait_request

        t0 = time.perf_counter()
        out = torch.empty_like(send)
        wait_request(self.comm.Ialltoall([send.numpy(), MPI.INT64_T], [out.numpy(), MPI.INT64_T]))
        self.seconds += time.perf_counter() - t0
        return out

    def alltoall(self, x: torch.Tensor, send_rows: list[int], recv_rows: list[int], name: str) -> torch.Tensor:
        """Rows ``x[sum(send_rows[:r]):...]`` to rank r; the rows received, by source rank."""
        t0 = time.perf_counter()
        x = x.contiguous()
        row = x[0].numel() if x.dim() > 1 else 1
        wire = x.view(torch.float16) if x.dtype == torch.bfloat16 else x  # bytes only: no bf16 in Horovod
        if self.backend == "horovod":
            from hpcllm.parallel.data_parallel import wait_handle

            splits = torch.tensor(send_rows, dtype=torch.int32)
            handle = self.hvd.alltoall_async(wire, splits=splits, name=name, process_set=self.process_set)
            wait_handle(self.hvd, handle)
            out, _ = self.hvd.synchronize(handle)
        else:
            from mpi4py import MPI

            from hpcllm.parallel.groups import wait_request

            host = wire.detach().cpu() if wire.device.type != "cpu" else wire.detach()
            out = torch.empty((sum(recv_rows),) + tuple(x.shape[1:]), dtype=wire.dtype)
            size = host.element_size() * row
            sc = [n * size for n in send_rows]
            rc = [n * size for n in recv_rows]
            sd = [sum(sc[:i]) for i in range(len(sc))]
            rd = [sum(rc[:i]) for i in range(len(rc))]
            src = host.reshape(-1).view(torch.uint8).numpy() if host.numel() else bytearray(1)
            dst = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else bytearray(1)
            wait_request(self.comm.Ialltoallv([src, (sc, sd), MPI.BYTE], [dst, (rc, rd), MPI.BYTE]))
            out = out.to(x.device)
        if x.dtype == torch.bfloat16:
            out = out.view(torch.bfloat16)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.bytes += x.numel() * x.element_size()
        return out


def choose_backend(comm: EPComm, rows: int, width: int, device, forced: str = "auto", repeats: int = 10) -> dict:
    """Measure the token all-to-all over each candidate (Horovod when it runs, mpi4py) with
    ``rows`` rows of ``width`` fp32 values to each peer (one micro-batch's share), keep the
    faster, the same on every rank of the group (``forced``: as asked). Returns the medians (ms)
    and the choice for the run log."""
    import statistics

    cands = (["horovod"] if comm.hvd is not None else []) + ["mpi4py"]
    if forced != "auto":
        if forced not in cands:
            raise HpcllmError(f"--ep-backend {forced}: not available here (candidates: {', '.join(cands)})")
        cands = [forced]
    X = comm.size
    probe = torch.zeros(rows * X, width, dtype=torch.float32, device=device)
    times = {}
    for backend in cands:
        comm.backend = backend
        samples = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            comm.alltoall(probe, [rows] * X, [rows] * X, "hpcllm.ep.probe")
            if i >= 2:
                samples.append(time.perf_counter() - t0)
        from mpi4py import MPI

        times[backend] = comm.comm.allreduce(statistics.median(samples), op=MPI.MAX)
    chosen = min(times, key=times.get)
    comm.backend, comm.seconds, comm.calls, comm.bytes = chosen, 0.0, 0, 0
    return {"chosen": chosen, "bytes": int(rows * width * 4), "median_ms": {k: round(v * 1e3, 3) for k, v in times.items()},
            "forced": forced != "auto"}


class _AllToAll(torch.autograd.Function):
    """The rows' all-to-all; its backward is the reverse all-to-all of the gradients."""

    @staticmethod
    def forward(ctx, x, comm: EPComm, send_rows, recv_rows, name):
        ctx.comm, ctx.send_rows, ctx.recv_rows, ctx.name = comm, send_rows, recv_rows, name
        return comm.alltoall(x, send_rows, recv_rows, name)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.alltoall(grad, ctx.recv_rows, ctx.send_rows, ctx.name + ".grad"), None, None, None, None


class ExpertDispatcher:
    """A mixture's tokens to the ranks of their experts and back (see the module doc)."""

    def __init__(self, comm: EPComm, n_experts: int, layer: int):
        self.comm, self.layer = comm, layer
        self.per_rank = n_experts // comm.size

    def __call__(self, moe, flat: torch.Tensor, routing) -> torch.Tensor:
        X, k = self.comm.size, self.per_rank
        send = routing.counts.detach().to("cpu", torch.int64).view(X, k)  # (dest rank, its expert)
        recv = self.comm.exchange_counts(send)  # (source rank, my expert)
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        tag = f"hpcllm.ep.{self.layer}"
        xs = flat[routing.token]  # by expert, so by destination rank
        got = _AllToAll.apply(xs, self.comm, send_rows, recv_rows, tag + ".dispatch")
        # received: by source rank, then by my expert; regroup by expert, then source rank
        starts = (torch.cumsum(recv.reshape(-1), 0) - recv.reshape(-1)).view(X, k)
        perm = [torch.arange(int(starts[s, e]), int(starts[s, e] + recv[s, e])) for e in range(k) for s in range(X)]
        perm = torch.cat(perm).to(flat.device) if perm else torch.zeros(0, dtype=torch.long, device=flat.device)
        out = moe.run_experts(got[perm], recv.sum(0).tolist())
        back = torch.empty_like(out).index_copy(0, perm, out) if out.shape[0] else out
        return _AllToAll.apply(back, self.comm, recv_rows, send_rows, tag + ".combine")


def apply_expert_parallel(model: torch.nn.Module, comm: EPComm) -> list[str]:
    """Keep this rank's E/X experts of every mixture in ``model`` (global indices ``rank *
    E/X`` ...) and install the dispatcher; returns the names of the expert parameters kept."""
    from hpcllm.model.moe import moe_modules

    kept = []
    for m in moe_modules(model):
        if m.n_experts % comm.size:
            raise HpcllmError(f"--expert-parallel {comm.size}: does not divide --moe-experts {m.n_experts}")
        per = m.n_experts // comm.size
        mine = set(range(comm.rank * per, (comm.rank + 1) * per))
        for e in list(m.experts):
            if int(e) not in mine:
                del m.experts[e]
        m.dispatcher = ExpertDispatcher(comm, m.n_experts, m.layer)
    for n, _ in model.named_parameters():
        if is_expert_param(n):
            kept.append(n)
    return kept


def is_expert_param(name: str) -> bool:
    """Whether ``name`` is a parameter of one expert (held by one rank of an expert group)."""
    return ".mlp.experts." in f".{name}"
