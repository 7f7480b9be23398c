"""preprocess end to end: exact content, splits, formats, corpora, workers, resume, job arrays."""
import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcllm.data.clean import content_hash, is_val
from hpcllm.data.preprocess import merge_parts, run_preprocess
from tests.data.conftest import (REPO, dataset_digest, decode_split, expected_clean, make_docs,
                                 write_jsonl)


def test_byte_shards_decode_to_the_cleaned_documents(small_corpus, tmp_path):
    path, docs = small_corpus
    m = run_preprocess([str(path)], str(tmp_path / "ds"), val_fraction=0.1, shard_tokens=20_000, item_bytes=8192)
    want = expected_clean(docs)
    train, val = decode_split(tmp_path / "ds", "train"), decode_split(tmp_path / "ds", "val")
    # each split keeps corpus order; together they are exactly the cleaned documents
    assert train == [d for d in want if not is_val(content_hash(d), 0.1)]
    assert val == [d for d in want if is_val(content_hash(d), 0.1)]
    assert 0 < len(val) < len(want) // 4
    n_dup = len([d for d in docs]) - len(want) - m["dropped"].get("too_short", 0) - m["dropped"].get("empty", 0)
    assert m["dropped"]["duplicate"] == n_dup > 0
    assert m["dropped"]["too_short"] > 0
    assert m["splits"]["train"]["documents"] == len(train)
    # the layout contract
    assert m["format"] == "hpcllm-dataset" and m["tokenizer"]["type"] == "byte"
    assert m["tokenizer"]["vocab_size"] == 257 and m["tokenizer"]["eod_id"] == 256
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(e["tokens"] >= 20_000 for e in shards[:-1])
    assert shards[0]["path"] == "train/shard-00000.h5" and shards[0]["corpus"] == "default"
    import h5py

    with h5py.File(tmp_path / "ds" / shards[0]["path"]) as f:
        assert f["tokens"].dtype == np.uint16 and f["doc_index"].dtype == np.int64
        assert f["tokens"].chunks is None and f["tokens"].compression is None
    assert not list((tmp_path / "ds").rglob("*.tmp")) and not (tmp_path / "ds" / ".work").exists()


def test_cleaning_switches(tmp_path):
    docs = ["e\u0301" * 40, "x\x07" * 40, "short", "same text that is long enough to keep" * 2] + \
        ["same text that is long enough to keep" * 2]
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    run_preprocess([str(src)], str(tmp_path / "off"), val_fraction=0, nfc=False, strip_control=False,
                   dedup=False, min_chars=0)
    assert decode_split(tmp_path / "off", "train") == docs
    m = run_preprocess([str(src)], str(tmp_path / "on"), val_fraction=0, min_chars=10)
    assert decode_split(tmp_path / "on", "train") == ["\u00e9" * 40, "x" * 40, docs[3]]
    assert m["dropped"] == {"duplicate": 1, "too_short": 1}


def test_formats_compression_and_corpora(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(120, seed=5, min_words=10)
    want = expected_clean(docs)
    (tmp_path / "in").mkdir()
    a, b, c = docs[:40], docs[40:80], docs[80:]
    # nested key, compressed three ways
    for name, opener in (("a.jsonl.gz", gzip.open), ("b.jsonl.xz", lzma.open)):
        with opener(tmp_path / "in" / name, "wt", encoding="utf-8") as f:
            for d in (a if name.startswith("a") else b):
                f.write(json.dumps({"meta": {"body": d}}) + "\n")
    import zstandard

    with open(tmp_path / "in" / "c.jsonl.zst", "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as w:
            for d in c:
                w.write((json.dumps({"meta": {"body": d}}) + "\n").encode())
    run_preprocess([str(tmp_path / "in")], str(tmp_path / "ds"), text_key="meta.body", val_fraction=0,
                   item_bytes=2048)
    assert decode_split(tmp_path / "ds", "train") == want

    # parquet in record batches over several row groups, txt whole-file and blank-line split
    pq.write_table(pa.table({"text": docs}), tmp_path / "p.parquet", row_group_size=50)
    run_preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "pq"), val_fraction=0)
    assert decode_split(tmp_path / "pq", "train") == want
    paras = [d.replace("\n", " ").replace("\x00", "").strip() for d in docs[:30]]
    (tmp_path / "t.txt").write_text("\n\n\n".join(paras) + "\n", encoding="utf-8")
    run_preprocess([str(tmp_path / "t.txt")], str(tmp_path / "tb"), val_fraction=0, txt_split="blank-line",
                   item_bytes=512)
    assert decode_split(tmp_path / "tb", "train") == expected_clean(paras)
    run_preprocess([str(tmp_path / "t.txt")], str(tmp_path / "tw"), val_fraction=0)
    assert decode_split(tmp_path / "tw", "train") == expected_clean([(tmp_path / "t.txt").read_bytes().decode()])

    # named, weighted corpora: shards per corpus, weights in the manifest
    m = run_preprocess([f"web={tmp_path}/in/a.jsonl.gz:3", f"code={tmp_path}/in/b.jsonl.xz"],
                       str(tmp_path / "named"), text_key="meta.body", val_fraction=0, shard_tokens=1000)
    assert m["corpora"] == [{"name": "web", "weight": 3.0}, {"name": "code", "weight": 1.0}]
    corpora = [e["corpus"] for e in m["splits"]["train"]["shards"]]
    assert corpora == sorted(corpora, key=["web", "code"].index) and set(corpora) == {"web", "code"}


