"""Training benchmarks: step throughput, data-parallel efficiency, Horovod allreduce bandwidth.

    .venv/bin/python benchmarks/train.py [--quick] [--parts step,kernels,dp,allreduce]

Prints a table and writes benchmarks/results/train.json. Every ratio is against a baseline
measured in the same run (on a shared 2-core machine absolute numbers drift; ratios much less):

- **step**: tokens/s of hpcllm's real training step (``hpcllm train``, 1 process) for the fixed
  shape 4 layers x 4 heads x d 256, seq 256, micro-batch 16, byte vocabulary, in fp32 and bf16,
  against a plain nanoGPT-style PyTorch loop of the same shape (fp32, AdamW, no autocast).
  Goal: bf16 >= 2.5x the baseline. Without AMX/AVX512-BF16 (e.g. an AVX2-only CPU) bf16
  matmuls are tens of times slower than fp32, so the bf16 run is skipped and the measured
  matmul speeds are reported instead (``--force-bf16`` runs it anyway).
- **kernels**: the pieces the bf16 step was sped up with, each against what it replaced
  (attention SDPA vs matmuls, tanh vs exact GELU, multi-tensor vs fused AdamW), in ms.
- **dp**: ``mpirun -np 2 hpcllm train`` with 1 thread per rank against 1 rank x 1 thread
  (weak scaling: the same micro-batch per rank), at hpcllm's default Horovod cycle time and at
  0.1 ms. Goal: efficiency >= 0.9. Also the time a step waits for its gradient allreduce
  (``sync_time_s`` in metrics.jsonl) as a share of the step.
- **allreduce**: Horovod allreduce bus bandwidth against mpi4py ``Allreduce`` on the same
  buffers (64 KiB .. 64 MiB, 2 ranks), at Horovod's defaults and with tuned knobs
  (HOROVOD_CYCLE_TIME, HOROVOD_FUSION_THRESHOLD, in-place allreduce_, and waiting by polling
  the handle instead of hvd.synchronize()). Goal: >= 0.75x mpi4py from 16 MiB up. Also the
  time to allreduce one step's gradients of the fixed shape.

On a shared node, run it when the load is low (``uptime``); every launch records the load.
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

#: Horovod settings compared: name -> (environment set before hvd.init(), in place).
#: "inplace" uses allreduce_ (what hvd.DistributedOptimizer does with gradients); otherwise
#: allreduce() returns a new tensor. Horovod's defaults (since 0.21): HOROVOD_CYCLE_TIME 1 ms,
#: HOROVOD_FUSION_THRESHOLD 128 MiB.
_YIELD = "OMPI_MCA_mpi_yield_when_idle"
HVD_SETTINGS = {
    "default": ({}, False),
    "default+inplace": ({}, True),
    "cycle0.1": ({"HOROVOD_CYCLE_TIME": "0.1"}, False),
    "cycle0.1+inplace": ({"HOROVOD_CYCLE_TIME": "0.1"}, True),
    "cycle0.1+fusion64M+inplace": ({"HOROVOD_CYCLE_TIME": "0.1", "HOROVOD_FUSION_THRESHOLD": str(64 << 20)}, True),
    "cycle0.1+fusion16M+inplace": ({"HOROVOD_CYCLE_TIME": "0.1", "HOROVOD_FUSION_THRESHOLD": str(16 << 20)}, True),
    "cycle0.5+inplace": ({"HOROVOD_CYCLE_TIME": "0.5"}, True),
    "cycle0.02+inplace": ({"HOROVOD_CYCLE_TIME": "0.02"}, True),
    # + waiting by polling the handle every 20 us from Python instead of hvd.synchronize()'s
    # 1 ms sleep loop (what hvd.synchronize does; hpcllm's GradSync polls instead)
    "default+inplace+poll": ({}, True, 20),
    "cycle0.1+inplace+poll": ({"HOROVOD_CYCLE_TIME": "0.1"}, True, 20),
    "cycle0.5+inplace+poll": ({"HOROVOD_CYCLE_TIME": "0.5"}, True, 20),
    # hpcllm's defaults (config.py, data_parallel.py): best for CPU training steps, see run_dp
    "cycle5+inplace+poll": ({"HOROVOD_CYCLE_TIME": "5"}, True, 20),
    "cycle1+inplace+poll": ({"HOROVOD_CYCLE_TIME": "1"}, True, 20),
    "cycle2+inplace+poll": ({"HOROVOD_CYCLE_TIME": "2"}, True, 20),
    # + Open MPI yielding instead of spinning while it waits (what hpcllm sets on CPU ranks,
    # hpcllm.parallel.data_parallel.mpi_env)
    "cycle0.1+inplace+poll+yield": ({"HOROVOD_CYCLE_TIME": "0.1", **{_YIELD: "1"}}, True, 20),
    "cycle0.5+inplace+poll+yield": ({"HOROVOD_CYCLE_TIME": "0.5", **{_YIELD: "1"}}, True, 20),
    "cycle2+inplace+poll+yield": ({"HOROVOD_CYCLE_TIME": "2", **{_YIELD: "1"}}, True, 20),
}
#: hpcllm's defaults: CPU ranks (2 ms cycle, Open MPI yields) and GPU ranks (0.1 ms cycle)
HPCLLM_SETTING = "cycle2+inplace+poll+yield"
HPCLLM_GPU_SETTING = "cycle0.1+inplace+poll"
DEFAULT_SETTINGS = ["default", "default+inplace", "cycle0.1+inplace", "default+inplace+poll",
                    "cycle0.1+inplace+poll", "cycle0.1+inplace+poll+yield", "cycle0.5+inplace+poll+yield",
                    "cycle2+inplace+poll+yield"]


def fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


# =========================================================================== workers (under mpirun)


def _sizes(args) -> list[int]:
    return [int(x) for x in args.sizes.split(",")] if getattr(args, "sizes", None) else SIZES


def _iters(size: int, quick: bool) -> int:
    n = max(5, min(200, (256 << 20) // size))
    return max(3, n // 4) if quick else n


def worker_allreduce(args) -> None:
    """One rank: time allreduce per buffer size; rank 0 writes JSON.

    ``--impl mpi``: mpi4py only (Horovod not even imported). ``--impl hvd``: Horovod only.
    (mpi4py rounds inside a Horovod launch are not a fair baseline: Horovod's background
    thread runs its own MPI collectives every cycle and slows them down.)
    """
    import torch

    torch.set_num_threads(1)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    impl = args.impl
    if impl == "hvd":
        import horovod.torch as hvd

        hvd.init()
    rounds = 4 if args.quick else 7
    out = {"impl": impl, "inplace": args.inplace, "poll_us": args.poll_us,
           "env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")}, "world": world, "sizes": {}}

    def wait(handle):
        # hvd.synchronize() polls the handle every 1 ms (C++ sleep_for in wait_and_clear);
        # --poll-us polls from Python first, as hpcllm does (wait_handle: from that interval,
        # doubling up to 0.5 ms)
        if args.poll_us:
            from hpcllm.parallel.data_parallel import wait_handle

            wait_handle(hvd, handle, args.poll_us * 1e-6)
        return hvd.synchronize(handle)

    def mpi_one(t, name):
        comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)

    def hvd_one(t, name):
        if args.inplace:
            wait(hvd.allreduce_async_(t, op=hvd.Sum, name=name))
        else:
            wait(hvd.allreduce_async(t, op=hvd.Sum, name=name))

    def timed(fn, t, name, n):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn(t, name)
        return comm.allreduce((time.perf_counter() - t0) / n, op=MPI.MAX)

    for size in _sizes(args):
        t = torch.ones(size // 4, dtype=torch.float32)
        n = _iters(size, args.quick)
        name = f"buf.{size}"
        fns = {"mpi": mpi_one} if impl == "mpi" else {"hvd": hvd_one}
        for fn in fns.values():  # warm up: connections, response cache, fusion buffer
            for _ in range(3):
                fn(t, name)
        times = {k: [] for k in fns}
        for r in range(rounds):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                times[k].append(timed(fns[k], t, name, n))
        entry = {}
        for k, ts in times.items():
            sec = statistics.median(ts)
            # bus bandwidth (NCCL-tests convention): algbw * 2(n-1)/n
            entry[k] = {"time_s": sec, "busbw_GBps": size / sec * 2 * (world - 1) / world / 1e9, "rounds": ts}
        out["sizes"][str(size)] = entry
        del t

    # one training step's gradients of the fixed shape: many tensors at once, as
    # hpcllm's GradSync issues them (async, in place, averaged), then wait for all;
    # mpi4py: one blocking Allreduce per tensor
    grads = [torch.ones(sh) for sh in _grad_shapes()]
    nbytes = sum(g.numel() * 4 for g in grads)

    def step_allreduce(_t=None, _name=None):
        if impl == "mpi":
            for g in grads:
                comm.Allreduce(MPI.IN_PLACE, g.numpy(), op=MPI.SUM)
        else:
            hs = [hvd.allreduce_async_(g, op=hvd.Average, name=f"grad.{i}") for i, g in enumerate(grads)]
            for h in hs:
                wait(h)

    for _ in range(3):
        step_allreduce()
    times = [timed(step_allreduce, None, None, 10) for _ in range(rounds)]
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
        # as nanoGPT's get_batch: contiguous (x, y) per step
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        loss = model(x, y)
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


def run_allreduce(quick: bool, settings: list[str], repeats: int, sizes: str | None = None) -> dict:
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
                    env, inplace, *poll = HVD_SETTINGS[name]
                    cmd = [sys.executable, __file__, "--worker", "allreduce", "--impl", "hvd", "--json", out]
                    if inplace:
                        cmd.append("--inplace")
                    if poll:
                        cmd += ["--poll-us", str(poll[0])]
                if quick:
                    cmd.append("--quick")
                if sizes:
                    cmd += ["--sizes", sizes]
                load0 = os.getloadavg()[0]
                _mpirun(2, cmd, env={"OMP_NUM_THREADS": "1", **env}, timeout=300)
                results[name].append(json.loads(out.read_text()))
                results[name][-1]["load_avg_1m"] = [load0, os.getloadavg()[0]]
                r = results[name][-1]["sizes"]
                k = "mpi" if name == "mpi4py" else "hvd"
                print(f"  allreduce {name:<28} rep {rep}: " + ", ".join(
                    f"{fmt_size(int(z))} {c[k]['busbw_GBps']:.2f} GB/s"
                    for z, c in r.items()),
                    flush=True)
    return summarize_allreduce(results)


def summarize_allreduce(raw: dict) -> dict:
    """Per setting and size: median over launches of time and bus bandwidth, and the ratio to
    the mpi4py launches (interleaved with the Horovod ones, so both saw the same load)."""
    summary = {}
    for name, runs in raw.items():
        key = "mpi" if name == "mpi4py" else "hvd"
        per = {}
        for size in SIZES:
            cells = [r["sizes"][str(size)][key] for r in runs if str(size) in r["sizes"]]
            if cells:
                t = statistics.median(c["time_s"] for c in cells)
                per[str(size)] = {"time_s": t, "busbw_GBps": size / t / 1e9}
        summary[name] = {"sizes": per, "grads_time_s": statistics.median(r["grads"]["time_s"] for r in runs),
                         "grads_bytes": runs[0]["grads"]["bytes"], "grads_tensors": runs[0]["grads"]["tensors"],
                         "launches": len(runs), "load_avg_1m": [r.get("load_avg_1m") for r in runs]}
    base = summary["mpi4py"]["sizes"]
    for name, v in summary.items():
        for z, c in v["sizes"].items():
            c["vs_mpi4py"] = base[z]["time_s"] / c["time_s"]
        big = [v["sizes"][str(z)]["vs_mpi4py"] for z in SIZES if z >= 16 << 20 and str(z) in v["sizes"]]
        v["min_ratio_16MiB_up"] = min(big) if big else None
    return {"settings": summary, "raw": raw}


def best_setting(ar: dict) -> str:
    """The Horovod setting with the best worst-case ratio from 16 MiB up."""
    cands = {k: v for k, v in ar["settings"].items() if k != "mpi4py"}
    return max(cands, key=lambda k: cands[k]["min_ratio_16MiB_up"] or 0.0)


def allreduce_table(ar: dict) -> str:
    s = ar["settings"]
    head = f"{'setting':<32}" + "".join(f"{fmt_size(z):>14}" for z in SIZES) + f"{'grads/step':>12}"
    lines = ["Allreduce, 2 ranks (mpirun, 1 node): bus bandwidth GB/s (x mpi4py on the same buffers, "
             "launches interleaved); grads/step = one step's gradients of the fixed shape", head, "-" * len(head)]
    for name, v in s.items():
        cells = []
        for z in SIZES:
            c = v["sizes"].get(str(z))
            cells.append("-" if c is None else f"{c['busbw_GBps']:.2f}" if name == "mpi4py"
                         else f"{c['busbw_GBps']:.2f} ({c['vs_mpi4py']:.2f}x)")
        lines.append(f"{name:<32}" + "".join(f"{c:>14}" for c in cells) + f"{v['grads_time_s'] * 1e3:>10.1f}ms")
    lat = {n: v["sizes"].get(str(64 << 10)) for n, v in s.items()}
    lines.append("64 KiB latency: " + ", ".join(f"{n} {c['time_s'] * 1e3:.2f} ms" for n, c in lat.items() if c))
    return "\n".join(lines)


# =========================================================================== hpcllm train runs


def make_dataset(out: Path, train_bytes: int = 6 << 20) -> Path:
    """A byte-vocabulary dataset of Python standard-library sources (offline, deterministic),
    written through hpcllm's own shard writer."""
    import numpy as np

    from hpcllm.data.shards import make_manifest, shard_relpath, write_manifest, write_shard
    from hpcllm.data.tokenizer import ByteTokenizer, tokenizer_manifest_entry

    if (out / "manifest.json").exists():
        return out
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    docs, total = [], 0
    for f in files:
        b = f.read_bytes()
        docs.append(b)
        total += len(b) + 1
        if total > train_bytes * 1.05:
            break
    tok = ByteTokenizer()
    split = {"val": docs[: max(1, len(docs) // 20)], "train": docs[max(1, len(docs) // 20):]}
    shards = {}
    for name, ds in split.items():
        arrs, index, pos = [], [], 0
        for d in ds:
            index.append(pos)
            a = np.frombuffer(d, dtype=np.uint8).astype(np.uint16)
            arrs.append(np.append(a, np.uint16(tok.eod_id)))
            pos += len(a) + 1
        entry = write_shard(str(out), shard_relpath(name, 0), np.concatenate(arrs), np.array(index), np.uint16)
        entry["corpus"] = "stdlib"
        shards[name] = [entry]
    write_manifest(str(out), make_manifest(tokenizer_manifest_entry(tok, None), [{"name": "stdlib", "weight": 1.0}],
                                           shards, {}, "benchmarks/train.py", time.strftime("%Y-%m-%dT%H:%M:%S")))
    return out


def train_run(data: Path, out: Path, np_: int, threads: int, precision: str, steps: int, log_every: int,
              extra_env: dict | None = None, extra_args: tuple = ()) -> dict:
    """``hpcllm train`` (under mpirun for np_ > 1) on the fixed shape; throughput from metrics.jsonl,
    the first log interval (warm-up, allocator, Horovod negotiation) left out."""
    args = _train_args(data, out, threads, precision, steps, log_every, extra_args)
    env = {"OMP_NUM_THREADS": str(threads), **(extra_env or {})}
    t0 = time.perf_counter()
    if np_ == 1:
        res = subprocess.run(args, env=_env(env), capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"hpcllm train failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    else:
        _mpirun(np_, args, env=env, timeout=900)
    return _metrics_summary(out, np_, threads, precision, time.perf_counter() - t0)


def _train_args(data: Path, out: Path, threads: int, precision: str, steps: int, log_every: int,
                extra_args: tuple = ()) -> list:
    s = SHAPE
    return [sys.executable, "-m", "hpcllm", "train", "--data", str(data), "--out", str(out), "--model", "small",
            "--n-layer", str(s["n_layer"]), "--n-head", str(s["n_head"]), "--d-model", str(s["d_model"]),
            "--seq-len", str(s["seq_len"]), "--micro-batch", str(s["micro_batch"]), "--accum", "1",
            "--steps", str(steps), "--precision", precision, "--log-every", str(log_every),
            "--eval-every", "0", "--ckpt-every", "0", "--threads", str(threads), "--warmup", "0", *extra_args]


def train_pair(data: Path, out: Path, threads: int, precision: str, steps: int, log_every: int) -> dict:
    """Two independent 1-rank ``hpcllm train`` processes at the same time (no MPI, no
    Horovod): the weak-scaling ceiling of the machine itself (shared memory bandwidth, caches,
    clock), against which the 2-rank run's communication overhead is judged."""
    env = _env({"OMP_NUM_THREADS": str(threads)})
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_train_args(data, out / f"p{i}", threads, precision, steps, log_every), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"hpcllm train failed:\n{err[-3000:]}")
    wall = time.perf_counter() - t0
    runs = [_metrics_summary(out / f"p{i}", 1, threads, precision, wall) for i in range(2)]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in runs),
            "step_time_s": statistics.mean(r["step_time_s"] for r in runs), "ranks": 2, "threads": threads,
            "precision": precision, "wall_s": wall, "runs": runs}


def _metrics_summary(out: Path, np_: int, threads: int, precision: str, wall: float) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("tokens_per_s")]
    if len(recs) < 2:
        raise RuntimeError(f"{out}/metrics.jsonl: too few records ({len(recs)})")
    used = recs[1:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in used),
            "step_time_s": statistics.median(r["step_time_s"] for r in used if "step_time_s" in r) if any(
                "step_time_s" in r for r in used) else None,
            "mfu": statistics.median(r["mfu"] for r in used if r.get("mfu") is not None) if any(
                r.get("mfu") is not None for r in used) else None,
            "sync_time_s": statistics.median(r["sync_time_s"] for r in used if "sync_time_s" in r) if any(
                "sync_time_s" in r for r in used) else None,
            "records": len(used), "ranks": np_, "threads": threads, "precision": precision, "wall_s": wall,
            "final_loss": recs[-1].get("loss")}


