"""hpcllm generate: sampling from checkpoints, run dirs and exported files, with the
tokenizer recorded at training time."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from hpcllm.cli import main as cli_main
from hpcllm.data.shards import make_manifest, write_manifest
from hpcllm.data.tokenizer import ByteTokenizer, tokenizer_manifest_entry, train_bpe
from hpcllm.errors import HpcllmError
from hpcllm.model.gpt import GPT, GPTConfig
from hpcllm.infer.generate import (SampleConfig, generate, generate_ids, load_model, resolve_checkpoint,
                                   save_export)

TEXT = ["the quick brown fox jumps over the lazy dog. " * 3, "pack my box with five dozen liquor jugs. " * 3,
        "how vexingly quick daft zebras jump! " * 3]


def _write_checkpoint(run: Path, cfg: GPTConfig, tok_sha: str, data_dir: str | None, seed: int = 1,
                      step: int = 3) -> Path:
    """A checkpoint in the layout of ARCHITECTURE.md (model.pt, config.json, trainer.json)."""
    model = GPT(cfg)
    model.init_weights(seed)
    ck = run / "checkpoints" / f"step-{step:08d}"
    ck.mkdir(parents=True)
    torch.save(model.state_dict(), ck / "model.pt")
    (ck / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "data": {"path": data_dir}}))
    (ck / "trainer.json").write_text(json.dumps({"step": step, "tokenizer_sha256": tok_sha}))
    (run / "checkpoints" / "latest").write_text(ck.name)
    return ck


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("byte") / "run"
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=257)
    _write_checkpoint(run, cfg, ByteTokenizer.sha256, None)
    return run


@pytest.fixture(scope="module")
def bpe_tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    a = train_bpe(iter(TEXT), 300, str(d / "a.json"), min_frequency=1)
    b = train_bpe(iter(TEXT[:1]), 280, str(d / "b.json"), min_frequency=1)
    assert a.sha256 != b.sha256
    return a, b


@pytest.fixture
def bpe_run(tmp_path, bpe_tokenizers):
    """A dataset dir (manifest + tokenizer.json) and a checkpoint trained 'on' it."""
    tok = bpe_tokenizers[0]
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tok.path, data / "tokenizer.json")
    write_manifest(str(data), make_manifest(tokenizer_manifest_entry(tok, "tokenizer.json"), [], {}, {},
                                            "test", "now"))
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=32, seq_len=32, vocab_size=tok.vocab_size)
    run = tmp_path / "run"
    _write_checkpoint(run, cfg, tok.sha256, str(data))
    return run, data, tok


def _cli(capsys, *args):
    try:
        rc = cli_main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_run_dir_resolves_to_latest_checkpoint(byte_run):
    assert resolve_checkpoint(byte_run).name == "step-00000003"
    assert resolve_checkpoint(byte_run / "checkpoints" / "step-00000003") == byte_run / "checkpoints" / "step-00000003"


def test_same_seed_same_text_other_seed_other_text(byte_run):
    lm = load_model(byte_run)
    s = dict(max_new_tokens=40, temperature=1.5, top_k=None, stop_at_eod=False)
    ids = lambda seed: generate_ids(lm.model, [104, 105], SampleConfig(seed=seed, **s), seq_len=16,
                                    vocab_size=257, eod_id=256)
    a, b, c = ids(7), ids(7), ids(8)
    assert a == b and len(a) == 40
    assert a != c
    # the padded embedding rows (257..319) are never sampled
    assert max(a + c) < 257


def test_top_k_1_and_temperature_0_are_greedy_argmax(byte_run):
    lm = load_model(byte_run)
    prompt = list(b"abc")
    # reference: argmax of the model's own logits, context cropped to seq_len
    ref = list(prompt)
    with torch.no_grad():
        for _ in range(25):  # longer than seq_len 16: exercises cropping
            logits = lm.model(torch.tensor([ref[-16:]]))[0, -1, :257]
            ref.append(int(logits.argmax()))
    for sample in (SampleConfig(max_new_tokens=25, top_k=1, temperature=1.0, seed=3, stop_at_eod=False),
                   SampleConfig(max_new_tokens=25, top_k=None, temperature=0.0, seed=4, stop_at_eod=False)):
        assert generate_ids(lm.model, prompt, sample, seq_len=16, vocab_size=257, eod_id=256) == ref[3:]


def test_top_k_samples_only_among_k_most_likely(byte_run):
    lm = load_model(byte_run)
    prompt = list(b"xy")
    new = generate_ids(lm.model, prompt, SampleConfig(max_new_tokens=30, top_k=3, temperature=5.0, seed=0,
                                                      stop_at_eod=False), seq_len=16, vocab_size=257, eod_id=256)
    seq = prompt + new
    outside_top1 = 0
    with torch.no_grad():
        for i in range(len(prompt), len(seq)):
            logits = lm.model(torch.tensor([seq[max(0, i - 16):i]]))[0, -1, :257]
            top = torch.topk(logits, 3).indices.tolist()
            assert seq[i] in top
            outside_top1 += seq[i] != top[0]
    assert outside_top1 > 0  # a hot temperature really samples, not argmax


def test_cli_generate_prints_prompt_and_completion(byte_run, capsys):
    rc, out, err = _cli(capsys, "generate", str(byte_run), "--prompt", "Hi", "--max-new-tokens", "8",
                        "--seed", "5", "--top-k", "1")
    assert rc == 0, err
    lm = load_model(byte_run)
    ids = generate_ids(lm.model, list(b"Hi"), SampleConfig(max_new_tokens=8, top_k=1), seq_len=16,
                       vocab_size=257, eod_id=256)
    expected = "Hi" + ByteTokenizer().decode(ids[:-1] if ids and ids[-1] == 256 else ids)
    assert out.rstrip("\n") == expected


def test_bpe_tokenizer_from_dataset_and_export_roundtrip(bpe_run, tmp_path):
    run, data, tok = bpe_run
    lm = load_model(run)
    assert lm.tokenizer.sha256 == tok.sha256 and lm.tokenizer.type == "bpe"
    sample = SampleConfig(max_new_tokens=12, temperature=1.0, top_k=20, seed=11, stop_at_eod=False)
    text = generate(run, "the quick", sample)
    assert text  # decodes through the BPE
    # the exported single file carries the tokenizer: same text even without the dataset
    exported = save_export(run, tmp_path / "model.pt")
    shutil.rmtree(data)
    assert generate(exported, "the quick", sample) == text


def test_missing_tokenizer_file_is_one_line_error(bpe_run, capsys):
    run, data, _ = bpe_run
    (data / "tokenizer.json").unlink()
    with pytest.raises(HpcllmError, match="tokenizer"):
        load_model(run)
    rc, out, err = _cli(capsys, "generate", str(run), "--prompt", "x", "--max-new-tokens", "2")
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "tokenizer.json" in err
    assert "Traceback" not in err


def test_changed_tokenizer_sha256_is_one_line_error(bpe_run, bpe_tokenizers, capsys):
    run, data, tok = bpe_run
    other = bpe_tokenizers[1]
    # the dataset's tokenizer replaced (manifest updated too): differs from the checkpoint's record
    shutil.copy(other.path, data / "tokenizer.json")
    write_manifest(str(data), make_manifest(tokenizer_manifest_entry(other, "tokenizer.json"), [], {}, {},
                                            "test", "now"))
    rc, out, err = _cli(capsys, "generate", str(run), "--prompt", "x", "--max-new-tokens", "2")
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "sha256" in err and tok.sha256[:12] in err and other.sha256[:12] in err


def test_not_a_checkpoint_is_one_line_error(tmp_path, capsys):
    rc, out, err = _cli(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert rc == 2 and err.count("\n") == 1 and str(tmp_path) in err


def test_generate_from_a_real_training_run(dataset, tmp_path, capsys):
    """End to end: `hpcllm train` writes the checkpoint, generate reads it back (its config,
    weights and recorded tokenizer) and greedy decoding matches the trained model's argmax."""
    from tests.train.conftest import TINY, run_train

    run = tmp_path / "run"
    run_train(["--data", str(dataset), "--out", str(run), "--steps", "3", "--ckpt-every", "0", *TINY])
    lm = load_model(run)
    assert lm.step == 3 and lm.tokenizer.type == "byte"
    from tests.train.conftest import ckpt_model

    state = ckpt_model(resolve_checkpoint(run))
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in state.items())
    prompt = list(b"The cluster ")
    ref = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ref.append(int(lm.model(torch.tensor([ref[-lm.seq_len:]]))[0, -1, :257].argmax()))
    rc, out, err = _cli(capsys, "generate", str(run), "--prompt", "The cluster ", "--top-k", "1",
                        "--max-new-tokens", "10")
    assert rc == 0, err
    new = ref[len(prompt):]
    if 256 in new:
        new = new[:new.index(256)]
    assert out.rstrip("\n") == "The cluster " + ByteTokenizer().decode(new)