def test_bpe_tokenizer_is_copied_and_recorded(tmp_path, small_corpus):
    from hpcllm.data.preprocess import train_tokenizer
    from hpcllm.data.tokenizer import tokenizer_from_dataset

    path, docs = small_corpus
    tok = train_tokenizer([str(path)], str(tmp_path / "tok.json"), vocab_size=400)
    assert 300 < tok.vocab_size <= 400 and tok.eod_id == 0
    m = run_preprocess([str(path)], str(tmp_path / "ds"), tokenizer=str(tmp_path / "tok.json"), val_fraction=0)
    assert m["tokenizer"]["file"] == "tokenizer.json" and m["tokenizer"]["sha256"] == tok.sha256
    t2 = tokenizer_from_dataset(str(tmp_path / "ds"))
    from hpcllm.data.shards import read_shard

    tokens, index = read_shard(str(tmp_path / "ds" / m["splits"]["train"]["shards"][0]["path"]))
    assert t2.decode(tokens[index[0]:index[1] - 1]) == expected_clean(docs)[0]
    assert m["splits"]["train"]["tokens"] < sum(len(d.encode()) for d in expected_clean(docs))


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~8 MB of jsonl: long enough to kill a run in the middle."""
    d = tmp_path_factory.mktemp("big")
    docs = make_docs(12_000, seed=3, min_words=20, max_words=200)
    return write_jsonl(d / "big.jsonl", docs)


OPTS = dict(val_fraction=0.05, shard_tokens=150_000, item_bytes=32 << 10)


@pytest.fixture(scope="module")
def reference(big_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    run_preprocess([str(big_corpus)], str(out), workers=1, **OPTS)
    return dataset_digest(out)


def test_worker_count_does_not_change_a_byte(big_corpus, reference, tmp_path):
    run_preprocess([str(big_corpus)], str(tmp_path / "w2"), workers=2, **OPTS)
    assert dataset_digest(tmp_path / "w2") == reference


def _cli_args(big_corpus, out, workers):
    return [sys.executable, "-m", "hpcllm", "preprocess", str(big_corpus), "--out", str(out),
            "--workers", str(workers), "--val-fraction", str(OPTS["val_fraction"]),
            "--shard-tokens", str(OPTS["shard_tokens"]), "--item-bytes", str(OPTS["item_bytes"]), "--no-progress"]


def test_kill_9_then_resume_is_byte_identical(big_corpus, reference, tmp_path):
    out = tmp_path / "ds"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    kills = 0
    for threshold in (3, 9):  # kill twice, at different points, with workers running
        p = subprocess.Popen(_cli_args(big_corpus, out, 2), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while p.poll() is None and time.time() < deadline:
            if len(list((out / "train").glob("shard-*.h5"))) >= threshold:
                os.kill(p.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        p.wait()
        p.stderr.close()
    assert kills >= 1, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    r = subprocess.run(_cli_args(big_corpus, out, 1), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert dataset_digest(out) == reference
    # a finished dataset is not redone; other arguments are refused
    r = subprocess.run(_cli_args(big_corpus, out, 1), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    r = subprocess.run(_cli_args(big_corpus, out, 1)[:-1] + ["--min-chars", "5"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


def test_two_task_array_plus_merge_equals_one_task(big_corpus, reference, tmp_path, capsys):
    out = tmp_path / "ds"
    # the second task from Slurm's job-array variables, the first from flags
    env = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        part1 = run_preprocess([str(big_corpus)], str(out), workers=2, **OPTS)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    # the first task is killed -9 once in the middle and resumed, through the CLI
    args = _cli_args(big_corpus, out, 1) + ["--num-tasks", "2", "--task-id", "0"]
    cli_env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(args, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tokens_bin = out / "parts" / "task-00000-of-00002" / "tokens.bin"
    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline:
        if tokens_bin.exists() and tokens_bin.stat().st_size > 1_000_000:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait()
    r = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "merge" in r.stdout, r.stderr
    assert p.returncode == -signal.SIGKILL and "resuming" in r.stderr
    part0 = json.loads((out / "parts" / "task-00000-of-00002" / "state.json").read_text())
    assert part0["done"] and part0["docs"] > 1000 and part1["documents"] > 1000
    assert not (out / "manifest.json").exists()
    # merge crashes after a few committed batches (injected), then a rerun resumes it
    from hpcllm.data import preprocess as pp

    commits = {"n": 0}
    real_commit = pp.Packer.commit

    def crashing_commit(self, key):
        real_commit(self, key)
        commits["n"] += 1
        if commits["n"] == 5:
            raise OSError("injected crash")

    pp.Packer.commit = crashing_commit
    try:
        with pytest.raises(OSError, match="injected"):
            merge_parts(str(out), batch_docs=500)
    finally:
        pp.Packer.commit = real_commit
    assert not (out / "manifest.json").exists() and (out / "parts").exists()
    capsys.readouterr()
    merge_parts(str(out), batch_docs=500)
    assert "merge: resuming after task 0 batch 4" in capsys.readouterr().err
    assert dataset_digest(out) == reference
    assert not (out / "parts").exists()


def test_merge_refuses_unfinished_tasks(big_corpus, tmp_path):
    from hpcllm.errors import HpcllmError

    run_preprocess([str(big_corpus)], str(tmp_path / "ds"), num_tasks=3, task_id=0, **OPTS)
    with pytest.raises(HpcllmError, match="task 1 of 3 has not run"):
        merge_parts(str(tmp_path / "ds"))
