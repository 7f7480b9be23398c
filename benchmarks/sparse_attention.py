"""Sparse attention benchmark: local and bigbird against dense causal SDPA, in one run.

    .venv/bin/python benchmarks/sparse_attention.py [--lengths 2048,4096,8192,16384] [--quick]

Two parts, each case in its own process (so ``ru_maxrss`` is that case's), one process per
case with the machine's threads, fp32, CPU (or CUDA with ``--device cuda``):

- **attention**: forward + backward of attention alone, 1 sequence x 4 heads x 64 (the
  issue's shape): ``dense`` = ``F.scaled_dot_product_attention(is_causal=True)``, ``local``
  (W = 256, B = 64) and ``bigbird`` (W = 256, G = 64, R = 3, B = 64) =
  :func:`hpcllm.model.attention.sparse_attention`;
- **step**: a whole training step (forward, loss, backward, AdamW) of a GPT of 2 layers x 4
  heads x d 256, rotary positions, byte vocabulary, micro-batch 1, with each attention.

``time`` = median over the repeats after a warm-up; ``peak MiB`` = the process's peak
resident set growth over its size once the inputs (and model) exist: what the forward and
backward add. ``speedup`` = dense time / this time at the same T. Results in
``benchmarks/results/sparse_attention.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"dense": {}, "local": dict(attention="local", attention_window=256, attention_block=64),
         "bigbird": dict(attention="bigbird", attention_window=256, attention_global=64, attention_random=3,
                         attention_block=64)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(part: str, kind: str, T: int, repeats: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from hpcllm.model.attention import pattern_for
    from hpcllm.model.gpt import GPT, preset

    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = preset("tiny", n_layer=2, n_head=4, n_kv_head=4, d_model=256, seq_len=T, pos_emb="rope", **KINDS[kind])
    if part == "attention":
        q, k, v = (torch.randn(1, 4, T, 64, device=dev, requires_grad=True) for _ in range(3))
        if kind == "dense":
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            from hpcllm.model.attention import sparse_attention
            pat = pattern_for(cfg, T, 0)
            fn = lambda: sparse_attention(q, k, v, pat)

        def run():
            fn().sum().backward()
            q.grad = k.grad = v.grad = None
    else:
        model = GPT(cfg, init_seed=0).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, 257, (1, T), device=dev)
        y = torch.roll(x, -1, 1)

        def run():
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        run()  # AdamW states exist before the baseline
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    run()  # warm-up (patterns built, kernels chosen)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {"part": part, "kind": kind, "T": T, "time_s": statistics.median(times), "times_s": times,
           "peak_growth_bytes": max(0, peak - base), "threads": torch.get_num_threads(), "device": device}
    if kind != "dense":
        p = pattern_for(cfg, T, 0)
        out.update(keys_per_query=p.attended_pairs() / T, density=p.density(), key_blocks=p.n_k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--parts", default="attention,step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="2k and 4k only, 2 repeats")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sparse_attention.json"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks/results/sparse_attention.png"),
                    help="PNG of time and peak memory against T (empty: none)")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from the JSON at --out, run nothing")
    ap.add_argument("--worker", nargs=3, metavar=("PART", "KIND", "T"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]), a.repeats, a.device)))
        return
    if a.plot_only:
        plot(json.loads(Path(a.out).read_text())["rows"], a.plot)
        return
    lengths = [2048, 4096] if a.quick else [int(t) for t in a.lengths.split(",")]
    repeats = 2 if a.quick else a.repeats
    rows = []
    for part in a.parts.split(","):
        for T in lengths:
            for kind in KINDS:
                # fewer repeats where dense is slow (16k attention: ~5 s each on 2 cores)
                r = max(1, repeats - (1 if T >= 16384 else 0))
                res = subprocess.run([sys.executable, __file__, "--worker", part, kind, str(T), "--repeats", str(r),
                                      "--device", a.device], capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    raise SystemExit(f"{part} {kind} T={T} failed:\n{res.stderr[-2000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"  {part:9s} {kind:7s} T={T:6d} {row['time_s'] * 1e3:9.1f} ms "
                      f"{row['peak_growth_bytes'] / 2**20:8.1f} MiB", file=sys.stderr, flush=True)
    dense = {(r["part"], r["T"]): r for r in rows if r["kind"] == "dense"}
    for r in rows:
        d = dense.get((r["part"], r["T"]))
        r["speedup_vs_dense"] = d["time_s"] / r["time_s"] if d else None
        r["memory_vs_dense"] = (r["peak_growth_bytes"] / d["peak_growth_bytes"]) if d and d["peak_growth_bytes"] else None
    lines = ["| part | attention | T | time ms | speedup vs dense | peak MiB | keys/query |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['kind']} | {r['T']} | {r['time_s'] * 1e3:.1f} | "
                     f"{r['speedup_vs_dense']:.2f}x | {r['peak_growth_bytes'] / 2**20:.1f} | "
                     f"{r.get('keys_per_query', r['T'] / 2 + 0.5):.0f} |")
    table = "\n".join(lines)
    print(table)
    import torch
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": a.device, "torch": torch.__version__, "cpus": os.cpu_count(),
                                       "lengths": lengths, "rows": rows, "table": table}, indent=1) + "\n")
    if a.plot:
        plot(rows, a.plot)


def plot(rows: list, path: str) -> None:
    """Time (log-log) and peak memory against T for each part and pattern: the README's figure."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = sorted({r["part"] for r in rows})
    fig, axes = plt.subplots(1, len(parts) + 1, figsize=(5 * (len(parts) + 1), 4))
    for ax, part in zip(axes, parts):
        for kind in KINDS:
            pts = sorted((r["T"], r["time_s"] * 1e3) for r in rows if r["part"] == part and r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kind)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms",
               title=f"{part}: forward + backward" if part == "attention" else f"{part}: training step")
        ts = sorted({r["T"] for r in rows})
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[-1]
    for kind in KINDS:
        pts = sorted((r["T"], r["peak_growth_bytes"] / 2**20) for r in rows if r["part"] == "attention" and r["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=kind)
    ax.set(xlabel="sequence length T", ylabel="peak MiB (RSS growth)", title="attention: peak memory")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
