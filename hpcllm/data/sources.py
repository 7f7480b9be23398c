"""Input corpora: resolve NAME=PATTERN[:WEIGHT] specs to files, plan work units, read items.

The unit of work is deterministic, so output never depends on worker count or task split:

* an uncompressed ``.jsonl``/``.json`` file is cut into a byte grid of ``item_bytes`` cells;
  a cell holds the lines that *start* inside it (Hadoop-style splits), so any reader can find a
  cell's lines by seeking, without reading what comes before;
* a parquet file's unit is a row group, read in record batches of ``batch_rows``;
* a compressed file or a ``.txt`` file is one unit, streamed into items of about
  ``item_bytes`` (whole lines; paragraph boundaries with ``--txt-split blank-line``).

Items have keys ``(file, unit, sub)`` ordered like the corpus. The reading here runs in the
parent (sequential I/O); :func:`parse_item` (decode, JSON, key lookup) runs in the workers.
Problems with a record or file become ``(line, reason, message)`` entries with a
``file:line: message`` text; they are skipped and counted, or fatal with ``--strict``.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

from hpcllm.errors import HpcllmError

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz"}
TXT_EXT = {".txt", ".text", ".md", ".rst"}
JSONL_EXT = {".jsonl", ".json", ".ndjson"}
PARQUET_EXT = {".parquet", ".pq"}
KNOWN_EXT = TXT_EXT | JSONL_EXT | PARQUET_EXT
_NAME_SPEC = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)=(.+)$")


@dataclass
class SourceOptions:
    """How input files are read."""

    #: JSON key holding the text (dotted for nested fields: "meta.body"); also the parquet column
    text_key: str = "text"
    #: "none" (a .txt file is one document) or "blank-line" (one document per paragraph block)
    txt_split: str = "none"
    #: size of a work item in bytes (uncompressed)
    item_bytes: int = 1 << 20
    #: parquet rows per record batch (one item)
    batch_rows: int = 1024
    #: documents (raw records) larger than this many bytes are rejected
    max_doc_bytes: int = 32 << 20


@dataclass
class Corpus:
    name: str
    weight: float
    patterns: list = field(default_factory=list)


@dataclass
class InputFile:
    index: int
    corpus: int
    path: str
    fmt: str          # "txt" | "jsonl" | "parquet"
    compression: str  # "" | "gzip" | "zstd" | "xz"
    size: int


@dataclass(frozen=True)
class Unit:
    file: int
    part: int
    start: int  # byte offset (jsonl grid), row group (parquet), 0 otherwise
    end: int
    weight: int  # bytes, for balancing tasks


@dataclass
class Item:
    key: tuple
    corpus: int
    path: str
    kind: str  # "lines" (jsonl), "paragraphs", "whole" (txt), "texts" (parquet), "none" (errors only)
    first_line: int
    data: object = b""
    nbytes: int = 0
    errors: list = field(default_factory=list)  # (line, reason, message) found while reading


def parse_inputs(inputs: list[str]) -> list[Corpus]:
    """``NAME=PATTERN[:WEIGHT]`` specs and plain paths/globs (corpus "default")."""
    corpora: dict[str, Corpus] = {}
    for spec in inputs:
        spec = os.fspath(spec)
        name, pattern, weight = "default", spec, None
        m = _NAME_SPEC.match(spec)
        if m and not os.path.exists(spec):
            name, pattern = m.group(1), m.group(2)
            head, sep, tail = pattern.rpartition(":")
            if sep and head:
                try:
                    weight = float(tail)
                except ValueError:
                    weight = None
                else:
                    pattern = head
                    if not weight > 0:
                        raise HpcllmError(f"{spec}: corpus weight must be positive")
        c = corpora.setdefault(name, Corpus(name, 1.0))
        if weight is not None:
            c.weight = weight
        c.patterns.append(pattern)
    if not corpora:
        raise HpcllmError("no inputs given")
    return list(corpora.values())


def detect_format(path: str) -> tuple[str, str]:
    base, ext = os.path.splitext(path.lower())
    compression = COMPRESSIONS.get(ext, "")
    if compression:
        ext = os.path.splitext(base)[1]
    if ext in JSONL_EXT:
        return "jsonl", compression
    if ext in PARQUET_EXT:
        return "parquet", compression
    return "txt", compression


def _known(path: str) -> bool:
    base, ext = os.path.splitext(path.lower())
    if ext in COMPRESSIONS:
        ext = os.path.splitext(base)[1]
    return ext in KNOWN_EXT


def expand_pattern(pattern: str) -> list[str]:
    """Files of a path, directory (recursive, known extensions) or glob, sorted."""
    if os.path.isdir(pattern):
        found = []
        for root, dirs, files in os.walk(pattern):
            dirs.sort()
            found.extend(os.path.join(root, f) for f in sorted(files) if _known(f))
        if not found:
            raise HpcllmError(f"{pattern}: directory has no .txt/.jsonl/.json/.parquet files (compressed or not)")
        return found
    if os.path.exists(pattern) or os.path.islink(pattern):
        return [pattern]
    if glob.has_magic(pattern):
        found = sorted(p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p))
        if not found:
            raise HpcllmError(f"{pattern}: no files match")
        return found
    raise HpcllmError(f"{pattern}: no such file or directory")


def resolve_files(corpora: list[Corpus]) -> list[InputFile]:
    files = []
    for ci, c in enumerate(corpora):
        for pattern in c.patterns:
            for path in expand_pattern(pattern):
                fmt, comp = detect_format(path)
                try:
                    size = os.path.getsize(path)
                except OSError:
                    size = 0  # reported as unreadable when read
                files.append(InputFile(len(files), ci, path, fmt, comp, size))
    return files


def plan_units(files: list[InputFile], options: SourceOptions) -> list[Unit]:
    """The ordered work units of all files (cheap: sizes and parquet metadata only)."""
    units = []
    step = max(1, options.item_bytes)
    for f in files:
        if f.fmt == "jsonl" and not f.compression and f.size > 0:
            for k, a in enumerate(range(0, f.size, step)):
                b = min(f.size, a + step)
                units.append(Unit(f.index, k, a, b, b - a))
        elif f.fmt == "parquet" and not f.compression:
            groups = _parquet_groups(f.path)
            if groups is None:  # unreadable: one unit that reports it
                units.append(Unit(f.index, 0, -1, -1, max(1, f.size)))
            for g, (rows, nbytes) in enumerate(groups or []):
                units.append(Unit(f.index, g, g, g + 1, max(1, nbytes)))
        else:
            units.append(Unit(f.index, 0, 0, f.size, max(1, f.size)))
    return units


def _parquet_groups(path: str):
    try:
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        return [(md.row_group(i).num_rows, md.row_group(i).total_byte_size) for i in range(md.num_row_groups)]
    except Exception:
        return None


def split_units(units: list[Unit], num_tasks: int, task_id: int) -> list[Unit]:
    """Task ``task_id``'s contiguous share of the units, balanced by bytes."""
    total = sum(u.weight for u in units)
    out, acc = [], 0
    for u in units:
        if total and min(num_tasks - 1, acc * num_tasks // total) == task_id:
            out.append(u)
        acc += u.weight
    return out


# -- reading (parent side) ----------------------------------------------------------------------

def _open_stream(f: InputFile):
    if f.compression == "gzip":
        return gzip.open(f.path, "rb")
    if f.compression == "xz":
        return lzma.open(f.path, "rb")
    if f.compression == "zstd":
        import zstandard

        raw = open(f.path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return open(f.path, "rb", buffering=1 << 20)


def _err_item(f: InputFile, unit: Unit, line: int, reason: str, msg: str) -> Item:
    return Item((f.index, unit.part, 0), f.corpus, f.path, "none", line, errors=[(line, reason, msg)])


def _read_error(f: InputFile, e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{f.path}: cannot read ({e.strerror})"
    return f"{f.path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


class _LineCounter:
    """Line numbers of byte offsets of uncompressed files (count newlines once, forward)."""

    def __init__(self):
        self.known: dict[int, tuple[int, int]] = {}

    def line_at(self, f: InputFile, offset: int) -> int:
        pos, line = self.known.get(f.index, (0, 1))
        if pos > offset:
            pos, line = 0, 1
        with open(f.path, "rb") as fh:
            fh.seek(pos)
            while pos < offset:
                b = fh.read(min(1 << 22, offset - pos))
                if not b:
                    break
                line += b.count(b"\n")
                pos += len(b)
        self.known[f.index] = (offset, line)
        return line

    def advance(self, f: InputFile, offset: int, line: int):
        self.known[f.index] = (offset, line)


def iter_items(files: list[InputFile], units: list[Unit], options: SourceOptions,
               after: tuple | None = None) -> Iterator[Item]:
    """Items of ``units`` in order, skipping keys <= ``after`` (resume)."""
    counter = _LineCounter()
    for unit in units:
        if after is not None and (unit.file, unit.part) < tuple(after[:2]):
            continue
        skip_sub = after[2] if after is not None and (unit.file, unit.part) == tuple(after[:2]) else -1
        f = files[unit.file]
        try:
            if f.fmt == "jsonl" and not f.compression:
                gen = _grid_items(f, unit, options, counter)
            elif f.fmt == "parquet":
                gen = _parquet_items(f, unit, options)
            else:
                gen = _stream_items(f, unit, options)
            for item in gen:
                if item.key[2] > skip_sub:
                    yield item
        except _FileProblem as p:
            if p.sub > skip_sub:  # a problem after the resume point is reported (again)
                item = _err_item(f, unit, p.line, p.reason, p.message)
                item.key = (f.index, unit.part, p.sub)
                yield item


class _FileProblem(Exception):
    """A file-level problem; ``sub`` is the index of the item it replaces (keys stay ordered)."""

    def __init__(self, line, reason, message, sub=0):
        super().__init__(message)
        self.line, self.reason, self.message, self.sub = line, reason, message, sub


def _check_start(f: InputFile, head: bytes):
    if not head:
        raise _FileProblem(1, "empty_file", f"{f.path}:1: empty file")
    if b"\x00" in head[:8192]:
        raise _FileProblem(1, "binary_file", f"{f.path}:1: binary file (NUL bytes), skipped")


def _readline(fh, limit: int):
    """(line, too_long): a line of at most ``limit`` bytes; longer ones are consumed and flagged."""
    line = fh.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    while True:
        rest = fh.readline(1 << 20)
        if not rest or rest.endswith(b"\n"):
            return b"", True


def _grid_items(f: InputFile, unit: Unit, options: SourceOptions, counter: _LineCounter):
    try:
        fh = open(f.path, "rb", buffering=1 << 20)
    except OSError as e:
        raise _FileProblem(1, "unreadable_file", _read_error(f, e)) from None
    with fh:
        try:
            try:
                _check_start(f, fh.read(8192))
            except _FileProblem:
                if unit.part == 0:
                    raise
                return  # reported once, by the file's first unit
            if unit.start == 0:
                pos = 0
            else:
                # skip the rest of the line that started before the cell; it may run past the
                # cell (a huge record): then no line starts here, and reading stops at the cell end
                fh.seek(unit.start - 1)
                skipped = fh.readline(unit.end - unit.start + 1)
                pos = fh.tell()
                if not skipped.endswith(b"\n") or pos >= unit.end:
                    return
            line = counter.line_at(f, pos)
            chunks, errors, first_line, nbytes = [], [], line, 0
            fh.seek(pos)
            while pos < unit.end:
                raw, too_long = _readline(fh, options.max_doc_bytes)
                if too_long:
                    errors.append((line, "too_long", f"{f.path}:{line}: record larger than "
                                   f"{options.max_doc_bytes >> 20} MB (--max-doc-mb), skipped"))
                    raw_len = fh.tell() - pos
                    chunks.append(b"\n")
                elif not raw:
                    break
                else:
                    raw_len = len(raw)
                    chunks.append(raw if raw.endswith(b"\n") else raw + b"\n")
                pos += raw_len
                line += 1
                nbytes += raw_len
            counter.advance(f, pos, line)
        except OSError as e:
            raise _FileProblem(1, "unreadable_file", _read_error(f, e)) from None
    yield Item((f.index, unit.part, 0), f.corpus, f.path, "lines", first_line, b"".join(chunks), nbytes, errors)


def _stream_items(f: InputFile, unit: Unit, options: SourceOptions):
    """Compressed files and txt files: one unit, streamed into items."""
    try:
        fh = _open_stream(f)
    except OSError as e:
        raise _FileProblem(1, "unreadable_file", _read_error(f, e)) from None
    sub, line = 0, 1
    with fh:
        try:
            head = fh.peek(8192)[:8192] if hasattr(fh, "peek") else b""
            _check_start(f, head)
            if f.fmt == "txt" and options.txt_split != "blank-line":
                data = fh.read(options.max_doc_bytes + 1)
                if len(data) > options.max_doc_bytes:
                    raise _FileProblem(1, "too_long", f"{f.path}:1: document larger than "
                                       f"{options.max_doc_bytes >> 20} MB (--max-doc-mb), skipped")
                yield Item((f.index, unit.part, 0), f.corpus, f.path, "whole", 1, data, len(data))
                return
            kind = "lines" if f.fmt == "jsonl" else "paragraphs"
            chunks, errors, first_line, nbytes = [], [], 1, 0
            while True:
                raw, too_long = _readline(fh, options.max_doc_bytes)
                if too_long:
                    errors.append((line, "too_long", f"{f.path}:{line}: record larger than "
                                   f"{options.max_doc_bytes >> 20} MB (--max-doc-mb), skipped"))
                    raw = b"\n"
                elif not raw:
                    break
                chunks.append(raw if raw.endswith(b"\n") else raw + b"\n")
                nbytes += len(raw)
                line += 1
                # cut after ~item_bytes, at a record (jsonl) or paragraph (blank line) boundary
                if nbytes >= options.item_bytes and (kind == "lines" or not raw.strip()):
                    yield Item((f.index, unit.part, sub), f.corpus, f.path, kind, first_line,
                               b"".join(chunks), nbytes, errors)
                    sub += 1
                    chunks, errors, first_line, nbytes = [], [], line, 0
            if chunks or errors:
                yield Item((f.index, unit.part, sub), f.corpus, f.path, kind, first_line, b"".join(chunks), nbytes, errors)
        except _FileProblem:
            raise
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise _FileProblem(line, "unreadable_file", _read_error(f, e), sub=sub) from None
        except Exception as e:  # zstandard.ZstdError and friends: corrupt compressed data
            if type(e).__module__.startswith("zstandard"):
                raise _FileProblem(line, "unreadable_file", _read_error(f, e), sub=sub) from None
            raise


def _parquet_items(f: InputFile, unit: Unit, options: SourceOptions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if unit.start < 0:
        raise _FileProblem(1, "unreadable_file", f"{f.path}: cannot read as parquet")
    column = options.text_key.split(".")[0]
    sub, row = 0, 1
    try:
        pf = pq.ParquetFile(f.path)
        if column not in pf.schema_arrow.names:
            raise _FileProblem(1, "missing_key", f"{f.path}:1: no column '{column}' "
                               f"(columns: {', '.join(pf.schema_arrow.names)})")
        md = pf.metadata
        row = sum(md.row_group(i).num_rows for i in range(unit.start)) + 1
        for batch in pf.iter_batches(batch_size=options.batch_rows, row_groups=[unit.start], columns=[column]):
            values = batch.column(0).to_pylist()
            yield Item((f.index, unit.part, sub), f.corpus, f.path, "texts", row, values, batch.nbytes)
            row += len(values)
            sub += 1
    except (OSError, pa.ArrowException) as e:
        raise _FileProblem(row, "unreadable_file", _read_error(f, e), sub=sub) from None


# -- parsing (worker side) ----------------------------------------------------------------------

def _dig(obj, keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return _MISSING
        obj = obj[k]
    return obj


_MISSING = object()


def _utf8_error(path, line, raw: bytes, e: UnicodeDecodeError):
    # line and column of the bad byte inside a multi-line block
    before = raw[:e.start]
    nl = before.count(b"\n")
    col = e.start - (before.rfind(b"\n") + 1) + 1
    return (line + nl, "invalid_utf8", f"{path}:{line + nl}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}), skipped")


def _check_text(path, line, value, key, limit, errors) -> str | None:
    if value is _MISSING or value is None:
        errors.append((line, "missing_key", f"{path}:{line}: no key '{key}'"))
        return None
    if not isinstance(value, str):
        errors.append((line, "bad_value", f"{path}:{line}: '{key}' is {type(value).__name__}, not a string"))
        return None
    if len(value) > limit:
        errors.append((line, "too_long", f"{path}:{line}: document larger than {limit >> 20} MB (--max-doc-mb), skipped"))
        return None
    return value


def parse_item(item: Item, options: SourceOptions) -> tuple[list, list]:
    """(docs [(line, text)], errors [(line, reason, message)]) of one item."""
    docs, errors = [], list(item.errors)
    path = item.path
    if item.kind == "whole":
        try:
            text = item.data.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(_utf8_error(path, 1, item.data, e))
        else:
            docs.append((1, text))
    elif item.kind == "lines":
        keys = options.text_key.split(".")
        for i, raw in enumerate(item.data.split(b"\n")[:-1]):
            line = item.first_line + i
            if not raw.strip():
                continue
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(_utf8_error(path, line, raw, e))
                continue
            if line == 1 and s.startswith("\ufeff"):
                s = s[1:]  # a UTF-8 byte-order mark at the start of the file
            try:
                obj = json.loads(s)
            except ValueError as e:
                msg = getattr(e, "msg", str(e))
                col = getattr(e, "colno", None)
                errors.append((line, "bad_json", f"{path}:{line}: malformed JSON ({msg}"
                               + (f" at column {col})" if col else ")")))
                continue
            text = _check_text(path, line, _dig(obj, keys), options.text_key, options.max_doc_bytes, errors)
            if text is not None:
                docs.append((line, text))
    elif item.kind == "paragraphs":
        para, start = [], item.first_line
        lines = item.data.split(b"\n")[:-1]
        for i, raw in enumerate(lines + [b""]):
            line = item.first_line + i
            if raw.strip():
                if not para:
                    start = line
                para.append(raw)
                continue
            if para:
                block = b"\n".join(para)
                para = []
                try:
                    docs.append((start, block.decode("utf-8")))
                except UnicodeDecodeError as e:
                    errors.append(_utf8_error(path, start, block, e))
    elif item.kind == "texts":
        keys = options.text_key.split(".")[1:]
        for i, value in enumerate(item.data):
            line = item.first_line + i
            if keys:
                value = _dig(value, keys)
            text = _check_text(path, line, value, options.text_key, options.max_doc_bytes, errors)
            if text is not None:
                docs.append((line, text))
    errors.sort(key=lambda e: e[0])
    return docs, errors
