"""`hpcllm plan` end to end: JSON, dataset comparison, device profiles, --emit-slurm, errors."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_subprocess(*args):
    """The real console entry point in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hpcllm", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def hpcllm(capsys):
    """`hpcllm ARGS` through hpcllm.cli.main in this process (torch is imported once)."""
    from hpcllm.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args]) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return run


@pytest.fixture
def plan_json(hpcllm):
    def run(*args):
        r = hpcllm("plan", "--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    return run


def test_json_compute_optimal_point_for_gopher_compute(plan_json):
    p = plan_json("--compute", "5.76e23", "--nodes", "64")
    assert abs(p["params"] / 70e9 - 1) < 0.10 and abs(p["tokens"] / 1.4e12 - 1) < 0.10
    assert p["methods"]["parametric"]["params"] < p["params"]  # both methods reported
    best = p["recommended"]
    assert best is not None and best["fits"]
    # the recommendation is the fastest layout that fits, and its memory is a byte breakdown
    fitting = [L for L in p["layouts"] if L["fits"]]
    assert best["tokens_per_s"] == max(L["tokens_per_s"] for L in fitting)
    m = best["memory"]
    parts = ["params", "grads", "optimizer", "weight_copies", "activations", "working", "zero_buffers", "comm_buffers",
             "overhead", "allocator_slack"]
    assert all(isinstance(m[k], int) for k in parts)
    assert m["total"] == sum(m[k] for k in parts)
    assert m["total"] <= p["device"]["capacity_bytes"]


def test_gpu_hours_budget(plan_json):
    p = plan_json("--gpu-hours", "1e5", "--device", "h100", "--mfu", "0.5")
    assert p["compute"] == pytest.approx(1e5 * 3600 * 989e12 * 0.5)
    assert p["budget"]["device"] == "h100-80gb"


def test_table_output_names_model_layout_and_command(hpcllm):
    r = hpcllm("plan", "--params", "1.3B", "--device", "a100-40gb", "--nodes", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "chinchilla *" in out and "preset 1.3B" in out and "recommended:" in out
    assert "run it: hpcllm slurm train" in out and "--nodes 2" in out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from hpcllm.data.preprocess import run_preprocess

    d = tmp_path_factory.mktemp("plan-data")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox " * 20 for i in range(50)))
    manifest = run_preprocess([str(corpus)], str(d / "ds"))
    return d / "ds", manifest


def test_data_comparison_reads_the_manifest(dataset, hpcllm, plan_json):
    path, manifest = dataset
    p = plan_json("--model", "tiny", "--device", "cpu", "--data", path, "--precision", "fp32")
    assert p["device"]["kind"] == "cpu" and p["recommended"]["fits"]
    d = p["data"]
    assert d["train_tokens"] == manifest["splits"]["train"]["tokens"]
    assert d["vocab_size"] == manifest["tokenizer"]["vocab_size"]
    assert d["needed_tokens"] == pytest.approx(p["preset"]["tokens"])
    assert d["enough"] is (d["train_tokens"] >= d["needed_tokens"])
    assert d["epochs"] == pytest.approx(d["needed_tokens"] / d["train_tokens"])
    r = hpcllm("plan", "--model", "tiny", "--device", "cpu", "--data", path, "--precision", "fp32")
    assert "SHORT" in r.stdout or "enough" in r.stdout


def test_emit_slurm_script_is_what_hpcllm_slurm_train_writes(dataset, tmp_path, hpcllm, plan_json):
    path, _ = dataset
    p = plan_json("--params", "1.3B", "--device", "a100-80gb", "--nodes", "2", "--data", path,
                  "--pipeline-stages", "2")
    cmd = p["slurm_command"]
    best = p["recommended"]
    assert cmd[:3] == ["hpcllm", "slurm", "train"]
    for flag, value in [("--nodes", "2"), ("--ntasks-per-node", "8"), ("--pipeline-stages", "2"),
                        ("--micro-batch", str(best["micro_batch"])), ("--accum", str(best["microbatches"]))]:
        assert cmd[cmd.index(flag) + 1] == value
    ours = tmp_path / "plan.sbatch"
    r = hpcllm("plan", "--params", "1.3B", "--device", "a100-80gb", "--nodes", "2", "--data", path,
               "--pipeline-stages", "2", "--emit-slurm", ours)
    assert r.returncode == 0, r.stderr
    theirs = tmp_path / "slurm.sbatch"
    r = hpcllm(*cmd[1:], "-o", theirs)
    assert r.returncode == 0, r.stderr
    assert ours.read_text() == theirs.read_text()
    assert "--pipeline-stages 2" in ours.read_text()


def test_user_defined_device_profile(tmp_path, plan_json):
    toml = tmp_path / "mi250.toml"
    toml.write_text('[device]\nname = "mi250x-gcd"\nmemory_gb = 64\ndevices_per_node = 8\n'
                    'peak_tflops = { bf16 = 191.5, fp32 = 47.9 }\nintra_node_gbps = 100\ninter_node_gbps = 100\n')
    p = plan_json("--params", "1.3B", "--device", toml)
    assert p["device"]["name"] == "mi250x-gcd"
    assert p["device"]["memory_bytes"] == 64 * 1024**3
    assert p["cluster"]["devices_per_node"] == 8
    h = plan_json("--params", "1.3B", "--device", "h100")
    # same layout, a slower device: slower steps
    assert p["recommended"]["time"]["compute"] > h["recommended"]["time"]["compute"]
    # a built-in base with one key changed
    half = tmp_path / "h100-40.toml"
    half.write_text('[device]\nbase = "h100"\nmemory_gb = 40\n')
    q = plan_json("--params", "1.3B", "--device", half)
    assert q["device"]["peak_flops"] == h["device"]["peak_flops"]
    assert q["device"]["memory_bytes"] == 40 * 1024**3 and q["device"]["name"] == "h100-40"


@pytest.mark.parametrize("args,words", [
    (["--compute", "-5"], "--compute"),
    (["--compute", "lots"], "cannot parse"),
    (["--compute", "1e20", "--params", "1B"], "not both"),
    (["--compute", "1e20", "--gpu-hours", "10"], "not both"),
    ([], "budget"),
    (["--params", "1B", "--device", "tpu9"], "unknown device"),
    (["--params", "1B", "--model", "huge"], "unknown preset"),
    (["--params", "1B", "--data", "/nonexistent/ds"], "manifest.json"),
    (["--params", "1B", "--mfu", "1.5"], "--mfu"),
    (["--params", "1B", "--global-batch", "3", "--nodes", "2", "--pipeline-stages", "1"], "layout"),
    (["--params", "1B", "--device", "/nonexistent/x.toml"], "cannot read"),
    (["--params", "1B", "--devices-per-node", "0"], "--devices-per-node"),
    (["--params", "1B", "--global-batch", "0"], "--global-batch"),
    (["--params", "1B", "--nodes", "0"], "--nodes"),
    (["--params", "1B", "--tokens-per-param", "-2"], "--tokens-per-param -2: must be > 0"),
])
def test_bad_input_is_one_line_error(args, words, hpcllm):
    r = hpcllm("plan", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_toml_profile_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[device]\nmemory_gb = -1\npeak_tflops = { bf16 = 1 }\n")
    r = run_subprocess("plan", "--params", "1B", "--device", bad)  # the console script, fresh process
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "memory_gb" in r.stderr


def test_sparse_attention_and_tensor_parallel_in_the_plan(plan_json, hpcllm):
    """--attention local at 16k: the time model counts the attended keys (a faster step than
    dense), and the emitted command trains that model; --tensor-parallel fixes T."""
    args = ["--model", "1.3B", "--seq-len", "16384", "--device", "h100", "--nodes", "1", "--global-batch", "32"]
    dense = plan_json(*args)
    local = plan_json(*args, "--attention", "local", "--attention-window", "256")
    assert local["recommended"]["time"]["total"] < 0.7 * dense["recommended"]["time"]["total"]
    cmd = local["slurm_command"]
    assert cmd[cmd.index("--attention") + 1] == "local" and cmd[cmd.index("--attention-window") + 1] == "256"
    tp = plan_json(*args, "--tensor-parallel", "4")
    assert all(L["tensor_parallel"] == 4 for L in tp["layouts"])
    r = hpcllm("plan", *args, "--attention", "local", "--attention-random", "2")
    assert r.returncode == 2 and "bigbird" in r.stderr
