"""Predicted against measured peak memory of every stage of a real 2-stage pipeline
(hpcllm's PipelineEngine, mpi4py point-to-point under mpirun, 1F1B), with and without
activation recomputation."""
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from hpcllm.model.gpt import GPTConfig
from hpcllm.plan.devices import cpu_profile
from hpcllm.plan.memory import Setup, Shape, stage_layers, stage_memory
from tests.cluster.mpi import run_mpi

SCRIPT = Path(__file__).with_name("pipeline_memory_rank.py")
CFG = GPTConfig(n_layer=4, n_head=4, d_model=256, seq_len=128, vocab_size=257)


@pytest.mark.mpi
@pytest.mark.memory
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
def test_every_stage_of_a_real_pipeline_within_15_percent(recompute):
    import json

    P, b, M = 2, 4, 4
    shape = Shape.from_config(CFG)
    counts = stage_layers(shape, P)
    spec = {"model": asdict(CFG), "micro_batch": b, "microbatches": M, "counts": counts, "precision": "fp32",
            "recompute": recompute, "schedule": "1f1b", "steps": 2}
    res = run_mpi([sys.executable, str(SCRIPT), json.dumps(spec)], np=P, timeout=180).check()
    device = cpu_profile(measure=False)
    setup = Setup(micro_batch=b, precision="fp32", pipeline_stages=P, microbatches=M, recompute=recompute)
    for r in sorted(res.results, key=lambda r: r["stage"]):
        s = r["stage"]
        pred = stage_memory(shape, setup, device, s, counts[s])
        assert r["params"] == pred.params_count
        assert r["peak_live"] == pred.inflight  # the engine's own count of live micro-batches
        ratio = pred.total / r["peak_delta"]
        print(f"stage {s} recompute={recompute}: predicted {pred.total / 2**20:.1f} MiB, "
              f"measured {r['peak_delta'] / 2**20:.1f} MiB, ratio {ratio:.3f}")
        assert abs(ratio - 1) <= 0.15, (s, pred.to_dict(), r)
