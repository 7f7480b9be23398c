"""Checkpoints on disk: the one module that writes and reads them.

Layout (format ``hpcllm-checkpoint`` version 2, the same for every parallel layout)::

    RUN/checkpoints/step-00000100/   model-00000.pt, optim-00000.pt [, model-00001.pt, ...],
                                     trainer.json, config.json, rng-rank{r}.pt [, tokenizer.json]
    RUN/checkpoints/latest           text file: the newest complete directory's name

Tensors are keyed by the **full model's parameter names** (``blocks.5.attn.qkv.weight``), in
``model-NNNNN.pt`` (parameters and buffers: ``{name: tensor}``) and ``optim-NNNNN.pt``
(``{"format": "hpcllm-named-optim", "state": {name: {exp_avg, exp_avg_sq, step}},
"param_groups": [...]}``). Each *owner* writes one pair: the data-parallel rank 0 of each
group that holds distinct tensors (rank 0 without stages; each pipeline stage's first
replica), and each tensor is written by exactly one owner (the last stage's copy of the tied
embedding is not: stage 0 owns it). ``trainer.json`` records the layout it was written under
(``layout``: degrees, pipeline bounds, schedule, micro-batches); a reader never needs it to
find a tensor: :class:`CheckpointReader` opens the model files memory-mapped and takes each
name from whichever file holds it, so any layout loads any checkpoint.

Under ``--zero-stage`` 1-3 every rank writes its own ``zero-SSSSS-RRRRR.pt`` (pipeline stage,
data-parallel rank), in parallel, nothing gathered: ``{"format": "hpcllm-zero-shard",
"zero_stage", "dp", "dp_rank", "pieces": {name: {"shape", "start", "stop", "value",
"exp_avg", "exp_avg_sq", "step"}}}``, each piece the elements ``[start, stop)`` of the
flattened parameter. The reader joins a name's pieces (they must cover it), so a sharded
checkpoint loads into any layout and stage, and any checkpoint into a sharded run.

Checkpoints of the first format (version 1) still load: ``model.pt``/``optim.pt`` (data
parallel, optimizer state indexed in :func:`hpcllm.train.setup.build_optimizer`'s order) and
``model-stage{s}.pt``/``optim-stage{s}.pt`` (pipeline, keyed by name).

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
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hpcllm.errors import HpcllmError, excerpt
from hpcllm.fileio import write_error
from hpcllm.schema import COUNT, INT, NUMBER, POSITIVE, MapOf, Nullable, Opt, validate

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


FORMAT = "hpcllm-checkpoint"
VERSION = 2
OPTIM_FORMAT = "hpcllm-named-optim"
_MODEL_FILE_RE = re.compile(r"^model-(\d{5,})\.pt$")
_SHARD_FILE_RE = re.compile(r"^zero-(\d{5,})-(\d{5,})(?:-t(\d{3,}))?\.pt$")
SHARD_FORMAT = "hpcllm-zero-shard"


def model_file(owner: int) -> str:
    return f"model-{owner:05d}.pt"


def optim_file(owner: int) -> str:
    return f"optim-{owner:05d}.pt"


def shard_file(stage: int, dp_rank: int, tp_rank: int | None = None) -> str:
    """A ZeRO rank's file: its pieces of the parameters of pipeline stage ``stage`` (with
    tensor parallelism, of its tensor-parallel rank's shards: ``-tTTT``)."""
    return f"zero-{stage:05d}-{dp_rank:05d}" + (f"-t{tp_rank:03d}" if tp_rank is not None else "") + ".pt"


