"""Training benchmarks: step throughput, data-parallel efficiency, Horovod allreduce bandwidth.

    .venv/bin/python benchmarks/train.py [--quick] [--parts step,dp,allreduce]

Prints a table and writes benchmarks/results/train.json. Every ratio is against a baseline
measured in the same run (on a shared 2-core machine absolute numbers drift; ratios much less):

- **step**: tokens/s of hpcllm's real training step (``hpcllm train``, 1 process) for the fixed
  shape 4 layers x 4 heads x d 256, seq 256, micro-batch 16, byte vocabulary, in fp32 and bf16,
  against a plain nanoGPT-style PyTorch loop of the same shape (fp32, AdamW, no autocast).
  Goal: bf16 >= 2.5x the baseline.
- **dp**: ``mpirun -np 2 hpcllm train`` with 1 thread per rank against 1 rank x 1 thread
  (weak scaling: the same micro-batch per rank). Goal: efficiency >= 0.9.
- **allreduce**: Horovod allreduce bus bandwidth against mpi4py ``Allreduce`` on the same
  buffers (64 KiB .. 64 MiB, 2 ranks), at Horovod's defaults and with tuned knobs
  (HOROVOD_CYCLE_TIME, HOROVOD_FUSION_THRESHOLD, in-place allreduce_). Goal: the best setting
  >= 0.75x mpi4py from 16 MiB up; that setting is hpcllm's default. Also the time to allreduce
  one step's gradients of the fixed shape and its share of a 2-rank training step.

Runs of the MPI parts re-enter this file under mpirun with ``--worker ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train.json"
SHAPE = dict(n_layer=4, n_head=4, d_model=256, seq_len=256, micro_batch=16, vocab_size=257)
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]

#: Horovod settings compared; env is set before hvd.init(). "inplace" uses allreduce_
#: (what hvd.DistributedOptimizer does with gradients).
HVD_SETTINGS = {
    "defaults": ({}, False),
    "defaults, allreduce_": ({}, True),
    "cycle 0.1ms, allreduce_": ({"HOROVOD_CYCLE_TIME": "0.1"}, True),
    "cycle 0.1ms, fusion 128MB, allreduce_": ({"HOROVOD_CYCLE_TIME": "0.1", "HOROVOD_FUSION_THRESHOLD": str(128 << 20)}, True),
    "cycle 0.1ms, fusion 16MB, allreduce_": ({"HOROVOD_CYCLE_TIME": "0.1", "HOROVOD_FUSION_THRESHOLD": str(16 << 20)}, True),
    "cycle 0.5ms, allreduce_": ({"HOROVOD_CYCLE_TIME": "0.5"}, True),
    "cycle 0.02ms, allreduce_": ({"HOROVOD_CYCLE_TIME": "0.02"}, True),
}


def fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


# =========================================================================== workers (under mpirun)


def _iters(size: int, quick: bool) -> int:
    n = max(5, min(200, (256 << 20) // size))
    return max(3, n // 4) if quick else n


def worker_allreduce(args) -> None:
    """One rank: time allreduce per buffer size with mpi4py or Horovod; rank 0 writes JSON."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    impl = args.impl
    if impl == "hvd":
        import horovod.torch as hvd

        hvd.init()
    rounds = 3 if args.quick else 5
    out = {"impl": impl, "inplace": args.inplace, "env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
           "world": world, "sizes": {}}

    def one(t: torch.Tensor, name: str):
        if impl == "mpi":
            comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
        elif args.inplace:
            hvd.allreduce_(t, op=hvd.Sum, name=name)
        else:
            hvd.allreduce(t, op=hvd.Sum, name=name)

    for size in SIZES:
        t = torch.ones(size // 4, dtype=torch.float32)
        n = _iters(size, args.quick)
        name = f"buf.{size}"
        for _ in range(3):  # warm up: connections, response cache, fusion buffer allocation
            one(t, name)
        times = []
        for _ in range(rounds):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                one(t, name)
            dt = (time.perf_counter() - t0) / n
            times.append(comm.allreduce(dt, op=MPI.MAX))
        sec = statistics.median(times)
        # bus bandwidth (NCCL-tests convention): algbw * 2(n-1)/n
        busbw = size / sec * 2 * (world - 1) / world
        out["sizes"][str(size)] = {"time_s": sec, "busbw_GBps": busbw / 1e9, "rounds": times}
        del t

    # one training step's gradients of the fixed shape: many tensors at once, as
    # hvd.DistributedOptimizer issues them (async, in place, averaged), then synchronize all
    grads = [torch.ones(s) for s in _grad_shapes()]
    nbytes = sum(g.numel() * 4 for g in grads)

    def step_allreduce():
        if impl == "mpi":
            for g in grads:
                comm.Allreduce(MPI.IN_PLACE, g.numpy(), op=MPI.SUM)
        else:
            hs = [hvd.allreduce_async_(g, op=hvd.Average, name=f"grad.{i}") for i, g in enumerate(grads)]
            for h in hs:
                hvd.synchronize(h)

    for _ in range(3):
        step_allreduce()
    times = []
    for _ in range(rounds):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(10):
            step_allreduce()
        times.append(comm.allreduce((time.perf_counter() - t0) / 10, op=MPI.MAX))
    out["grads"] = {"tensors": len(grads), "bytes": nbytes, "time_s": statistics.median(times)}
    if impl == "hvd":
        hvd.shutdown()
    if rank == 0:
        Path(args.json).write_text(json.dumps(out))


def _grad_shapes() -> list[tuple]:
    """Parameter shapes of the fixed benchmark shape (hpcllm's GPT, or the baseline's)."""
    try:
        from hpcllm.model.gpt import GPT, GPTConfig

        m = GPT(GPTConfig(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], d_model=SHAPE["d_model"],
                          seq_len=SHAPE["seq_len"], vocab_size=SHAPE["vocab_size"]))
    except Exception:  # model not importable: the baseline has the same tensors up to padding
        m = BaselineGPT(**{k: SHAPE[k] for k in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size")})
    return [tuple(p.shape) for p in m.parameters() if p.requires_grad]


# =========================================================================== baseline


def _baseline_classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attn(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.h = h
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)
            q, k, v = (z.view(B, T, self.h, C // self.h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = Attn(d, h)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        """nanoGPT's model, minus dropout: what a plain PyTorch script trains."""

        def __init__(self, n_layer, n_head, d_model, seq_len, vocab_size):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, d_model)
            self.wpe = nn.Embedding(seq_len, d_model)
            self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_size, bias=False)
            self.head.weight = self.wte.weight
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, 0.0, 0.02)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
            for b in self.blocks:
                x = b(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT


def BaselineGPT(**kw):
    return _baseline_classes()(**kw)


def bench_baseline(steps: int, warmup: int, threads: int) -> dict:
    """tokens/s of the plain loop (fp32, AdamW, no autocast) on random byte tokens."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = SHAPE
    model = BaselineGPT(**{k: s[k] for k in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size")})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    data = torch.randint(0, 256, (s["micro_batch"] * 8, s["seq_len"] + 1))
    times = []
    for i in range(warmup + steps):
        j = (i % 8) * s["micro_batch"]
        batch = data[j:j + s["micro_batch"]]
        t0 = time.perf_counter()
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tok = s["micro_batch"] * s["seq_len"]
    return {"tokens_per_s": tok / statistics.median(times), "step_time_s": statistics.median(times),
            "steps": steps, "threads": threads}


# =========================================================================== driver helpers


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def _mpirun(np_: int, cmd: list, env: dict | None = None, timeout: float = 600):
    sys.path.insert(0, str(REPO))
    from tests.cluster.mpi import run_mpi

    res = run_mpi(cmd, np=np_, env=env or {}, timeout=timeout)
    if res.returncode != 0 or res.timed_out:
        raise RuntimeError("mpirun failed:\n" + res.output())
    return res


def run_allreduce(quick: bool, settings: list[str], repeats: int) -> dict:
    """Launch the allreduce worker per setting, interleaved with mpi4py baseline launches."""
    results = {"mpi4py": []}
    results.update({k: [] for k in settings})
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for name in ["mpi4py", *settings]:
                out = Path(tmp) / f"r{rep}-{len(results[name])}-{abs(hash(name))}.json"
                if name == "mpi4py":
                    cmd = [sys.executable, __file__, "--worker", "allreduce", "--impl", "mpi", "--json", out]
                    env = {}
                else:
                    env, inplace = HVD_SETTINGS[name]
                    cmd = [sys.executable, __file__, "--worker", "allreduce", "--impl", "hvd", "--json", out]
                    if inplace:
                        cmd.append("--inplace")
                if quick:
                    cmd.append("--quick")
                _mpirun(2, cmd, env={"OMP_NUM_THREADS": "1", **env}, timeout=300)
                results[name].append(json.loads(out.read_text()))
                print(f"  allreduce {name:<40} rep {rep}: 16 MiB "
                      f"{results[name][-1]['sizes'][str(16 << 20)]['busbw_GBps']:.2f} GB/s, "
                      f"64 KiB {results[name][-1]['sizes'][str(64 << 10)]['time_s'] * 1e3:.3f} ms", flush=True)
    return summarize_allreduce(results)


def summarize_allreduce(raw: dict) -> dict:
    """Per setting and size: median over launches of time and bus bandwidth, ratio to mpi4py."""
    summary = {}
    for name, runs in raw.items():
        per = {}
        for size in SIZES:
            ts = [r["sizes"][str(size)]["time_s"] for r in runs]
            t = statistics.median(ts)
            per[str(size)] = {"time_s": t, "busbw_GBps": size / t / 1e9}
        g = statistics.median(r["grads"]["time_s"] for r in runs)
        summary[name] = {"sizes": per, "grads_time_s": g, "grads_bytes": runs[0]["grads"]["bytes"],
                         "grads_tensors": runs[0]["grads"]["tensors"], "launches": len(runs)}
    base = summary["mpi4py"]["sizes"]
    for name, s in summary.items():
        for size in SIZES:
            s["sizes"][str(size)]["vs_mpi4py"] = base[str(size)]["time_s"] / s["sizes"][str(size)]["time_s"]
        s["min_ratio_16MiB_up"] = min(s["sizes"][str(z)]["vs_mpi4py"] for z in SIZES if z >= 16 << 20)
    return {"settings": summary, "raw": raw}


def allreduce_table(ar: dict) -> str:
    s = ar["settings"]
    head = f"{'setting':<40}" + "".join(f"{fmt_size(z):>14}" for z in SIZES) + f"{'grads/step':>12}"
    lines = ["Allreduce, 2 ranks: bus bandwidth GB/s (x mpi4py); 64 KiB also as latency", head, "-" * len(head)]
    for name, v in s.items():
        cells = []
        for z in SIZES:
            c = v["sizes"][str(z)]
            cells.append(f"{c['busbw_GBps']:.2f} ({c['vs_mpi4py']:.2f}x)" if name != "mpi4py" else f"{c['busbw_GBps']:.2f}")
        lines.append(f"{name:<40}" + "".join(f"{c:>14}" for c in cells) + f"{v['grads_time_s'] * 1e3:>10.2f}ms")
        lines.append(f"{'':<40}{'64 KiB: ' + format(v['sizes'][str(64 << 10)]['time_s'] * 1e3, '.3f') + ' ms':>14}")
    return "\n".join(lines)


# =========================================================================== main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["allreduce"], help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["mpi", "hvd"], help=argparse.SUPPRESS)
    p.add_argument("--inplace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run, noisy numbers)")
    p.add_argument("--parts", default="step,dp,allreduce", help="comma list of step, dp, allreduce")
    p.add_argument("--settings", default=",".join(HVD_SETTINGS), help="Horovod settings to compare (allreduce part)")
    p.add_argument("--repeats", type=int, default=2, help="launches per allreduce setting")
    p.add_argument("--out", default=str(RESULTS), help="JSON results path")
    args = p.parse_args(argv)
    if args.worker == "allreduce":
        worker_allreduce(args)
        return 0

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    results = {"machine": _machine(), "shape": SHAPE, "quick": args.quick}
    out = Path(args.out)
    if out.exists():  # keep the parts not rerun now
        try:
            prev = json.loads(out.read_text())
            results.update({k: v for k, v in prev.items() if k not in ("machine", "quick")})
        except json.JSONDecodeError:
            pass
    tables = []
    if "allreduce" in parts:
        settings = [x for x in args.settings.split(",") if x]
        results["allreduce"] = run_allreduce(args.quick, settings, args.repeats)
    if "allreduce" in results:
        tables.append(allreduce_table(results["allreduce"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("\n\n".join(tables))
    print(f"\nwrote {out}")
    return 0


def _machine() -> dict:
    import platform

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
