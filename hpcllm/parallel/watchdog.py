"""A per-rank watchdog that ends the job when a rank waits on its peers for too long.

Horovod's own stall check (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) runs in its background
thread, between negotiation rounds that are themselves MPI collectives. A peer that is alive
but frozen (SIGSTOP, a hung NFS read, a node that stops scheduling it) never joins the next
round, so every other rank's background thread blocks inside MPI and the stall check never
runs: the job hangs until the wall-clock limit. A killed peer is caught by mpirun/srun; a
frozen one is caught only from outside MPI, by this thread.

The trainer marks the places where it waits for other ranks (gradient allreduce, the
per-step agreement, evaluation, pipeline collectives)::

    watchdog.step = step + 1
    with watchdog.waiting("the gradient allreduce"):
        dp.synchronize(optimizer)

A wait longer than ``warn_s`` prints one warning; longer than ``timeout_s`` prints an error
naming the rank, the wait and the step, and exits the process with status 1: mpirun then
tears down the rest of the job; under hpcllm's srun line (``--kill-on-bad-exit=0 --wait=60``)
every waiting rank exits by its own watchdog and srun kills a frozen one 60 s later. Time
spent computing, loading data or writing checkpoints is never counted.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from hpcllm import exitcodes


class Watchdog:
    """``timeout_s`` None or <= 0 disables it (``waiting`` is then free)."""

    def __init__(self, rank: int, timeout_s: float | None, warn_s: float | None = None,
                 hint: str = "--stall-shutdown-s"):
        self.rank, self.timeout_s, self.hint = rank, timeout_s, hint
        self.warn_s = warn_s if warn_s and timeout_s and warn_s < timeout_s else None
        self.step: int | None = None
        """The step the rank is in (named in the messages); the trainer sets it."""
        self._since: float | None = None
        self._what = ""
        self._warned = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s and timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="hpcllm-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def waiting(self, what: str):
        """Count the time inside this block as waiting on peers."""
        if self._thread is None:
            yield
            return
        with self._lock:
            self._since, self._warned = time.monotonic(), False
            self._what = what if self.step is None else f"{what} (step {self.step})"
        try:
            yield
        finally:
            with self._lock:
                self._since = None

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        tick = max(0.05, min(1.0, self.timeout_s / 10))
        while not self._stop.wait(tick):
            with self._lock:
                since, what, warned = self._since, self._what, self._warned
            if since is None:
                continue
            waited = time.monotonic() - since
            if waited > self.timeout_s:
                print(f"error: rank {self.rank}: stalled {waited:.0f} s waiting for the other ranks in {what}: "
                      f"a rank is hung or dead; ending the job ({self.hint} {self.timeout_s:g})",
                      file=sys.stderr, flush=True)
                os._exit(exitcodes.FAILURE)
            if self.warn_s and waited > self.warn_s and not warned:
                with self._lock:
                    self._warned = True
                print(f"warning: rank {self.rank}: waiting {waited:.0f} s for the other ranks in {what} "
                      f"(the job ends after {self.timeout_s:g} s)", file=sys.stderr, flush=True)
