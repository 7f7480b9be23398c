"""Fixtures for the inference tests: checkpoints of given shapes, slices of the built-in
corpus, and the `hpcllm` CLI in-process."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from hpcllm.data.tokenizer import ByteTokenizer
from hpcllm.model.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]


def write_checkpoint(run: Path, cfg: GPTConfig, tok_sha: str = ByteTokenizer.sha256, data_dir: str | None = None,
                     seed: int = 1, step: int = 3) -> Path:
    """A checkpoint (model.pt, config.json, trainer.json) of a randomly initialised model."""
    model = GPT(cfg, init_seed=seed)
    ck = run / "checkpoints" / f"step-{step:08d}"
    ck.mkdir(parents=True)
    torch.save(model.state_dict(), ck / "model.pt")
    (ck / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "data": {"path": data_dir}}))
    (ck / "trainer.json").write_text(json.dumps({"step": step, "tokenizer_sha256": tok_sha}))
    (run / "checkpoints" / "latest").write_text(ck.name)
    return ck


def stdlib_dataset(out: Path, n_files: int = 30, val_fraction: float = 0.1) -> Path:
    """A byte-tokenized dataset of the first ``n_files`` files of the built-in corpus (Python
    stdlib sources, data_prep/build_stdlib_corpus.py)."""
    from hpcllm.data.preprocess import run_preprocess

    spec = importlib.util.spec_from_file_location("build_stdlib_corpus", REPO / "data_prep" / "build_stdlib_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = out.parent / (out.name + "-src.jsonl")
    with open(src, "w") as f:
        for root, rel in list(mod.stdlib_files(False))[:n_files]:
            with open(os.path.join(root, rel), encoding="utf-8") as g:
                f.write(json.dumps({"text": g.read(), "path": rel}) + "\n")
    run_preprocess([str(src)], str(out), tokenizer="byte", val_fraction=val_fraction, workers=1)
    return out


def cli(capsys, *args):
    """(exit status, stdout, stderr) of `hpcllm ARGS` run in this process."""
    from hpcllm.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory) -> Path:
    return stdlib_dataset(tmp_path_factory.mktemp("stdlib") / "ds")
