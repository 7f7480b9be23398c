"""Fixtures for tests/launch: a small corpus, a dataset, the real `hpcllm` CLI."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def write_corpus(directory: Path, files: int = 2, docs: int = 120, seed: int = 0) -> list[Path]:
    """jsonl files of random word documents (all distinct, all longer than --min-chars)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        p = directory / f"part{f}.jsonl"
        with open(p, "w") as fh:
            for i in range(docs):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
                fh.write(json.dumps({"text": f"document {f}-{i}: {words}"}) + "\n")
        paths.append(p)
    return paths


def hpcllm(args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m hpcllm ARGS`)."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "hpcllm", *map(str, args)], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


#: how batch jobs run hpcllm: this interpreter, so the job uses the same virtualenv
HPCLLM_CMD = f"{sys.executable} -m hpcllm"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d)
    return d


@pytest.fixture(scope="session")
def dataset(corpus, tmp_path_factory) -> Path:
    """A byte-tokenized dataset from the corpus, preprocessed in one process."""
    from hpcllm.data.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("ds") / "ds"
    run_preprocess([str(corpus / "*.jsonl")], str(out), item_bytes=4096, progress=False)
    return out
