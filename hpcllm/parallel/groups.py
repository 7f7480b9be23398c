"""ParallelGroups: the communicators every parallel dimension needs, created once, in one place.

For a :class:`~hpcllm.parallel.dims.ParallelDims` layout this builds, on every rank:

- ``world``: ``MPI.COMM_WORLD`` (mpi4py), for the per-step agreement, evaluation sums and
  checkpoint barriers: small messages, where mpi4py takes tens of microseconds and a Horovod
  collective milliseconds;
- ``comm[dim]``: the mpi4py communicator of this rank's group in each dimension (rank in it =
  the coordinate), e.g. ``comm["pp"]`` for a pipeline's point-to-point transfers;
- ``tie``: first and last stage of this rank's pipeline (None elsewhere and without stages),
  the two holders of the tied embedding matrix;
- ``process_set[dim]``: the Horovod process set of this rank's group in each dimension that
  moves gradients (``dp``), registered at ``hvd.init()`` (Horovod needs every set
  known there, the same list on every rank);
- with expert parallelism, ``comm``/``process_set`` ``"ep"`` (the expert group: token
  all-to-alls) and ``"edp"`` (the ranks holding the same experts: their gradients).

A single process (no launcher) uses neither MPI nor Horovod: every collective is an identity.
A multi-rank launch without Horovod or mpi4py is an error, never N independent copies.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
import torch

from hpcllm.errors import HpcllmError
from hpcllm.parallel.data_parallel import (POLL_INTERVAL_S, POLL_MAX_INTERVAL_S, horovod_env, mpi_env,
                                           set_threads)
from hpcllm.parallel.dims import ORDER, ParallelDims
from hpcllm.parallel.topology import Topology

#: dimensions whose gradients Horovod reduces (process sets are registered for these)
HOROVOD_DIMS = ("dp",)
#: dimensions Horovod may carry activations for (tensor parallelism measures Horovod against
#: mpi4py at startup and keeps the faster; its process sets are registered when Horovod is there)
HOROVOD_OPTIONAL_DIMS = ("tp",)


class ParallelGroups:
    """This rank's place in the layout and the groups of every dimension (see module doc)."""

    def __init__(self, dims: ParallelDims, rank: int = 0, local_rank: int = 0, local_size: int = 1,
                 world=None, hvd=None, watchdog=None):
        self.dims, self.rank = dims, rank
        self.size = dims.world
        self.coords = dims.coords(rank)
        self.local_rank, self.local_size = local_rank, local_size
        #: number of nodes (of shared-memory domains) the job spans
        self.cross_size = 1
        self.world = world
        self.hvd = hvd
        self.watchdog = watchdog
        self.comm: dict[str, object] = {}
        self.process_set: dict[str, object] = {}
        self.tie = None
        #: the config to start Horovod with when it is only a candidate backend (no dimension
        #: reduces gradients with it): see start_horovod / stop_horovod
        self.horovod_candidate = None

    # ---------------------------------------------------------------- where this rank is
    @property
    def stage(self) -> int:
        return self.coords["pp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def ep_rank(self) -> int:
        """Index within the expert group (which E/X experts this rank holds)."""
        return self.coords["dp"] % self.dims.ep

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.dims.pp - 1

    @property
    def is_root(self) -> bool:
        """World rank 0: the one process that writes the run's shared files."""
        return self.rank == 0

    def describe(self) -> str:
        where = ", ".join(f"{d} {self.coords[d]}/{getattr(self.dims, d)}" for d in reversed(ORDER))
        return f"rank {self.rank}/{self.size} ({where}; local {self.local_rank}/{self.local_size})"

    # ---------------------------------------------------------------- collectives
    def waiting(self, what: str):
        """The watchdog's context around a wait on other ranks (free without one)."""
        return self.watchdog.waiting(what) if self.watchdog is not None else contextlib.nullcontext()

    def allreduce_sum(self, values, what: str = "a statistics allreduce") -> np.ndarray:
        """Sum of a small float64 vector over the world (mpi4py), a new array."""
        buf = np.array(values, dtype=np.float64)
        if self.world is None:
            return buf
        from mpi4py import MPI

        with self.waiting(what):
            wait_request(self.world.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        return buf

    def allgather(self, obj, what: str | None = "an allgather") -> list:
        """Every rank's ``obj`` (picklable), in rank order; ``what`` None: not watched (ranks
        wait here while others write checkpoint files)."""
        if self.world is None:
            return [obj]
        if what is None:
            return self.world.allgather(obj)
        with self.waiting(what):
            return self.world.allgather(obj)

    def bcast(self, obj, root: int = 0, what: str = "a broadcast"):
        if self.world is None:
            return obj
        with self.waiting(what):
            return self.world.bcast(obj, root=root)

    def on_root(self, fn, what: str = "rank 0's work"):
        """Run ``fn`` on rank 0 only; an HpcllmError there is raised on every rank (the others
        would otherwise wait for rank 0 in the next collective)."""
        err = None
        if self.is_root:
            try:
                fn()
            except HpcllmError as e:
                err = str(e)
        err = self.bcast(err, what=what)
        if err:
            raise HpcllmError(err)

    def broadcast_tensors(self, tensors: dict, dim: str = "dp", root: int = 0) -> None:
        """Copy the tensors of coordinate ``root`` in ``dim`` to the rest of that group, in
        place (mpi4py, name order): replicas start from identical values however they got them."""
        comm = self.comm.get(dim)
        if comm is None or comm.Get_size() == 1:
            return
        with self.waiting(f"the broadcast of the {dim} replicas' state"):
            for name in sorted(tensors):
                t = tensors[name]
                host = t.detach().cpu().contiguous()
                if host.numel():
                    comm.Bcast(host.reshape(-1).view(torch.uint8).numpy(), root=root)
                    if host.data_ptr() != t.data_ptr():
                        t.copy_(host)

    def start_horovod(self) -> None:
        """Start the candidate Horovod (every rank calls this together)."""
        if self.hvd is None and self.horovod_candidate is not None:
            self.hvd = _init_horovod(self.horovod_candidate, self.dims, self)

    def stop_horovod(self) -> None:
        """Shut the candidate Horovod down again (every rank together): nothing uses it, and its
        background thread would cycle beside the compute."""
        if self.hvd is not None and self.horovod_candidate is not None:
            self.hvd.shutdown()
            self.hvd = None
            self.process_set.clear()

    def abort(self, code: int = 1) -> None:
        """End every rank now (after an unexpected exception on one rank)."""
        if self.world is not None:
            try:
                self.world.Abort(code)
            except Exception:
                pass
        os._exit(code)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()


def wait_request(req, interval_s: float = POLL_INTERVAL_S, max_interval_s: float = POLL_MAX_INTERVAL_S) -> None:
    """Complete an mpi4py request by polling it with a growing pause (20 us to 0.5 ms), as
    :func:`~hpcllm.parallel.data_parallel.wait_handle` waits on Horovod: a blocking MPI call
    would spin a core (Open MPI's progress loop) that the other ranks' compute and Horovod's
    background thread need, on a CPU where ranks x threads fill every core."""
    pause = interval_s
    while not req.Test():
        time.sleep(pause)
        pause = min(2 * pause, max_interval_s)


def init_groups(pcfg) -> ParallelGroups:
    """Start MPI (more than one rank) and Horovod (when a dimension reduces gradients over more
    than one rank), and build every group of the layout ``pcfg`` asks for."""
    topo = Topology.from_env()
    if topo.world_size == 1:
        dims = ParallelDims.for_world(1, pcfg.pipeline_stages, getattr(pcfg, "tensor_parallel", 1),
                                      getattr(pcfg, "expert_parallel", 1))
        g = ParallelGroups(dims)
        set_threads(pcfg, 1)
        return g
    os.environ.update(mpi_env(pcfg))  # read by MPI_Init: before mpi4py starts MPI
    try:
        from mpi4py import MPI
    except ImportError:
        raise HpcllmError(f"launched as {topo.world_size} ranks ({topo.launcher}) but mpi4py is not installed "
                          "(scripts/install.sh installs it); refusing to train independent copies") from None
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size != topo.world_size:
        # e.g. MPICH's mpiexec starting ranks of an Open MPI build of mpi4py: each would be alone
        raise HpcllmError(f"launched as {topo.world_size} ranks ({topo.launcher}) but MPI reports a world of {size}: "
                          "the launcher and the MPI library mpi4py/Horovod were built with differ "
                          "(use that MPI's mpirun, or srun --mpi=pmix); refusing to train independent copies")
    dims = ParallelDims.for_world(size, pcfg.pipeline_stages, getattr(pcfg, "tensor_parallel", 1),
                                  getattr(pcfg, "expert_parallel", 1))
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    from hpcllm.parallel.watchdog import Watchdog

    g = ParallelGroups(dims, rank, local_rank, local_size, world,
                       watchdog=Watchdog(rank, pcfg.stall_shutdown_s, pcfg.stall_check_s))
    g.cross_size = world.allreduce(1 if local_rank == 0 else 0)
    for dim in ORDER:
        c = g.coords
        color = sum(c[d] * (10 ** 6) ** i for i, d in enumerate(x for x in ORDER if x != dim))
        g.comm[dim] = world.Split(color=color, key=c[dim])
    if dims.ep > 1:  # the expert group and the expert-data-parallel group (both within dp)
        c = g.coords
        rest = (c["tp"] + dims.tp * c["pp"]) * dims.dp
        g.comm["ep"] = world.Split(color=rest + c["dp"] // dims.ep, key=g.ep_rank)
        g.comm["edp"] = world.Split(color=rest + c["dp"] % dims.ep, key=c["dp"] // dims.ep)
    if dims.pp > 1:
        in_tie = g.first_stage or g.last_stage
        # one pair per (replica, tensor-parallel rank): each holds the same shard of the matrix
        tie = world.Split(color=g.dp_rank * dims.tp + g.tp_rank if in_tie else MPI.UNDEFINED, key=g.stage)
        g.tie = tie if in_tie else None
    if any(getattr(dims, d) > 1 for d in HOROVOD_DIMS):
        g.hvd = _init_horovod(pcfg, dims, g)
    elif dims.tp > 1 and getattr(pcfg, "tp_backend", "auto") in ("auto", "horovod"):
        try:  # a candidate for the tensor-parallel collectives (without it: mpi4py)
            import horovod.torch  # noqa: F401
        except ImportError:
            if getattr(pcfg, "tp_backend", "auto") == "horovod":
                raise HpcllmError("--tp-backend horovod: Horovod is not installed") from None
        else:
            if pcfg.tp_backend == "horovod":
                g.hvd = _init_horovod(pcfg, dims, g)
            else:  # auto: started only to be measured, after mpi4py (its thread would slow mpi4py's)
                g.horovod_candidate = pcfg
    set_threads(pcfg, local_size)
    return g


def _init_horovod(pcfg, dims: ParallelDims, g: ParallelGroups):
    """``hvd.init()`` with a process set per group of each gradient-reducing dimension (the
    whole world's set when a group is the world)."""
    try:
        import horovod.torch as hvd
    except ImportError:
        raise HpcllmError(f"{dims.dp} data-parallel replicas need Horovod (scripts/install.sh builds it)") from None
    wanted = {d: dims.groups(d) for d in HOROVOD_DIMS + HOROVOD_OPTIONAL_DIMS if getattr(dims, d) > 1}
    if dims.ep > 1:  # token all-to-alls (ep) and expert gradients (edp, when more than one rank)
        wanted["ep"] = dims.expert_groups("ep")
        if dims.dp // dims.ep > 1:
            wanted["edp"] = dims.expert_groups("edp")
    extra = list(dict.fromkeys(tuple(grp) for groups in wanted.values() for grp in groups
                               if len(grp) < dims.world))  # one set per distinct group (ep may equal dp's)
    extra = [list(grp) for grp in extra]
    sets = _registered_sets(hvd, extra) if hvd.is_initialized() else None
    if sets is None:
        if hvd.is_initialized():  # a second run in one process (tests) with other groups
            hvd.shutdown()
        os.environ.update(horovod_env(pcfg))
        sets = [hvd.ProcessSet(grp) for grp in extra]
        hvd.init(process_sets=sets or None)
    by_ranks = {tuple(grp): ps for grp, ps in zip(extra, sets)}
    for d, groups in wanted.items():
        mine = tuple(dims.expert_group_ranks(g.rank, d) if d in ("ep", "edp") else dims.group_ranks(d, g.rank))
        g.process_set[d] = by_ranks.get(mine, hvd.global_process_set)
    return hvd


def _registered_sets(hvd, groups: list[list[int]]):
    """The process sets Horovod already has for ``groups`` (a second run in one process), or
    None when any is missing."""
    from horovod.common.process_sets import _init_process_sets

    out = []
    for grp in groups:
        ps = hvd.ProcessSet(grp)
        try:
            _init_process_sets([ps])  # looks the ranks up among the registered sets
        except KeyError:
            return None
        if ps.process_set_id is None:
            return None
        out.append(ps)
    return out


@contextlib.contextmanager
def abort_on_exception(g: ParallelGroups, expected=(HpcllmError,)):
    """Turn an unexpected exception on one rank into the end of the whole job.

    Expected errors (bad input, raised on every rank alike) propagate normally; anything else
    prints its traceback and aborts MPI so the other ranks do not wait in a collective.
    """
    try:
        yield
    except expected:
        raise
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        if g.size > 1:
            from hpcllm.fileio import is_write_failure, write_error

            if isinstance(e, OSError) and is_write_failure(e):  # a full disk: one line, then end the job
                print(f"error: rank {g.rank}: {write_error('the output', e.filename or '.', e)}", file=sys.stderr,
                      flush=True)
            else:
                import traceback

                traceback.print_exc()
            print(f"hpcllm: rank {g.rank} failed; aborting all {g.size} ranks", file=sys.stderr, flush=True)
            g.abort(1)
        raise