def run_step(quick: bool, repeats: int, force_bf16: bool = False) -> dict:
    """hpcllm fp32/bf16 vs the plain loop, all with 2 threads, interleaved ``repeats`` times.

    Without AMX/AVX512-BF16 a bf16 matmul on CPU is tens of times slower than fp32 (no fast
    kernels), so a bf16 training run of this shape takes minutes per step: it is skipped
    (unless ``force_bf16``) and the matmul speed ratio is reported instead."""
    steps, log_every = (12, 4) if quick else (30, 5)
    base_steps = 8 if quick else 20
    precisions = ["fp32", "bf16", "bf16+compile"] if (force_bf16 or _fast_bf16()) else ["fp32"]
    out = {"baseline": [], **{p: [] for p in precisions}}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data")
        for rep in range(repeats):
            out["baseline"].append(bench_baseline(base_steps, 3, threads=2))
            print(f"  step baseline rep {rep}: {out['baseline'][-1]['tokens_per_s']:.0f} tok/s", flush=True)
            for name in precisions:
                prec, _, comp = name.partition("+")
                st, le = (steps, log_every) if prec == "fp32" or _fast_bf16() else (4, 1)
                # the first log interval (compilation, warm-up) is left out of the rate
                out[name].append(train_run(data, Path(tmp) / f"{prec}{comp}-{rep}", 1, 2, prec, st, le,
                                           extra_args=("--compile",) if comp else ()))
                print(f"  step hpcllm {name} rep {rep}: {out[name][-1]['tokens_per_s']:.0f} tok/s", flush=True)
    summary = {k: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in v), "runs": v} for k, v in out.items()}
    b = summary["baseline"]["tokens_per_s"]
    for k in precisions:
        summary[k]["vs_baseline"] = summary[k]["tokens_per_s"] / b
    summary["cpu_capability"] = _cpu_capability()
    summary["fast_bf16"] = _fast_bf16()
    summary["matmul_gflops"] = matmul_speed()
    if _fast_bf16() or force_bf16:
        mb = matmul_bound(threads=2)
        summary["matmul_bound"] = mb
        # the best bf16 could do if everything but the matmuls took no time
        summary["matmul_bound"]["ceiling_vs_baseline"] = (
            summary["baseline"]["tokens_per_s"] and
            (SHAPE["micro_batch"] * SHAPE["seq_len"] / mb["bf16_s"]) / summary["baseline"]["tokens_per_s"])
    if "bf16" not in precisions:
        summary["bf16"] = {"skipped": "no AMX/AVX512-BF16 on this CPU: bf16 matmuls run at "
                                      f"{summary['matmul_gflops']['bf16']:.1f} GFLOP/s vs fp32 "
                                      f"{summary['matmul_gflops']['fp32']:.1f} (autocast would be slower)"}
    return summary


