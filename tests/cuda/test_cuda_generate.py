"""Generation on CUDA from a checkpoint a CUDA run wrote: greedy tokens with the KV cache equal
recomputing the context, a left-padded batch equals its prompts one at a time, the CLI's
--device cuda prints the same text with and without the cache, logits match the CPU's; INT8
weight-only quantization where hpcllm has it."""
import inspect

import pytest
import torch

from hpcllm.infer.generate import SampleConfig, generate_batch, generate_ids, load_model
from tests.cuda.conftest import run_hpcllm
from tests.train.conftest import TINY, run_train

pytestmark = pytest.mark.cuda

PROMPTS = ["The cluster ", "Each node", "a", "Our job checkpoints the gradients. The model "]


@pytest.fixture(scope="module")
def cuda_run(cuda_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    run_train([*TINY, "--data", str(cuda_dataset), "--out", str(run), "--steps", "30", "--device", "cuda",
               "--ckpt-every", "0"])
    return run


def _kw(lm):
    return dict(seq_len=lm.seq_len, vocab_size=lm.tokenizer.vocab_size, eod_id=lm.tokenizer.eod_id)


def test_greedy_tokens_with_and_without_the_kv_cache_are_equal_on_cuda(cuda_run):
    lm = load_model(cuda_run, device="cuda")
    assert next(lm.model.parameters()).device.type == "cuda"
    for p in PROMPTS:
        ids = lm.tokenizer.encode(p)
        runs = [generate_ids(lm.model, ids, SampleConfig(max_new_tokens=40, temperature=0, kv_cache=kv,
                                                         stop_at_eod=False), **_kw(lm)) for kv in (True, False)]
        assert runs[0] == runs[1] and len(runs[0]) == 40, p


def test_sampling_with_a_seed_is_the_same_with_and_without_the_cache_on_cuda(cuda_run):
    lm = load_model(cuda_run, device="cuda")
    ids = lm.tokenizer.encode("The model ")
    a, b = (generate_ids(lm.model, ids, SampleConfig(max_new_tokens=30, temperature=0.9, top_k=20, seed=7,
                                                     kv_cache=kv, stop_at_eod=False), **_kw(lm)) for kv in (True, False))
    assert a == b


def test_a_padded_batch_on_cuda_equals_one_prompt_at_a_time(cuda_run):
    lm = load_model(cuda_run, device="cuda")
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    sample = SampleConfig(max_new_tokens=12, temperature=0, stop_at_eod=False)
    alone = [generate_ids(lm.model, p, sample, **_kw(lm)) for p in prompts]
    assert generate_batch(lm.model, prompts, sample, batch_size=len(prompts), **_kw(lm)) == alone


def test_cuda_logits_match_the_cpu(cuda_run):
    gpu, cpu = load_model(cuda_run, device="cuda"), load_model(cuda_run, device="cpu")
    ids = torch.tensor([gpu.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(gpu.model(ids.cuda()).cpu(), cpu.model(ids), rtol=1e-4, atol=1e-4)


def test_cli_generate_on_cuda_with_and_without_the_cache(cuda_run):
    outs = [run_hpcllm("generate", cuda_run, "--prompt", "The cluster ", "--max-new-tokens", "24",
                       "--temperature", "0", "--device", "cuda", *flags).stdout for flags in ([], ["--no-kv-cache"])]
    assert outs[0] == outs[1] and outs[0].startswith("The cluster ")


def test_int8_generation_on_cuda_stays_close_to_fp32(cuda_run):
    quantize = pytest.importorskip("hpcllm.infer.quantize")
    if "int8" not in inspect.signature(load_model).parameters:
        pytest.skip("load_model has no int8 option")
    fp = load_model(cuda_run, device="cuda")
    q = load_model(cuda_run, device="cuda", int8=True)
    assert quantize.is_quantized(q.model)
    assert all(t.device.type == "cuda" for t in list(q.model.parameters()) + list(q.model.buffers()))
    ids = torch.tensor([fp.tokenizer.encode(PROMPTS[0])], device="cuda")
    with torch.no_grad():
        a, b = fp.model(ids).float(), q.model(ids).float()
    assert float((a - b).norm() / a.norm()) < 0.05
    new = generate_ids(q.model, ids[0].tolist(), SampleConfig(max_new_tokens=16, temperature=0, stop_at_eod=False),
                       **_kw(q))
    assert len(new) == 16