def test_generate_runs_without_mpi(byte_run):
    """generate is a plain process: neither mpi4py nor Horovod gets imported (no MPI init,
    works on a login node or a laptop)."""
    import subprocess
    import sys

    code = ("import sys; from hpcllm.cli import main; main(['generate', sys.argv[1], '--prompt', 'a', "
            "'--max-new-tokens', '2']); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mpi4py', 'horovod')))")
    r = subprocess.run([sys.executable, "-c", code, str(byte_run)], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_cli_prompts_file_batches_and_matches_one_prompt_at_a_time(byte_run, capsys, tmp_path):
    import json

    f = tmp_path / "p.jsonl"
    prompts = ["Hi", "a longer prompt", "x"]
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    rc, out, err = _cli(capsys, "generate", str(byte_run), "--prompts-file", str(f), "--max-new-tokens", "6",
                        "--temperature", "0", "--batch-size", "2", "--output", "jsonl")
    assert rc == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["prompt"] for g in got] == prompts and "tokens/s" in err
    for g in got:
        rc, single, err = _cli(capsys, "generate", str(byte_run), "--prompt", g["prompt"], "--max-new-tokens", "6",
                               "--temperature", "0", "--no-kv-cache")
        assert rc == 0 and single.rstrip("\n") == g["prompt"] + g["completion"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    rc, out, err = _cli(capsys, "generate", str(byte_run), "--prompts-file", str(bad))
    assert rc == 2 and err.strip().splitlines() == [f'error: {bad}:2: expected a JSON string or an object with a "prompt" string']


def test_top_p_keeps_the_smallest_set_reaching_p_and_stop_cuts_the_text(byte_run, capsys):
    from hpcllm.infer.generate import cut_at_stop, next_token_distribution

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = next_token_distribution(logits, 4, 1.0, None, top_p=0.75)
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert torch.allclose(next_token_distribution(logits, 4, 1.0, None, top_p=0.4), torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(next_token_distribution(logits, 4, 1.0, None, top_p=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert cut_at_stop("abc\ndef", "\n") == "abc" and cut_at_stop("abc", "x") == "abc"
    rc, out, err = _cli(capsys, "generate", str(byte_run), "--prompt", "Hi", "--max-new-tokens", "12",
                        "--temperature", "0")
    full = out.rstrip("\n")[2:]
    assert rc == 0 and len(full) > 2
    rc, out, err = _cli(capsys, "generate", str(byte_run), "--prompt", "Hi", "--max-new-tokens", "12",
                        "--temperature", "0", "--stop", full[1:3])
    assert rc == 0 and out.rstrip("\n") == "Hi" + full[:full.index(full[1:3])]
    rc, out, err = _cli(capsys, "generate", str(byte_run), "--prompt", "Hi", "--top-p", "0")
    assert rc == 2 and "--top-p" in err and "Traceback" not in err
