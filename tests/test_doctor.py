"""`hpcllm doctor` against the real installed stack."""
import json
import subprocess
import sys

import pytest

from tests.cluster.mpi import run_mpi


def test_doctor_reports_horovod_with_pytorch_and_mpi():
    res = subprocess.run([sys.executable, "-m", "hpcllm", "doctor", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert "PyTorch" in checks["horovod"]["value"] and "MPI" in checks["horovod"]["value"]
    assert checks["horovod init"]["ok"]
    for name in ("python", "torch", "mpi4py", "h5py", "slurm", "rank layout"):
        assert name in checks


@pytest.mark.mpi
def test_doctor_under_mpirun_shows_each_rank():
    res = run_mpi([sys.executable, "-m", "hpcllm", "doctor", "--all-ranks"], np=2).check()
    assert "rank 0/2" in res.stdout and "rank 1/2" in res.stdout
    assert "horovod init" in res.stdout and "rank 1/2 local 1/2" in res.stdout


@pytest.mark.slurm
def test_doctor_under_srun_reads_the_slurm_layout(slurm_cluster):
    res = slurm_cluster.run(["srun", "--mpi=pmix", "-N2", "--ntasks-per-node=1", sys.executable, "-m",
                             "hpcllm", "doctor", "--all-ranks"], timeout=180)
    assert "srun --mpi=pmix   available" in res.stdout
    assert "rank 0/2 local 0/1 node 0/2 (node1) via srun" in res.stdout
    assert "rank 1/2 local 0/1 node 1/2 (node2) via srun" in res.stdout
