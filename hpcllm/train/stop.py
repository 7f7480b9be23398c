"""Stop requests: SIGUSR1/SIGTERM set a flag; the trainer agrees on it at step boundaries."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Installs handlers that only record the request (never act inside a signal handler:
    the rank may be in the middle of a collective or a checkpoint write)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def install(self) -> "StopRequest":
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
