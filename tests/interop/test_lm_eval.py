"""lm-evaluation-harness: hpcllm's adapter (registered as "hpcllm") and lm-eval's own "hf"
backend on the exported model give the same log-likelihoods on the shipped tasks (a
perplexity task and a multiple-choice one); generate_until stops at the task's strings."""
from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from tests.interop.test_hf import SHAPES, _export_file  # noqa: E402


def _flat(samples):
    out = []
    for s in samples:
        for r in s["resps"]:
            for x in (r if isinstance(r, (list, tuple)) else [r]):
                out.append(x)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_adapter_equals_hf_backend_on_the_shipped_tasks(tmp_path, name):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from hpcllm.interop.hf_export import export_hf
    from hpcllm.interop.lm_eval_adapter import TASKS_DIR, run_tasks

    _export_file(SHAPES[name], tmp_path / "m.pt")
    export_hf(tmp_path / "m.pt", tmp_path / "hf")
    tasks = ["hpcllm_ppl", "hpcllm_mc"]
    ours = run_tasks(tmp_path / "m.pt", tasks, log_samples=True, batch_size=4)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
                             tasks=tasks, task_manager=TaskManager(include_path=[str(TASKS_DIR)]),
                             log_samples=True, bootstrap_iters=0)
    for t in tasks:
        a, b = _flat(ours["samples"][t]), _flat(theirs["samples"][t])
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            if isinstance(x, tuple):
                assert x[0] == pytest.approx(y[0], rel=1e-5, abs=1e-5) and x[1] == y[1]
            else:
                assert x == pytest.approx(y, rel=1e-5)
    r = ours["results"]
    assert r["hpcllm_mc"]["acc,none"] == theirs["results"]["hpcllm_mc"]["acc,none"]
    assert r["hpcllm_ppl"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["hpcllm_ppl"]["bits_per_byte,none"], rel=1e-6)
    assert len(ours["samples"]["hpcllm_mc"]) == 20 and len(ours["samples"]["hpcllm_ppl"]) == 10


def test_generate_until_and_rolling_windows(tmp_path):
    from lm_eval.api.instance import Instance

    from hpcllm.infer.generate import SampleConfig, generate_ids, load_model
    from hpcllm.interop.lm_eval_adapter import HpcllmLM

    _export_file(SHAPES["llama"], tmp_path / "m.pt")
    lm = HpcllmLM(pretrained=str(tmp_path / "m.pt"), batch_size=2)
    loaded = load_model(tmp_path / "m.pt")
    full = loaded.tokenizer.decode(generate_ids(loaded.model, list(b"def f("), SampleConfig(
        max_new_tokens=20, temperature=0, stop_at_eod=False), seq_len=64, vocab_size=257))
    stop = full[5:7]
    req = Instance(request_type="generate_until", doc={}, arguments=("def f(", {"until": [stop], "max_gen_toks": 20}),
                   idx=0)
    (text,) = lm.generate_until([req])
    assert stop not in text and full.startswith(text) and len(text) <= full.index(stop)
    # a text longer than seq_len (64) is scored in disjoint windows: the sum of every token's
    # log-probability exactly once equals the likelihood computed window by window by hand
    text = "x = 1\n" * 30
    (ll,) = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)])
    import torch

    ids = [256] + list(text.encode())
    total = 0.0
    with torch.no_grad():
        for start in range(1, len(ids), 64):
            end = min(start + 64, len(ids))
            window = ids[max(0, end - 65):end]
            logp = torch.log_softmax(loaded.model(torch.tensor([window[:-1]])), -1)[0]
            n = end - start
            tgt = torch.tensor(window[-n:])
            total += float(logp[-n:].gather(1, tgt[:, None]).sum())
    assert ll == pytest.approx(total, rel=1e-5)


def test_eval_cli_runs_the_shipped_tasks_offline(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.train.conftest import REPO

    _export_file(SHAPES["gpt2"], tmp_path / "m.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_OFFLINE", None)  # the command sets it itself
    r = subprocess.run([sys.executable, "-m", "hpcllm", "eval", str(tmp_path / "m.pt"), "--tasks",
                        "hpcllm_mc,hpcllm_ppl", "--limit", "4", "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= out["hpcllm_mc"]["acc,none"] <= 1 and out["hpcllm_ppl"]["bits_per_byte,none"] > 0
    r = subprocess.run([sys.executable, "-m", "hpcllm", "eval", str(tmp_path / "m.pt"), "--tasks", "nope"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "unknown task nope" in r.stderr and "Traceback" not in r.stderr
