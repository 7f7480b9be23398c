"""The GPT on CUDA: fp32 equals the CPU, bf16/fp16 autocast stays close to fp32, attention
takes SDPA's kernels at long sequences, initialisation by name is device-independent."""
import pytest
import torch
import torch.nn.functional as F

from hpcllm.model.gpt import GPT, causal_attention, init_parameters, preset
from hpcllm.train.precision import DTYPES, autocast

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")


def cfg_of(arch: str, seq_len: int = 64):
    if arch == "llama":
        return preset("llama-tiny", seq_len=seq_len, d_model=64, n_head=4, n_kv_head=2)
    return preset("tiny", n_layer=2, n_head=4, n_kv_head=4, d_model=64, seq_len=seq_len, vocab_size=257)


def batch(cfg, b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=g)
    return x, y


def loss_and_grads(model, x, y, precision="fp32", device=DEV):
    model.zero_grad(set_to_none=True)
    with autocast(precision, device):
        loss = model(x.to(device), y.to(device))
    loss.backward()
    return loss.detach().float().cpu(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                                        if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_forward_backward_on_cuda_equals_the_cpu(arch):
    cfg = cfg_of(arch)
    cpu = GPT(cfg, init_seed=0)
    gpu = GPT(cfg, init_seed=0).to(DEV)
    x, y = batch(cfg)
    lc, gc = loss_and_grads(cpu, x, y, device=torch.device("cpu"))
    lg, gg = loss_and_grads(gpu, x, y)
    torch.testing.assert_close(lg, lc, rtol=1e-5, atol=1e-5)
    assert gc.keys() == gg.keys()
    for n in gc:
        torch.testing.assert_close(gg[n], gc[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_autocast_on_cuda_is_close_to_fp32(arch, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = cfg_of(arch)
    model = GPT(cfg, init_seed=0).to(DEV)
    x, y = batch(cfg)
    l32, g32 = loss_and_grads(model, x, y)
    llo, glo = loss_and_grads(model, x, y, precision)
    # the master weights and their gradients stay fp32 under autocast
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters()
               if p.grad is not None)
    tol = {"bf16": 2e-2, "fp16": 5e-3}[precision]
    assert abs(float(llo) - float(l32)) <= tol * abs(float(l32))
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flatlo = torch.cat([glo[n].flatten() for n in g32])
    assert float((flatlo - flat32).norm() / flat32.norm()) < 10 * tol
    for n in g32:  # the weight matrices (biases include the keys', whose gradient is exactly 0 but for noise)
        if g32[n].dim() >= 2 and g32[n].norm() > 1e-3 * flat32.norm():
            assert F.cosine_similarity(glo[n].flatten(), g32[n].flatten(), dim=0) > 0.98, n


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_runs_the_matmuls_in_16_bits_on_cuda(precision):
    lin = torch.nn.Linear(64, 32).to(DEV)
    x = torch.randn(8, 64, device=DEV)
    with autocast(precision, DEV):
        y = lin(x)
    assert y.dtype == DTYPES[precision]
    with autocast("fp32", DEV):
        assert lin(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_sequence_attention_on_cuda_matches_the_explicit_softmax(dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1024, 64, generator=g).to(DEV, dtype) for _ in range(3))
    out = causal_attention(q, k, v)
    scores = (q.float() @ k.float().transpose(-1, -2)) / 8.0
    mask = torch.full((1024, 1024), float("-inf"), device=DEV).triu_(1)
    ref = torch.softmax(scores + mask, dim=-1) @ v.float()
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_initialisation_by_name_is_the_same_on_cuda():
    cfg = cfg_of("gpt2")
    cpu = GPT(cfg, init_seed=3)
    gpu = GPT(cfg, init_seed=None).to(DEV)
    init_parameters(gpu.named_parameters(), 3, cfg.n_layer)
    for (n, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu()), n


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_kv_cache_logits_on_cuda_match_recomputation(pos_emb):
    cfg = preset("tiny", n_layer=2, n_head=2, d_model=32, seq_len=48, vocab_size=257, pos_emb=pos_emb)
    m = GPT(cfg, init_seed=1).to(DEV).eval()
    ids = [1, 2, 3, 4]
    cache = m.new_kv_cache(1, cfg.seq_len)
    assert cache.k.device.type == "cuda"
    with torch.no_grad():
        out = m(torch.tensor([ids], device=DEV), kv=cache)[0, -1]
        for _ in range(cfg.seq_len - len(ids)):
            torch.testing.assert_close(out, m(torch.tensor([ids], device=DEV))[0, -1], rtol=0, atol=1e-4)
            ids.append(int(out.argmax()))
            out = m(torch.tensor([ids[-1:]], device=DEV), kv=cache)[0, -1]
