"""Predicted against measured peak memory of real training steps on this CPU.

Each configuration runs in a fresh process (hpcllm/plan/measure.py): the real GPT, AdamW,
fp32 or bf16 autocast, two optimizer steps (the second has the optimizer state allocated);
pipeline cases build only one stage's blocks and run that stage's instruction list from the
real 1F1B schedule (test_measured_pipeline.py measures every stage of the real engine under
mpirun instead). The prediction is the plan's memory model with the `cpu` device profile.
"""
import pytest

from hpcllm.model.gpt import GPTConfig
from hpcllm.plan.devices import cpu_profile
from hpcllm.plan.measure import measure
from hpcllm.plan.memory import Setup, Shape, stage_layers, stage_memory

pytestmark = pytest.mark.memory

TOLERANCE = 0.15

CASES = {
    # activations dominate: 2 layers of 8 x 128 tokens, width 256
    "fp32-activations": (GPTConfig(n_layer=2, n_head=4, d_model=256, seq_len=128, vocab_size=257), 8, "fp32", 1, 0, 1),
    # parameters, gradients, bf16 weight copies and AdamW dominate: one 12.6M-parameter block
    "bf16-parameters": (GPTConfig(n_layer=1, n_head=8, d_model=1024, seq_len=4, vocab_size=257), 1, "bf16", 1, 0, 1),
    # last of 2 pipeline stages (block + final norm + tied head copy), bf16
    "bf16-pipeline-stage1": (GPTConfig(n_layer=2, n_head=8, d_model=1024, seq_len=4, vocab_size=257), 1, "bf16", 2, 1, 2),
}


@pytest.fixture(scope="module")
def device():
    return cpu_profile(measure=False)  # memory only: no GEMM timing needed


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_peak_memory_within_15_percent_of_measured(name, device):
    cfg, b, precision, P, stage, M = CASES[name]
    shape = Shape.from_config(cfg)
    setup = Setup(micro_batch=b, precision=precision, pipeline_stages=P, microbatches=M)
    counts = stage_layers(shape, P)
    first = sum(counts[:stage])
    predicted = stage_memory(shape, setup, device, stage, counts[stage])
    got = measure(cfg, b, precision, pipeline_stages=P, stage=stage, layers=(first, first + counts[stage]),
                  microbatches=M, steps=2, repeats=2)
    assert got["params"] == predicted.params_count  # the stage really holds what the model counts
    ratio = predicted.total / got["peak_delta"]
    print(f"{name}: predicted {predicted.total / 2**20:.1f} MiB, measured {got['peak_delta'] / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, (name, predicted.to_dict(), got)
