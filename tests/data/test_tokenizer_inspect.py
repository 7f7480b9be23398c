"""Tokenizers (byte, BPE train/load) and `hpcllm inspect` / `hpcllm tokenizer train` via the CLI."""
import json

import numpy as np
import pytest

from hpcllm.data.tokenizer import ByteTokenizer, load_tokenizer
from hpcllm.errors import HpcllmError
from tests.data.conftest import hpcllm, make_docs, write_jsonl


def test_byte_tokenizer_contract():
    t = load_tokenizer(None)
    assert isinstance(t, ByteTokenizer) and load_tokenizer("byte").sha256 == t.sha256
    assert (t.type, t.vocab_size, t.eod_id) == ("byte", 257, 256)
    s = "héllo\n日本\t"
    assert t.encode(s) == list(s.encode("utf-8")) and t.decode(t.encode(s) + [256]) == s
    assert t.encode_batch([s, "a"]) == [t.encode(s), [97]]
    assert np.array_equal(t.encode_batch_np([s])[0], np.frombuffer(s.encode(), np.uint8))


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HpcllmError, match="not a valid tokenizers tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(HpcllmError, match="does not exist"):
        load_tokenizer(str(tmp_path / "none.json"))


@pytest.fixture(scope="module")
def dataset_and_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = write_jsonl(d / "c.jsonl", make_docs(300, seed=9))
    r = hpcllm("tokenizer", "train", src, "--vocab-size", "320", "--out", d / "tok.json")
    assert r.returncode == 0, r.stderr
    r = hpcllm("preprocess", f"code={src}:2", "--out", d / "ds", "--tokenizer", d / "tok.json", "--val-fraction",
               "0.2", "--shard-tokens", "3000", "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    return d, src


def test_tokenizer_train_cli_roundtrips(dataset_and_tok):
    d, _ = dataset_and_tok
    t = load_tokenizer(str(d / "tok.json"))
    assert t.type == "bpe" and t.eod_id == 0 and 257 < t.vocab_size <= 320
    s = "doc 1: ζήτα délta 日本 \n\t end"
    assert t.decode(t.encode(s)) == s
    assert len(t.encode("alpha beta gamma alpha beta gamma")) < len("alpha beta gamma alpha beta gamma")


def test_inspect_json_show_and_verify(dataset_and_tok):
    d, src = dataset_and_tok
    r = hpcllm("inspect", d / "ds", "--json", "--show", "2", "--verify")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    m = rep["manifest"]
    assert m["tokenizer"]["type"] == "bpe" and m["corpora"] == [{"name": "code", "weight": 2.0}]
    assert rep["problems"] == [] and rep["verified"]
    assert len(rep["documents"]) == 2 and rep["documents"][0].startswith("doc ")
    r = hpcllm("inspect", d / "ds")
    assert r.returncode == 0 and "tokenizer bpe" in r.stdout and "train/shard-00000.h5" in r.stdout
    # --verify catches a corrupted shard: exit 2, one line naming it
    shard = d / "ds" / m["splits"]["train"]["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = hpcllm("inspect", d / "ds", "--verify")
    assert r.returncode == 2 and "shard-00001.h5: sha256 differs" in r.stderr and "Traceback" not in r.stderr


def test_long_documents_are_encoded_in_pieces_with_identical_tokens(tmp_path):
    """Memory bound for huge documents: cut at safe newlines, the tokens must not change."""
    import random

    from hpcllm.data.tokenizer import train_bpe

    rng = random.Random(0)
    words = ["def", "x", "  ", "\t", "'s", "ζήτα", "日本", "(", ")", ":", "#", "42", "a.b", "'", '"', "\\n"]
    lines = []
    for _ in range(3000):
        indent = rng.choice(["", " ", "    ", "\t", "        "])
        body = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        lines.append(indent + body + rng.choice(["", " ", "  ", "\t"]))
    text = "\n".join(lines) + "\n\n  \n"
    tok = train_bpe(iter([text]), 400, str(tmp_path / "t.json"))
    tok.BATCH_CHARS, tok.PIECE_CHARS = 3000, 700  # many cuts on a modest text
    assert tok._can_split and len(tok._pieces(text)) > 20
    docs = [text, text[:2500], text[100:9000], "short one"]
    got = tok.encode_batch_np(docs)
    for g, d in zip(got, docs):
        assert g.tolist() == tok._tok.encode(d, add_special_tokens=False).ids
