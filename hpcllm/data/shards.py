"""The dataset on disk: HDF5 shards and ``manifest.json`` (the only reader/writer of both).

Layout (a contract; see README "Dataset layout")::

    OUT/manifest.json
    OUT/tokenizer.json            (BPE datasets only: a copy of the tokenizer used)
    OUT/train/shard-00000.h5      datasets `tokens` (uint16 if vocab <= 65536 else uint32:
    OUT/val/shard-00000.h5        every document's tokens then the EOD id) and `doc_index`
                                  (int64 start offset of each document in `tokens`)

Shards are written as ``NAME.h5.tmp`` and renamed when complete, so a reader never sees half
a shard. ``tokens`` is stored contiguous and uncompressed by default: random windows are then
plain reads at a fixed file offset, which :func:`open_tokens` maps with ``np.memmap`` (see
benchmarks/preprocess.py for the none-vs-lzf measurement behind this choice).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.schema import COUNT, INT, POSITIVE, WEIGHT, MapOf, Nullable, OneOf, Opt, validate
from hpcllm.fileio import write_json_atomic

FORMAT = "hpcllm-dataset"
VERSION = 1
SPLITS = ("train", "val")
#: how much of a spill file is copied into a shard at a time (bounded memory)
COPY_CHUNK = 1 << 20


def shard_relpath(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.h5"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return h.hexdigest()
            h.update(b)


@dataclass
class ShardOptions:
    """How shards store their tokens."""

    #: "none" (contiguous: fastest random windows, memory-mappable) or "lzf" (chunked+compressed)
    compression: str = "none"
    #: chunk length in tokens when compression is on
    chunk_tokens: int = 1 << 16


class FileArray:
    """A read-only 1-D array over a raw file, read with ``pread`` in slices.

    Used to copy spill files into shards: unlike ``np.memmap`` the pages read do not stay in
    the process' RSS, so peak memory does not grow with the shard size."""

    def __init__(self, path: str, dtype, length: int):
        self.path, self.dtype, self.length = path, np.dtype(dtype), int(length)

    def __len__(self):
        return self.length

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b, _ = s.indices(self.length)
        n = max(0, b - a)
        size = self.dtype.itemsize
        with open(self.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), n * size, a * size)
        if len(data) != n * size:
            raise HpcllmError(f"{self.path}: short read ({len(data)} of {n * size} bytes)")
        return np.frombuffer(data, dtype=self.dtype)


