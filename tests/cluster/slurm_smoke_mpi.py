"""Run under `srun --mpi=pmix`: each rank prints one JSON line with its place in the job."""
import json
import os
import socket

from mpi4py import MPI

comm = MPI.COMM_WORLD
local = comm.Split_type(MPI.COMM_TYPE_SHARED)
total = comm.allreduce(comm.Get_rank())
print(json.dumps({
    "rank": comm.Get_rank(), "size": comm.Get_size(), "local_size": local.Get_size(),
    "node": os.environ.get("SLURMD_NODENAME"), "host": socket.gethostname(), "sum": total,
}), flush=True)
