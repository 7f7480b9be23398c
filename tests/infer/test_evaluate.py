"""`hpcllm eval`: loss, perplexity and bits per byte over every window of a split, one
process or several MPI ranks, and the tokenizer check."""
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcllm.data.shards import open_tokens, read_manifest
from hpcllm.data.tokenizer import train_bpe
from hpcllm.infer.evaluate import evaluate, rank_windows, token_bytes
from hpcllm.infer.generate import load_model
from hpcllm.model.gpt import GPTConfig
from tests.infer.conftest import cli, write_checkpoint

SEQ = 32
CFG = GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=SEQ, vocab_size=257)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # a val split of a few thousand tokens spread over several shards
    d = tmp_path_factory.mktemp("evaldata") / "ds"
    from hpcllm.data.preprocess import run_preprocess
    from tests.train.conftest import make_text

    src = d.parent / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_text(300, seed=3)))
    run_preprocess([str(src)], str(d), tokenizer="byte", val_fraction=0.2, workers=1, shard_tokens=1500)
    assert len(read_manifest(str(d))["splits"]["val"]["shards"]) > 1
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "run"
    write_checkpoint(run, CFG, seed=5)
    return run


def _val_tokens(data) -> np.ndarray:
    m = read_manifest(str(data))
    return np.concatenate([np.asarray(open_tokens(str(data / s["path"]))) for s in m["splits"]["val"]["shards"]])


def test_loss_is_the_mean_over_every_window_computed_by_hand(run, data):
    lm = load_model(run)
    tokens = _val_tokens(data).astype(np.int64)
    n = (len(tokens) - 1) // SEQ
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):  # every non-overlapping window, one at a time
            t = torch.from_numpy(tokens[w * SEQ:w * SEQ + SEQ + 1])
            logits = lm.model(t[None, :-1])[0]
            nll += float(F.cross_entropy(logits, t[1:], reduction="sum"))
            count += SEQ
    for bs in (1, 7):  # batches that do not divide the windows
        r = evaluate(lm, data, "val", batch_size=bs)
        assert r["windows"] == n and r["tokens"] == n * SEQ == count
        assert r["loss"] == pytest.approx(nll / count, rel=1e-6)
        assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_bits_per_byte_of_the_byte_tokenizer(run, data):
    lm = load_model(run)
    r = evaluate(lm, data, "val", batch_size=16)
    tokens = _val_tokens(data)
    targets = tokens[1:1 + r["windows"] * SEQ]
    # each target byte is one byte; the EOD token (256) none
    assert r["bytes"] == int((targets != 256).sum()) and r["bytes"] < r["tokens"]
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / r["bytes"], rel=1e-12)


def test_every_window_is_counted_exactly_once_over_ranks(run, data):
    for n in (0, 1, 5, 13, 100):
        for world in range(1, 8):
            covered = [w for r in range(world) for w in rank_windows(n, r, world)]
            assert covered == list(range(n)), (n, world)
    lm = load_model(run)
    whole = evaluate(lm, data, "val", batch_size=4)
    parts = [evaluate(lm, data, "val", batch_size=4, rank=r, world=3) for r in range(3)]
    assert sum(p["windows"] for p in parts) == whole["windows"]
    assert sum(p["bytes"] for p in parts) == whole["bytes"]
    loss = sum(p["loss"] * p["tokens"] for p in parts) / sum(p["tokens"] for p in parts)
    assert loss == pytest.approx(whole["loss"], rel=1e-6)


def test_token_bytes_of_a_byte_level_bpe_add_up_to_the_utf8_length(tmp_path):
    texts = ["café au lait, 3€ — naïve façade\n", "the quick brown fox. " * 4, "日本語のテキスト"]
    tok = train_bpe(iter(texts * 5), 300, str(tmp_path / "t.json"), min_frequency=1)
    table = token_bytes(tok, 320)
    for text in texts + ["fox café 日本"]:
        ids = tok.encode(text)
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
    assert table[tok.eod_id] == 0 and table[tok.vocab_size:].sum() == 0


def test_cli_text_and_json_with_int8_beside_the_original(run, data, capsys):
    rc, out, err = cli(capsys, "eval", run, "--data", data, "--int8")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert "windows" in lines[0] and lines[1].lstrip().startswith("fp32: loss")
    assert lines[2].lstrip().startswith("int8: loss") and "% vs fp32" in lines[2]
    rc, out, err = cli(capsys, "eval", run, "--data", data, "--int8", "--json", "--batch-size", "3")
    assert rc == 0, err
    r = json.loads(out)
    fp32, int8 = r["results"]["fp32"], r["results"]["int8"]
    assert fp32 == pytest.approx(evaluate(load_model(run), data, "val"), rel=1e-6)
    assert r["int8_perplexity_change"] == pytest.approx(int8["perplexity"] / fp32["perplexity"] - 1)
    assert int8["windows"] == fp32["windows"] and int8["loss"] != fp32["loss"]


def test_mismatched_tokenizer_is_one_line_error(run, tmp_path, capsys):
    from hpcllm.data.preprocess import run_preprocess
    from tests.train.conftest import make_text

    texts = make_text(60, seed=1)
    tok = train_bpe(iter(texts), 300, str(tmp_path / "bpe.json"), min_frequency=1)
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_preprocess([str(src)], str(tmp_path / "bpe-ds"), tokenizer=tok.path, val_fraction=0.2, workers=1)
    capsys.readouterr()  # preprocess's own summary
    rc, out, err = cli(capsys, "eval", run, "--data", tmp_path / "bpe-ds")
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert "tokenizer sha256" in err and tok.sha256[:12] in err and "Traceback" not in err
    rc, out, err = cli(capsys, "eval", run, "--data", tmp_path / "bpe-ds", "--split", "nope")
    assert rc == 2 and err.count("\n") == 1


@pytest.mark.mpi
def test_two_mpi_ranks_equal_one_process(run, data):
    from tests.cluster.mpi import run_mpi

    cmd = [sys.executable, "-m", "hpcllm", "eval", str(run), "--data", str(data), "--json", "--batch-size", "4"]
    res = run_mpi(cmd, np=2, env={"OMP_NUM_THREADS": "1"}, timeout=180).check()
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, res.output()  # rank 0 prints, rank 1 does not
    two = json.loads(lines[0])["results"]["fp32"]
    one = evaluate(load_model(run), data, "val", batch_size=4)
    for key in ("windows", "tokens", "bytes"):
        assert two[key] == one[key]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-6)