def _tp_join(shards: list, dim: int, groups: list) -> torch.Tensor:
    """The whole tensor from its tensor-parallel shards, rank order (rank r holds the r-th
    piece of each of ``groups``, consecutive sizes along ``dim``; as
    :class:`hpcllm.parallel.tensor_parallel.ShardSpec` cuts it)."""
    size = len(shards)
    pieces = [s.split([n // size for n in groups], dim=dim) for s in shards]
    return torch.cat([torch.cat([pieces[r][g] for r in range(size)], dim=dim) for g in range(len(groups))], dim=dim)


def has_model_files(d: Path) -> bool:
    return (d / "model.pt").is_file() or any(d.glob("model-stage*.pt")) or any(
        _MODEL_FILE_RE.match(f.name) for f in d.glob("model-*.pt")) or any(
        _SHARD_FILE_RE.match(f.name) for f in d.glob("zero-*.pt"))


def is_complete(d: Path) -> bool:
    """A finished checkpoint directory (never a ``.tmp`` one)."""
    return (d.is_dir() and _STEP_RE.match(d.name) is not None and (d / "trainer.json").is_file()
            and has_model_files(d))


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


class _WriteRecorder:
    """A file for ``torch.save`` that keeps the OSError of a failed write: torch reports it as a
    RuntimeError without the errno ('unexpected pos ...'), which says nothing of a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_torch(obj, path) -> None:
    """``torch.save`` to ``path``; a failed write raises its OSError (ENOSPC, EDQUOT, EFBIG...)."""
    with open(path, "wb") as f:
        w = _WriteRecorder(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise


_save_torch = save_torch


def _save_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save(run_dir, step: int, files: dict[str, Any], *, is_root: bool, barrier: Callable[[], None] | None = None,
         keep: int, gather: Callable[[Any], list] | None = None) -> Path:
    """Write one checkpoint collectively; returns its final directory.

    ``files`` maps file names to objects this rank writes: bytes verbatim, ``*.json`` as
    JSON, anything else with ``torch.save``. Rank 0 must include ``trainer.json`` (written last, as the
    directory's completeness mark) and ``config.json``. ``gather(x)`` returns every rank's ``x``
    (an allgather; None: a single process); the ranks exchange their write errors at each
    synchronisation point, so a full disk on any rank is the same one-line error on every rank,
    the half-written ``step-….tmp`` is removed and the previous checkpoint stays the latest.
    """
    if gather is None:
        def gather(x):
            if barrier is not None:
                barrier()
            return [x]
    root = ckpt_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    what = f"the checkpoint of step {step}"
    err = None
    if is_root:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            err = str(write_error(what, tmp, e))
    _raise_first(gather(err), tmp, is_root, run_dir)
    sleep = _test_sleep(step)
    names = sorted(files, key=lambda n: (n == "trainer.json", not n.startswith("model"), n))
    for i, name in enumerate(names):
        obj = files[name]
        try:
            if isinstance(obj, bytes):  # a file copied verbatim (the tokenizer)
                (tmp / name).write_bytes(obj)
            else:
                (_save_json if name.endswith(".json") else _save_torch)(obj, tmp / name)
        except OSError as e:
            err = str(write_error(what, tmp / name, e))
            break
        if i == 0 and sleep > 0:
            time.sleep(sleep)
    _raise_first(gather(err), tmp, is_root, run_dir)
    if is_root:
        try:
            _publish(root, tmp, final)
            prune(run_dir, keep)
        except OSError as e:
            err = str(write_error(what, root / LATEST, e))
    _raise_first(gather(err), tmp, is_root, run_dir)
    return final


def _raise_first(errors: list, tmp: Path, is_root: bool, run_dir) -> None:
    """Every rank raises the first rank's write error (rank 0 removes the half-written directory)."""
    first = next((e for e in errors if e), None)
    if first is None:
        return
    if is_root:
        shutil.rmtree(tmp, ignore_errors=True)
    prev = latest_checkpoint(run_dir)
    raise HpcllmError(f"{first}; the checkpoint is not written, the latest stays "
                      f"{prev.name if prev is not None else 'none'}")


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


def load_torch(path: Path, map_location="cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a missing or damaged file is an HpcllmError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise HpcllmError(f"{path}: missing from the checkpoint") from None
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            # torch's own advice here (load with weights_only=False) would run the file's code
            raise HpcllmError(f"{path}: not an hpcllm checkpoint or model file: it holds Python objects "
                              "beyond tensors, which hpcllm never loads (unsafe)") from None
        raise HpcllmError(f"{path}: cannot load, truncated or not a PyTorch file ({type(e).__name__}: "
                          f"{excerpt(e)})") from None


def load_json(path: Path, schema=None) -> dict:
    """A JSON file of the checkpoint, checked against ``schema`` (default: by its name,
    :data:`TRAINER_SCHEMA` or :data:`CONFIG_SCHEMA`)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HpcllmError(f"{path}: missing from the checkpoint") from None
    except json.JSONDecodeError as e:
        raise HpcllmError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HpcllmError(f"{path}: unreadable ({excerpt(e)})") from None
    schema = schema if schema is not None else _SCHEMAS.get(path.name, dict)
    validate(obj, schema, str(path))
    return obj


_LOADER = {"slot": COUNT, "seed": INT, "seq_len": POSITIVE, "consumed": Opt(MapOf(COUNT))}
_SCALER = {"enabled": Opt(bool), "scale": Opt(NUMBER), "good_steps": Opt(COUNT), "skipped": Opt(COUNT)}
#: what resuming relies on in trainer.json (versions 1 and 2)
TRAINER_SCHEMA = {
    "format": Opt(str), "version": Opt(POSITIVE), "step": COUNT, "loader": Nullable(_LOADER), "lr_schedule": Opt(dict), "loss_scaler": Opt(Nullable(_SCALER)),
    "tokenizer_sha256": Opt(Nullable(str)), "world_size": Opt(POSITIVE), "global_batch": Opt(Nullable(POSITIVE)),
    "layout": Opt({"pp": POSITIVE, "dp": POSITIVE, "tp": Opt(POSITIVE), "zero": Opt(COUNT),
                   "bounds": Opt(Nullable([[COUNT]]))}),
    "pipeline": Opt(Nullable({"stages": POSITIVE, "bounds": [[COUNT]]})),
}
#: what finding a checkpoint's tensors relies on in trainer.json (generation and export too)
LAYOUT_SCHEMA = {k: (v if isinstance(v, Opt) else Opt(v)) for k, v in TRAINER_SCHEMA.items()}
#: what loading a model relies on in config.json
CONFIG_SCHEMA = {"model": {"n_layer": POSITIVE, "n_head": POSITIVE, "d_model": POSITIVE, "seq_len": POSITIVE,
                           "vocab_size": POSITIVE}}
_SCHEMAS = {"trainer.json": LAYOUT_SCHEMA, "config.json": CONFIG_SCHEMA}


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
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CPU run does not start CUDA
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
    if ("cuda" in d and torch.cuda.is_available() and torch.cuda.is_initialized()
            and len(d["cuda"]) == torch.cuda.device_count()):
        torch.cuda.set_rng_state_all(d["cuda"])


# --------------------------------------------------------------------------- tensors by name


def named_optim_state(optimizer, named_params, exclude=()) -> dict:
    """The optimizer's state keyed by parameter name (tensors on the CPU), the ``optim-*.pt``
    payload; parameters named in ``exclude`` are left out (owned by another writer)."""
    names = {id(p): n for n, p in named_params}
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in sd["state"].items() if order[i] not in exclude}
    groups = [{k: v for k, v in g.items() if k != "params"}
              | {"names": [order[i] for i in g["params"] if order[i] not in exclude]}
              for g in sd["param_groups"]]
    return {"format": OPTIM_FORMAT, "state": state, "param_groups": groups}


def load_named_optim_state(optimizer, named_params, state: dict, device) -> None:
    """Give each of ``optimizer``'s parameters its state from ``state`` (name -> AdamW state);
    the hyperparameters stay this run's (the LR schedule sets ``lr`` every step)."""
    named_params = list(named_params)
    names = {id(p): n for n, p in named_params}
    shapes = {n: p.shape for n, p in named_params}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    for n in order:  # a damaged or foreign state would fail much later, inside optimizer.step()
        for k, v in (state.get(n) or {}).items():
            if k in ("exp_avg", "exp_avg_sq") and (not torch.is_tensor(v) or v.shape != shapes[n]):
                raise HpcllmError(f"optimizer state of {n}: {k} has shape "
                                  f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}, the parameter "
                                  f"{tuple(shapes[n])} (a damaged or foreign checkpoint)")
    sd = optimizer.state_dict()
    sd["state"] = {i: state[n] for i, n in enumerate(order) if n in state}
    optimizer.load_state_dict(sd)
    for s in optimizer.state.values():
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(device)


def _v1_optimizer_order(config: dict) -> list[str]:
    """Parameter names in the order a version-1 data-parallel ``optim.pt`` indexed them: the
    whole model's matrices (weight decay group), then the rest, as build_optimizer grouped them."""
    from hpcllm.model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        whole = GPT(GPTConfig(**(config.get("model") or {})), init_seed=None)
    named = list(whole.named_parameters())
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


class CheckpointReader:
    """Tensors of one checkpoint by full parameter name, whatever layout wrote it.

    ``model_state(names)`` and ``optim_state(names)`` read only the files that hold the
    names asked for (model files are opened memory-mapped, so looking at which names a file
    holds costs no tensor reads)."""

    def __init__(self, d):
        self.dir = Path(d)
        self.trainer = load_json(self.dir / "trainer.json") if (self.dir / "trainer.json").is_file() else {}
        self.version = self.trainer.get("version", 1) if self.trainer.get("format") == FORMAT else 1
        if self.version > VERSION:
            raise HpcllmError(f"{self.dir / 'trainer.json'}: checkpoint format version {self.version}; this hpcllm "
                              f"reads versions 1 to {VERSION} (a newer hpcllm wrote it)")
        self._parts: dict[str, dict] | None = None  # model file -> its tensors, memory-mapped
        self._pieces: dict[str, list] | None = None  # name -> ZeRO pieces [(start, stop, shape, record, file)]

    # ---- which files
    def _model_files(self) -> list[tuple[Path, Path]]:
        """(model file, optimizer file) pairs, owner order."""
        d = self.dir
        if self.version >= 2:
            found = sorted(f for f in d.glob("model-*.pt") if _MODEL_FILE_RE.match(f.name))
            return [(f, d / f.name.replace("model-", "optim-", 1)) for f in found]
        if (d / "model.pt").is_file():
            return [(d / "model.pt", d / "optim.pt")]
        stages = sorted(d.glob("model-stage*.pt"), key=lambda f: int(f.stem.removeprefix("model-stage") or 0))
        return [(f, d / f.name.replace("model-", "optim-", 1)) for f in stages]

    def describe(self) -> str:
        """What wrote this checkpoint, in words (for messages)."""
        lay = self.layout()
        if lay.get("zero", 0):
            where = f"{lay['pp']}-stage pipeline, " if lay.get("pp", 1) > 1 else ""
            return f"a ZeRO-{lay['zero']} checkpoint ({where}{lay.get('dp', '?')} data-parallel ranks)"
        if lay.get("pp", 1) > 1:
            return f"a {lay['pp']}-stage pipeline checkpoint"
        return "a data-parallel checkpoint"

    def layout(self) -> dict:
        """The layout the checkpoint was written under: ``pp``, ``dp`` and, for a pipeline,
        ``bounds``, ``schedule``, ``microbatches`` (version 1: from its ``pipeline`` record)."""
        if "layout" in self.trainer:
            return dict(self.trainer["layout"])
        pipe = self.trainer.get("pipeline")
        if pipe:
            return {"pp": int(pipe["stages"]), "dp": int(pipe.get("dp_size", 1)), "bounds": pipe.get("bounds"),
                    "schedule": pipe.get("schedule"), "microbatches": pipe.get("microbatches")}
        return {"pp": 1, "dp": int(self.trainer.get("world_size", 1))}

    def _shard_pieces(self) -> dict[str, list]:
        """ZeRO pieces by parameter name, from every ``zero-*.pt`` (memory-mapped)."""
        if self._pieces is None:
            self._pieces = {}
            files = sorted(f for f in self.dir.glob("zero-*.pt") if _SHARD_FILE_RE.match(f.name))
            for f in files:
                obj = load_torch(f, mmap=True)
                if not isinstance(obj, dict) or obj.get("format") != SHARD_FORMAT:
                    raise HpcllmError(f"{f}: not a ZeRO shard file of a checkpoint (format {SHARD_FORMAT})")
                validate(obj, {"pieces": MapOf({"shape": [COUNT], "start": COUNT, "stop": COUNT})}, str(f))
                for name, rec in obj["pieces"].items():
                    if not torch.is_tensor(rec.get("value")) or rec["value"].numel() != rec["stop"] - rec["start"]:
                        raise HpcllmError(f"{f}: piece of {name} has no values or the wrong number of them")
                    self._pieces.setdefault(name, []).append((rec["start"], rec["stop"], tuple(rec["shape"]), rec, f))
        return self._pieces

    def _joined(self, name: str, key: str, map_location="cpu") -> torch.Tensor | None:
        """The whole tensor ``key`` (value, exp_avg, ...) of ``name`` from its ZeRO pieces
        (under tensor parallelism: each tensor-parallel rank's shard from its pieces, then
        the shards joined)."""
        every = self._shard_pieces()[name]
        tp = [rec.get("tp") for *_, rec, _ in every]
        if any(tp):
            if not all(tp) or len({(t["size"], t["dim"], tuple(t["groups"])) for t in tp}) != 1:
                raise HpcllmError(f"{self.dir}: the tensor-parallel pieces of {name} disagree on how it is cut")
            size, dim, groups = tp[0]["size"], tp[0]["dim"], tp[0]["groups"]
            shards = []
            for r in range(size):
                mine = [p for p, t in zip(every, tp) if t["rank"] == r]
                if not mine:
                    raise HpcllmError(f"{self.dir}: no pieces of tensor-parallel rank {r}'s shard of {name} "
                                      "(a shard file is missing)")
                shards.append(self._joined_flat(name, mine, key, "cpu"))
            if any(x is None for x in shards):
                return None
            return _tp_join(shards, dim, groups).to(map_location)
        return self._joined_flat(name, every, key, map_location)

    def _joined_flat(self, name: str, pieces: list, key: str, map_location) -> torch.Tensor | None:
        pieces = sorted(pieces, key=lambda t: t[0])
        shape = pieces[0][2]
        total = 1
        for k in shape:
            total *= k
        if key != "value" and any(key not in rec for *_, rec, _ in pieces):
            return None
        out = torch.empty(total, dtype=pieces[0][3][key].dtype)
        at = 0
        for start, stop, shp, rec, f in pieces:
            if shp != shape or start != at or stop > total:
                raise HpcllmError(f"{f}: the pieces of {name} do not fit together (elements {start}-{stop} of "
                                  f"{total} after {at}): a shard file of the checkpoint is missing or foreign")
            out[start:stop] = rec[key].reshape(-1)
            at = stop
        if at != total:
            raise HpcllmError(f"{self.dir}: the ZeRO shard files hold {at} of the {total} elements of {name} "
                              "(a shard file is missing)")
        return out.view(shape).to(map_location)

    def check_files(self) -> None:
        """Every tensor file the recorded layout wrote is present (version 2): one model file
        per pipeline stage, or under ZeRO one shard file per rank."""
        if self.version < 2:
            return
        lay = self.layout()
        P = int(lay.get("pp", 1))
        T = int(lay.get("tp", 1))
        if lay.get("zero"):
            want = [shard_file(s, r, t if T > 1 else None) for s in range(P) for r in range(int(lay.get("dp", 1)))
                    for t in range(T)]
        elif T > 1:  # tensor-parallel shards of the first replica
            want = [shard_file(s, 0, t) for s in range(P) for t in range(T)]
        else:  # one pair per stage (expert parallelism: per stage and expert-parallel rank)
            X = int(lay.get("ep", 1))
            want = [model_file(s * X + e) for s in range(P) for e in range(X)]
        missing = [w for w in want if not (self.dir / w).is_file()]
        if missing:
            raise HpcllmError(f"{self.dir}: {self.describe()} is missing {', '.join(missing[:3])}"
                              f"{' …' if len(missing) > 3 else ''} ({len(want) - len(missing)} of its {len(want)} "
                              "tensor files are there)")

    def _file_parts(self) -> dict[str, dict]:
        """Each model file's tensors, opened once, memory-mapped (no tensor is read yet)."""
        if self._parts is None:
            pairs = self._model_files()
            if not pairs and not self._shard_pieces():
                raise HpcllmError(f"{self.dir}: no model files (model-*.pt) in the checkpoint")
            self._parts = {}
            for f, _ in pairs:
                part = load_torch(f, mmap=True)
                if not isinstance(part, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                         for k, v in part.items()):
                    raise HpcllmError(f"{f}: not a model file of a checkpoint (expected parameter name -> tensor)")
                self._parts[str(f)] = part
        return self._parts

    def close(self) -> None:
        """Unmap the model files (a mapped file would keep a pruned checkpoint's space, and on
        NFS leave .nfs files that block deleting its directory)."""
        self._parts = None
        self._pieces = None

    def names(self) -> set[str]:
        """Every tensor name the checkpoint holds."""
        return set().union(*self._file_parts().values(), self._shard_pieces())

    # ---- reading
    def model_state(self, names=None, map_location="cpu") -> dict:
        """``{name: tensor}`` for ``names`` (None: every tensor); a missing name is an error."""
        parts = self._file_parts()
        want = self.names() if names is None else set(names)
        out = {}
        for part in parts.values():
            # copies: the returned tensors do not keep the files mapped
            out.update({k: part[k].to(map_location, copy=True) for k in (part.keys() & want) - out.keys()})
        pieces = self._shard_pieces()
        for k in (want & pieces.keys()) - out.keys():
            out[k] = self._joined(k, "value", map_location)
        missing = want - set(out)
        if missing:
            raise HpcllmError(f"{self.dir}: {self.describe()} lacks {', '.join(sorted(missing)[:3])}"
                              f"{' …' if len(missing) > 3 else ''}")
        return out

    def optim_state(self, names) -> dict:
        """``{name: AdamW state}`` for ``names`` (names without state are left out: a
        checkpoint written before the first optimizer step)."""
        want, out = set(names), {}
        parts = self._file_parts()
        if self.version == 1 and (self.dir / "model.pt").is_file():
            sd = load_torch(self.dir / "optim.pt")
            order = _v1_optimizer_order(load_json(self.dir / "config.json"))
            return {order[int(i)]: s for i, s in sd.get("state", {}).items() if order[int(i)] in want}
        pieces = self._shard_pieces()
        for k in want & pieces.keys():
            ea, eas = self._joined(k, "exp_avg"), self._joined(k, "exp_avg_sq")
            if ea is not None and eas is not None:
                out[k] = {"exp_avg": ea, "exp_avg_sq": eas, "step": pieces[k][0][3].get("step", torch.tensor(0.0))}
        for f, of in self._model_files():
            if not (parts[str(f)].keys() & want) - out.keys():
                continue
            named = load_torch(of)
            if not isinstance(named, dict) or named.get("format") != OPTIM_FORMAT:
                raise HpcllmError(f"{of}: not an hpcllm optimizer state file (format {OPTIM_FORMAT})")
            validate(named, {"state": MapOf(dict)}, str(of))
            out.update({k: v for k, v in named["state"].items() if k in want and k not in out})
        return out
