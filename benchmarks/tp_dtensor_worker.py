"""The peers of ``benchmarks/tensor_parallel.py``, one mode per ``mpirun -np 2`` run.

    mpirun -np 2 ... python benchmarks/tp_dtensor_worker.py dtensor CONFIG_JSON OUT_JSON
    mpirun -np 2 ... python benchmarks/tp_dtensor_worker.py allreduce CONFIG_JSON OUT_JSON

``dtensor``: PyTorch's own tensor parallelism (``torch.distributed.tensor.parallel``) on
hpcllm's GPT (``hpcllm.model.gpt.GPT``, same shape, same initialisation by ``--seed``), over
gloo, one intra-op thread per rank. Per block ``attn.qkv`` and ``mlp.fc`` are
``ColwiseParallel``, ``attn.proj`` and ``mlp.proj`` ``RowwiseParallel`` (Megatron's layout, the
same 2 all-reduces forward and 2 backward per block as hpcllm). Before parallelizing, the rows
of each fused ``attn.qkv`` are reordered so that DTensor's contiguous row split gives rank r
its own heads' q, k and v rows (the order hpcllm's :class:`ShardSpec` ``(0, (d, d, d))`` takes
them in), and each block's ``attn.n_head`` is halved afterwards: both compute the same
function. The token/position embeddings, the final norm, the tied head and the loss stay
*replicated* (computed whole on both ranks; hpcllm splits the embedding, head and loss by
vocabulary). Same batches as hpcllm's run (``BatchLoader``, same seed, both ranks the same
micro-batch), AdamW as hpcllm builds it (decay on matrices/embeddings, fused kernel), the same
warmup/cosine learning rate, global-norm clipping at 1.0 (the sharded gradients' squares
summed over the ranks by one gloo all-reduce, replicated ones counted once). Per step the
slowest rank's time; after the timed steps, ``profile_steps`` more under ``torch.profiler``:
the main thread's time inside the collective ops (DTensor's functional all-reduces, their
waits and the clipping all-reduce) over those steps' wall time is its communication share.

``allreduce``: the latency of a blocking in-place sum all-reduce of fp32 buffers between the
2 ranks at the given sizes through mpi4py (``Comm.Allreduce``, as hpcllm's TP uses it; first
before Horovod starts, then again while Horovod's background thread runs), Horovod
(``horovod.torch``, global process set, with ``HOROVOD_*`` and Open MPI settings as hpcllm
applies them on CPUs: :func:`hpcllm.parallel.data_parallel.horovod_env` / ``mpi_env``),
waited two ways (``hvd.synchronize`` and hpcllm's polling ``wait_handle``), and gloo
(``torch.distributed.all_reduce``, DTensor's transport here). Each size: ``warmup``
untimed calls, then ``iters`` calls each after a barrier; the slowest rank's time per call,
median (and p10/p90) reported. Idle cores: this is the collectives' best case, not their
cost inside a step whose ranks fill every core.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: main-thread profiler events that are collectives (or waits on one), by name substring
COLLECTIVE_EVENTS = ("_c10d_functional::", "c10d::allreduce_", "c10d::broadcast_", "c10d::allgather_",
                     "c10d::reduce_scatter_", "c10d::barrier")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors: their local shards)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def dtensor(cfgj: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from hpcllm.data.loader import BatchLoader
    from hpcllm.model.gpt import GPT, preset
    from hpcllm.parallel.tensor_parallel import ShardSpec
    from hpcllm.train.schedule import lr_at

    torch.set_num_threads(cfgj.get("threads", 1))
    rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    start_rss = rss_now()
    shape, seed, mb, steps = cfgj["shape"], cfgj["seed"], cfgj["micro_batch"], cfgj["steps"]
    loader = BatchLoader(cfgj["data"], split="train", seq_len=shape["seq_len"], micro_batch=mb, accum=1,
                         dp_rank=0, dp_size=1, seed=seed)
    cfg = preset("tiny", vocab_size=loader.info.vocab_size, n_kv_head=shape["n_head"], **shape)
    model = GPT(cfg, init_seed=seed)
    mesh = DeviceMesh("cpu", list(range(world)))
    d = cfg.d_model
    spec = ShardSpec(0, (d, cfg.kv_dim, cfg.kv_dim))
    rows = torch.arange(d + 2 * cfg.kv_dim)
    perm = torch.cat([spec.shard(rows, world, r) for r in range(world)])
    plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()}
    with torch.no_grad():
        for blk in model.block_list():
            qkv = blk.attn.qkv
            qkv.weight.copy_(qkv.weight[perm])
            if qkv.bias is not None:
                qkv.bias.copy_(qkv.bias[perm])
            parallelize_module(blk, mesh, plan)
            blk.attn.n_head //= world
            blk.attn.n_kv_head //= world
    named = list(model.named_parameters())
    sharded = [p for _, p in named if isinstance(p, DTensor) and not all(pl.is_replicate() for pl in p.placements)]
    replicated = [p for _, p in named if not any(p is s for s in sharded)]
    # AdamW as hpcllm's build_optimizer: decay on matrices and embeddings; DTensor and plain
    # parameters in separate groups (one multi-tensor/fused call must not mix them)
    groups = []
    for decay in (True, False):
        for dt in (True, False):
            ps = [p for _, p in named if (p.dim() >= 2) == decay and isinstance(p, DTensor) == dt]
            if ps:
                groups.append({"params": ps, "weight_decay": 0.1 if decay else 0.0})
    try:
        opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        fused = True
    except RuntimeError:
        opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
        fused = False

    def squares(grads) -> float:
        return float(torch.stack(torch._foreach_norm(grads)).double().square().sum()) if grads else 0.0

    def local(g):
        return g._local_tensor if isinstance(g, DTensor) else g

    def step(i: int) -> float:
        lr = lr_at(i, cfgj["lr"], min(cfgj["warmup"], steps), steps, 0.1)
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = loader.next_batch()[0]
        loss = model(x, y)
        loss.backward()
        with torch.no_grad():
            g_sh = [local(p.grad) for p in sharded if p.grad is not None]
            g_rep = [local(p.grad) for p in replicated if p.grad is not None]
            sq = torch.zeros(2, dtype=torch.float64)
            sq[0] = squares(g_sh)
            sq[1] = float(loss.detach())
            dist.all_reduce(sq)  # the shards' squares summed; the loss averaged (as hpcllm's agreement)
            norm = (float(sq[0]) + squares(g_rep)) ** 0.5
            if norm > 1.0:
                torch._foreach_mul_(g_sh + g_rep, 1.0 / (norm + 1e-6))
        opt.step()
        if i == 0:
            nonlocal state_bytes
            state_bytes = storage_bytes([t for _, p in named for t in (p, p.grad)]
                                        + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])
        opt.zero_grad(set_to_none=True)
        return float(sq[1]) / world

    state_bytes = 0
    times, losses = [], []
    for i in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t0)
    comm_s = wall_s = None
    prof_steps = cfgj.get("profile_steps", 0)
    if prof_steps:
        from torch.profiler import ProfilerActivity, profile

        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for i in range(steps, steps + prof_steps):
                step(i)
            wall_s = time.perf_counter() - t0
        main = None
        comm_s = 0.0
        for ev in prof.events():
            if any(k in ev.name for k in COLLECTIVE_EVENTS):
                main = ev.thread if main is None else main
                # top-level collective events on the thread that launches them (nested
                # records, e.g. an op inside a functional collective, are not added twice)
                if ev.cpu_parent is None or not any(k in ev.cpu_parent.name for k in COLLECTIVE_EVENTS):
                    comm_s += ev.cpu_time_total / 1e6
        comm_s /= prof_steps
        wall_s /= prof_steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    all_times = [torch.zeros(steps, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(all_times, torch.tensor(times, dtype=torch.float64))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (peak, start_rss, state_bytes, comm_s, wall_s))
    if rank == 0:
        per_step = [max(float(a[i]) for a in all_times) for i in range(steps)]
        Path(out).write_text(json.dumps({
            "step_times_s": per_step, "losses": losses, "fused_adamw": fused,
            "peak_rss_bytes": [r[0] for r in per_rank], "start_rss_bytes": [r[1] for r in per_rank],
            "model_state_bytes": [r[2] for r in per_rank],
            "profiled_comm_s": [r[3] for r in per_rank], "profiled_step_s": [r[4] for r in per_rank]}))
    dist.barrier()
    os._exit(0)  # gloo's teardown at interpreter exit aborts (terminate called without an active exception)


def allreduce(cfgj: dict, out: str) -> None:
    from hpcllm.config import ParallelConfig
    from hpcllm.parallel.data_parallel import horovod_env, mpi_env

    pcfg = ParallelConfig(device="cpu")
    os.environ.update(mpi_env(pcfg))  # before MPI starts, as hpcllm.parallel.groups does
    os.environ.update(horovod_env(pcfg))
    import numpy as np
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    results = []

    def measure(backends: dict) -> None:
        for nbytes in cfgj["sizes"]:
            for name, op in backends.items():
                t = torch.ones(nbytes // 4, dtype=torch.float32)
                for _ in range(cfgj["warmup"]):
                    op(t)
                times = []
                for _ in range(cfgj["iters"]):
                    comm.Barrier()
                    t0 = time.perf_counter()
                    op(t)
                    times.append(time.perf_counter() - t0)
                slowest = np.max(np.array(comm.allgather(times)), axis=0)
                q = np.percentile(slowest, [10, 50, 90])
                results.append({"bytes": nbytes, "backend": name, "median_s": float(q[1]), "p10_s": float(q[0]),
                                "p90_s": float(q[2]), "mean_s": float(slowest.mean())})

    def mpi_op(t):
        comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)

    # mpi4py first alone (as with --tp-backend mpi4py), then again once Horovod runs (its
    # background thread negotiates every HOROVOD_CYCLE_TIME ms, as under --tp-backend auto)
    measure({"mpi4py": mpi_op})
    import horovod.torch as hvd

    hvd.init()
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    from hpcllm.parallel.data_parallel import wait_handle

    def hvd_sync(t):
        hvd.allreduce_(t, op=hvd.Sum, name="bench")

    def hvd_poll(t):
        h = hvd.allreduce_async_(t, op=hvd.Sum, name="bench")
        wait_handle(hvd, h)
        hvd.synchronize(h)

    def gloo_op(t):
        dist.all_reduce(t)

    measure({"mpi4py_with_horovod": mpi_op, "horovod": hvd_sync, "horovod_poll": hvd_poll, "gloo": gloo_op})
    if rank == 0:
        Path(out).write_text(json.dumps({
            "results": results, "horovod_env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
            "mpi_env": {k: v for k, v in os.environ.items() if k.startswith("OMPI_MCA_")}}))
    comm.Barrier()
    hvd.shutdown()
    MPI.Finalize()
    os._exit(0)  # skips gloo's teardown at interpreter exit (see dtensor)


if __name__ == "__main__":
    mode, cfg_json, out_path = sys.argv[1:4]
    {"dtensor": dtensor, "allreduce": allreduce}[mode](json.loads(cfg_json), out_path)
