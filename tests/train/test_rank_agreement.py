"""Ranks that see different data at the same path (a node with a stale copy) stop at startup
with one line naming the ranks that differ. Real mpirun, one app context per rank with its own
working directory, so the same relative --data path holds different datasets."""
import os
import shutil
import subprocess

import pytest

from tests.cluster.mpi import REPO, mpirun_command
from tests.train.conftest import TINY, build_dataset, train_cmd

pytestmark = pytest.mark.mpi


def test_ranks_reading_different_datasets_stop_with_one_line(dataset, tmp_path):
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    a.mkdir()
    b.mkdir()
    shutil.copytree(dataset, a / "ds")
    build_dataset(b / "ds", n_docs=300, seed=1)  # another dataset at the same relative path
    args = train_cmd(*TINY, "--data", "ds", "--out", str(tmp_path / "run"), "--steps", "2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    full = mpirun_command(1)
    base = [full[0]] + full[3:]  # without "-np 1": each app context gives its own
    cmd = base + ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-np", "1", "--wdir", str(a), *args, ":",
                  "-np", "1", "--wdir", str(b), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the ranks read different dataset files at this path (rank 0 sees sha256" in r.stderr, r.stderr
    assert "rank 1 sees sha256" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stale_shard_behind_the_same_manifest_is_caught(dataset, tmp_path):
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    for d in (a, b):
        shutil.copytree(dataset, d / "ds")
    shard = next((b / "ds" / "train").glob("shard-*.h5"))
    with open(shard, "ab") as f:  # a partial or stale copy: same manifest, other bytes
        f.write(b"\0" * 4096)
    args = train_cmd(*TINY, "--data", "ds", "--out", str(tmp_path / "run"), "--steps", "2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    full = mpirun_command(1)
    cmd = [full[0]] + full[3:] + ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-np", "1", "--wdir", str(a), *args,
                                  ":", "-np", "1", "--wdir", str(b), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "the ranks read different dataset files" in r.stderr, r.stdout + r.stderr
