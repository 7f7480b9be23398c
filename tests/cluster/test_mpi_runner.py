"""The MPI test runner itself: real mpirun, per-rank results, virtual hosts, timeouts."""
import sys
import textwrap

import pytest

from tests.cluster.mpi import run_mpi

pytestmark = pytest.mark.mpi

RANK_INFO = textwrap.dedent("""
    import socket
    from mpi4py import MPI
    from tests.cluster.mpi import report
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    report({"rank": world.rank, "size": world.size, "host": socket.gethostname(),
            "local_size": node.size, "local_rank": node.rank})
""")


@pytest.fixture
def rank_info(tmp_path):
    path = tmp_path / "rank_info.py"
    path.write_text(RANK_INFO)
    return path


def test_two_ranks_report(rank_info):
    res = run_mpi([sys.executable, rank_info], np=2).check()
    assert [r["rank"] for r in res.results] == [0, 1]
    assert all(r["size"] == 2 for r in res.results)


def test_virtual_two_hosts_give_two_nodes(rank_info):
    res = run_mpi([sys.executable, rank_info], np=4, hosts=["hpcllm-vnode1", "hpcllm-vnode2"]).check()
    hosts = [r["host"] for r in res.results]
    assert hosts == ["hpcllm-vnode1", "hpcllm-vnode1", "hpcllm-vnode2", "hpcllm-vnode2"]
    assert [r["local_size"] for r in res.results] == [2, 2, 2, 2]
    assert [r["local_rank"] for r in res.results] == [0, 1, 0, 1]


def test_timeout_kills_every_rank(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\nfrom mpi4py import MPI\ntime.sleep(600)\n")
    res = run_mpi([sys.executable, script], np=2, timeout=5)
    assert res.timed_out and res.elapsed_s < 30
    import subprocess
    left = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
    assert left == [], f"ranks survived the timeout: {left}"
