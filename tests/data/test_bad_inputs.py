"""Bad input through the real `hpcllm` CLI: a one-line `file:line: message`, skipped and
counted by default, fatal (exit 2, no traceback, nothing half-written) with --strict."""
import gzip
import json
import os

import pytest

from tests.data.conftest import hpcllm, write_jsonl

GOOD = [f"good document number {i} " + "with enough characters to keep" for i in range(20)]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    write_jsonl(d / "good.jsonl", GOOD)
    (d / "badjson.jsonl").write_text(json.dumps({"text": GOOD[0] + "x"}) + "\n" + '{"text": "unterminated\n')
    (d / "nokey.jsonl").write_text(json.dumps({"text": GOOD[1] + "x"}) + "\n\n" + json.dumps({"body": "b" * 50}) + "\n")
    (d / "utf8.jsonl").write_bytes(json.dumps({"text": GOOD[2] + "x"}).encode() + b"\n" + b'{"text": "caf\xff\xfe"}\n')
    (d / "empty.jsonl").write_bytes(b"")
    (d / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4)
    os.symlink(d / "gone.jsonl", d / "dangling.jsonl")  # unreadable, even for root
    with open(d / "corrupt.jsonl.gz", "wb") as f:
        f.write(gzip.compress(b'{"text": "x"}\n' * 100)[:40] + b"garbage" * 10)
    with open(d / "huge.jsonl", "wb") as f:  # a 100 MB single document
        f.write(b'{"text": "')
        block = b"a" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'"}\n')
    return d


# file, line, reason, message fragment
CASES = [
    ("badjson.jsonl", 2, "bad_json", "malformed JSON"),
    ("nokey.jsonl", 3, "missing_key", "no key 'text'"),
    ("utf8.jsonl", 2, "invalid_utf8", "invalid UTF-8 (byte 0xff at column 14)"),
    ("empty.jsonl", 1, "empty_file", "empty file"),
    ("binary.txt", 1, "binary_file", "binary file"),
    ("dangling.jsonl", None, "unreadable_file", "cannot read (No such file or directory)"),
    ("corrupt.jsonl.gz", None, "unreadable_file", "cannot read"),
    ("huge.jsonl", 1, "too_long", "larger than 32 MB"),
]


def _where(d, name, line):
    return f"{d / name}:{line}: " if line else f"{d / name}: "


def test_bad_records_are_skipped_counted_and_reported(bad, tmp_path):
    inputs = [bad / "good.jsonl"] + [bad / c[0] for c in CASES]
    r = hpcllm("preprocess", *inputs, "--out", tmp_path / "ds", "--no-progress", "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: ")]
    for name, line, reason, fragment in CASES:
        hits = [w for w in warnings if w.startswith("warning: " + _where(bad, name, line)) and fragment in w]
        assert len(hits) == 1, (name, warnings)
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["dropped"] == {"bad_json": 1, "missing_key": 1, "invalid_utf8": 1, "empty_file": 1, "binary_file": 1,
                            "unreadable_file": 2, "too_long": 1}
    # the good records of the bad files are kept
    assert m["splits"]["train"]["documents"] == len(GOOD) + 3


@pytest.mark.parametrize("name,line,reason,fragment", CASES, ids=[c[0] for c in CASES])
def test_strict_makes_each_fatal_with_one_line(bad, tmp_path, name, line, reason, fragment):
    out = tmp_path / "ds"
    r = hpcllm("preprocess", bad / "good.jsonl", bad / name, "--out", out, "--strict", "--no-progress")
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if not l.startswith(("preprocess", "warning"))]
    assert errors == [errors[0]] and errors[0].startswith("error: " + _where(bad, name, line)), r.stderr
    assert fragment in errors[0] and "Traceback" not in r.stderr
    # nothing half-written: no manifest, no temporary shards; the good file's work is kept to resume
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))


def test_fatal_inputs(bad, tmp_path):
    r = hpcllm("preprocess", tmp_path / "nope.jsonl", "--out", tmp_path / "a")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file or directory"
    r = hpcllm("preprocess", str(tmp_path / "*.parquet"), "--out", tmp_path / "a")
    assert r.returncode == 2 and "no files match" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # an empty corpus: every input empty or dropped
    (tmp_path / "short.jsonl").write_text('{"text": "hi"}\n')
    r = hpcllm("preprocess", bad / "empty.jsonl", tmp_path / "short.jsonl", "--out", tmp_path / "b", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert err == ["error: corpus 'default': no documents left after reading and cleaning (1 empty_file, 1 too_short)"]
    assert not (tmp_path / "b" / "manifest.json").exists()
    # bad options and a missing dataset for inspect
    r = hpcllm("inspect", tmp_path / "missing")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = hpcllm("preprocess", bad / "good.jsonl", "--out", tmp_path / "c", "--tokenizer", tmp_path / "no.json")
    assert r.returncode == 2 and "tokenizer file does not exist" in r.stderr


def test_a_strict_stop_keeps_the_work_done_and_resumes_leniently(bad, tmp_path):
    out = tmp_path / "ds"
    args = ["preprocess", bad / "good.jsonl", bad / "badjson.jsonl", "--out", out, "--no-progress"]
    r = hpcllm(*args, "--strict")
    assert r.returncode == 2 and "badjson.jsonl:2: malformed JSON" in r.stderr
    r = hpcllm(*args)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"] == {"bad_json": 1} and m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 21


def test_truncated_compressed_file_keeps_its_good_part_in_order(tmp_path):
    from hpcllm.data.sources import SourceOptions, iter_items, parse_inputs, plan_units, resolve_files

    lines = b"".join(json.dumps({"text": f"record {i} " + "x" * 40}).encode() + b"\n" for i in range(400))
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(lines)[:-200])  # truncated stream
    src = SourceOptions(item_bytes=2048)
    files = resolve_files(parse_inputs([str(tmp_path / "t.jsonl.gz")]))
    items = list(iter_items(files, plan_units(files, src), src))
    keys = [it.key for it in items]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) and len(items) > 3
    assert items[-1].kind == "none" and items[-1].errors[0][1] == "unreadable_file"
    # resuming after the last good item reports the problem again, with the same key
    again = list(iter_items(files, plan_units(files, src), src, after=keys[-2]))
    assert [it.key for it in again] == [keys[-1]] and again[0].errors == items[-1].errors
