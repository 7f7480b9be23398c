"""INT8 weight-only quantization (hpcllm/infer/quantize.py): per-row round trip, storage
(tied embedding once), the matmul against fp32, greedy generation via `generate --int8`
and from an `export --int8` file, and perplexity within 1% of fp32 on the built-in corpus."""
import json

import pytest
import torch
import torch.nn.functional as F

from hpcllm.infer import quantize as qz
from hpcllm.infer.generate import SampleConfig, generate_ids, load_model
from hpcllm.model.gpt import GPT, GPTConfig, preset
from tests.infer.conftest import cli, write_checkpoint


def test_round_trip_error_is_at_most_half_a_scale_per_element():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.02
    w[3] *= 50  # one row with a much larger range: its own scale
    w[7, 5] = 3.0  # an outlier in one row
    w[9] = 0.0  # an all-zero row
    q, s = qz.quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (64,)
    err = (w - qz.dequantize(q, s)).abs()
    # <= scale/2 up to fp32 rounding of w / scale (a relative 2^-24 of up to 127 scales)
    assert bool((err <= s[:, None] / 2 * (1 + 1e-4)).all()), (err / s[:, None]).max()
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    nonzero = torch.ones(64, dtype=torch.bool)
    nonzero[9] = False
    # symmetric per row: each row's largest magnitude maps to +-127, scale = max|w_row| / 127
    assert bool((q[nonzero].abs().amax(dim=1) == 127).all())
    torch.testing.assert_close(s[nonzero], w[nonzero].abs().amax(dim=1) / 127)
    assert bool((q[9] == 0).all()) and float(s[9]) == 1.0


@pytest.mark.parametrize("name", ["small", "llama-small", "124M"])
def test_weight_bytes_at_most_30_percent_of_fp32_and_the_tied_matrix_stored_once(name):
    cfg = preset(name, vocab_size=257) if name == "124M" else preset(name)
    with torch.device("meta") if name == "124M" else torch.device("cpu"):
        model = GPT(cfg, init_seed=None if name == "124M" else 0)
    fp32 = qz.weight_bytes(model)
    qz.quantize_int8(model)
    ratio = qz.weight_bytes(model) / fp32
    assert ratio <= 0.30, ratio
    assert isinstance(model.wte, qz.Int8Embedding) and isinstance(model.lm_head, qz.Int8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    if cfg.tie_embeddings:  # the head is the embedding's int8 matrix and scales, not a copy
        assert model.lm_head.weight_int8 is model.wte.weight_int8 and model.lm_head.scales is model.wte.scales
        assert not any(k.startswith("lm_head.") for k in qz.quantized_state_dict(model))
    else:
        assert model.lm_head.weight_int8.data_ptr() != model.wte.weight_int8.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 40])  # 40: past the int8pack kernel's row limit
@pytest.mark.parametrize("k", [64, 48, 40])  # 40: not a multiple of 16, not for the kernel
def test_int8_linear_is_close_to_fp32_linear(dtype, rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    lin = torch.nn.Linear(k, 72)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(72, generator=g) * 0.1)
    x = torch.randn(2, rows, k, generator=g).to(dtype)
    q8 = qz.Int8Linear.from_linear(lin)
    y = q8(x)
    assert y.dtype == dtype and y.shape == (2, rows, 72)
    ref = F.linear(x.float(), lin.weight, lin.bias)
    deq = F.linear(x.float(), qz.dequantize(q8.weight_int8, q8.scales), lin.bias)
    scale = ref.abs().max()
    # against the dequantized weights: only the kernel's bf16 rounding (2^-9 relative)
    assert (y.float() - deq).abs().max() <= 0.01 * scale
    # against the fp32 weights: int8 error too, still within 2% of the output's range
    assert (y.float() - ref).abs().max() <= 0.02 * scale


def test_int8_embedding_rows_are_the_dequantized_rows():
    emb = torch.nn.Embedding(70, 32)
    q8 = qz.Int8Embedding.from_embedding(emb)
    idx = torch.tensor([[0, 5, 69], [5, 5, 1]])
    torch.testing.assert_close(q8(idx), F.embedding(idx, qz.dequantize(q8.weight_int8, q8.scales)))
    assert (q8(idx) - emb(idx)).abs().max() <= q8.scales.max() / 2 + 1e-7


@pytest.mark.parametrize("name", ["small", "llama-small"])
def test_quantized_model_logits_close_to_fp32(name):
    model = GPT(preset(name), init_seed=0).eval()
    idx = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)
        qz.quantize_int8(model)
        got = model(idx)
        one = model(idx[:1, :3])  # the decoding path's row counts (kernel)
    assert qz.is_quantized(model)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
    assert (one - ref[:1, :3]).abs().max() <= 0.03 * ref.abs().max()


CFG = GPTConfig(n_layer=2, n_head=2, d_model=128, seq_len=32, vocab_size=257)
LLAMA = preset("llama-tiny", seq_len=32)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def run(request, tmp_path_factory):
    run = tmp_path_factory.mktemp(request.param) / "run"
    write_checkpoint(run, CFG if request.param == "gpt2" else LLAMA)
    return run