def write_shard(out_dir: str, relpath: str, tokens, doc_index: np.ndarray, dtype,
                options: ShardOptions | None = None, attrs: dict | None = None) -> dict:
    """Write one shard atomically (``.tmp`` then rename) and return its manifest entry.

    ``tokens`` may be any sliceable 1-D array (a ``np.memmap`` of a spill file): it is copied in
    bounded chunks. The file's bytes depend only on the arguments, so reruns are identical.
    """
    import h5py

    options = options or ShardOptions()
    path = os.path.join(out_dir, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    n = int(len(tokens))
    kwargs = {}
    if options.compression == "lzf":
        kwargs = dict(chunks=(max(1, min(options.chunk_tokens, n)),), compression="lzf")
    elif options.compression != "none":
        raise HpcllmError(f"unknown shard compression {options.compression!r} (none, lzf)")
    with h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
        ds = f.create_dataset("tokens", shape=(n,), dtype=dtype, **kwargs)
        for a in range(0, n, COPY_CHUNK):
            b = min(n, a + COPY_CHUNK)
            ds[a:b] = np.asarray(tokens[a:b], dtype=dtype)
        f.create_dataset("doc_index", data=np.asarray(doc_index, dtype=np.int64))
        for k, v in sorted((attrs or {}).items()):
            f.attrs[k] = v
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return {"path": relpath, "tokens": n, "documents": int(len(doc_index)), "sha256": digest}


def open_tokens(path: str):
    """The ``tokens`` of a shard as an array: an ``np.memmap`` at the dataset's file offset when
    stored contiguous and uncompressed (no h5py in the hot path), else the h5py dataset."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise HpcllmError(f"{path}: cannot open shard ({e})") from None
    ds = f["tokens"]
    offset = ds.id.get_offset()
    if ds.chunks is None and ds.compression is None and offset is not None:
        dtype, n = ds.dtype, ds.shape[0]
        f.close()
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,))
    return ds  # keeps f open through the dataset's reference


def read_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_index) fully in memory (tests, inspect)."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["tokens"][:], f["doc_index"][:]


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isdir(data_dir):
        raise HpcllmError(f"{data_dir}: dataset directory does not exist (run `hpcllm preprocess`)")
    if not os.path.isfile(path):
        raise HpcllmError(f"{path}: no manifest.json (not a dataset, or preprocess has not finished)")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise HpcllmError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise HpcllmError(f"{path}: not an {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise HpcllmError(f"{path}: dataset version {m.get('version')} not supported (this hpcllm reads {VERSION})")
    validate(m, MANIFEST_SCHEMA, path)
    for split in SPLITS:
        sp = m["splits"][split]
        if sp["tokens"] != sum(e["tokens"] for e in sp["shards"]):
            raise HpcllmError(f"{path}: field 'splits.{split}.tokens' is {sp['tokens']}, but its shards hold "
                              f"{sum(e['tokens'] for e in sp['shards'])} tokens")
        names = [c["name"] for c in m["corpora"]]
        for i, e in enumerate(sp["shards"]):
            if "corpus" in e and e["corpus"] not in names:
                raise HpcllmError(f"{path}: field 'splits.{split}.shards[{i}].corpus' is {e['corpus']!r}, which "
                                  f"'corpora' does not list ({', '.join(map(repr, names)) or 'none'})")
            if os.path.isabs(e["path"]) or ".." in e["path"].split("/"):
                raise HpcllmError(f"{path}: field 'splits.{split}.shards[{i}].path' must be a path inside the "
                                  f"dataset, not {e['path']!r}")
    tok = m["tokenizer"]
    if tok["eod_id"] >= tok["vocab_size"]:
        raise HpcllmError(f"{path}: field 'tokenizer.eod_id' ({tok['eod_id']}) must be below "
                          f"'tokenizer.vocab_size' ({tok['vocab_size']})")
    return m


_SPLIT = {"shards": [{"path": str, "tokens": COUNT, "documents": COUNT, "sha256": str, "corpus": Opt(str)}],
          "tokens": COUNT, "documents": COUNT}
#: what a reader of a manifest relies on (see the module doc for the meaning of each field)
MANIFEST_SCHEMA = {
    "format": str, "version": INT,
    "tokenizer": {"type": OneOf(("byte", "bpe")), "vocab_size": POSITIVE, "eod_id": COUNT, "sha256": str,
                  "file": Opt(Nullable(str))},
    "corpora": [{"name": str, "weight": WEIGHT}],
    "created": Opt(str), "command": Opt(str),
    "splits": {"train": _SPLIT, "val": _SPLIT},
    "dropped": Opt(MapOf(COUNT)),
}


def write_manifest(data_dir: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(data_dir, "manifest.json"), manifest)


def make_manifest(tokenizer: dict, corpora: list[dict], shards: dict[str, list[dict]],
                  dropped: dict, command: str, created: str, extra: dict | None = None) -> dict:
    """Assemble a manifest; ``shards`` maps split -> list of shard entries (with ``corpus``)."""
    splits = {}
    for split in SPLITS:
        entries = shards.get(split, [])
        splits[split] = {
            "shards": entries,
            "tokens": int(sum(e["tokens"] for e in entries)),
            "documents": int(sum(e["documents"] for e in entries)),
        }
    m = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "corpora": corpora,
         "splits": splits, "dropped": dict(sorted(dropped.items())), "command": command,
         "created": created}
    if extra:
        m.update(extra)
    return m


def verify_shard(data_dir: str, entry: dict, vocab_size: int, eod_id: int) -> list[str]:
    """Problems with one shard (empty list when it is sound): sha256, shapes, doc structure."""
    import h5py

    path = os.path.join(data_dir, entry["path"])
    if not os.path.isfile(path):
        return [f"{entry['path']}: missing"]
    problems = []
    if file_sha256(path) != entry["sha256"]:
        problems.append(f"{entry['path']}: sha256 differs from the manifest")
    try:
        with h5py.File(path, "r") as f:
            tokens = f["tokens"]
            doc_index = f["doc_index"][:]
            n = tokens.shape[0]
            if n != entry["tokens"]:
                problems.append(f"{entry['path']}: {n} tokens, manifest says {entry['tokens']}")
            if len(doc_index) != entry["documents"]:
                problems.append(f"{entry['path']}: {len(doc_index)} documents, manifest says {entry['documents']}")
            if len(doc_index) and (doc_index[0] != 0 or np.any(np.diff(doc_index) <= 0) or doc_index[-1] >= max(n, 1)):
                problems.append(f"{entry['path']}: doc_index is not increasing from 0 within the tokens")
            # every document ends with EOD: the token before each start, and the last token
            elif n:
                ends = np.append(doc_index[1:] - 1, n - 1)
                if np.any(tokens[:][ends] != eod_id):
                    problems.append(f"{entry['path']}: a document does not end with the EOD id {eod_id}")
                mx = 0
                for a in range(0, n, COPY_CHUNK):
                    mx = max(mx, int(tokens[a:a + COPY_CHUNK].max()))
                if mx >= vocab_size:
                    problems.append(f"{entry['path']}: token id {mx} >= vocab size {vocab_size}")
    except Exception as e:  # any HDF5/h5py failure on a damaged file is a finding, not a crash
        problems.append(f"{entry['path']}: unreadable HDF5 ({type(e).__name__}: {e})")
    return problems
