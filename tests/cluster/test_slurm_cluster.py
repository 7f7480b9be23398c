"""The localhost Slurm fixture itself: 2 virtual nodes, a 2-node `srun --mpi=pmix` MPI job."""
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

HERE = Path(__file__).parent


def test_nodes_up(slurm_cluster):
    states = slurm_cluster.node_states()
    assert sorted(states) == ["node1", "node2"]
    # up and responding (other tests may be using them: idle, mixed, allocated, completing)
    assert all(s.rstrip("*~#!%$@+-") in ("idle", "mixed", "allocated", "completing") and not s.endswith("*")
               for s in states.values()), states


def test_srun_pmix_two_nodes(slurm_cluster):
    res = slurm_cluster.run(
        ["srun", "--mpi=pmix", "-N2", "--ntasks-per-node=2", sys.executable, str(HERE / "slurm_smoke_mpi.py")],
        timeout=90,
    )
    ranks = sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert all(r["size"] == 4 and r["local_size"] == 2 and r["sum"] == 6 for r in ranks)
    # block distribution: ranks 0,1 on node1 and 2,3 on node2
    assert [r["node"] for r in ranks] == ["node1", "node1", "node2", "node2"]


def test_batch_job_and_state(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(["-N2", "-o", str(out), "--wrap", "srun -l hostname"], cwd=tmp_path)
    rec = slurm_cluster.wait(job, timeout=60)[0]
    assert rec["JobState"] == "COMPLETED" and rec["NodeList"] == "node[1-2]"
    assert len(out.read_text().splitlines()) == 2
