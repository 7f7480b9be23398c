"""The preprocess pipeline: sources -> clean -> tokenize -> shards.

Determinism: the parent reads work items (see :mod:`hpcllm.data.sources`) in corpus order,
workers parse/clean/hash/tokenize them, and the parent consumes the results strictly in item
order through a bounded window of in-flight items (backpressure: memory does not grow with the
corpus). Deduplication, the shard a document lands in and shard boundaries (a shard closes
once it holds ``shard_tokens`` tokens) are decided by the parent in that order, so the output
is byte-identical for any ``--workers``.

Bounded memory: open shards are spilled to raw files under ``OUT/.work/`` as documents arrive
(not held in RAM) and copied into HDF5 when they close; the dedup set of 16-byte content hashes
is an on-disk SQLite B-tree (``OUT/.work/state.sqlite``) with a bounded page cache.

Resume: after every item the parent flushes the spill files and commits, in one SQLite
transaction, the new hashes and a JSON state (last item key, finished shards, spill lengths,
counts). A run killed at any point restarts from the last commit: it truncates the spill files
to the committed lengths, drops ``*.tmp`` shards, skips the items already done and rewrites
any shard finished after that commit with identical bytes.

Job arrays: with ``num_tasks > 1`` each task takes a contiguous, byte-balanced range of work
units and writes a *part* (``OUT/parts/task-I-of-T/``: every cleaned document's tokens, content
hash and split, undeduplicated). ``merge`` feeds the parts, in task order, through the same
packer (dedup, split, shard filling) a single-task run uses, so the result equals it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from hpcllm.data import shards as shards_mod
from hpcllm.data.clean import CleanOptions, content_hash, drop_reason, is_val, normalize
from hpcllm.data.sources import (SourceOptions, iter_items, parse_inputs, parse_item, plan_units,
                                 resolve_files, split_units)
from hpcllm.data.tokenizer import load_tokenizer, token_dtype, tokenizer_manifest_entry
from hpcllm.errors import HpcllmError, excerpt
from hpcllm.fileio import is_write_failure, write_error, write_json_atomic
from hpcllm.locking import lock_dir, lock_file
from hpcllm.schema import COUNT, POSITIVE, MapOf, Nullable, validate

WORK = ".work"
PARTS = "parts"


@dataclass
class PreprocessOptions:
    """Options of `hpcllm preprocess` (same names as the CLI flags)."""

    #: None/"byte" for the byte tokenizer, or a tokenizer.json path
    tokenizer: str | None = None
    #: JSON key (dotted for nested fields) or parquet column holding the text
    text_key: str = "text"
    #: "none": a .txt file is one document; "blank-line": one document per paragraph block
    txt_split: str = "none"
    #: fraction of documents (by content hash) that go to the val split
    val_fraction: float = 0.005
    #: a shard closes once it holds at least this many tokens
    shard_tokens: int = 1 << 26
    #: tokenizing processes (output is identical for any value)
    workers: int = 1
    #: drop documents shorter than this many characters
    min_chars: int = 32
    #: Unicode NFC normalisation
    nfc: bool = True
    #: remove control characters other than \n and \t
    strip_control: bool = True
    #: exact deduplication by content hash across the run
    dedup: bool = True
    #: bad records are fatal instead of skipped and counted
    strict: bool = False
    #: job-array size and this task's index (default: SLURM_ARRAY_TASK_COUNT / _ID, else 1 / 0)
    num_tasks: int | None = None
    task_id: int | None = None
    #: shard storage: "none" (contiguous, memory-mappable; the default) or "lzf"
    compression: str = "none"
    #: size of a work item in bytes
    item_bytes: int = 1 << 20
    #: records larger than this many MB are rejected as bad input
    max_doc_mb: int = 32
    #: delete an existing dataset or unfinished run with other arguments in OUT
    overwrite: bool = False
    #: progress bar (True), log lines (False) or auto (None: a bar when stderr is a terminal)
    progress: bool | None = None
    #: seconds between progress log lines when not on a terminal
    log_every: float = 10.0
    #: how many warnings per reason are printed (all are counted)
    max_warnings: int = 10
    #: the command line recorded in the manifest
    command: str | None = None


def _options(options: dict) -> PreprocessOptions:
    names = {f.name for f in dataclasses.fields(PreprocessOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise HpcllmError(f"unknown preprocess option(s): {', '.join(unknown)}")
    opts = PreprocessOptions(**options)
    if opts.txt_split not in ("none", "blank-line"):
        raise HpcllmError(f"--txt-split {opts.txt_split!r}: use 'none' or 'blank-line'")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise HpcllmError(f"--val-fraction {opts.val_fraction}: must be in [0, 1)")
    if opts.shard_tokens < 1 or opts.workers < 1 or opts.item_bytes < 1:
        raise HpcllmError("--shard-tokens, --workers and --item-bytes must be positive")
    if opts.compression not in ("none", "lzf"):
        raise HpcllmError(f"--compression {opts.compression!r}: use 'none' or 'lzf'")
    return opts


def task_layout(num_tasks: int | None, task_id: int | None) -> tuple[int, int]:
    """(num_tasks, task_id) from the arguments, else Slurm's job-array variables, else (1, 0)."""
    env = os.environ
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_id is None:
        if "SLURM_ARRAY_TASK_ID" in env and num_tasks > 1:
            # array indices may start anywhere (--array=1-4): offset by the minimum
            task_id = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        else:
            task_id = 0
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise HpcllmError(f"--task-id {task_id} is outside --num-tasks {num_tasks}")
    return num_tasks, task_id


