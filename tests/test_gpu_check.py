"""scripts/gpu_check.py and scripts/gpu_prepare.py on a CPU machine: the one-line answer without
a CUDA device, the --dry-run plan, argument errors, the step runner's incremental JSON (a failed
step never loses the others), the process runner's timeouts, the metrics and junit parsing and
the table, a CPU rehearsal of one training step (metrics, plan prediction, the run ended after
its last record), and the wheel preparation's dry run (no network)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "scripts" / "gpu_check.py"
PREPARE = REPO / "scripts" / "gpu_prepare.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc():
    return _load(CHECK, "gpu_check_under_test")


@pytest.fixture(scope="module")
def gp():
    return _load(PREPARE, "gpu_prepare_under_test")


def _run(*args, env=None, timeout=120):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, str(CHECK), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e)


def _args(tmp_path, **kw):
    base = dict(deadline=120.0, quick=False, scratch=str(tmp_path / "scratch"), logs=None,
                wheels=str(tmp_path / "wheels"), only=None, skip=None, micro_batch_large=None,
                micro_batch_small=None)
    base.update(kw)
    return SimpleNamespace(**base)


# --------------------------------------------------------------------------- the command line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the check would run")
def test_without_a_cuda_device_one_line_and_exit_0(tmp_path):
    out = tmp_path / "r.json"
    r = _run("--out", out)
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 0
    assert len(lines) == 1 and lines[0].startswith("no CUDA device ("), lines
    assert "CPU build" in lines[0] or "sees none" in lines[0]
    assert not out.exists()  # nothing written on a CPU machine


def test_without_torch_one_line_and_exit_0(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: no torch here')\n")
    r = _run(env={"PYTHONPATH": str(fake.parent)})
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 0 and lines == [
        "no CUDA device (torch is not importable: simulated: no torch here): nothing to check; "
        "run scripts/gpu_check.py on a machine with an NVIDIA GPU"]


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, gc):
    r = _run("--dry-run", "--out", tmp_path / "x.json", "--wheels", tmp_path)
    assert r.returncode == 0, r.stderr
    for name in gc.step_names():
        assert f"  {name} " in r.stdout, name
    assert "deadline 480 s" in r.stdout and str(tmp_path / "x.json") in r.stdout
    assert "--model 1.3B --steps 20 --micro-batch 8 --precision bf16 --device cuda" in r.stdout
    assert "--compile" in r.stdout
    assert "no CUDA device" not in r.stdout and not (tmp_path / "x.json").exists()
    q = _run("--dry-run", "--quick")
    assert q.returncode == 0 and "(quick)" in q.stdout
    quick = {s.name for s in gc.make_steps() if s.quick}
    for name in gc.step_names():
        assert (f"  {name} " in q.stdout) == (name in quick), name
    assert "--model 1.3B --steps 10" in q.stdout
    o = _run("--dry-run", "--only", "env,horovod,matmul", "--skip", "horovod", "--deadline", "90")
    assert o.returncode == 0
    listed = [ln.split()[0] for ln in o.stdout.splitlines() if " budget " in ln and ln.startswith("  ")]
    assert listed == ["env", "matmul"] and "deadline 90 s" in o.stdout


def test_unknown_steps_and_bad_deadline_are_usage_errors():
    r = _run("--skip", "env,bogus", "--dry-run")
    assert r.returncode == 2 and "--skip bogus: unknown step(s)" in r.stderr and "train_1.3b_bf16" in r.stderr
    r = _run("--only", "nope")
    assert r.returncode == 2 and "--only nope" in r.stderr
    r = _run("--deadline", "0", "--dry-run")
    assert r.returncode != 0 and "--deadline must be > 0" in r.stderr
    r = _run("--list")
    assert r.returncode == 0 and r.stdout.split()[:2] == ["env", "install"]


def test_makefile_target_runs_the_script():
    r = subprocess.run(["make", "-s", "gpu-check", "GPU_CHECK_ARGS=--dry-run --quick"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gpu-check plan:" in r.stdout and "(quick)" in r.stdout
    assert "gpu-check" in subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True).stdout


# --------------------------------------------------------------------------- the step runner and its JSON


def test_steps_are_recorded_incrementally_and_a_failure_loses_nothing(tmp_path, gc):
    out = tmp_path / "res" / "check.json"
    seen = {}

    def ok(ck, budget):
        assert budget <= 10
        return {"value": 42}

    def boom(ck, budget):
        raise RuntimeError("simulated crash")

    def failed(ck, budget):
        raise gc.StepFailed("ran, measured, missed", {"measured": 1.5})

    def skip(ck, budget):
        raise gc.Skip("no such tool here")

    def look(ck, budget):  # the file on disk while this step runs
        seen.update(json.loads(out.read_text()))
        return {}

    steps = [gc.Step("a", 10, 1, "a done step", fn=ok), gc.Step("b", 10, 1, "a crashing step", fn=boom),
             gc.Step("c", 10, 1, "a failing step", fn=failed), gc.Step("d", 10, 1, "a skipping step", fn=skip),
             gc.Step("e", 10, 1, "needs b", needs=("b",), fn=ok), gc.Step("f", 10, 1, "looks", fn=look),
             gc.Step("g", 10, 10_000, "too long for the deadline", fn=ok)]
    ck = gc.Check(_args(tmp_path), steps, out, device={"name": "Test GPU", "total_memory_bytes": 2 ** 34})
    res = ck.run()
    on_disk = json.loads(out.read_text())
    assert on_disk["format"] == "hpcllm-gpu-check" and on_disk["complete"] is True and on_disk["finished"]
    st = on_disk["steps"]
    assert st["a"]["status"] == "done" and st["a"]["value"] == 42 and st["a"]["seconds"] >= 0
    assert st["b"]["status"] == "failed" and st["b"]["reason"] == "RuntimeError: simulated crash"
    assert "simulated crash" in st["b"]["traceback"]
    assert st["c"] == {**st["c"], "status": "failed", "reason": "ran, measured, missed", "measured": 1.5}
    assert st["d"]["status"] == "skipped" and st["d"]["reason"] == "no such tool here"
    assert st["e"]["status"] == "skipped" and st["e"]["reason"] == "needs step b (failed)"
    assert st["g"]["status"] == "skipped" and st["g"]["reason"].startswith("not enough time left")
    # while f ran, the file already held every earlier step, and f as running
    assert seen["steps"]["a"]["status"] == "done" and seen["steps"]["b"]["status"] == "failed"
    assert seen["steps"]["f"]["status"] == "running" and seen["steps"]["g"]["status"] == "pending"
    assert res["summary"]["status_counts"] == {"done": 2, "failed": 2, "skipped": 3}
    assert [p.name for p in out.parent.iterdir()] == ["check.json"]  # no temporary files left
    table = gc.render_table(on_disk)
    assert "Test GPU" in table and "a crashing step" not in table and "RuntimeError: simulated crash" in table


def test_write_json_atomic_keeps_the_old_file_when_writing_fails(tmp_path, gc):
    class Unprintable:
        def __str__(self):
            raise ValueError("cannot be written")

    p = tmp_path / "x.json"
    gc.write_json_atomic(p, {"n": 1})
    with pytest.raises(ValueError, match="cannot be written"):
        gc.write_json_atomic(p, {"bad": Unprintable()})
    assert json.loads(p.read_text()) == {"n": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_run_process_ends_children_on_timeout_and_on_request(tmp_path, gc):
    code = "import time, sys; print('started', flush=True); time.sleep(60)"
    t = time.monotonic()
    r = gc.run_process([sys.executable, "-c", code], timeout=1.5, log=tmp_path / "a.log")
    assert r.timed_out and not r.stopped and r.rc != 0 and time.monotonic() - t < 20
    assert "started" in r.output and Path(r.log).read_text().startswith("$ ")
    flag = tmp_path / "flag"
    r = gc.run_process([sys.executable, "-c", f"import time, pathlib; pathlib.Path({str(flag)!r}).touch(); "
                        "time.sleep(60)"], timeout=30, stop=flag.exists)
    assert r.stopped and not r.timed_out and r.seconds < 20
    r = gc.run_process([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], timeout=30)
    assert r.rc == 3 and not r.timed_out and r.output == "x\n"
    r = gc.run_process(["/nonexistent/tool"], timeout=5)
    assert r.rc is None and "cannot start" in r.output


def test_summarize_metrics_takes_the_steps_after_warm_up(gc):
    recs = [{"step": i, "loss": 5.0 - i / 10, "tokens_per_s": 1000.0 * (1 if i <= 3 else 10 + i), "mfu": 0.1 * i,
             "step_time_s": 1.0 / i, "skipped": int(i == 2), "peak_mem_bytes": [100 * i], "model_state_bytes": [7],
             "loss_scale": 1024.0} for i in range(1, 8)]
    recs.insert(3, {"step": 3, "val_loss": 4.0})  # an eval-only line is not a step
    s = gc.summarize_metrics(recs)
    assert s["steps_logged"] == 7 and s["steps_measured"] == 4
    assert s["tokens_per_s"] == pytest.approx(1000 * (10 + 5.5)) and s["tokens_per_s_best"] == 17000
    assert s["peak_alloc_bytes"] == 700 and s["model_state_bytes"] == 7 and s["skipped_steps"] == 1
    assert s["loss_first"] == pytest.approx(4.9) and s["loss_scale_last"] == 1024.0
    assert gc.summarize_metrics([]) == {"steps_logged": 0}


def test_plan_prediction_for_the_1p3b_run_on_an_h200(gc):
    from hpcllm.model.gpt import preset

    cfg = preset("1.3B", vocab_size=257).to_dict()
    pred = gc.predict_memory(cfg, 8, "bf16", "NVIDIA H200", 141 * 10 ** 9)
    assert pred["profile"] == "h200-141gb" and pred["phase"] in ("backward", "optimizer")
    assert pred["tensors_bytes"] == pred["total_bytes"] - pred["overhead_bytes"]
    assert 30 * 2 ** 30 < pred["total_bytes"] < 100 * 2 ** 30
    fpt, params = gc.flops_of(cfg)
    assert 1.1e9 < params < 1.4e9 and fpt > 6 * params
    assert gc.plan_profile("NVIDIA A100-SXM4-40GB", 40 * 2 ** 30).name == "a100-40gb"
    other = gc.plan_profile("NVIDIA L40S", 48 * 2 ** 30)
    assert other.name == "nvidia-l40s" and other.memory_bytes == 48 * 2 ** 30


def test_parse_junit_counts_and_names(tmp_path, gc):
    xml = tmp_path / "j.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" '
                   'skipped="1"><testcase classname="tests.cuda.test_x" name="test_ok"/>'
                   '<testcase classname="tests.cuda.test_x" name="test_bad"><failure message="assert 1 == 2">tb'
                   '</failure></testcase><testcase classname="tests.cuda.test_x" name="test_skip"><skipped '
                   'message="no mpi4py"/></testcase><testcase classname="tests.cuda.test_x" name="test_ok2"/>'
                   '</testsuite></testsuites>')
    j = gc.parse_junit(xml)
    assert (j["tests"], j["passed"], j["failures"], j["skipped"]) == (4, 2, 1, 1)
    assert j["failed_tests"] == [{"test": "tests.cuda.test_x::test_bad", "message": "assert 1 == 2"}]
    assert j["skipped_tests"][0]["reason"] == "no mpi4py"


def test_table_of_a_complete_result(gc):
    results = {
        "device": {"name": "NVIDIA H200", "total_memory_bytes": 150 * 2 ** 30, "torch": "2.11", "cuda": "13.0"},
        "elapsed_s": 401.0,
        "steps": {"matmul": {"status": "done", "tflops": {"bf16": 750.0}, "datasheet_bf16_tflops": 989.0},
                  "train_1.3b_bf16": {"status": "done", "tokens_per_s": 40000.0, "step_time_s": 0.41,
                                      "mfu_measured": 0.48, "mfu_datasheet": 0.37, "peak_alloc_bytes": 50 * 2 ** 30,
                                      "device_peak_bytes": 53 * 2 ** 30, "plan": {"total_bytes": 52 * 2 ** 30},
                                      "alloc_over_plan_tensors": 1.0, "device_over_plan_total": 1.02},
                  "generate": {"status": "done", "api": {"kv_cache": {"tokens_per_s": 300.0},
                                                         "greedy_kv_equals_recompute": True}}},
        "summary": {"goals": {"mfu_1.3b_bf16": {"goal": ">= 0.45", "value": 0.48, "met": True}}}}
    t = gc.render_table(results)
    assert "train_1.3b_bf16" in t and "40,000" in t and "48.0%" in t and "37.0%" in t and "1.02" in t
    assert "bf16 750.0 TFLOP/s" in t and "kv_cache 300 tok/s" in t and "met" in t


def test_cpu_rehearsal_of_a_training_step(tmp_path, gc):
    """The real run_training flow on this CPU (tiny model): `hpcllm train`, its metrics,
    the plan's prediction and the end of the process once the last step is logged."""
    from tests.train.conftest import build_dataset

    data = build_dataset(tmp_path / "ds", n_docs=200)
    ck = gc.Check(_args(tmp_path), [], tmp_path / "r.json", device={"name": "cpu rehearsal",
                                                                     "total_memory_bytes": 2 ** 34})
    ck.device = "cpu"
    ck.state.update(data=str(data), matmul={"fp32": 1e10})
    run = gc.TrainRun("tiny", "fp32", False, 4, 4, 4, keep=False)
    res = ck.run_step(gc.Step("rehearsal", 120, 5, "tiny on the CPU",
                              fn=lambda c, b: gc.run_training(c, b, "rehearsal", run, extra_args=[
                                  "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--seq-len", "32",
                                  "--threads", "1"])))
    assert res["status"] == "done", res
    assert res["steps_logged"] == 4 and res["tokens_per_s"] > 0 and res["tokens_per_step"] == 4 * 32
    assert res["mfu_measured"] == pytest.approx(res["tokens_per_s"] * res["flops_per_token"] / 1e10)
    assert res["plan"]["total_bytes"] > res["plan"]["tensors_bytes"] > 0 and res["alloc_over_plan_tensors"] > 0
    assert res["process"]["rc"] == 0 or res["process"]["stopped_after_result"]
    assert not (ck.scratch / "runs" / "rehearsal").exists()  # not kept
    assert json.loads((tmp_path / "r.json").read_text())["steps"]["rehearsal"]["status"] == "done"


