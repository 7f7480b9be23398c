"""CUDA variants of the model, precision, loss-scaler, checkpoint, generation and training
tests (marker ``cuda``). ``scripts/gpu_check.py`` runs them on a GPU machine (``pytest -m cuda
tests/cuda``); where ``torch.cuda.is_available()`` is False every test here is skipped at
collection, before any fixture runs, so ``make test`` on a CPU machine stays green and fast.

Shapes are tiny (a few seconds each on a GPU); fp32 comparisons run with TF32 off (PyTorch's
default for matmuls), so CPU and GPU agree to rounding.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
SKIP_REASON = "no CUDA device (torch.cuda.is_available() is False)"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cuda)
            if not CUDA:
                item.add_marker(skip)


def compile_unavailable() -> str | None:
    """Why torch.compile cannot build kernels here (Triton compiles its launcher with a C
    compiler against Python.h), or None."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler for Triton's launcher"
    inc = sysconfig.get_paths().get("include")
    if not inc or not (Path(inc) / "Python.h").is_file():
        return "no Python.h for Triton's launcher"
    return None


@pytest.fixture(scope="session")
def cuda_dataset(tmp_path_factory) -> Path:
    from tests.train.conftest import build_dataset

    return build_dataset(tmp_path_factory.mktemp("cuda-data") / "ds")


@pytest.fixture(autouse=True)
def _tf32_off():
    """fp32 stays fp32 on Ampere+ (what the comparisons with the CPU assume)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def run_hpcllm(*args, timeout: float = 180, check: bool = True, env=None):
    """`python -m hpcllm ARGS` in a fresh process (the repository on its path)."""
    import subprocess

    from tests.train.conftest import REPO

    e = dict(os.environ)
    e.update({"PYTHONPATH": os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])),
              "OMP_NUM_THREADS": "1"})
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "hpcllm", *map(str, args)], env=e, capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"hpcllm {' '.join(map(str, args[:2]))} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}")
    return r
