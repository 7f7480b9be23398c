"""One rank of a real pipeline (hpcllm's PipelineEngine over MPI): peak memory of its stage.

Run under mpirun with np = P; rank s is stage s. Reports the peak RSS growth over the
baseline taken after imports, as hpcllm/plan/measure.py does for single processes.
"""
import json
import os
import resource
import sys

import torch
from mpi4py import MPI

from hpcllm.model.gpt import GPTConfig
from hpcllm.parallel.pipeline.engine import PipelineEngine
from hpcllm.parallel.pipeline.partition import Partition
from hpcllm.parallel.pipeline.stage import PipelineStage, activation_dtype
from tests.cluster.mpi import report


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    spec = json.loads(sys.argv[1])
    comm = MPI.COMM_WORLD
    stage, P = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)  # two ranks share this machine's cores
    cfg = GPTConfig(**spec["model"])
    b, M = spec["micro_batch"], spec["microbatches"]
    part = Partition.from_counts(spec["counts"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else None
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else None
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=g),
                torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=g)) for _ in range(M)]
    act_dtype = activation_dtype(cfg, autocast or (lambda: torch.autocast("cpu", enabled=False)))
    comm.Barrier()
    base = rss()
    module = PipelineStage(cfg, part, stage, recompute=spec["recompute"])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    engine = PipelineEngine(module, comm, stage, P, spec["schedule"], M, (b, cfg.seq_len, cfg.d_model),
                            act_dtype, autocast=autocast)
    for _ in range(spec["steps"]):
        opt.zero_grad(set_to_none=True)
        engine.step(batches)
        opt.step()
    comm.Barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report({"stage": stage, "peak_delta": peak - base, "params": sum(p.numel() for p in module.parameters()),
            "peak_live": engine.stats.peak_live})


if __name__ == "__main__":
    main()
