"""hpcllm.parallel.topology read from a real Slurm step (2 nodes x 2 tasks), launched with the
generator's own srun line: ranks in blocks, so a pipeline's stages share a node."""
import json
import shlex
import sys

import pytest

from hpcllm.launch.profiles import Profile
from hpcllm.launch.slurm import launcher_line
from tests.launch.conftest import REPO

pytestmark = pytest.mark.slurm

PROBE = ("import json, dataclasses; from hpcllm.parallel.topology import Topology; "
         "t = Topology.from_env(); print(json.dumps(dataclasses.asdict(t)))")


@pytest.mark.parametrize("mpi", ["none", "pmix"])
def test_topology_from_a_real_step(slurm_cluster, mpi):
    words = shlex.split(launcher_line("srun", Profile(), [sys.executable, "-c", PROBE], None))
    assert words[:2] == ["srun", "--mpi=pmix"]
    words[1] = f"--mpi={mpi}"  # plain Slurm step variables, and under PMIx
    env = dict(slurm_cluster.env, PYTHONPATH=str(REPO))
    res = slurm_cluster.run([words[0], "-N2", "--ntasks-per-node=2", *words[1:]], env=env, timeout=90)
    ranks = sorted((json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")), key=lambda t: t["rank"])
    assert [(t["rank"], t["local_rank"], t["node_id"]) for t in ranks] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert all(t["world_size"] == 4 and t["local_size"] == 2 and t["num_nodes"] == 2 for t in ranks)
    assert all(t["nodelist"] == ["node1", "node2"] and t["launcher"] == "srun" for t in ranks)
    assert len({t["job_id"] for t in ranks}) == 1 and all(t["restart_count"] == 0 for t in ranks)
    # --pipeline-stages 2: rank = dp_index * 2 + stage, so each pipeline lives on one node
    stages = 2
    for dp_index in range(len(ranks) // stages):
        nodes = {ranks[dp_index * stages + s]["node_id"] for s in range(stages)}
        assert len(nodes) == 1, (dp_index, nodes)