# -- worker side -------------------------------------------------------------------------------

@dataclass
class ItemResult:
    """One item's cleaned, tokenized documents (each followed by EOD) and its bad records."""

    key: tuple
    corpus: int
    hashes: bytes            # 16 bytes per kept document
    val: np.ndarray          # bool per kept document
    lengths: np.ndarray      # int64 tokens per kept document, EOD included
    tokens: np.ndarray       # all kept documents' tokens, concatenated
    dropped: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    nbytes: int = 0


@dataclass
class WorkerConfig:
    tokenizer: str | None
    source: SourceOptions
    clean: CleanOptions
    val_fraction: float


class Worker:
    """parse -> clean -> hash -> tokenize for one item (runs in a worker process or inline)."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.tok = load_tokenizer(cfg.tokenizer)
        self.dtype = token_dtype(self.tok.vocab_size)

    def __call__(self, item) -> ItemResult:
        cfg = self.cfg
        docs, errors = parse_item(item, cfg.source)
        dropped = Counter()
        texts, hashes, val = [], [], []
        for _, text in docs:
            text = normalize(text, cfg.clean)
            reason = drop_reason(text, cfg.clean)
            if reason:
                dropped[reason] += 1
                continue
            h = content_hash(text)
            texts.append(text)
            hashes.append(h)
            val.append(is_val(h, cfg.val_fraction))
        arrays = self.tok.encode_batch_np(texts) if texts else []
        lengths = np.array([len(a) + 1 for a in arrays], dtype=np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        eod = self.tok.eod_id
        for a in arrays:
            tokens[pos:pos + len(a)] = a
            pos += len(a)
            tokens[pos] = eod
            pos += 1
        return ItemResult(item.key, item.corpus, b"".join(hashes), np.array(val, dtype=bool), lengths,
                          tokens, dict(dropped), errors, item.nbytes)


_WORKER: Worker | None = None


def bound_malloc():
    """Pin glibc's mmap threshold at 256 KiB (this also stops its dynamic growth).

    Items, token arrays and pickles are transient buffers of about a MiB. By default glibc
    raises its mmap threshold each time such a buffer is freed, after which the buffers come
    from the heap, which fragments and is not given back: the process' RSS then creeps up
    with the length of the run. With a fixed threshold they are mmapped and returned on free,
    so peak memory does not depend on the corpus size."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)    # M_TRIM_THRESHOLD
    except Exception:  # not glibc: nothing to tune
        pass


def _init_worker(cfg: WorkerConfig):
    global _WORKER
    import signal

    # one thread per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    bound_malloc()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # die with the parent (kill -9 of preprocess must not leave orphans)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    _WORKER = Worker(cfg)


def _work(item) -> ItemResult:
    return _WORKER(item)


def ordered_results(items, cfg: WorkerConfig, workers: int):
    """Worker results in item order, at most ``2*workers + 2`` items in flight."""
    if workers <= 1:
        worker = Worker(cfg)
        for item in items:
            yield worker(item)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                               initargs=(cfg,))
    pending = deque()
    try:
        for item in items:
            pending.append(pool.submit(_work, item))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# -- progress ----------------------------------------------------------------------------------

