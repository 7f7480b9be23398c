"""Horovod and Open MPI settings for a rank, applied before they start, and waiting on Horovod.

Horovod reads its tuning knobs from the environment once, in ``hvd.init()``, and Open MPI in
``MPI_Init``, so :func:`mpi_env` and :func:`horovod_env` must be applied before either starts;
:func:`hpcllm.parallel.groups.init_groups` does that. The gradient reductions themselves are
:class:`hpcllm.parallel.grad_sync.GradSync`'s.
"""
from __future__ import annotations

import os
import time

import torch

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
        # ZeRO's parameter all-gathers follow the same choice (Horovod 0.28 has no hierarchical
        # reduce-scatter: that one is flat over the process set)
        "HOROVOD_HIERARCHICAL_ALLGATHER": "1" if pcfg.hierarchical_allreduce else "0",
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


def set_threads(pcfg, local_size: int) -> int:
    """Intra-op threads for this rank: --threads, else the node's cores shared by its ranks."""
    # local_size comes from Horovod (authoritative after init), the rest from the environment
    # (SLURM_CPUS_PER_TASK, or the CPUs this process may run on, which a binding launcher
    # has already narrowed)
    n = pcfg.threads or Topology(local_size=local_size).threads_per_rank()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
