"""One writer per output: an advisory lock held for a command's lifetime.

Every command that writes a directory (``preprocess``, ``preprocess merge``, ``train``'s run
directory) holds ``DIR/.hpcllm.lock`` with ``flock`` while it runs, and commands that write one
file (``export``, ``tokenizer train``) hold ``.NAME.hpcllm.lock`` beside it. A second writer is
refused at once with one line naming the holder (host, pid, start time, command), which the
holder wrote into the lock file after it got the lock. The kernel drops a lock when its process
ends, however it ends (``kill -9``, a node reboot on local disks, the NFS server's lock recovery
on shared ones), so a killed job never blocks the next run.

Job-array tasks of one preprocess run write into one ``OUT`` side by side: they hold ``OUT``'s
lock *shared* (no single-task run or merge can start meanwhile) and their own part directory's
exclusively (a task started twice is refused).
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from hpcllm.errors import HpcllmError

LOCK_NAME = ".hpcllm.lock"


def _command() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]]
    if argv[0] in ("__main__.py", "-m"):
        argv[0] = "hpcllm"
    text = " ".join(argv)
    return text if len(text) <= 160 else text[:157] + "..."


class Lock:
    """An exclusive (or shared) lock on ``lock_file``; ``what`` names the thing locked in
    messages (a directory or an output file)."""

    def __init__(self, lock_file, what, shared: bool = False):
        self.path, self.what, self.shared = Path(lock_file), str(what), shared
        self.fd = None

    def acquire(self) -> "Lock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise HpcllmError(f"{self.what}: cannot create the lock file {self.path.name} ({e.strerror})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            # a holder that got the lock a moment ago writes its record right after: wait for it
            end = time.monotonic() + 1.0
            while holder is None and time.monotonic() < end:
                time.sleep(0.02)
                holder = _read_holder(fd)
            holder = holder or "another hpcllm process (job-array tasks of a preprocess run, or a writer that does not say)"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise HpcllmError(f"{self.what}: in use by {holder}; wait for it to finish, or write "
                                  "somewhere else") from None
            if e.errno == errno.ENOLCK:  # a file system without locks: go on, unprotected
                print(f"warning: {self.what}: the file system does not support locks; another writer "
                      "would not be detected", file=sys.stderr, flush=True)
                return self
            raise HpcllmError(f"{self.what}: cannot lock ({e.strerror})") from None
        self.fd = fd
        # an exclusive holder says who it is; a shared one clears a dead exclusive holder's
        # words (none can be alive while we hold the lock shared) and names no one
        os.ftruncate(fd, 0)
        if not self.shared:
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": _dt.datetime.now().astimezone().replace(microsecond=0).isoformat(),
                    "command": _command()}
            try:
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except OSError:
                pass  # a full disk: the lock holds all the same, the holder just goes unnamed
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        info = json.loads(text) if text else None
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return None
    return (f"{info.get('command', 'hpcllm')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"started {info.get('started', '?')})")


def lock_dir(directory, shared: bool = False) -> Lock:
    """The lock of a directory a command writes (created if needed); use ``with``."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpcllmError(f"{d}: cannot create the directory ({e.strerror})") from None
    return Lock(d / LOCK_NAME, d, shared=shared)


def lock_file(path) -> Lock:
    """The lock of one output file, ``.NAME.hpcllm.lock`` beside it (left in place: removing
    it would let a writer that opened it just before lock a file nobody else sees)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpcllmError(f"{p.parent}: cannot create the directory ({e.strerror})") from None
    return Lock(p.with_name(f".{p.name}{LOCK_NAME}"), p)
