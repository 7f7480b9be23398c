"""`hpcllm plan` against reality on this machine: predicted vs measured tokens/s and peak memory.

The throughput case is the CPU benchmark configuration (preset ``small``: 4 layers, 4 heads,
d_model 256, seq 256, byte vocabulary; micro-batch 16). The prediction is exactly what
``hpcllm plan --model small --device cpu --micro-batch 16 --global-batch 16`` computes: the
`cpu` profile's peak is a large matmul measured here, and the step runs at the profile's MFU
(CPU_MFU = 0.4) of it. The memory cases are those of tests/plan/test_measured.py plus the
benchmark configuration itself. Each measurement runs in a fresh process.

    .venv/bin/python benchmarks/plan_check.py            # table; JSON in benchmarks/results/plan_check.json
    .venv/bin/python benchmarks/plan_check.py --quick    # throughput case only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpcllm.model.gpt import PRESETS, GPTConfig  # noqa: E402
from hpcllm.plan.devices import cpu_profile  # noqa: E402
from hpcllm.train.precision import BF16_MIN_SPEEDUP, cpu_matmul_probe  # noqa: E402
from hpcllm.plan.layout import Cluster, evaluate  # noqa: E402
from hpcllm.plan.measure import measure  # noqa: E402
from hpcllm.plan.memory import Setup, Shape, stage_layers, stage_memory  # noqa: E402

MiB = 2**20

MEMORY_CASES = {
    "fp32-activations": (GPTConfig(n_layer=2, n_head=4, d_model=256, seq_len=128, vocab_size=257), 8, "fp32", 1, 0, 1),
    "bf16-parameters": (GPTConfig(n_layer=1, n_head=8, d_model=1024, seq_len=4, vocab_size=257), 1, "bf16", 1, 0, 1),
    "fp32-pipeline-stage0": (GPTConfig(n_layer=4, n_head=4, d_model=256, seq_len=128, vocab_size=257), 4, "fp32", 2, 0, 4),
    "bf16-pipeline-stage1": (GPTConfig(n_layer=2, n_head=8, d_model=1024, seq_len=4, vocab_size=257), 1, "bf16", 2, 1, 2),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the throughput case")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per throughput measurement")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "plan_check.json"))
    args = ap.parse_args()

    dev = cpu_profile(measure=False)  # the peak is measured in the benchmark process below
    cluster = Cluster(nodes=1, devices_per_node=1, device=dev)
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_average_before": os.getloadavg(),
               "gemm_flops": dev.peak_flops, "cpu_mfu": dev.mfu, "throughput": [], "memory": []}

    # ---- throughput: the CPU benchmark configuration
    cfg = PRESETS["small"]
    precisions = ["fp32"] + (["bf16"] if cpu_matmul_probe(1024, 1024, 1024).bf16_speedup >= BF16_MIN_SPEEDUP else [])
    rows = []
    for prec in precisions:
        shape = Shape.from_config(cfg)
        setup = Setup(micro_batch=16, precision=prec)
        t0 = time.time()
        got = measure(cfg, 16, prec, steps=args.steps, gemm=True)
        # the prediction uses the GEMM rate measured in the same process as the steps, so
        # both see the same machine load
        dev = replace(dev, peak_flops=got["gemm_flops"])
        cluster = Cluster(nodes=1, devices_per_node=1, device=dev)
        results["gemm_flops"] = dev.peak_flops
        lay = evaluate(shape, setup, cluster)
        achieved = got["tokens_per_s"] * shape.flops_per_token / dev.flops(prec)
        rec = {"config": "small, micro-batch 16, seq 256", "precision": prec,
               "predicted_tokens_per_s": lay.tokens_per_s, "measured_tokens_per_s": got["tokens_per_s"],
               "ratio": lay.tokens_per_s / got["tokens_per_s"], "predicted_mfu": dev.mfu,
               "measured_mfu_of_gemm_peak": achieved, "step_times": got["step_times"],
               "predicted_peak_bytes": lay.memory.total, "measured_peak_bytes": got["peak_delta"],
               "threads": got["threads"], "wall_s": time.time() - t0}
        results["throughput"].append(rec)
        rows.append(rec)

    print(f"CPU: {results['cpus']} cores, measured GEMM peak fp32 {dev.peak_flops['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {dev.peak_flops['bf16'] / 1e9:.1f} GFLOP/s; plan assumes MFU {dev.mfu:.2f} of it")
    print(f"{'config':34s} {'prec':5s} {'pred tok/s':>10s} {'meas tok/s':>10s} {'ratio':>6s} "
          f"{'MFU(meas)':>9s} {'pred MiB':>9s} {'meas MiB':>9s}")
    for r in rows:
        print(f"{r['config']:34s} {r['precision']:5s} {r['predicted_tokens_per_s']:10.0f} "
              f"{r['measured_tokens_per_s']:10.0f} {r['ratio']:6.2f} {r['measured_mfu_of_gemm_peak']:9.2f} "
              f"{r['predicted_peak_bytes'] / MiB:9.1f} {r['measured_peak_bytes'] / MiB:9.1f}")

    # ---- peak memory cases
    if not args.quick:
        print()
        print(f"{'memory case':24s} {'predicted MiB':>13s} {'measured MiB':>12s} {'ratio':>6s}")
        for name, (mcfg, b, prec, P, stage, M) in MEMORY_CASES.items():
            shape = Shape.from_config(mcfg)
            setup = Setup(micro_batch=b, precision=prec, pipeline_stages=P, microbatches=M)
            counts = stage_layers(shape, P)
            first = sum(counts[:stage])
            pred = stage_memory(shape, setup, dev, stage, counts[stage])
            got = measure(mcfg, b, prec, pipeline_stages=P, stage=stage, layers=(first, first + counts[stage]),
                          microbatches=M, steps=2)
            rec = {"case": name, "predicted_bytes": pred.total, "measured_bytes": got["peak_delta"],
                   "ratio": pred.total / got["peak_delta"], "breakdown": pred.to_dict()}
            results["memory"].append(rec)
            print(f"{name:24s} {pred.total / MiB:13.1f} {got['peak_delta'] / MiB:12.1f} {rec['ratio']:6.3f}")

    results["load_average_after"] = os.getloadavg()
    print(f"load average before/after: {results['load_average_before'][0]:.1f} / "
          f"{results['load_average_after'][0]:.1f} (other processes on this machine skew timings)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
