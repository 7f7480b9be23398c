"""Topology from Slurm / Open MPI environments, and for real under mpirun."""
import sys
import textwrap

import pytest

from hpcllm.parallel.topology import Topology, expand_nodelist
from tests.cluster.mpi import run_mpi


@pytest.mark.parametrize("spec,hosts", [
    ("", []),
    ("node1", ["node1"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
])
def test_expand_nodelist(spec, hosts):
    assert expand_nodelist(spec) == hosts


def test_slurm_step_environment():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
           "SLURM_JOB_NODELIST": "cn[1-4]", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "3"}
    t = Topology.from_env(env)
    assert (t.rank, t.world_size, t.local_rank, t.local_size, t.node_id, t.num_nodes) == (5, 8, 1, 2, 2, 4)
    assert t.nodelist == ("cn1", "cn2", "cn3", "cn4") and t.launcher == "srun"
    assert t.job_id == "77" and t.restart_count == 3


def test_openmpi_environment_and_threads():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_ID": "1"}
    t = Topology.from_env(env)
    assert (t.rank, t.world_size, t.local_rank, t.local_size, t.node_id, t.num_nodes) == (3, 4, 1, 2, 1, 2)
    assert t.launcher == "mpirun"
    assert t.threads_per_rank({"SLURM_CPUS_PER_TASK": "6"}) == 6


def test_single_process():
    t = Topology.from_env({})
    assert (t.rank, t.world_size, t.local_size, t.num_nodes, t.launcher) == (0, 1, 1, 1, "single")


@pytest.mark.mpi
def test_under_real_mpirun_on_two_virtual_hosts(tmp_path):
    script = tmp_path / "topo.py"
    script.write_text(textwrap.dedent("""
        from mpi4py import MPI
        from hpcllm.parallel.topology import Topology
        from tests.cluster.mpi import report
        t = Topology.from_env()
        report({"rank": t.rank, "world": t.world_size, "local_rank": t.local_rank,
                "local_size": t.local_size, "node_id": t.node_id, "num_nodes": t.num_nodes,
                "mpi_rank": MPI.COMM_WORLD.rank, "host": t.hostname})
    """))
    res = run_mpi([sys.executable, script], np=4, hosts=["hpcllm-vnode1", "hpcllm-vnode2"]).check()
    for i, r in enumerate(res.results):
        assert r["rank"] == r["mpi_rank"] == i
        assert (r["world"], r["local_size"], r["num_nodes"]) == (4, 2, 2)
        assert r["local_rank"] == i % 2 and r["node_id"] == i // 2


def test_mpich_and_intel_mpi_pmi_variables():
    t = Topology.from_env({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"})
    assert (t.rank, t.world_size, t.local_rank, t.local_size, t.node_id, t.num_nodes, t.launcher) == \
        (5, 8, 1, 4, 1, 2, "mpiexec")


def test_a_launcher_of_another_mpi_is_one_line_error(tmp_path):
    """Ranks started by a launcher whose MPI is not mpi4py's would each be alone: refused."""
    import os
    import subprocess
    import sys

    from tests.train.conftest import REPO, build_dataset

    data = build_dataset(tmp_path / "ds", n_docs=50)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}
    r = subprocess.run([sys.executable, "-m", "hpcllm", "train", "--data", str(data), "--out", str(tmp_path / "r"),
                        "--steps", "1", "--threads", "1", "--model", "tiny", "--seq-len", "32"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "launched as 2 ranks (mpiexec) but MPI reports a world of 1" in r.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
