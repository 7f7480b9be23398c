"""Hugging Face interop with the real `transformers`: export -> logits/generation equal to
hpcllm's; random HF models -> `hpcllm train --init-from` -> first loss equal to transformers'
on the same batch; import -> export gives the same tensors. Nothing is downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import REPO, build_dataset, run_train

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hpcllm.data.tokenizer import ByteTokenizer  # noqa: E402
from hpcllm.interop import safetensors_io as st  # noqa: E402
from hpcllm.interop.hf import byte_tokenizer_json  # noqa: E402
from hpcllm.interop.hf_export import export_hf  # noqa: E402
from hpcllm.model.gpt import GPT, GPTConfig, preset  # noqa: E402

SHAPES = {
    "gpt2": GPTConfig(n_layer=2, n_head=4, d_model=64, seq_len=64, vocab_size=257),
    "neox": GPTConfig(n_layer=2, n_head=4, d_model=64, seq_len=64, vocab_size=257, pos_emb="rope"),
    "llama": preset("llama-tiny", seq_len=64),
    "llama-tied-mha": preset("llama-tiny", seq_len=64, tie_embeddings=True, n_kv_head=4),
    "gpt2-nobias-untied": GPTConfig(n_layer=2, n_head=4, d_model=64, seq_len=64, vocab_size=257, bias=False,
                                    tie_embeddings=False),
    "neox-untied-tanh": GPTConfig(n_layer=2, n_head=4, d_model=64, seq_len=64, vocab_size=257, pos_emb="rope",
                                  tie_embeddings=False, gelu_approx="tanh"),
}
CLASSES = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
           "llama-tied-mha": "LlamaForCausalLM", "gpt2-nobias-untied": "GPT2LMHeadModel",
           "neox-untied-tanh": "GPTNeoXForCausalLM"}


def _export_file(cfg, path, seed=1):
    """An hpcllm single-file export of a random model with non-trivial norms and biases."""
    from hpcllm.infer.generate import EXPORT_FORMAT, EXPORT_VERSION
    from hpcllm.train.checkpoint import save_torch

    m = GPT(cfg, init_seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in m.named_parameters():
            if ".ln" in n or n.startswith("ln") or n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    tok = ByteTokenizer()
    save_torch({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "config": cfg.to_dict(), "model": m.state_dict(),
                "tokenizer": {"type": "byte", "vocab_size": 257, "eod_id": 256, "sha256": tok.sha256, "json": None},
                "step": 0}, path)
    return m.eval()


def _hf(d):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    return m.eval()


@pytest.mark.parametrize("name", list(SHAPES))
def test_exported_model_logits_equal_hpcllm(tmp_path, name):
    cfg = SHAPES[name]
    ours = _export_file(cfg, tmp_path / "m.pt")
    export_hf(tmp_path / "m.pt", tmp_path / "hf")
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    hf = _hf(tmp_path / "hf")
    assert type(hf).__name__ == CLASSES[name]
    x = torch.randint(0, 257, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    if name.startswith("gpt2"):
        assert diff == 0.0  # the same operations in the same order
    else:
        assert diff < 1e-5
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(257, cfg.padded_vocab)) and gen["eos_token_id"] == 256


def test_tokenizer_and_greedy_generation_match(tmp_path):
    """AutoTokenizer encodes like hpcllm's byte tokenizer; transformers' greedy generate gives
    hpcllm's greedy tokens for 32 new tokens."""
    from hpcllm.infer.generate import SampleConfig, generate_ids

    cfg = SHAPES["llama"]
    ours = _export_file(cfg, tmp_path / "m.pt")
    export_hf(tmp_path / "m.pt", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Grüße, the cluster <|endoftext|>trains"
    assert tok(text)["input_ids"] == ByteTokenizer().encode("Grüße, the cluster ") + [256] + list(b"trains")
    assert tok.decode(list("héllo".encode())) == "héllo"
    prompt = list("the scheduler ".encode())
    mine = generate_ids(ours, prompt, SampleConfig(max_new_tokens=32, temperature=0, stop_at_eod=False),
                        seq_len=cfg.seq_len, vocab_size=257)
    hf = _hf(tmp_path / "hf")
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert out[0, len(prompt):].tolist() == mine


def test_sharded_export_and_bf16(tmp_path):
    cfg = SHAPES["gpt2"]
    ours = _export_file(cfg, tmp_path / "m.pt")
    export_hf(tmp_path / "m.pt", tmp_path / "hf", dtype="bf16", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "hf" / s).is_file() for s in shards)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    hf = _hf(tmp_path / "hf")
    assert next(hf.parameters()).dtype == torch.bfloat16
    sd = {k: v for k, v in hf.state_dict().items()}
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"],
                       ours.blocks[0].attn.qkv.weight.detach().t().to(torch.bfloat16))


