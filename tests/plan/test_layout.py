import torch
"""Layout search: communication and bubble terms, constraints, the recommendation."""
import pytest

from hpcllm.model.gpt import PRESETS
from hpcllm.plan.devices import GB, get_profile
from hpcllm.plan.layout import Cluster, allreduce_time, evaluate, ring_allreduce_time, search
from hpcllm.plan.memory import Setup, Shape

H100 = get_profile("h100")
SHAPE = Shape.from_config(PRESETS["1.3B"])


def test_ring_allreduce_moves_2_n_minus_1_over_n_of_the_bytes():
    assert ring_allreduce_time(1e9, 1, 100e9) == 0
    assert ring_allreduce_time(1e9, 2, 100e9) == pytest.approx(1e9 / 100e9)
    assert ring_allreduce_time(1e9, 8, 100e9) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9)


def test_hierarchical_allreduce_inside_then_across_nodes():
    one_node = Cluster(nodes=1, devices_per_node=8, device=H100)
    four = Cluster(nodes=4, devices_per_node=8, device=H100)
    B = 4e9
    assert allreduce_time(B, one_node, 1, 8) == pytest.approx(ring_allreduce_time(B, 8, 450 * GB))
    # 8 replicas per node, then 4 nodes whose network carries the (one) stage's gradients
    assert allreduce_time(B, four, 1, 32) == pytest.approx(ring_allreduce_time(B, 8, 450 * GB)
                                                            + ring_allreduce_time(B, 4, 400 * GB))
    # 2 stages per replica: 4 replicas of each stage per node, both stages cross the network
    assert allreduce_time(B, four, 2, 16) == pytest.approx(ring_allreduce_time(B, 4, 450 * GB)
                                                           + ring_allreduce_time(2 * B, 4, 400 * GB))


def test_pipeline_bubble_is_p_minus_1_micro_batch_slots():
    cl = Cluster(nodes=1, devices_per_node=4, device=H100)
    L = evaluate(SHAPE, Setup(micro_batch=2, pipeline_stages=4, data_parallel=1, microbatches=12), cl)
    assert L.time.bubble / L.time.compute == pytest.approx(3 / 12)
    assert L.time.bubble / (L.time.compute + L.time.bubble) == pytest.approx(3 / (12 + 4 - 1))
    # ZB-H1 fills two thirds of it with deferred weight passes: (P - 1)(F + B - W), F = B = W
    zb = evaluate(SHAPE, Setup(micro_batch=2, pipeline_stages=4, data_parallel=1, microbatches=12,
                               schedule="zbh1"), cl)
    assert zb.time.bubble == pytest.approx(L.time.bubble / 3) and zb.time.compute == L.time.compute


def test_compute_time_is_flops_over_peak_times_mfu():
    cl = Cluster(nodes=1, devices_per_node=1, device=H100)
    L = evaluate(SHAPE, Setup(micro_batch=4, microbatches=2), cl, mfu=0.5)
    tokens = 4 * 2 * SHAPE.seq_len
    assert L.time.compute == pytest.approx(tokens * SHAPE.flops_per_token / (989e12 * 0.5))
    assert L.mfu == pytest.approx(0.5)  # nothing else on one device without a pipeline


def test_search_respects_batch_and_node_boundaries_and_recommends_the_fastest_fit():
    cl = Cluster(nodes=2, devices_per_node=4, device=get_profile("a100-40gb"))
    layouts = search(SHAPE, cl, global_batch=64)
    assert layouts
    for L in layouts:
        assert L.tensor_parallel * L.pipeline_stages * L.data_parallel == 8
        assert L.global_batch == 64
        part = L.tensor_parallel * L.pipeline_stages
        assert 4 % part == 0 or part % 4 == 0
        assert 4 % L.tensor_parallel == 0  # within a node
    assert {L.tensor_parallel for L in layouts} == {1, 2, 4}
    fits = [L for L in layouts if L.fits]
    assert fits and layouts[0] is fits[0]
    assert layouts[0].tokens_per_s == max(L.tokens_per_s for L in fits)
    assert all(not L.fits for L in layouts[len(fits):])


def test_a_model_too_big_for_one_device_needs_pipeline_stages_or_zero():
    big = Shape.from_config(PRESETS["6.7B"])  # ~120 GB of fp32 weights, gradients and AdamW
    cl = Cluster(nodes=1, devices_per_node=8, device=get_profile("a100-80gb"))
    replicated = search(big, cl, global_batch=64, zero=(0,), tensor_parallel=(1,))
    assert not any(L.fits for L in replicated if L.pipeline_stages == 1)
    assert replicated[0].fits and replicated[0].pipeline_stages >= 2
    # sharding the model state over the 8 replicas fits it without stages
    layouts = search(big, cl, global_batch=64)
    flat = [L for L in layouts if L.pipeline_stages == 1]
    assert not any(L.fits for L in flat if L.zero_stage == 0 and L.tensor_parallel == 1)
    assert any(L.fits for L in flat if L.zero_stage == 3)
    # ... and so does splitting each layer over tensor-parallel ranks
    assert any(L.fits for L in flat if L.tensor_parallel > 1)


def test_zero_model_state_formula_per_stage():
    from hpcllm.plan.memory import model_state_bytes

    n = 1000
    assert model_state_bytes(n, 0, 4) == 16 * n
    assert model_state_bytes(n, 1, 4) == (4 + 4 + 8 / 4) * n
    assert model_state_bytes(n, 2, 4) == (4 + 12 / 4) * n
    assert model_state_bytes(n, 3, 4) == 16 / 4 * n
    assert model_state_bytes(n, 3, 1) == 16 * n  # one rank: nothing to shard


def test_tensor_parallelism_divides_model_state_and_activations():
    """T=2 holds half the split matrices (norms, row biases and positions whole) and half the
    heads' and MLP's activations; its step adds the 4 all-reduces per layer."""
    from hpcllm.model.gpt import GPT

    cfg = PRESETS["1.3B"]
    shape = Shape.from_config(cfg)
    cl = Cluster(nodes=1, devices_per_node=8, device=get_profile("a100-80gb"))
    one = evaluate(shape, Setup(micro_batch=4, microbatches=2), cl)
    two = evaluate(shape, Setup(micro_batch=4, microbatches=2, tensor_parallel=2), cl)
    with torch.device("meta"):
        m = GPT(cfg, init_seed=None)
    whole = sum(p.numel() for n, p in m.named_parameters() if ".ln" in n or n.startswith("ln_")
                or n.endswith("proj.bias") or n == "wpe.weight")
    n = shape.params
    assert two.memory.model_state == pytest.approx(16 * ((n - whole) / 2 + whole), rel=1e-6)
    assert two.memory.model_state < 0.55 * one.memory.model_state
    assert two.memory.activations < 0.75 * one.memory.activations
    assert two.time.tensor_parallel > 0 == one.time.tensor_parallel
    sp = evaluate(shape, Setup(micro_batch=4, microbatches=2, tensor_parallel=2, sequence_parallel=True), cl)
    assert sp.memory.activations < two.memory.activations
