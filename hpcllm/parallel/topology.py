"""Where this process sits in the job: rank, local rank, node, from Slurm or Open MPI.

Read from the environment only (no MPI call), so it works before ``hvd.init()`` and in
``hpcllm doctor``. Precedence: Open MPI's ``OMPI_COMM_WORLD_*`` (set by mpirun and by
``srun --mpi=pmix`` for Open MPI ranks), then Slurm's ``SLURM_*`` step variables, then the
PMI variables of MPICH / Intel MPI launchers (``mpiexec``: ``PMI_RANK``, ``PMI_SIZE``,
``MPI_LOCALRANKID``), then a single process.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node_id: int = 0
    num_nodes: int = 1
    hostname: str = field(default_factory=socket.gethostname)
    nodelist: tuple = ()
    launcher: str = "single"  # "mpirun", "srun", "single"
    job_id: str | None = None
    restart_count: int = 0

    @classmethod
    def from_env(cls, env=None) -> "Topology":
        env = os.environ if env is None else env
        in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
        nodelist = tuple(expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""))
        job_id = env.get("SLURM_JOB_ID")
        restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        # Slurm's node name is what squeue and the node list show (and it tells virtual
        # nodes on one host apart); outside a Slurm step, the host name.
        host = env.get("SLURMD_NODENAME") if in_step and env.get("SLURMD_NODENAME") else socket.gethostname()
        if "OMPI_COMM_WORLD_RANK" in env:
            world = int(env["OMPI_COMM_WORLD_SIZE"])
            local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
            rank = int(env["OMPI_COMM_WORLD_RANK"])
            if "OMPI_COMM_WORLD_NODE_ID" in env:
                node_id = int(env["OMPI_COMM_WORLD_NODE_ID"])
            elif in_step and "SLURM_NODEID" in env:
                node_id = int(env["SLURM_NODEID"])
            else:
                # Open MPI 4 exports no node id; mpirun's default by-slot mapping fills nodes
                # in rank order, so with equal ranks per node this is the node index.
                node_id = rank // max(local_size, 1)
            num_nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 0) \
                if in_step else 0
            if not num_nodes:
                num_nodes = max(1, -(-world // max(local_size, 1)))
            return cls(rank=rank, world_size=world,
                       local_rank=int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")),
                       local_size=local_size, node_id=node_id, num_nodes=num_nodes,
                       nodelist=nodelist, launcher="srun" if in_step else "mpirun", hostname=host,
                       job_id=job_id, restart_count=restarts)
        if in_step:
            world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
            num_nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
            tasks_per_node = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or
                                            env.get("SLURM_TASKS_PER_NODE") or "",
                                            int(env.get("SLURM_NODEID", "0")))
            return cls(rank=int(env["SLURM_PROCID"]), world_size=world,
                       local_rank=int(env.get("SLURM_LOCALID", "0")),
                       local_size=tasks_per_node or max(1, world // num_nodes),
                       node_id=int(env.get("SLURM_NODEID", "0")), num_nodes=num_nodes,
                       nodelist=nodelist, launcher="srun", job_id=job_id, restart_count=restarts,
                       hostname=host)
        if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH / Intel MPI (Hydra) mpiexec
            world = int(env["PMI_SIZE"])
            local_size = int(env.get("MPI_LOCALNRANKS", "1"))
            rank = int(env["PMI_RANK"])
            return cls(rank=rank, world_size=world, local_rank=int(env.get("MPI_LOCALRANKID", "0")),
                       local_size=local_size, node_id=rank // max(local_size, 1),
                       num_nodes=max(1, -(-world // max(local_size, 1))), nodelist=nodelist, launcher="mpiexec",
                       hostname=host, job_id=job_id, restart_count=restarts)
        return cls(nodelist=nodelist, job_id=job_id, restart_count=restarts)

    def threads_per_rank(self, env=None) -> int:
        """Intra-op threads for this rank: the node's cores shared by the ranks on it."""
        env = os.environ if env is None else env
        if env.get("SLURM_CPUS_PER_TASK"):
            return max(1, int(env["SLURM_CPUS_PER_TASK"]))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cpus // max(1, self.local_size))

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} local {self.local_rank}/{self.local_size} "
                f"node {self.node_id}/{self.num_nodes} ({self.hostname}) via {self.launcher}")


def _tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's compressed form, e.g. '2(x3),1'."""
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return 0
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else 0


def expand_nodelist(spec: str) -> list:
    """Expand a Slurm host list: 'gpu[01-03,07],login1' -> ['gpu01','gpu02','gpu03','gpu07','login1']."""
    hosts, i, n = [], 0, len(spec)
    while i < n:
        j, depth = i, 0
        while j < n and (spec[j] != "," or depth):
            depth += spec[j] == "["
            depth -= spec[j] == "]"
            j += 1
        hosts += _expand_one(spec[i:j].strip())
        i = j + 1
    return [h for h in hosts if h]


def _expand_one(item: str) -> list:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        width = len(lo)
        for k in range(int(lo), int(hi or lo) + 1):
            out += [prefix + str(k).zfill(width) + tail for tail in _expand_one(rest)]
    return out