def matmul_speed(threads: int = 2) -> dict:
    """GFLOP/s of a (4096x256)@(256x1024) matmul, the MLP shape of the benchmark, per dtype."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 256), torch.randn(256, 1024)
    res = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dt), b.to(dt)
        x @ y
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5 or n < 2:
            x @ y
            n += 1
        res[name] = 2 * 4096 * 256 * 1024 * n / (time.perf_counter() - t0) / 1e9
    return res


def matmul_bound(threads: int = 2, repeats: int = 5) -> dict:
    """Seconds the matmuls of one training step of the fixed shape take alone, in fp32 and
    bf16: every linear's forward (x W^T), input gradient (dy W) and weight gradient (dy^T x),
    the tied head included, plus attention's four batched matmuls forward and backward.
    Everything else (norms, GELU, softmax, casts, optimizer) is left out, so the bf16 time
    bounds how fast a bf16 step can be on this CPU."""
    import torch

    torch.set_num_threads(threads)
    s = SHAPE
    n, d, T, H = s["micro_batch"] * s["seq_len"], s["d_model"], s["seq_len"], s["n_head"]
    vocab = -(-s["vocab_size"] // 64) * 64
    linears = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * s["n_layer"] + [(d, vocab)]
    res = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xs = {k: torch.randn(n, k, dtype=dt) for k in {a for a, _ in linears} | {b for _, b in linears}}
        ws = [torch.randn(o, i, dtype=dt) for i, o in linears]
        q = torch.randn(s["micro_batch"] * H, T, d // H, dtype=dt)
        p = torch.randn(s["micro_batch"] * H, T, T, dtype=dt)

        def step():
            for (i, o), w in zip(linears, ws):
                torch.mm(xs[i], w.t())              # forward
                torch.mm(xs[o], w)                  # input gradient (xs[o] stands for dy)
                torch.mm(xs[o].t(), xs[i])          # weight gradient
            for _ in range(s["n_layer"]):
                for _ in range(2):                  # forward: q k^T, p v; backward: 4 more
                    torch.bmm(q, q.transpose(1, 2))
                    torch.bmm(p, q)
                    torch.bmm(p.transpose(1, 2), q)

        res[f"{name}_s"] = _best_seconds(step, repeats)
    return res


def _best_seconds(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_kernels(threads: int = 2, repeats: int = 15) -> dict:
    """The three pieces the bf16 step was sped up with, each against what it replaced, on
    the fixed shape (best of ``repeats``, ms): attention forward + backward of one layer in
    bf16 (``F.scaled_dot_product_attention`` vs hpcllm's ``causal_attention``), GELU forward
    + backward of the MLP activation in bf16 (tanh approximation vs exact), and one AdamW step
    over the whole model (multi-tensor vs fused)."""
    import torch
    import torch.nn.functional as F

    from hpcllm.model.gpt import GPT, GPTConfig, causal_attention
    from hpcllm.train.setup import build_optimizer

    torch.set_num_threads(threads)
    s = SHAPE
    B, T, H, d = s["micro_batch"], s["seq_len"], s["n_head"], s["d_model"]

    def best(fn) -> float:
        return _best_seconds(fn, repeats) * 1e3

    qkv = [torch.randn(B, H, T, d // H, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g_attn = torch.randn(B, H, T, d // H, dtype=torch.bfloat16)

    def attention(fn):
        return lambda: fn(*qkv).backward(g_attn)

    x = torch.randn(B * T, 4 * d, dtype=torch.bfloat16, requires_grad=True)
    g_mlp = torch.randn(B * T, 4 * d, dtype=torch.bfloat16)

    def gelu(approximate):
        return lambda: F.gelu(x, approximate=approximate).backward(g_mlp)

    model = GPT(GPTConfig(n_layer=s["n_layer"], n_head=H, d_model=d, seq_len=T, vocab_size=s["vocab_size"]))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ocfg = argparse.Namespace(lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    opts = {k: build_optimizer(model.named_parameters(), ocfg, fused=f) for k, f in (("foreach", False),
                                                                                      ("fused", None))}
    rows = {
        "attention_bf16": {"sdpa": best(attention(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True))), "hpcllm": best(attention(causal_attention))},
        "gelu_bf16": {"tanh": best(gelu("tanh")), "exact": best(gelu("none"))},
        "adamw_step": {"foreach": best(opts["foreach"].step), "fused": best(opts["fused"].step)},
    }
    return {"ms": rows, "threads": threads, "fused_adamw": bool(opts["fused"].param_groups[0].get("fused"))}


def kernels_table(k: dict) -> str:
    lines = [f"Pieces of the bf16 step, best of repeats, {k['threads']} threads (ms; before -> hpcllm)",
             f"{'piece':<44}{'before':>10}{'hpcllm':>10}{'ratio':>8}", "-" * 72]
    labels = {"attention_bf16": "attention fwd+bwd, 1 layer (SDPA -> matmuls)",
              "gelu_bf16": "GELU fwd+bwd, 4096x1024 (tanh -> exact)",
              "adamw_step": "AdamW step, whole model (foreach -> fused)"}
    for key, label in labels.items():
        before, after = k["ms"][key].values()
        lines.append(f"{label:<44}{before:>10.1f}{after:>10.1f}{before / after:>7.2f}x")
    return "\n".join(lines)


def _cpu_capability() -> str:
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "unknown"


def _fast_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def run_dp(quick: bool, repeats: int, precision: str) -> dict:
    """Weak scaling: 2 ranks x 1 thread vs 1 rank x 1 thread, same micro-batch per rank; the
    2-rank run at hpcllm's default Horovod cycle time and at 0.1 ms (the allreduce
    microbenchmark's best), which shows what the background thread costs a CPU step."""
    steps, log_every = (10, 3) if quick else (24, 4)
    layouts = {"1x1": (1, ()), "2x1": (2, ()), "2x1 cycle 0.1ms": (2, ("--cycle-time-ms", "0.1")),
               "2x1 no yield": (2, ()), "2 independent": (0, ())}
    out = {k: [] for k in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data")
        for rep in range(repeats):
            for i, (name, (np_, extra)) in enumerate(layouts.items()):
                where = Path(tmp) / f"dp{i}-{rep}"
                env = {_YIELD: "0"} if name == "2x1 no yield" else None  # the user's setting wins
                out[name].append(train_pair(data, where, 1, precision, steps, log_every) if np_ == 0 else
                                 train_run(data, where, np_, 1, precision, steps, log_every, extra_env=env,
                                           extra_args=extra))
                print(f"  dp {name} rep {rep}: {out[name][-1]['tokens_per_s']:.0f} tok/s, step "
                      f"{out[name][-1]['step_time_s']:.2f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in out.items()}
    one, two = med["1x1"], med["2x1"]
    st = [r["step_time_s"] for r in out["2x1"] if r["step_time_s"]]
    sync = [r["sync_time_s"] for r in out["2x1"] if r.get("sync_time_s") is not None]
    res = {"precision": precision, "tokens_per_s_1x1": one, "tokens_per_s_2x1": two,
           "tokens_per_s_2x1_cycle0.1": med["2x1 cycle 0.1ms"], "efficiency": two / (2 * one),
           "efficiency_cycle0.1": med["2x1 cycle 0.1ms"] / (2 * one),
           "tokens_per_s_2x1_no_yield": med["2x1 no yield"],
           "efficiency_no_yield": med["2x1 no yield"] / (2 * one),
           "tokens_per_s_independent": med["2 independent"],
           "machine_ceiling": med["2 independent"] / (2 * one),
           "efficiency_vs_ceiling": two / med["2 independent"],
           "step_time_s_2x1": statistics.median(st) if st else None, "runs": out}
    if sync and res["step_time_s_2x1"]:
        # measured inside training: time waiting for the gradient allreduce after backward
        res["sync_time_s_2x1"] = statistics.median(sync)
        res["sync_share"] = res["sync_time_s_2x1"] / res["step_time_s_2x1"]
    return res


def step_table(st: dict) -> str:
    lines = ["Training step, 1 process x 2 threads, 4 layers x 4 heads x d256, seq 256, micro-batch 16, byte vocab "
             f"(CPU: {st.get('cpu_capability')})",
             f"{'loop':<44}{'tokens/s':>10}{'x baseline':>12}", "-" * 66,
             f"{'plain PyTorch (nanoGPT-style, fp32, AdamW)':<44}{st['baseline']['tokens_per_s']:>10.0f}{1.0:>12.2f}"]
    for k in ("fp32", "bf16", "bf16+compile"):
        label = "hpcllm train " + k.replace("+compile", " --compile")
        if "skipped" in st.get(k, {}):
            lines.append(f"{label:<44}{'skipped':>10}{'':>12}   ({st[k]['skipped']})")
        elif k in st:
            lines.append(f"{label:<44}{st[k]['tokens_per_s']:>10.0f}{st[k]['vs_baseline']:>12.2f}")
    mb = st.get("matmul_bound")
    if mb:
        tok = SHAPE["micro_batch"] * SHAPE["seq_len"]
        lines.append(f"{'ceiling: the step matmuls alone, bf16':<44}{tok / mb['bf16_s']:>10.0f}"
                     f"{mb['ceiling_vs_baseline']:>12.2f}   (fp32 matmuls alone: {tok / mb['fp32_s']:.0f} tok/s)")
    return "\n".join(lines)


def dp_table(dp: dict, ar: dict | None) -> str:
    lines = [f"Data parallel ({dp['precision']}), weak scaling, 1 thread per rank, same shape, micro-batch 16 per rank",
             f"{'layout':<30}{'tokens/s':>10}", "-" * 40,
             f"{'1 rank x 1 thread':<30}{dp['tokens_per_s_1x1']:>10.0f}",
             f"{'2 ranks x 1 thread (mpirun)':<30}{dp['tokens_per_s_2x1']:>10.0f}   efficiency "
             f"{dp['efficiency']:.2f} (goal >= 0.9)"]
    if "tokens_per_s_2x1_no_yield" in dp:
        lines.append(f"{'  same, Open MPI spinning':<30}{dp['tokens_per_s_2x1_no_yield']:>10.0f}   efficiency "
                     f"{dp['efficiency_no_yield']:.2f}   (OMPI_MCA_mpi_yield_when_idle=0)")
    if "tokens_per_s_independent" in dp:
        lines.append(f"{'2 independent 1-rank processes':<30}{dp['tokens_per_s_independent']:>10.0f}   machine "
                     f"ceiling {dp['machine_ceiling']:.2f}; the 2-rank run reaches "
                     f"{dp['efficiency_vs_ceiling']:.2f} of it")
    if "tokens_per_s_2x1_cycle0.1" in dp:
        lines.append(f"{'  same, HOROVOD_CYCLE_TIME 0.1':<30}{dp['tokens_per_s_2x1_cycle0.1']:>10.0f}   efficiency "
                     f"{dp['efficiency_cycle0.1']:.2f}")
    if ar and dp.get("step_time_s_2x1") and dp.get("allreduce_share") is not None:
        lines.append(f"allreduce of one step's gradients ({dp['allreduce_setting']}): "
                     f"{dp['allreduce_grads_s'] * 1e3:.1f} ms = {dp['allreduce_share'] * 100:.1f}% of a "
                     f"{dp['step_time_s_2x1'] * 1e3:.0f} ms step")
    if dp.get("sync_share") is not None:
        lines.append(f"time a training step waits for its gradient allreduce (measured in hpcllm train): "
                     f"{dp['sync_time_s_2x1'] * 1e3:.1f} ms = {dp['sync_share'] * 100:.1f}% of the step")
    return "\n".join(lines)


# =========================================================================== main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["allreduce"], help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["mpi", "hvd"], help=argparse.SUPPRESS)
    p.add_argument("--inplace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    p.add_argument("--poll-us", type=float, default=0.0, help=argparse.SUPPRESS)  # worker: comma list of byte sizes (exploration)
    p.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run, noisy numbers)")
    p.add_argument("--parts", default="step,kernels,dp,allreduce", help="comma list of step, kernels, dp, allreduce")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help=f"Horovod settings to compare (allreduce part), from: {', '.join(HVD_SETTINGS)}")
    p.add_argument("--repeats", type=int, default=2, help="launches per allreduce setting")
    p.add_argument("--out", default=str(RESULTS), help="JSON results path")
    p.add_argument("--step-repeats", type=int, default=2, help="interleaved repeats of the step part")
    p.add_argument("--dp-repeats", type=int, default=2, help="interleaved repeats of the dp part")
    p.add_argument("--dp-precision", default="auto",
                   help="precision of the dp part (auto: bf16 where the CPU has fast bf16, like hpcllm train)")
    p.add_argument("--force-bf16", action="store_true", help="run the bf16 step even without fast bf16 (slow)")
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
    if "step" in parts:
        results["step"] = run_step(args.quick, args.step_repeats, args.force_bf16)
    if "step" in results:
        tables.append(step_table(results["step"]))
    if "kernels" in parts:
        results["kernels"] = run_kernels()
    if "kernels" in results:
        tables.append(kernels_table(results["kernels"]))
    if "allreduce" in parts:
        settings = [x for x in args.settings.split(",") if x]
        results["allreduce"] = run_allreduce(args.quick, settings, args.repeats, args.sizes)
    if "allreduce" in results:
        tables.append(allreduce_table(results["allreduce"]))
    if "dp" in parts:
        prec = args.dp_precision if args.dp_precision != "auto" else ("bf16" if _fast_bf16() else "fp32")
        results["dp"] = run_dp(args.quick, args.dp_repeats, prec)
    if "dp" in results:
        dp = results["dp"]
        ar = results.get("allreduce")
        if ar and dp.get("step_time_s_2x1"):
            # the setting hpcllm uses by default (else the best one measured)
            best = HPCLLM_SETTING if HPCLLM_SETTING in ar["settings"] else best_setting(ar)
            dp["allreduce_setting"] = best
            dp["allreduce_grads_s"] = ar["settings"][best]["grads_time_s"]
            dp["allreduce_share"] = dp["allreduce_grads_s"] / dp["step_time_s_2x1"]
        tables.append(dp_table(dp, ar))
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
