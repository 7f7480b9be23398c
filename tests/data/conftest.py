"""Fixtures for tests/data: generated corpora, dataset comparison, the real `hpcllm` CLI."""
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
WORDS = ["alpha", "beta", "gamma", "délta", "epsilon", "ζήτα", "eta", "θ", "iota", "kappa", "λ", "mu", "日本"]


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """Varied text with things cleaning acts on: NFD accents, control characters, duplicates,
    short documents."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        text = f"doc {i}: " + " ".join(words)
        r = rng.random()
        if r < 0.05:
            text = unicodedata.normalize("NFD", text) + " cafe\u0301"
        elif r < 0.10:
            text = text + "\x07\r\n\ttail\x00"
        elif r < 0.15 and docs:
            text = rng.choice(docs)  # exact duplicate
        elif r < 0.18:
            text = "tiny"
        if rng.random() < 0.2:
            text = "line one\n\n" + text
        docs.append(text)
    return docs


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def expected_clean(docs: list[str], min_chars: int = 32) -> list[str]:
    """What preprocess must keep, computed independently: NFC, controls removed, short
    documents dropped, first occurrence of each duplicate kept, order preserved."""
    out, seen = [], set()
    for d in docs:
        d = _CONTROL.sub("", unicodedata.normalize("NFC", d))
        if len(d) < min_chars or d in seen:
            continue
        seen.add(d)
        out.append(d)
    return out


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            obj = {"id": i}
            cur = obj
            parts = key.split(".")
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = d
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


def decode_split(data_dir, split: str) -> list[str]:
    """Every document of a split, decoded (byte tokenizer), checking the doc/EOD structure."""
    from hpcllm.data.shards import read_manifest, read_shard

    m = read_manifest(str(data_dir))
    docs = []
    for e in m["splits"][split]["shards"]:
        tokens, index = read_shard(os.path.join(data_dir, e["path"]))
        ends = list(index[1:]) + [len(tokens)]
        for a, b in zip(index, ends):
            assert tokens[b - 1] == m["tokenizer"]["eod_id"]
            assert not np.any(tokens[a:b - 1] == m["tokenizer"]["eod_id"])
            docs.append(bytes(tokens[a:b - 1].astype(np.uint8)).decode("utf-8"))
    return docs


def dataset_digest(data_dir) -> dict:
    """Everything a dataset is made of, except the command line and creation time."""
    data_dir = Path(data_dir)
    m = json.loads((data_dir / "manifest.json").read_text())
    m.pop("command")
    m.pop("created")
    files = {}
    for p in sorted(data_dir.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[str(p.relative_to(data_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"manifest": m, "files": files}


def hpcllm(*args, timeout=120, env=None, **kw) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (as a user runs it)."""
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "hpcllm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, **kw)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(600, seed=1)
    return write_jsonl(d / "small.jsonl", docs), docs