def test_export_cli_refuses_a_foreign_directory(tmp_path):
    _export_file(SHAPES["gpt2"], tmp_path / "m.pt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "hpcllm", "export", str(tmp_path / "m.pt"), "--format", "hf",
                        "--out", str(tmp_path / "busy")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "not empty" in r.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- import


def _random_hf(kind, d, with_tokenizer=True):
    """A random-weight transformers model built from a config and saved locally."""
    torch.manual_seed(0)
    common = dict(vocab_size=320, bos_token_id=256, eos_token_id=256)
    if kind == "gpt2":
        c = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, activation_function="gelu_new",
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **common)
        m = transformers.GPT2LMHeadModel(c)
    elif kind == "neox":
        c = transformers.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                       intermediate_size=192, max_position_embeddings=64, use_parallel_residual=False,
                                       rotary_pct=1.0, tie_word_embeddings=False, hidden_dropout=0,
                                       attention_dropout=0, **common)
        m = transformers.GPTNeoXForCausalLM(c)
    else:
        c = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                     intermediate_size=160, max_position_embeddings=64, rms_norm_eps=1e-5, **common)
        m = transformers.LlamaForCausalLM(c)
    with torch.no_grad():  # norms and biases away from their init, so a mapping error shows
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(str(d))
    if with_tokenizer:
        (d / "tokenizer.json").write_text(byte_tokenizer_json())
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "eos_token": "<|endoftext|>", "hpcllm_tokenizer": "byte"}))
    return m.eval()


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("data") / "ds", n_docs=200)


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_init_from_first_loss_equals_transformers_and_round_trips(tmp_path, byte_dataset, kind):
    from hpcllm.data.loader import BatchLoader
    from hpcllm.train.metrics import read_metrics

    hf = _random_hf(kind, tmp_path / "hfmodel", with_tokenizer=kind != "neox")
    run = tmp_path / "run"
    run_train(["--data", str(byte_dataset), "--out", str(run), "--init-from", str(tmp_path / "hfmodel"),
               "--steps", "1", "--micro-batch", "4", "--seq-len", "32", "--threads", "1", "--precision", "fp32",
               "--log-every", "1", "--eval-every", "0", "--seed", "3"])
    first = read_metrics(run)[0]
    assert first["step"] == 1
    loader = BatchLoader(str(byte_dataset), split="train", seq_len=32, micro_batch=4, accum=1, dp_rank=0, dp_size=1,
                         seed=3, model_vocab_size=320)
    x, y = loader.next_batch()[0]
    with torch.no_grad():
        logits = hf(x).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert abs(first["loss"] - want) < 1e-5 * max(1.0, abs(want))

    # import -> export: the same tensors as the HF model the run started from (after one
    # step the weights moved, so compare the mapping on the initial weights instead)
    from hpcllm.interop.hf import HFWeights, to_hf

    w = HFWeights(tmp_path / "hfmodel")
    cfg_dict, tensors = to_hf(w.cfg, w.model_state(), 256)
    theirs = {k: v for k, v in hf.state_dict().items()}
    renamed = {"embed_out.weight": "lm_head.weight"}  # transformers 5's name of NeoX's head
    for k, v in tensors.items():
        assert torch.equal(v, theirs[k if k in theirs else renamed[k]].float()), k
    assert cfg_dict["vocab_size"] == 320


def test_init_from_refuses_shape_flags_and_foreign_tokenizers(tmp_path, byte_dataset):
    _random_hf("llama", tmp_path / "hfmodel")
    base = ["--data", str(byte_dataset), "--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "hfmodel"),
            "--steps", "1", "--threads", "1"]
    r = run_train(base + ["--n-layer", "4"], check=False)
    assert r.returncode == 2 and "--n-layer" in r.stderr and "--init-from" in r.stderr
    # a tokenizer that is not the dataset's
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "hfmodel" / "tokenizer.json").write_text(t.to_str())
    (tmp_path / "hfmodel" / "tokenizer_config.json").write_text("{}")
    r = run_train(base, check=False)
    assert r.returncode == 2 and "tokenizer" in r.stderr and "--tokenizer" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("field,value,needle", [
    ("use_parallel_residual", True, "use_parallel_residual"),
    ("rotary_pct", 0.25, "rotary_pct"),
    ("model_type", "mamba", "model_type"),
])
def test_unsupported_fields_are_named(tmp_path, field, value, needle):
    from hpcllm.errors import HpcllmError
    from hpcllm.interop.hf import HFWeights

    _random_hf("neox", tmp_path / "m", with_tokenizer=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg[field] = value
    if field == "rotary_pct":
        cfg.pop("rope_parameters", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpcllmError, match=needle):
        HFWeights(tmp_path / "m")


def test_safetensors_reader_refuses_truncated_files(tmp_path):
    from hpcllm.errors import HpcllmError

    st.write_file(tmp_path / "a.safetensors", {"w": torch.arange(10.0), "b": torch.ones(2, 3, dtype=torch.bfloat16)})
    f = st.SafetensorsFile(tmp_path / "a.safetensors")
    assert torch.equal(f.get("w"), torch.arange(10.0)) and f.get("b").dtype == torch.bfloat16
    f.close()
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-5])
    with pytest.raises(HpcllmError, match="truncated"):
        st.read_header(tmp_path / "cut.safetensors")