def test_greedy_generation_with_int8_via_the_cli_and_from_an_int8_export(run, tmp_path, capsys):
    lm = load_model(run, int8=True)
    assert lm.quantization == qz.METHOD
    ids = generate_ids(lm.model, list(b"The "), SampleConfig(max_new_tokens=12, temperature=0, stop_at_eod=False),
                       seq_len=lm.seq_len, vocab_size=257, eod_id=256)
    assert len(ids) == 12
    want = "The " + lm.tokenizer.decode(ids)
    args = ["--prompt", "The ", "--max-new-tokens", "12", "--temperature", "0"]
    rc, out, err = cli(capsys, "generate", run, *args, "--int8")
    assert rc == 0, err
    # the CLI stops at the EOD token: compare up to it
    assert want.startswith(out.rstrip("\n")) and len(out.rstrip("\n")) > len("The ")
    rc, out8, err = cli(capsys, "export", run, "--out", tmp_path / "m8.pt", "--int8")
    assert rc == 0 and "INT8" in out8, err
    rc, _, err = cli(capsys, "export", run, "--out", tmp_path / "m.pt")
    assert rc == 0, err
    payload = torch.load(tmp_path / "m8.pt", weights_only=True)
    assert payload["quantization"] == qz.METHOD and "quantization" not in torch.load(tmp_path / "m.pt",
                                                                                      weights_only=True)
    # the INT8 file holds int8 weights, each tensor once: about a quarter of the fp32 file
    assert (tmp_path / "m8.pt").stat().st_size <= 0.30 * (tmp_path / "m.pt").stat().st_size
    # loaded transparently: the same quantized model, the same greedy text
    lm8 = load_model(tmp_path / "m8.pt")
    assert lm8.quantization == qz.METHOD
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, lm8.model.state_dict()[k]), k
    if lm8.model.cfg.tie_embeddings:
        assert lm8.model.lm_head.weight_int8 is lm8.model.wte.weight_int8
    rc, out_file, err = cli(capsys, "generate", tmp_path / "m8.pt", *args)
    assert rc == 0 and out_file == out, err
    rc, _, err = cli(capsys, "export", run, "--out", tmp_path / "hf", "--format", "hf", "--int8")
    assert rc == 2 and "--int8" in err and err.count("\n") == 1


def test_damaged_int8_export_is_a_one_line_error(run, tmp_path, capsys):
    from hpcllm.infer.generate import export_payload

    payload = export_payload(run, int8=True)
    name = next(k for k in payload["model"] if k.endswith("weight_int8"))
    payload["model"][name] = payload["model"][name].float()  # a float tensor where int8 belongs
    torch.save(payload, tmp_path / "bad.pt")
    rc, out, err = cli(capsys, "generate", tmp_path / "bad.pt", "--prompt", "x", "--max-new-tokens", "2")
    assert rc == 2 and err.count("\n") == 1 and "INT8 weights do not fit" in err and name in err
    payload["quantization"] = "int4-magic"
    torch.save(payload, tmp_path / "bad.pt")
    rc, out, err = cli(capsys, "generate", tmp_path / "bad.pt", "--prompt", "x")
    assert rc == 2 and "int4-magic" in err and err.count("\n") == 1


def _train(data, out, model_args, steps):
    from tests.train.conftest import run_train

    run_train(["--data", str(data), "--out", str(out), "--steps", str(steps), "--ckpt-every", "0",
               "--eval-every", "0", "--log-every", "50", "--threads", "2", *model_args], timeout=900)
    return out


def _int8_perplexity_change(capsys, run, data) -> dict:
    rc, out, err = cli(capsys, "eval", run, "--data", data, "--int8", "--json", "--batch-size", "16")
    assert rc == 0, err
    r = json.loads(out)
    assert r["results"]["int8"]["loss"] != r["results"]["fp32"]["loss"]  # really another model
    print(json.dumps(r))
    return r


def test_int8_perplexity_within_1_percent_of_fp32_tiny_model(stdlib_data, tmp_path, capsys):
    """Fast variant: a tiny model trained briefly on a slice of the built-in corpus."""
    run = _train(stdlib_data, tmp_path / "run", ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--d-model",
                                                  "64", "--seq-len", "64", "--precision", "fp32", "--lr", "3e-3",
                                                  "--warmup", "5", "--micro-batch", "8"], 60)
    r = _int8_perplexity_change(capsys, run, stdlib_data)
    fp32, int8 = r["results"]["fp32"], r["results"]["int8"]
    assert fp32["perplexity"] < 0.5 * 257  # trained: well below a uniform guess over the bytes
    assert abs(r["int8_perplexity_change"]) <= 0.01, r
    assert fp32["windows"] == int8["windows"] and fp32["tokens"] == int8["tokens"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_int8_perplexity_within_1_percent_of_fp32_small_model(stdlib_data, tmp_path, capsys):
    """The `small` preset (4 x 256, seq 256) trained on the same slice of the built-in corpus
    (about 2-4 minutes on 2 cores)."""
    run = _train(stdlib_data, tmp_path / "run", ["--model", "small", "--precision", "auto", "--lr", "1e-3",
                                                 "--warmup", "30", "--micro-batch", "8"], 250)
    r = _int8_perplexity_change(capsys, run, stdlib_data)
    assert r["results"]["fp32"]["perplexity"] < 0.1 * 257
    assert abs(r["int8_perplexity_change"]) <= 0.01, r


@pytest.mark.parametrize("name", ["small", "llama-small"])
def test_dequantized_state_has_the_plain_names_within_half_a_scale(name):
    model = GPT(preset(name), init_seed=0)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    qz.quantize_int8(model)
    deq = qz.dequantized_state_dict(model)
    assert set(deq) == set(plain)
    for k, v in deq.items():
        mod = k.rpartition(".")[0]
        sub = model.get_submodule(mod) if mod else None
        if isinstance(sub, (qz.Int8Linear, qz.Int8Embedding)) and k.endswith(".weight"):
            assert bool(((v - plain[k]).abs() <= sub.scales[:, None] / 2 * (1 + 1e-4)).all()), k
        else:
            assert torch.equal(v, plain[k]), k
    GPT(preset(name), init_seed=None).load_state_dict(deq)  # loads strictly into the plain model
