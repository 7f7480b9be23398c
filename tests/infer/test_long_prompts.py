"""Prompts longer than the model's seq_len: truncated from the left, alike for --prompt and
--prompts-file, and said so (a stderr note for text, a field in JSONL)."""
import json

import pytest

from hpcllm.model.gpt import GPTConfig
from tests.infer.conftest import cli, write_checkpoint

SEQ = 16
LONG = "abcdefghijklmnopqrstuvwxyz0123"  # 30 byte tokens: 14 past seq_len
GREEDY = ["--max-new-tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("long") / "run"
    write_checkpoint(run, GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=SEQ, vocab_size=257), seed=2)
    return run


def test_single_prompt_is_truncated_from_the_left_with_a_note(run, capsys):
    rc, out, err = cli(capsys, "generate", run, "--prompt", LONG, *GREEDY)
    assert rc == 0, err
    assert "note: --prompt has 30 tokens, more than the model's seq_len 16: its first 14 tokens were dropped" in err
    assert out.startswith(LONG)  # the prompt is printed as given
    # the model saw the last 16 tokens: the same completion as that prompt alone, with no note
    rc, tail, err_tail = cli(capsys, "generate", run, "--prompt", LONG[-SEQ:], *GREEDY)
    assert rc == 0 and "note" not in err_tail
    assert out[len(LONG):] == tail[SEQ:]
    for kv in ("--kv-cache", "--no-kv-cache"):
        rc, again, _ = cli(capsys, "generate", run, "--prompt", LONG, *GREEDY, kv)
        assert again == out


def test_prompts_file_truncates_alike_and_reports_it(run, tmp_path, capsys):
    rc, single, _ = cli(capsys, "generate", run, "--prompt", LONG, *GREEDY)
    f = tmp_path / "p.txt"
    f.write_text(f"short\n{LONG}\n")
    rc, out, err = cli(capsys, "generate", run, "--prompts-file", f, *GREEDY)
    assert rc == 0, err
    assert "note: prompt 2 has 30 tokens, more than the model's seq_len 16: its first 14 tokens were dropped" in err
    assert "prompt 1" not in err
    assert out.splitlines()[1] == single.rstrip("\n")
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": LONG}) + "\n")
    rc, out, err = cli(capsys, "generate", run, "--prompts-file", j, *GREEDY, "--output", "jsonl", "--batch-size", "2")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt_tokens_dropped"] for r in rows] == [0, 14]
    assert LONG + rows[1]["completion"] == single.rstrip("\n")
    assert "note:" not in err  # JSONL carries it in the field
