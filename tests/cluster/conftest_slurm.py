"""Pytest plugin: the session-scoped ``slurm_cluster`` fixture (register in tests/conftest.py
with ``pytest_plugins = ["tests.cluster.conftest_slurm"]``).

One throwaway cluster (munged + slurmctld + 2 virtual slurmd, see tests/cluster/slurm.py)
serves the whole session; it is started on first use and stopped at the end. Where Slurm is
not installed the tests skip, except under CI (CI=true), where that is a failure.
"""
from __future__ import annotations

import os

import pytest

from tests.cluster.slurm import SlurmCluster, SlurmStartError, missing_binaries, start_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    missing = missing_binaries()
    if missing:
        message = f"Slurm/munge not installed ({', '.join(missing)}); `make install` as root adds them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        cluster = start_cluster(nodes=2, cpus_per_node=4)
    except SlurmStartError as e:
        pytest.fail(f"localhost Slurm cluster did not start:\n{e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