def test_preprocess_with_an_hf_tokenizer_then_init_from(tmp_path):
    """A Llama-3-style directory (its own BPE tokenizer whose end of text is <|end_of_text|>):
    preprocess --tokenizer DIR tokenizes with it, train --init-from DIR accepts the dataset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.train.conftest import make_text

    docs = make_text(120)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end_of_text|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / "hfmodel"
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=32, intermediate_size=64,
        max_position_embeddings=64, vocab_size=tok.get_vocab_size(), eos_token_id=0))
    m.save_pretrained(str(d))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "hpcllm", "preprocess", str(src), "--out", str(tmp_path / "ds"),
                        "--tokenizer", str(d), "--workers", "1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == tok.get_vocab_size()
    assert manifest["tokenizer"]["eod_id"] == tok.token_to_id("<|end_of_text|>")
    run_train(["--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--init-from", str(d), "--steps", "2",
               "--micro-batch", "2", "--seq-len", "32", "--threads", "1", "--precision", "fp32", "--eval-every", "0"])
    from hpcllm.infer.generate import load_model

    loaded = load_model(tmp_path / "run")
    assert loaded.model_config["arch"] == "llama" and loaded.tokenizer.eod_id == tok.token_to_id("<|end_of_text|>")


@pytest.mark.mpi
@pytest.mark.slow
def test_init_from_loads_alike_in_every_layout(tmp_path, byte_dataset):
    """The same HF Llama starts a 2-stage pipeline, ZeRO-3 and T=2 runs at transformers' loss
    on the first batch (each rank reads only its tensors: stage slices, shards, TP rows)."""
    from hpcllm.data.loader import BatchLoader
    from hpcllm.train.metrics import read_metrics
    from tests.cluster.mpi import run_mpi
    from tests.train.conftest import train_cmd

    hf = _random_hf("llama", tmp_path / "hfmodel")
    loader = BatchLoader(str(byte_dataset), split="train", seq_len=32, micro_batch=4, accum=1, dp_rank=0, dp_size=1,
                         seed=3, model_vocab_size=320)
    x, y = loader.next_batch()[0]
    with torch.no_grad():
        logits = hf(x).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    base = ["--data", str(byte_dataset), "--init-from", str(tmp_path / "hfmodel"), "--steps", "1", "--seq-len", "32",
            "--threads", "1", "--precision", "fp32", "--log-every", "1", "--eval-every", "0", "--seed", "3"]
    layouts = {"pp2": ["--micro-batch", "2", "--pipeline-stages", "2", "--microbatches", "2"],
               "zero3": ["--micro-batch", "2", "--zero-stage", "3"],
               "tp2": ["--micro-batch", "4", "--tensor-parallel", "2"]}
    for name, extra in layouts.items():
        out = tmp_path / name
        run_mpi(train_cmd(*base, "--out", str(out), *extra), np=2, env={"OMP_NUM_THREADS": "1"}, timeout=240).check()
        assert abs(read_metrics(out)[0]["loss"] - want) < 1e-5 * max(1.0, want), name


def test_an_int8_export_leaves_as_its_dequantized_weights(tmp_path):
    """export --int8 -> export --format hf: transformers gets the dequantized weights (int8 x
    scale) under the plain names: its logits equal the plain model holding those weights."""
    from hpcllm.infer.generate import load_model, save_export
    from hpcllm.infer.quantize import dequantized_state_dict

    cfg = SHAPES["gpt2"]
    _export_file(cfg, tmp_path / "m.pt")
    save_export(tmp_path / "m.pt", tmp_path / "q.pt", int8=True)  # what export --int8 writes
    export_hf(tmp_path / "q.pt", tmp_path / "hf")
    plain = GPT(cfg, init_seed=None)
    plain.load_state_dict(dequantized_state_dict(load_model(tmp_path / "q.pt").model), strict=False)
    plain.eval()
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (plain(x) - _hf(tmp_path / "hf")(x).logits).abs().max().item() < 1e-5