@pytest.mark.slow
def test_cpu_rehearsal_of_the_whole_script(tmp_path):
    """HPCLLM_GPU_CHECK_DEVICE=cpu: the script end to end (env, data, a 124M-named tiny run with its
    checkpoint, every generate mode and the generation benchmark), its JSON and its table."""
    out = tmp_path / "r.json"
    r = _run("--quick", "--only", "env,data,train_124m_bf16,generate", "--out", out, "--logs", tmp_path / "logs",
             "--deadline", "300", env={"HPCLLM_GPU_CHECK_DEVICE": "cpu"}, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["complete"] and res["device"]["name"] == "CPU rehearsal"
    st = res["steps"]
    assert {k: v["status"] for k, v in st.items()} == {"env": "done", "data": "done", "train_124m_bf16": "done",
                                                      "generate": "done"}, {k: v.get("reason") for k, v in st.items()}
    assert st["train_124m_bf16"]["steps_logged"] == 6 and st["train_124m_bf16"]["process"]["rc"] == 0
    gen = st["generate"]
    assert gen["cli_greedy_kv_equals_recompute"] is True and gen["api"]["greedy_kv_equals_recompute"] is True
    assert gen["api"]["kv_cache"]["tokens"] == 32 and gen["cli"]["prompts_file_batch8"]["tokens"] > 0
    assert "train_124m_bf16" in r.stdout and "generate (124M" in r.stdout and f"wrote {out}" in r.stdout
    assert sorted(p.name for p in (tmp_path / "logs").iterdir())[:2] == ["generate-batch.log", "generate-bench.log"]


# --------------------------------------------------------------------------- gpu_prepare.py


def test_prepare_dry_run_lists_what_it_would_fetch_without_network(tmp_path):
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "pytest_timeout-2.4.0-py3-none-any.whl").write_bytes(b"x" * 1000)
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", PIP_NO_INDEX="1")
    r = subprocess.run([sys.executable, str(PREPARE), "--dry-run", "--json", "--dest", str(dest)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    names = {e["name"]: e for e in p["packages"]}
    assert set(names) == {"pytest-timeout", "setuptools", "horovod", "cloudpickle", "pyyaml", "packaging", "cmake"}
    assert names["pytest-timeout"]["present"] == ["pytest_timeout-2.4.0-py3-none-any.whl"]
    assert names["horovod"]["kind"] == "sdist" and names["horovod"]["present"] == []
    assert p["tree_bytes"] > 100_000 and p["budget_bytes"] == p["limit_bytes"] - p["margin_bytes"] - p["tree_bytes"]
    wheel_cmd, sdist_cmd = p["commands"]
    assert "--only-binary=:all:" in wheel_cmd and wheel_cmd[wheel_cmd.index("--python-version") + 1] == "3.12"
    assert "manylinux2014_x86_64" in wheel_cmd and "--no-deps" in wheel_cmd and "cmake<4" in wheel_cmd
    assert sdist_cmd[-1] == "horovod==0.28.1" and "--no-binary" in sdist_cmd
    assert sorted(os.listdir(dest)) == ["pytest_timeout-2.4.0-py3-none-any.whl"]  # nothing fetched
    text = subprocess.run([sys.executable, str(PREPARE), "--dry-run", "--groups", "test", "--dest", str(dest)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert text.returncode == 0 and "pytest-timeout" in text.stdout and "horovod" not in text.stdout
    assert "would run:" in text.stdout
    bad = subprocess.run([sys.executable, str(PREPARE), "--dry-run", "--groups", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown nope" in bad.stderr


def test_prepare_fits_the_size_limit_by_priority(gp):
    kept, dropped = gp.fit({"a": 10, "b": 20, "c": 30, "d": 5}, {"a": 1, "b": 4, "c": 8, "d": 4}, 40)
    assert dropped == ["c"] and sorted(kept) == ["a", "b", "d"]
    kept, dropped = gp.fit({"a": 10, "b": 20}, {"a": 1, "b": 2}, 5)
    assert kept == [] and dropped == ["b", "a"]
    with pytest.raises(SystemExit, match="torch: already on the GPU machine"):
        gp.select(["test"], with_=("torch",))
    assert gp.Package("cmake<4", "horovod", "", 8).pattern() == "cmake-*.whl"
    assert gp.Package("pytest-timeout", "test", "", 1).pattern() == "pytest_timeout-*.whl"
