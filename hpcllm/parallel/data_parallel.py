"""Horovod data parallelism: environment knobs, init, optimizer wrapping, broadcasts, collectives.

Horovod reads its tuning knobs from the environment once, in ``hvd.init()``, so
:func:`horovod_env` must be applied before it; :func:`init_data_parallel` does both.

Without Horovod installed a single process still trains (``hpcllm train`` on a laptop):
:class:`DataParallel` then has size 1 and its collectives are identities. A multi-rank launch
without Horovod is an error, never N independent copies.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch

from hpcllm.errors import HpcllmError
from hpcllm.parallel.topology import Topology


#: HOROVOD_CYCLE_TIME (ms) when --cycle-time-ms is not given, by where the ranks compute.
#: GPU ranks leave CPU cores free for Horovod's background thread, so the shortest cycle
#: wins (in-place allreduce at 0.1 ms: 0.84-0.98x mpi4py from 16 MiB up); CPU ranks fill the
#: cores and each cycle's negotiation takes one from compute (2-rank CPU step before Open MPI
#: yielding, see :func:`mpi_env`: 0.1 ms 2.8 s, 1 ms 2.2 s, 2 ms 1.6 s, 5 ms 1.7 s; with
#: yielding 0.1, 0.5 and 2 ms were within noise of each other; benchmarks/train.py).
AUTO_CYCLE_TIME_MS = {"cuda": 0.1, "cpu": 2.0}


def compute_device_type(pcfg) -> str:
    """'cuda' or 'cpu': where this rank will compute (decided before ``hvd.init()``)."""
    if pcfg.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return pcfg.device


def mpi_env(pcfg) -> dict:
    """Open MPI settings for this rank, to apply before MPI starts; variables already in the
    environment (the user's, a launcher's) are left alone.

    CPU ranks: ``mpi_yield_when_idle``. Ranks x threads fill the cores, and each rank also runs
    Horovod's background thread, whose MPI calls spin in Open MPI's progress loop while they
    wait for the other ranks; Open MPI yields only when it sees more ranks than cores, which
    the extra thread does not count as. With yielding, 2 ranks x 1 thread (bf16, benchmark
    shape) went from 0.78 to 0.91-0.96 of twice one rank's speed (benchmarks/train.py, dp).
    GPU ranks leave the cores idle, so spinning costs nothing and gives the lowest latency.
    """
    env = {}
    if compute_device_type(pcfg) == "cpu":
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    return {k: v for k, v in env.items() if k not in os.environ}


def horovod_env(pcfg) -> dict:
    """The HOROVOD_* variables for a ParallelConfig (applied before ``hvd.init()``)."""
    cycle = pcfg.cycle_time_ms
    if cycle is None:
        cycle = AUTO_CYCLE_TIME_MS[compute_device_type(pcfg)]
    env = {
        "HOROVOD_FUSION_THRESHOLD": str(int(pcfg.fusion_threshold_mb * 1024 * 1024)),
        "HOROVOD_CYCLE_TIME": f"{cycle:g}",
        "HOROVOD_HIERARCHICAL_ALLREDUCE": "1" if pcfg.hierarchical_allreduce else "0",
        # A rank that died or hangs leaves the others waiting in a collective: warn after
        # stall_check_s and shut the job down after stall_shutdown_s, so it never hangs silently.
        "HOROVOD_STALL_CHECK_TIME_SECONDS": f"{int(pcfg.stall_check_s)}",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": f"{int(pcfg.stall_shutdown_s)}",
    }
    if pcfg.timeline:
        env["HOROVOD_TIMELINE"] = os.path.abspath(pcfg.timeline)
    return env


#: :func:`wait_handle` polls an allreduce handle every POLL_INTERVAL_S at first, doubling the
#: pause up to POLL_MAX_INTERVAL_S: small allreduces are seen complete within tens of
#: microseconds, while a long wait does not keep waking a core the reduction needs.
POLL_INTERVAL_S = 20e-6
POLL_MAX_INTERVAL_S = 500e-6


def wait_handle(hvd, handle, interval_s: float = POLL_INTERVAL_S, max_interval_s: float = POLL_MAX_INTERVAL_S) -> None:
    """Return once Horovod's async ``handle`` is complete (without consuming its result).

    ``hvd.synchronize()`` waits in C++ with a 1 ms ``sleep_for`` between polls; on a CPU
    where every core computes (ranks x threads = cores) the sleeping thread often wakes much
    later, adding milliseconds to each wait (benchmarks/train.py, "+poll" settings).
    """
    pause = interval_s
    while not hvd.poll(handle):
        time.sleep(pause)
        pause = min(2 * pause, max_interval_s)


def poll_until_done(hvd, optimizer, interval_s: float = POLL_INTERVAL_S) -> None:
    """Wait for the optimizer's in-flight allreduces with :func:`wait_handle`. After this
    returns, ``optimizer.synchronize()`` finds every handle complete and does not sleep."""
    for handle, _ in list(getattr(optimizer, "_handles", {}).values()):
        if handle is None or callable(handle):
            continue
        wait_handle(hvd, handle, interval_s)


def _import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError:
        return None
    return hvd


@dataclass
class DataParallel:
    """This process's place in the data-parallel group and the collectives training needs."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cross_rank: int = 0
    cross_size: int = 1
    hvd: object = None  # the horovod.torch module, or None for a lone process
    watchdog: object = None
    """A :class:`~hpcllm.parallel.watchdog.Watchdog` timing every wait on the other ranks
    (collectives below, except the checkpoint barrier: rank 0 writes files meanwhile)."""

    def _waiting(self, what: str):
        return self.watchdog.waiting(what) if self.watchdog is not None else contextlib.nullcontext()

    @property
    def distributed(self) -> bool:
        """More than one rank: gradients go through Horovod. With one rank the optimizer is
        left unwrapped (no allreduce of one, no background-thread round trip per step)."""
        return self.hvd is not None and self.size > 1

    @property
    def is_root(self) -> bool:
        """Rank 0: the one process that writes shared files (config, checkpoints, metrics)."""
        return self.rank == 0

    # ---------------------------------------------------------------- optimizer
    def wrap_optimizer(self, optimizer, model, accum: int, compression: str = "none"):
        """``hvd.DistributedOptimizer`` averaging gradients once every ``accum`` backward passes.

        The gradients of the ``accum`` passes accumulate locally in ``.grad`` and are
        allreduced (averaged over ranks) after the last one, overlapping with its backward.
        """
        if not self.distributed:
            return optimizer
        hvd = self.hvd
        comp = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        compression=comp, backward_passes_per_step=accum, op=hvd.Average)

    def synchronize(self, optimizer) -> None:
        """Wait for the gradient allreduces (so they can be unscaled and clipped)."""
        if self.distributed:
            with self._waiting("the gradient allreduce"):
                poll_until_done(self.hvd, optimizer)
                optimizer.synchronize()

    def step(self, optimizer) -> None:
        """``optimizer.step()`` after :meth:`synchronize`, without a second synchronize."""
        if not self.distributed:
            optimizer.step()
            return
        with optimizer.skip_synchronize():
            optimizer.step()

    def skip_step(self, optimizer) -> None:
        """Drop this step's (synchronized) gradients without updating: fp16 overflow."""
        optimizer.zero_grad()
        if self.distributed:
            # Horovod warns when step() follows synchronize() outside skip_synchronize(); we
            # did synchronize but deliberately take no step, so clear its bookkeeping flag.
            optimizer._synchronized = False

    # ---------------------------------------------------------------- broadcasts
    def broadcast_model(self, model) -> None:
        """Parameters and buffers of rank 0 everywhere (initial values or a loaded checkpoint)."""
        if self.hvd is not None and self.size > 1:
            with self._waiting("the broadcast of the parameters"):
                self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_optimizer_state(self, optimizer) -> None:
        """Rank 0's optimizer state tensors everywhere, in place.

        Horovod's own ``broadcast_optimizer_state`` initialises an empty state by taking an
        optimizer step with zero gradients (which moves AdamW weights by weight decay and
        advances its step counter); here an empty state is left empty: every rank starts
        from the same empty state, so there is nothing to make equal.
        """
        if self.hvd is None or self.size == 1:
            return
        hvd = self.hvd
        inner = optimizer
        i = 0
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                for key in sorted(st):
                    v = st[key]
                    if torch.is_tensor(v):
                        with self._waiting("the broadcast of the optimizer state"):
                            hvd.broadcast_(v, root_rank=0, name=f"hpcllm.optstate.{i}.{key}")
                i += 1

    # ---------------------------------------------------------------- collectives
    def allreduce_sum(self, t: torch.Tensor, name: str = "hpcllm.stats") -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor)."""
        if self.hvd is None or self.size == 1:
            return t.clone()
        with self._waiting(f"allreduce {name}"):
            return self.hvd.allreduce(t, op=self.hvd.Sum, name=name)

    def allgather(self, t: torch.Tensor, name: str = "hpcllm.gather") -> torch.Tensor:
        """Concatenation of every rank's ``t`` along dim 0, in rank order."""
        if self.hvd is None or self.size == 1:
            return t.clone()
        with self._waiting(f"allgather {name}"):
            return self.hvd.allgather(t, name=name)

    def barrier(self) -> None:
        if self.hvd is not None and self.size > 1:
            self.hvd.barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank now (after an unexpected exception on one rank)."""
        if self.size > 1:
            try:
                from mpi4py import MPI

                MPI.COMM_WORLD.Abort(code)
            except Exception:
                pass
        os._exit(code)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.size} local {self.local_rank}/{self.local_size} "
                f"cross {self.cross_rank}/{self.cross_size}"
                + ("" if self.hvd is not None else " (no Horovod: single process)"))


def set_threads(pcfg, local_size: int) -> int:
    """Intra-op threads for this rank: --threads, else the node's cores shared by its ranks."""
    # local_size comes from Horovod (authoritative after init), the rest from the environment
    # (SLURM_CPUS_PER_TASK, or the CPUs this process may run on, which a binding launcher
    # has already narrowed)
    n = pcfg.threads or Topology(local_size=local_size).threads_per_rank()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def init_data_parallel(pcfg) -> DataParallel:
    """Set Horovod's environment, ``hvd.init()``, and the per-rank thread count."""
    topo = Topology.from_env()
    hvd = _import_horovod()
    if hvd is None:
        if topo.world_size > 1:
            raise HpcllmError(f"launched as {topo.world_size} ranks ({topo.launcher}) but Horovod is not "
                              "installed (scripts/install.sh builds it); refusing to train "
                              f"{topo.world_size} independent copies")
        dp = DataParallel()
    else:
        os.environ.update(mpi_env(pcfg))  # read by MPI_Init, inside hvd.init()
        os.environ.update(horovod_env(pcfg))
        hvd.init()
        dp = DataParallel(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(),
                          local_size=hvd.local_size(), cross_rank=hvd.cross_rank(),
                          cross_size=hvd.cross_size(), hvd=hvd)
        if dp.size > 1:
            from hpcllm.parallel.watchdog import Watchdog

            dp.watchdog = Watchdog(dp.rank, pcfg.stall_shutdown_s, pcfg.stall_check_s)
    set_threads(pcfg, dp.local_size)
    return dp


@contextlib.contextmanager
def abort_on_exception(dp: DataParallel, expected=(HpcllmError,)):
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
    except BaseException:
        if dp.size > 1:
            import traceback

            traceback.print_exc()
            print(f"hpcllm: rank {dp.rank} failed; aborting all {dp.size} ranks", file=sys.stderr, flush=True)
            dp.abort(1)
        raise
