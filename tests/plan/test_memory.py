"""The memory model: per-parameter bytes, the activation formula against the tensors PyTorch
really saves, pipeline in-flight counts, communication buffers."""
import pytest
import torch

from hpcllm.model.gpt import GPT, GPTConfig, param_count
from hpcllm.plan.devices import cpu_profile, get_profile
from hpcllm.plan.memory import (Setup, Shape, embed_activation_bytes, head_activation_bytes,
                                inflight_microbatches, layer_activation_bytes, memory_per_device,
                                model_uses_flash_attention, stage_layers, stage_memory)

H100 = get_profile("h100")
SMALL = GPTConfig(n_layer=2, n_head=4, d_model=64, seq_len=96, vocab_size=257)


def test_one_billion_fp32_parameters_take_about_4_gb():
    cfg = GPTConfig(n_layer=20, n_head=16, d_model=2048, seq_len=2048)  # ~1.1B parameters
    n = param_count(cfg)
    m = memory_per_device(Shape.from_config(cfg), Setup(micro_batch=1, precision="fp32"), H100)
    assert m.params_count == n
    assert m.params == 4 * n
    assert m.params / (n / 1e9) == pytest.approx(4e9)  # 4 bytes each: 1B params -> 4 GB


@pytest.mark.parametrize("precision,per_param", [("fp32", 16.0), ("bf16", 18.0)])
def test_bytes_per_parameter_of_adam(precision, per_param):
    cfg = GPTConfig(n_layer=24, n_head=16, d_model=2048, seq_len=2048)
    m = memory_per_device(Shape.from_config(cfg), Setup(micro_batch=1, precision=precision), H100)
    states = m.params + m.grads + m.optimizer + m.weight_copies
    # the 16-bit copies cover the matmul weights only (not LayerNorms, biases, positions)
    assert states / m.params_count == pytest.approx(per_param, abs=0.1)


def test_layer_activations_follow_korthikanti_without_dropout_and_score_matrix():
    shape = Shape.from_config(GPTConfig(n_layer=4, n_head=8, d_model=512, seq_len=1024))
    s, b, h, a = 1024, 2, 512, 8
    sbh = s * b * h
    lse = 4 * a * s * b + 16 * s * b  # log-sum-exp, LayerNorm statistics
    assert layer_activation_bytes(shape, Setup(micro_batch=b, precision="fp32")) == 64 * sbh + lse
    assert layer_activation_bytes(shape, Setup(micro_batch=b, precision="bf16")) == 36 * sbh + lse
    assert layer_activation_bytes(shape, Setup(micro_batch=b, precision="bf16", recompute=True)) == 4 * sbh
    # materialised attention scores: Korthikanti's a*s^2*b terms come back
    naive = layer_activation_bytes(shape, Setup(micro_batch=b, precision="bf16", flash_attention=False))
    assert naive == 36 * sbh + 16 * s * b + 2 * a * s * s * b


def _saved_activation_bytes(model, cfg, b, precision):
    """Bytes of the distinct tensors autograd keeps for backward, parameters and their
    16-bit casts (saved transposed by F.linear) excluded: those are the weight terms."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    pshapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() in params or (t.is_floating_point() and t.dim() <= 2 and tuple(t.shape) in pshapes):
            return t
        saved[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x, x)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_model_equals_the_tensors_pytorch_saves(precision):
    torch.manual_seed(0)
    model = GPT(SMALL)
    b = 3
    shape = Shape.from_config(SMALL)
    # on this CPU the model runs attention as hpcllm does there (bf16: probabilities materialised)
    setup = Setup(micro_batch=b, precision=precision,
                  flash_attention=model_uses_flash_attention(shape, precision, cpu_profile(measure=False)))
    predicted = (SMALL.n_layer * layer_activation_bytes(shape, setup) + head_activation_bytes(shape, setup)
                 + embed_activation_bytes(shape, setup))
    measured = _saved_activation_bytes(model, SMALL, b, precision)
    assert measured == pytest.approx(predicted, rel=0.02)


@pytest.mark.parametrize("schedule,P,M,first_stage", [("1f1b", 4, 8, 4), ("1f1b", 4, 2, 2), ("gpipe", 4, 8, 8),
                                                      ("zbh1", 4, 8, 7)])  # counted until the weight pass
def test_in_flight_micro_batches_of_the_schedules(schedule, P, M, first_stage):
    setup = Setup(micro_batch=1, pipeline_stages=P, microbatches=M, schedule=schedule)
    assert inflight_microbatches(setup, 0) == first_stage
    if schedule == "1f1b":
        assert inflight_microbatches(setup, P - 1) == 1  # the last stage runs each backward at once


def test_pipeline_stages_split_the_weights_and_multiply_the_activations():
    cfg = GPTConfig(n_layer=8, n_head=8, d_model=1024, seq_len=1024, vocab_size=257)
    shape = Shape.from_config(cfg)
    one = memory_per_device(shape, Setup(micro_batch=2, microbatches=8), H100)
    four = memory_per_device(shape, Setup(micro_batch=2, pipeline_stages=4, microbatches=8), H100)
    assert four.params < 0.4 * one.params
    assert four.inflight == 4 and one.inflight == 1
    assert len(four.per_stage_total) == 4 and four.total == max(four.per_stage_total)
    gpipe = memory_per_device(shape, Setup(micro_batch=2, pipeline_stages=4, microbatches=8, schedule="gpipe"), H100)
    assert gpipe.inflight == 8 and gpipe.total > four.total
    first = lambda setup: stage_memory(shape, setup, H100, 0, stage_layers(shape, 4)[0])  # noqa: E731
    assert first(Setup(micro_batch=2, pipeline_stages=4, microbatches=8, schedule="gpipe")).activations == \
        2 * first(Setup(micro_batch=2, pipeline_stages=4, microbatches=8)).activations


def test_horovod_fusion_buffer_only_with_data_parallelism():
    shape = Shape.from_config(SMALL)
    solo = memory_per_device(shape, Setup(micro_batch=1), H100)
    dp = memory_per_device(shape, Setup(micro_batch=1, data_parallel=4), H100)
    assert solo.comm_buffers == 0
    assert dp.comm_buffers == 64 * 1024**2 and dp.total - solo.total == 64 * 1024**2


def test_recomputation_trades_memory_for_time():
    cfg = GPTConfig(n_layer=16, n_head=16, d_model=2048, seq_len=2048)
    shape = Shape.from_config(cfg)
    layers = stage_layers(shape, 4)[0]
    base = stage_memory(shape, Setup(micro_batch=4, pipeline_stages=4, microbatches=8), H100, 0, layers)
    rc = stage_memory(shape, Setup(micro_batch=4, pipeline_stages=4, microbatches=8, recompute=True), H100, 0, layers)
    assert rc.activations < base.activations / 8
    assert rc.total < base.total
