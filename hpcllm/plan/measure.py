"""Measure what the plan predicts, on this CPU: peak memory and tokens/s of real steps.

Each measurement runs in a fresh Python process (``python -m hpcllm.plan.measure JSON``) so
the peak resident set size (``ru_maxrss``) belongs to that one configuration. The process
imports torch and the model first and records its resident size as the baseline; the
reported figure is the growth of the peak over that baseline, i.e. everything the
training step itself needed (parameters, optimizer, activations, temporaries, the
framework's lazily created thread pools and kernel caches).

A pipeline stage is measured by building only that stage's blocks (``GPT(cfg, layers=...,
embed=..., head=...)``, as the pipeline engine does) and running its instruction list from
the real 1F1B/GPipe schedule, with random tensors standing in for what the neighbours send.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

from hpcllm.errors import HpcllmError


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _worker(spec: dict) -> dict:
    """Run the steps described by ``spec`` in this process; return the measurements."""
    import time

    import torch

    from hpcllm.model.gpt import GPT, GPTConfig
    from hpcllm.parallel.pipeline.schedules import BWD, FWD, build_schedule

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    cfg = GPTConfig(**spec["model"])
    b, s = spec["micro_batch"], cfg.seq_len
    stages, stage = spec.get("pipeline_stages", 1), spec.get("stage", 0)
    M = spec.get("microbatches", 1)
    first, last = stage == 0, stage == stages - 1
    lo, hi = spec.get("layers", [0, cfg.n_layer])
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
    g = torch.Generator().manual_seed(0)
    # the inputs of every micro-batch exist before the model (the loader's batch)
    ids = [torch.randint(0, cfg.vocab_size, (b, s), generator=g) for _ in range(M)]
    out_grad = None if last else torch.randn(b, s, cfg.d_model, generator=g) * 1e-3
    gemm = None
    if spec.get("gemm"):
        # the CPU profile's peak, measured in this process under the same conditions
        from hpcllm.plan.devices import measure_gemm_flops

        gemm = measure_gemm_flops()
    base = _rss_bytes()

    whole = stages == 1
    model = GPT(cfg) if whole else GPT(cfg, layers=range(lo, hi), embed=first, head=last)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4)
    if stages == 1:
        # accumulation: each micro-batch's backward runs before the next forward
        prog = [op for i in range(M) for op in (("fwd", i), ("bwd", i))]
    else:
        prog = [(ins.op, ins.mb) for ins in build_schedule(spec.get("schedule", "1f1b"), stage, stages, M)
                if ins.op in (FWD, BWD)]

    def forward(i):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            # a later stage receives a fresh activation tensor per micro-batch, as from MPI
            x = ids[i] if first else torch.randn(b, s, cfg.d_model, generator=g).requires_grad_(True)
            return model(x, ids[i]) if last else model(x)

    times = []
    for _ in range(spec.get("steps", 3)):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        live = {}
        for op, i in prog:
            if op == FWD:
                live[i] = forward(i)
            else:
                out = live.pop(i)
                if last:
                    (out / M).backward()
                else:
                    out.backward(out_grad)
        opt.step()
        times.append(time.perf_counter() - t0)
    tokens = M * b * s
    best = min(times[1:]) if len(times) > 1 else times[0]
    return {"baseline_rss": base, "peak_rss": _peak_rss_bytes(), "peak_delta": _peak_rss_bytes() - base,
            "step_times": times, "tokens_per_step": tokens, "tokens_per_s": tokens / best,
            "threads": torch.get_num_threads(), "gemm_flops": gemm,
            "params": sum(p.numel() for p in model.parameters())}


def measure(cfg, micro_batch: int, precision: str = "fp32", pipeline_stages: int = 1, stage: int = 0,
            layers: tuple[int, int] | None = None, microbatches: int = 1, schedule: str = "1f1b",
            steps: int = 3, threads: int | None = None, timeout: float = 300, gemm: bool = False,
            repeats: int = 1) -> dict:
    """Run a real training step configuration in a fresh process and return its peak memory
    growth (``peak_delta``, bytes) and throughput (``tokens_per_s``, best step after the first).
    With ``gemm``, also the matmul rate of the CPU profile (``gemm_flops``), measured in that
    process just before the model is built. With ``repeats`` > 1, the configuration runs in
    that many fresh processes and the one with the smallest peak is returned: glibc's heap
    keeps a varying share of freed memory resident (the same fp32 case has measured 159 to
    211 MiB), and that noise only ever adds."""
    if repeats > 1:
        runs = [measure(cfg, micro_batch, precision, pipeline_stages, stage, layers, microbatches,
                        schedule, steps, threads, timeout, gemm) for _ in range(repeats)]
        return min(runs, key=lambda r: r["peak_delta"])
    spec = {"model": {k: v for k, v in asdict(cfg).items()}, "micro_batch": micro_batch,
            "precision": precision, "pipeline_stages": pipeline_stages, "stage": stage,
            "layers": list(layers) if layers else [0, cfg.n_layer], "microbatches": microbatches,
            "schedule": schedule, "steps": steps, "threads": threads, "gemm": gemm}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "hpcllm.plan.measure", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise HpcllmError(f"measurement failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