class Progress:
    """A tqdm bar on a terminal, else a log line every ``log_every`` seconds (stderr)."""

    def __init__(self, total_bytes: int, label: str, bar: bool | None, log_every: float):
        self.total, self.label, self.log_every = total_bytes, label, log_every
        self.docs = self.tokens = self.nbytes = 0
        self.t0 = self.last = time.monotonic()
        if bar is None:
            bar = sys.stderr.isatty()
        self.bar = None
        if bar:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: workers are forked after this
            self.bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=label, file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, docs: int, tokens: int, nbytes: int):
        self.docs += docs
        self.tokens += tokens
        self.nbytes += nbytes
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(nbytes)
            if now - self.last > 0.5:
                self.bar.set_postfix(docs=self.docs, tokens=_si(self.tokens), refresh=False)
                self.last = now
        elif now - self.last >= self.log_every:
            self.last = now
            el = now - self.t0
            rate = self.nbytes / el if el else 0.0
            pct = f" ({100 * self.nbytes / self.total:.0f}%)" if self.total else ""
            eta = f", ETA {_dt.timedelta(seconds=int((self.total - self.nbytes) / rate))}" if rate and self.total else ""
            log(f"{self.label}: {self.nbytes / 1e6:.1f}/{self.total / 1e6:.1f} MB{pct}, {self.docs} docs, "
                f"{_si(self.tokens)} tokens, {rate / 1e6:.2f} MB/s{eta}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self):
        """The closing line, once the output is complete (a failed run ends with its error only)."""
        el = max(time.monotonic() - self.t0, 1e-9)
        log(f"{self.label}: {self.docs} docs, {_si(self.tokens)} tokens, {self.nbytes / 1e6:.1f} MB in {el:.1f} s "
            f"({self.nbytes / 1e6 / el:.2f} MB/s, {_si(self.tokens / el)} tokens/s)")


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


class Warnings:
    """Bad-record reports: printed up to ``limit`` per reason, all counted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts = Counter()

    def report(self, reason: str, message: str):
        self.counts[reason] += 1
        if self.counts[reason] <= self.limit:
            log(f"warning: {message}")
        elif self.counts[reason] == self.limit + 1:
            log(f"warning: more '{reason}' records are skipped without a message (counted in the manifest)")


# -- the packer: dedup, split, shard filling, resume state ---------------------------------------

class Packer:
    """Turns ordered item results into shards + manifest, committing state after every item."""

    def __init__(self, out: str, *, fingerprint: str, tokenizer_entry: dict, tokenizer_path: str | None,
                 corpora: list[dict], dtype, shard_tokens: int, shard_options: shards_mod.ShardOptions,
                 dedup: bool, overwrite: bool, command: str):
        self.out, self.fingerprint = out, fingerprint
        self.tokenizer_entry, self.tokenizer_path = tokenizer_entry, tokenizer_path
        self.corpora, self.dtype = corpora, np.dtype(dtype)
        self.shard_tokens, self.shard_options, self.dedup = shard_tokens, shard_options, dedup
        self.command = command
        self.work = os.path.join(out, WORK)
        self.done_manifest = None
        manifest_path = os.path.join(out, "manifest.json")
        if os.path.isfile(manifest_path):
            m = shards_mod.read_manifest(out)
            if m.get("fingerprint") == fingerprint:
                self.done_manifest = m
                shutil.rmtree(self.work, ignore_errors=True)
                return
            if not overwrite:
                raise HpcllmError(f"{out}: already holds a dataset made from other inputs or options "
                                  f"(use another directory, or --overwrite to replace it)")
            clear_output(out)
        os.makedirs(self.work, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(self.work, "state.sqlite"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")   # kill -9 safe; fsync at checkpoints
        self.db.execute("PRAGMA cache_size=-65536")    # 64 MiB page cache: bounded memory
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (h BLOB PRIMARY KEY) WITHOUT ROWID")
        row = self.db.execute("SELECT v FROM kv WHERE k='state'").fetchone()
        state = read_state(row[0], os.path.join(self.work, "state.sqlite"), PACKER_STATE) if row else None
        if state is not None and state["fingerprint"] != fingerprint:
            if not overwrite:
                self.db.close()
                raise HpcllmError(f"{out}: holds an unfinished run with other inputs or options (rerun it with "
                                  f"the same arguments to resume, or --overwrite to start over)")
            self.db.close()
            clear_output(out)
            return self.__init__(out, fingerprint=fingerprint, tokenizer_entry=tokenizer_entry,
                                 tokenizer_path=tokenizer_path, corpora=corpora, dtype=dtype,
                                 shard_tokens=shard_tokens, shard_options=shard_options, dedup=dedup,
                                 overwrite=False, command=command)
        if state is None:
            state = {"fingerprint": fingerprint, "last_key": None, "shards": {"train": [], "val": []},
                     "open": {"train": None, "val": None}, "corpus": None, "dropped": {},
                     "corpus_docs": [0] * len(corpora), "created": _now()}
        self.state = state
        self.resumed = state["last_key"] is not None
        self.db.execute("BEGIN")
        self._to_delete: list[str] = []
        self._spill = {}
        self._restore_files()

    # spill files of the open shard of each split
    def _spill_paths(self, split: str, index: int):
        base = os.path.join(self.work, f"{split}-{index:05d}")
        return base + ".tokens", base + ".lens"

    def _restore_files(self):
        for split in shards_mod.SPLITS:
            d = os.path.join(self.out, split)
            if os.path.isdir(d):
                for name in os.listdir(d):
                    if name.endswith(".tmp"):
                        os.unlink(os.path.join(d, name))
        keep = set()
        for split in shards_mod.SPLITS:
            o = self.state["open"][split]
            if o is not None:
                tp, lp = self._spill_paths(split, o["index"])
                keep |= {tp, lp}
                for p, n in ((tp, o["tokens"] * self.dtype.itemsize), (lp, o["docs"] * 8)):
                    with open(p, "ab") as fh:
                        if fh.tell() < n:
                            raise HpcllmError(f"{p}: shorter than its committed length (storage lost data); "
                                              f"rerun with --overwrite")
                        fh.truncate(n)
        for name in os.listdir(self.work):
            p = os.path.join(self.work, name)
            if (name.endswith(".tokens") or name.endswith(".lens")) and p not in keep:
                os.unlink(p)

    @property
    def last_key(self):
        return None if self.done_manifest else self.state["last_key"]

    def _open(self, split: str):
        o = self.state["open"][split]
        if o is None:
            o = self.state["open"][split] = {"index": len(self.state["shards"][split]),
                                             "corpus": self.state["corpus"], "tokens": 0, "docs": 0}
        fh = self._spill.get(split)
        if fh is None:
            tp, lp = self._spill_paths(split, o["index"])
            fh = self._spill[split] = (open(tp, "ab"), open(lp, "ab"))
        return o, fh

    def _close(self, split: str):
        o = self.state["open"][split]
        if o is None:
            return
        fh = self._spill.pop(split, None)
        if fh:
            fh[0].close()
            fh[1].close()
        tp, lp = self._spill_paths(split, o["index"])
        if o["docs"]:
            tokens = shards_mod.FileArray(tp, self.dtype, o["tokens"])
            lens = np.fromfile(lp, dtype=np.int64, count=o["docs"])
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
            entry = shards_mod.write_shard(self.out, shards_mod.shard_relpath(split, o["index"]), tokens, starts,
                                           self.dtype, self.shard_options)
            del tokens
            entry["corpus"] = self.corpora[o["corpus"]]["name"]
            self.state["shards"][split].append(entry)
        self.state["open"][split] = None
        self._to_delete += [tp, lp]

    def _seen(self, hashes: list[bytes]) -> list[bool]:
        """For each hash: already seen earlier in the run (marks the new ones seen)."""
        if not self.dedup:
            return [False] * len(hashes)
        old = set()
        for a in range(0, len(hashes), 500):
            chunk = hashes[a:a + 500]
            q = f"SELECT h FROM seen WHERE h IN ({','.join('?' * len(chunk))})"
            old.update(r[0] for r in self.db.execute(q, chunk))
        out, new = [], []
        for h in hashes:
            if h in old:
                out.append(True)
            else:
                out.append(False)
                old.add(h)
                new.append((h,))
        self.db.executemany("INSERT INTO seen VALUES (?)", new)
        return out

    def count(self, dropped: dict):
        d = self.state["dropped"]
        for k, v in dropped.items():
            if v:
                d[k] = d.get(k, 0) + int(v)

    def add(self, res: ItemResult) -> int:
        """Append an item's documents; returns how many were kept."""
        if self.state["corpus"] != res.corpus:
            for split in shards_mod.SPLITS:  # a shard holds one corpus
                self._close(split)
            self.state["corpus"] = res.corpus
        n = len(res.lengths)
        if n == 0:
            return 0
        hashes = [res.hashes[16 * i:16 * i + 16] for i in range(n)]
        dup = self._seen(hashes)
        ends = np.cumsum(res.lengths)
        kept = 0
        for i in range(n):
            if dup[i]:
                self.state["dropped"]["duplicate"] = self.state["dropped"].get("duplicate", 0) + 1
                continue
            split = "val" if res.val[i] else "train"
            o, (tf, lf) = self._open(split)
            length = int(res.lengths[i])
            tf.write(res.tokens[ends[i] - length:ends[i]].data)
            lf.write(np.int64(length).tobytes())
            o["tokens"] += length
            o["docs"] += 1
            kept += 1
            if o["tokens"] >= self.shard_tokens:
                self._close(split)
        self.state["corpus_docs"][res.corpus] += kept
        return kept

    def commit(self, key):
        """Persist everything up to and including item ``key`` (atomic with the dedup hashes)."""
        for tf, lf in self._spill.values():
            tf.flush()
            lf.flush()
        self.state["last_key"] = list(key)
        self.db.execute("INSERT OR REPLACE INTO kv VALUES ('state', ?)", (json.dumps(self.state),))
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")
        for p in self._to_delete:
            if os.path.exists(p):
                os.unlink(p)
        self._to_delete = []

    def finish(self) -> dict:
        if self.done_manifest is not None:
            return self.done_manifest
        for split in shards_mod.SPLITS:
            self._close(split)
        dropped = self.state["dropped"]
        for c, n in zip(self.corpora, self.state["corpus_docs"]):
            if n == 0:
                why = ", ".join(f"{v} {k}" for k, v in sorted(dropped.items())) or "no records"
                self.db.execute("ROLLBACK")
                self.db.close()
                raise HpcllmError(f"corpus '{c['name']}': no documents left after reading and cleaning ({why})")
        tok_file = None
        if self.tokenizer_path:
            tok_file = "tokenizer.json"
            tmp = os.path.join(self.out, tok_file + ".tmp")
            shutil.copyfile(self.tokenizer_path, tmp)
            os.replace(tmp, os.path.join(self.out, tok_file))
        tok = dict(self.tokenizer_entry, file=tok_file)
        m = shards_mod.make_manifest(tok, self.corpora, self.state["shards"], dropped, self.command,
                                     self.state["created"], extra={"fingerprint": self.fingerprint})
        shards_mod.write_manifest(self.out, m)
        self.db.execute("COMMIT")
        self.db.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return m

    def abort(self):
        """Leave the last commit in place (the next run resumes from it)."""
        if self.done_manifest is None and getattr(self, "db", None) is not None:
            for tf, lf in self._spill.values():
                tf.close()
                lf.close()
            self._spill = {}
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.db.close()
            self.db = None


def clear_output(out: str):
    """Remove what preprocess writes into OUT (and nothing else)."""
    for name in ("train", "val", WORK, PARTS):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in ("manifest.json", "tokenizer.json"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            os.unlink(p)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# -- resume state: one validating reader ---------------------------------------------------------

#: the packer's committed state (in OUT/.work/state.sqlite) and a task part's state.json: what
#: resuming relies on
PACKER_STATE = {"fingerprint": str, "last_key": Nullable(list), "shards": {"train": list, "val": list},
                "open": dict, "dropped": MapOf(COUNT), "corpus_docs": [COUNT]}
PART_STATE = {"fingerprint": str, "config": dict, "num_tasks": POSITIVE, "task_id": COUNT,
              "last_key": Nullable(list), "tokens": COUNT, "docs": COUNT, "dropped": MapOf(COUNT), "done": bool}


def read_state(text: str, where: str, schema) -> dict:
    try:
        state = json.loads(text)
    except (TypeError, ValueError) as e:
        raise HpcllmError(f"{where}: damaged resume state ({excerpt(e, 80)}); rerun with --overwrite") from None
    validate(state, schema, where)
    return state


def read_state_file(path: str, schema) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise HpcllmError(f"{path}: unreadable resume state ({excerpt(e, 80)}); rerun with --overwrite") from None
    return read_state(text, path, schema)


# -- task parts -------------------------------------------------------------------------------

PART_DOC = np.dtype([("hash", "u1", (16,)), ("length", "<i8"), ("corpus", "<i4"), ("val", "u1")])


class PartSink:
    """One job-array task's output: every cleaned document, in order, undeduplicated."""

    def __init__(self, out: str, num_tasks: int, task_id: int, *, fingerprint: str, config: dict,
                 dtype, overwrite: bool):
        self.dir = part_dir(out, num_tasks, task_id)
        self.dtype = np.dtype(dtype)
        self.state_path = os.path.join(self.dir, "state.json")
        os.makedirs(self.dir, exist_ok=True)
        state = None
        if os.path.isfile(self.state_path):
            state = read_state_file(self.state_path, PART_STATE)
            if state["fingerprint"] != fingerprint:
                if not overwrite:
                    raise HpcllmError(f"{self.dir}: holds a task part made from other inputs or options "
                                      f"(use --overwrite to redo it)")
                state = None
        if state is None:
            state = {"fingerprint": fingerprint, "config": config, "num_tasks": num_tasks, "task_id": task_id,
                     "last_key": None, "tokens": 0, "docs": 0, "dropped": {}, "done": False}
        self.state = state
        self.tokens_path = os.path.join(self.dir, "tokens.bin")
        self.docs_path = os.path.join(self.dir, "docs.bin")
        self.tf = open(self.tokens_path, "ab")
        self.df = open(self.docs_path, "ab")
        for fh, n in ((self.tf, state["tokens"] * self.dtype.itemsize), (self.df, state["docs"] * PART_DOC.itemsize)):
            if fh.tell() < n:
                raise HpcllmError(f"{fh.name}: shorter than its committed length; rerun with --overwrite")
            fh.truncate(n)

    @property
    def last_key(self):
        return self.state["last_key"]

    def count(self, dropped: dict):
        for k, v in dropped.items():
            if v:
                self.state["dropped"][k] = self.state["dropped"].get(k, 0) + int(v)

    def add(self, res: ItemResult) -> int:
        n = len(res.lengths)
        if n:
            rec = np.zeros(n, dtype=PART_DOC)
            rec["hash"] = np.frombuffer(res.hashes, dtype=np.uint8).reshape(n, 16)
            rec["length"] = res.lengths
            rec["corpus"] = res.corpus
            rec["val"] = res.val
            self.tf.write(res.tokens.data)
            self.df.write(rec.tobytes())
            self.state["tokens"] += int(res.lengths.sum())
            self.state["docs"] += n
        return n

    def commit(self, key):
        self.tf.flush()
        self.df.flush()
        self.state["last_key"] = list(key)
        write_json_atomic(self.state_path, self.state)

    def finish(self) -> dict:
        self.tf.close()
        self.df.close()
        self.state["done"] = True
        write_json_atomic(self.state_path, self.state)
        return {"part": self.dir, "task_id": self.state["task_id"], "num_tasks": self.state["num_tasks"],
                "documents": self.state["docs"], "tokens": self.state["tokens"], "dropped": self.state["dropped"]}

    def abort(self):
        self.tf.close()
        self.df.close()


def part_dir(out: str, num_tasks: int, task_id: int) -> str:
    return os.path.join(out, PARTS, f"task-{task_id:05d}-of-{num_tasks:05d}")


# -- the entry points ---------------------------------------------------------------------------

def _fingerprint(files, opts: PreprocessOptions, tok, corpora) -> str:
    """Identity of a run's output: inputs (path, size, mtime) and every option that shapes it.

    Not --workers (output is identical for any count) and not --strict (a strict run that
    stopped at a bad record has committed exactly what a lenient run would have, so it can be
    resumed without --strict)."""
    inputs = []
    for f in files:
        try:
            st = os.stat(f.path)
            inputs.append([f.path, f.corpus, st.st_size, st.st_mtime_ns])
        except OSError:
            inputs.append([f.path, f.corpus, None, None])
    shaping = {k: getattr(opts, k) for k in ("text_key", "txt_split", "val_fraction", "shard_tokens", "min_chars",
                                             "nfc", "strip_control", "dedup", "compression", "item_bytes",
                                             "max_doc_mb")}
    blob = json.dumps({"inputs": inputs, "options": shaping, "tokenizer": tok.sha256, "corpora": corpora},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _command(opts: PreprocessOptions, inputs, out) -> str:
    if opts.command:
        return opts.command
    return "run_preprocess(" + json.dumps([list(inputs), out]) + ")"


def run_preprocess(inputs: list[str], out: str, **options) -> dict:
    """Preprocess ``inputs`` into the dataset directory ``out``; returns the manifest
    (or, for one task of a job array, a summary of the task's part). A full disk (or another
    failed write) is one line; what was committed stays, and the same command resumes."""
    with _faults_as_errors(out, "the dataset", "rerun the same command to resume once there is room"):
        return _run_preprocess(inputs, out, **options)


@contextlib.contextmanager
def _faults_as_errors(out, what: str, resume: str):
    """A damaged resume state or a failed write (full disk, quota) as one line; what was
    committed stays, so ``resume`` says how to continue."""
    try:
        yield
    except sqlite3.DatabaseError as e:  # a damaged or foreign resume state, found while using it
        raise _damaged_state(os.fspath(out), e) from None
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise HpcllmError(f"{write_error(what, e.filename or out, e)}; {resume}") from None


def _run_preprocess(inputs: list[str], out: str, **options) -> dict:
    """Preprocess ``inputs`` into the dataset directory ``out``; returns the manifest
    (or, for one task of a job array, a summary of the task's part)."""
    opts = _options(options)
    out = os.fspath(out)
    bound_malloc()
    corpora = parse_inputs(list(inputs))
    files = resolve_files(corpora)
    source = SourceOptions(text_key=opts.text_key, txt_split=opts.txt_split, item_bytes=opts.item_bytes,
                           max_doc_bytes=opts.max_doc_mb << 20)
    clean = CleanOptions(nfc=opts.nfc, strip_control=opts.strip_control, min_chars=opts.min_chars, dedup=opts.dedup)
    tok = load_tokenizer(opts.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    corpora_entry = [{"name": c.name, "weight": c.weight} for c in corpora]
    fingerprint = _fingerprint(files, opts, tok, corpora_entry)
    num_tasks, task_id = task_layout(opts.num_tasks, opts.task_id)
    units = plan_units(files, source)
    os.makedirs(out, exist_ok=True)
    with contextlib.ExitStack() as locks:  # one writer per output, for the whole run
        if num_tasks > 1:  # job-array tasks share OUT; each holds its own part
            locks.enter_context(lock_dir(out, shared=True))
            locks.enter_context(lock_dir(part_dir(out, num_tasks, task_id)))
        else:
            locks.enter_context(lock_dir(out))
        config = {"tokenizer_entry": tokenizer_manifest_entry(tok, None), "tokenizer_path": tok.path,
                  "corpora": corpora_entry, "dtype": np.dtype(dtype).str, "shard_tokens": opts.shard_tokens,
                  "compression": opts.compression, "dedup": opts.dedup, "command": _command(opts, inputs, out)}
        if num_tasks > 1:
            units = split_units(units, num_tasks, task_id)
            sink = PartSink(out, num_tasks, task_id, fingerprint=fingerprint, config=config, dtype=dtype,
                            overwrite=opts.overwrite)
            if sink.state["done"]:
                sink.abort()
                return sink.finish()
            label = f"preprocess task {task_id}/{num_tasks}"
        else:
            sink = _packer(out, fingerprint, config, opts.overwrite)
            if sink.done_manifest is not None:
                log(f"{out}: already complete (same inputs and options), nothing to do (delete it to redo it)")
                return sink.done_manifest
            label = "preprocess"
        after = sink.last_key
        if after is not None:
            log(f"{label}: resuming after item {tuple(after)}")
        total = sum(u.weight for u in units)
        cfg = WorkerConfig(opts.tokenizer if tok.path is None else tok.path, source, clean, opts.val_fraction)
        progress = Progress(total, label, opts.progress, opts.log_every)
        warnings = Warnings(opts.max_warnings)
        items = iter_items(files, units, source, after=tuple(after) if after else None)
        results = ordered_results(items, cfg, opts.workers)
        ok = False
        try:
            for res in results:
                for line, reason, message in res.errors:
                    if opts.strict:
                        raise HpcllmError(message.removesuffix(", skipped") + " (--strict)")
                    warnings.report(reason, message)
                sink.count(res.dropped)
                sink.count(Counter(reason for _, reason, _ in res.errors))
                kept = sink.add(res)
                sink.commit(res.key)
                progress.update(kept, int(res.lengths.sum()), res.nbytes)
            ok = True
        finally:
            results.close()
            progress.close()
            if not ok:
                sink.abort()
        result = sink.finish()
        progress.summary()
        return result


def _damaged_state(out: str, e: Exception) -> HpcllmError:
    return HpcllmError(f"{os.path.join(out, WORK, 'state.sqlite')}: damaged resume state ({excerpt(e, 80)}); "
                       "rerun with --overwrite")


def _packer(out: str, fingerprint: str, config: dict, overwrite: bool) -> Packer:
    return Packer(out, fingerprint=fingerprint, tokenizer_entry=config["tokenizer_entry"],
                  tokenizer_path=config["tokenizer_path"], corpora=config["corpora"], dtype=np.dtype(config["dtype"]),
                  shard_tokens=config["shard_tokens"],
                  shard_options=shards_mod.ShardOptions(compression=config["compression"]),
                  dedup=config["dedup"], overwrite=overwrite, command=config["command"])


def merge_parts(out: str, overwrite: bool = False, progress: bool | None = None, log_every: float = 10.0,
                batch_docs: int = 4096) -> dict:
    """Write the global dataset from the finished parts of a job array (see module docstring)."""
    with _faults_as_errors(out, "the merged dataset", "rerun the merge to resume once there is room"):
        return _merge_parts(out, overwrite, progress, log_every, batch_docs)


def _merge_parts(out: str, overwrite: bool = False, progress: bool | None = None, log_every: float = 10.0,
                 batch_docs: int = 4096) -> dict:
    """Write the global dataset from the finished parts of a job array (see module docstring)."""
    root = os.path.join(out, PARTS)
    if not os.path.isdir(root):
        raise HpcllmError(f"{root}: no task parts (run `hpcllm preprocess ... --num-tasks T --task-id I` first)")
    with lock_dir(out):  # one writer: no tasks, no other merge or run meanwhile
        names = sorted(os.listdir(root))
        if not names:
            raise HpcllmError(f"{root}: no task parts")
        num_tasks = int(names[0].rsplit("-of-", 1)[1])
        states = []
        for t in range(num_tasks):
            sp = os.path.join(part_dir(out, num_tasks, t), "state.json")
            if not os.path.isfile(sp):
                raise HpcllmError(f"{sp}: task {t} of {num_tasks} has not run")
            st = read_state_file(sp, PART_STATE)
            if not st.get("done"):
                raise HpcllmError(f"{sp}: task {t} of {num_tasks} has not finished (rerun it to resume)")
            states.append(st)
        if len({s["fingerprint"] for s in states}) != 1:
            raise HpcllmError(f"{root}: the task parts were made from different inputs or options")
        config = states[0]["config"]
        packer = _packer(out, states[0]["fingerprint"], config, overwrite)
        if packer.done_manifest is not None:
            shutil.rmtree(root, ignore_errors=True)
            return packer.done_manifest
        dtype = np.dtype(config["dtype"])
        after = tuple(packer.last_key) if packer.last_key else None
        if after is not None:
            log(f"merge: resuming after task {after[0]} batch {after[1]}")
        prog = Progress(sum(s["tokens"] for s in states) * dtype.itemsize, "merge", progress, log_every)
        ok = False
        try:
            for t, st in enumerate(states):
                d = part_dir(out, num_tasks, t)
                tokens = shards_mod.FileArray(os.path.join(d, "tokens.bin"), dtype, st["tokens"])
                docs_path = os.path.join(d, "docs.bin")
                n_docs = st["docs"]
                pos = 0  # token offset of the batch in the part
                for b in range(max(1, -(-n_docs // batch_docs))):
                    key = (t, b)
                    count = min(batch_docs, n_docs - b * batch_docs)
                    # read the part's doc records a batch at a time: bounded memory
                    sel = np.fromfile(docs_path, dtype=PART_DOC, count=count, offset=b * batch_docs * PART_DOC.itemsize) \
                        if count > 0 else np.zeros(0, dtype=PART_DOC)
                    batch_tokens = int(sel["length"].sum())
                    if after is not None and key <= after:
                        pos += batch_tokens
                        continue
                    if b == 0:
                        packer.count(st["dropped"])
                    # a batch spans corpora only at a corpus boundary: feed it per corpus run
                    runs = np.flatnonzero(np.diff(sel["corpus"])) + 1 if len(sel) else []
                    bounds = [0, *runs, len(sel)]
                    for a, z in zip(bounds[:-1], bounds[1:]):
                        part = sel[a:z]
                        if not len(part):
                            continue
                        n_tok = int(part["length"].sum())
                        packer.add(ItemResult(key, int(part["corpus"][0]), part["hash"].tobytes(), part["val"].astype(bool),
                                              part["length"].astype(np.int64), tokens[pos:pos + n_tok]))
                        pos += n_tok
                    packer.commit(key)
                    prog.update(len(sel), batch_tokens, batch_tokens * dtype.itemsize)
            ok = True
        finally:
            prog.close()
            if not ok:
                packer.abort()
        m = packer.finish()
        prog.summary()
        shutil.rmtree(root, ignore_errors=True)
        return m


def iter_clean_texts(inputs: list[str], text_key: str = "text", txt_split: str = "none",
                     clean: CleanOptions | None = None, max_bytes: int | None = None, max_warnings: int = 10):
    """Cleaned document texts of ``inputs`` in order (single process; tokenizer training)."""
    clean = clean or CleanOptions()
    source = SourceOptions(text_key=text_key, txt_split=txt_split)
    files = resolve_files(parse_inputs(list(inputs)))
    warnings = Warnings(max_warnings)
    seen = 0
    for item in iter_items(files, plan_units(files, source), source):
        docs, errors = parse_item(item, source)
        for _, reason, message in errors:
            warnings.report(reason, message)
        for _, text in docs:
            text = normalize(text, clean)
            if drop_reason(text, clean):
                continue
            yield text
            seen += len(text)
            if max_bytes is not None and seen >= max_bytes:
                return


def train_tokenizer(inputs: list[str], out: str, vocab_size: int, text_key: str = "text", txt_split: str = "none",
                    max_mb: float | None = None, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on cleaned documents of ``inputs``; write ``out``."""
    from hpcllm.data.tokenizer import train_bpe

    texts = iter_clean_texts(inputs, text_key, txt_split,
                             max_bytes=None if max_mb is None else int(max_mb * 1e6))
    first = next(texts, None)
    if first is None:
        raise HpcllmError(f"{' '.join(inputs)}: no documents to train a tokenizer on")

    def all_texts():
        yield first
        yield from texts

    with lock_file(out):  # one writer of this file
        return train_bpe(all_texts(), vocab_size, out, min_frequency=min_frequency)
