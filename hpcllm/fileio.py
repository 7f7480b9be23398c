"""Small file helpers shared by the dataset, config and checkpoint writers."""
from __future__ import annotations

import errno
import json
import os
import shutil


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it and rename it over ``path``:
    a reader sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def free_space(path) -> str:
    """Free space on the file system holding ``path`` (or its nearest existing parent), in
    words: '0 B free on /scratch' ."""
    p = os.path.abspath(os.fspath(path))
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"


def write_error(what: str, path, e: OSError):
    """The one-line error for a failed write: what was being written, why, and the space left."""
    from hpcllm.errors import HpcllmError

    why = e.strerror or str(e)
    if e.errno == errno.EFBIG:
        why += " (a file-size limit, ulimit -f?)"
    return HpcllmError(f"{os.fspath(path)}: cannot write {what} ({why}; {free_space(path)})")


#: errno values of writes that fail for lack of room or permission to write
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def is_write_failure(e: OSError) -> bool:
    """A full disk, a quota, a file-size limit, a read-only or failing device (HDF5 reports
    some of these without an errno, in its message)."""
    return e.errno in WRITE_ERRNOS or any(s in str(e) for s in ("No space left", "Disk quota", "File too large"))


def remove_stale_tmp(path) -> None:
    """Delete ``PATH.tmpPID`` files beside ``path`` left by writers that are gone (killed mid-write):
    the pid is in the name, and a live process of that pid on this host keeps its file."""
    path = os.fspath(path)
    d, name = os.path.split(os.path.abspath(path))
    try:
        entries = os.listdir(d)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(name + ".tmp"):
            continue
        pid = entry[len(name) + 4:]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # still writing
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        try:
            os.unlink(os.path.join(d, entry))
        except OSError:
            pass
