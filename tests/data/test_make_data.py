"""`make data` (data_prep/data.mk): the built-in corpus builder and the preprocess recipe."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.data.conftest import REPO, decode_split, expected_clean


def test_make_data_builds_the_stdlib_corpus_and_dataset(tmp_path):
    corpus, out = tmp_path / "stdlib.jsonl", tmp_path / "ds"
    venv = str(Path(sys.executable).parent.parent)
    # -o install: the installation is what runs this test
    r = subprocess.run(["make", "-s", "-o", "install", "data", f"OUT={out}", f"STDLIB_CORPUS={corpus}", f"VENV={venv}",
                        "PREPROCESS_FLAGS=--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    stdlib = sysconfig.get_paths()["stdlib"]
    assert len(records) > 300 and all(set(rec) == {"text", "path"} for rec in records)
    first = records[0]
    with open(f"{stdlib}/{first['path']}", encoding="utf-8") as f:
        assert f.read() == first["text"]
    assert not any(rec["path"].startswith(("site-packages/", "test/")) for rec in records)
    # the dataset holds exactly the cleaned stdlib files
    docs = decode_split(out, "train") + decode_split(out, "val")
    assert sorted(docs) == sorted(expected_clean([rec["text"] for rec in records]))
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["val"]["documents"] >= 3  # the built-in corpus uses --val-fraction 0.02
