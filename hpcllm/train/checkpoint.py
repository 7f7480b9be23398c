"""Checkpoints on disk: the one module that writes and reads them.

Layout::

    RUN/checkpoints/step-00000100/   model.pt (or model-stage{s}.pt), optim.pt (or optim-stage{s}.pt),
                                     trainer.json, rng-rank{r}.pt, config.json [, tokenizer.json]
    RUN/checkpoints/latest           text file: the newest complete directory's name

Protocol (every rank calls :func:`save` with the files it owns): rank 0 clears a stale
``step-….tmp/`` and creates it; barrier; every rank writes its files into it; barrier; rank 0
renames it to ``step-…/``, rewrites ``latest`` (temporary file + rename) and deletes all
but the newest ``keep`` checkpoints; barrier. A crash at any point leaves either the old
``latest`` or the new one, each pointing at a complete directory; ``*.tmp`` leftovers are
ignored by readers and removed by the next run. Loading uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hpcllm.errors import HpcllmError

LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
#: test hook "SECONDS" or "STEP:SECONDS": sleep inside a checkpoint write (after model.pt,
#: before the rest), so a test can kill -9 the job while a checkpoint is half written
SLEEP_ENV = "HPCLLM_TEST_CKPT_SLEEP"


def _test_sleep(step: int) -> float:
    spec = os.environ.get(SLEEP_ENV, "")
    if not spec:
        return 0.0
    at, _, secs = spec.rpartition(":")
    return float(secs) if (not at or int(at) == step) else 0.0


def ckpt_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(d: Path) -> bool:
    """A finished checkpoint directory (never a ``.tmp`` one)."""
    return (d.is_dir() and _STEP_RE.match(d.name) is not None and (d / "trainer.json").is_file()
            and ((d / "model.pt").is_file() or any(d.glob("model-stage*.pt"))))


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if is_complete(d)), key=lambda d: int(d.name[5:]))


def latest_checkpoint(run_dir) -> Path | None:
    """The directory ``latest`` names if complete, else the newest complete one, else None."""
    root = ckpt_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if is_complete(d):
            return d
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh run), 'auto' (newest in ``run_dir``, or a
    fresh run when there is none), or an explicit checkpoint or run directory."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if is_complete(p):
        return p
    if (p / "checkpoints").is_dir():
        found = latest_checkpoint(p)
        if found is not None:
            return found
    raise HpcllmError(f"--resume {resume}: not a complete checkpoint directory (step-*/ with trainer.json) "
                      "or a run directory holding one")


def clean_stale(run_dir) -> None:
    """Remove ``*.tmp`` directories left by a killed writer (rank 0, before training)."""
    root = ckpt_root(run_dir)
    if root.is_dir():
        for d in root.glob("step-*.tmp"):
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- writing


def _save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def _save_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save(run_dir, step: int, files: dict[str, Any], *, is_root: bool, barrier: Callable[[], None],
         keep: int) -> Path:
    """Write one checkpoint collectively; returns its final directory.

    ``files`` maps file names to objects this rank writes: bytes verbatim, ``*.json`` as
    JSON, anything else with ``torch.save``. Rank 0 must include ``trainer.json`` (written last, as the
    directory's completeness mark) and ``config.json``.
    """
    root = ckpt_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if is_root:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    sleep = _test_sleep(step)
    names = sorted(files, key=lambda n: (n == "trainer.json", not n.startswith("model"), n))
    for i, name in enumerate(names):
        obj = files[name]
        if isinstance(obj, bytes):  # a file copied verbatim (the tokenizer)
            (tmp / name).write_bytes(obj)
        else:
            (_save_json if name.endswith(".json") else _save_torch)(obj, tmp / name)
        if i == 0 and sleep > 0:
            time.sleep(sleep)
    barrier()
    if is_root:
        _publish(root, tmp, final)
        prune(run_dir, keep)
    barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` and point ``latest`` at it (rank 0)."""
    old = None
    if final.exists():  # the same step written again (a stop right after a resume)
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    pointer_tmp = root / f"{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(root)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(run_dir, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints; returns the deleted ones."""
    found = list_checkpoints(run_dir)
    doomed = found[:-keep] if keep > 0 else []
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- reading


def load_torch(path: Path, map_location="cpu") -> Any:
    """``torch.load(weights_only=True)``; a missing or damaged file is an HpcllmError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise HpcllmError(f"{path}: missing from the checkpoint") from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise HpcllmError(f"{path}: cannot load ({type(e).__name__}: {first})") from None


def load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HpcllmError(f"{path}: missing from the checkpoint") from None
    except json.JSONDecodeError as e:
        raise HpcllmError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's RNG states, as tensors and ints (loadable with weights_only=True)."""
    import random

    import numpy as np

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(d: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(d["torch"])
    py = d["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = d["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in d and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(d["cuda"])
