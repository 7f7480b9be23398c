"""The trainer's reusable pieces, in process: LR schedule, loss scaler, checkpoint protocol,
config precedence, and the errors users see before the first step."""
import json
import math
import click
import pytest
import torch

from hpcllm.config import TrainConfig, add_train_options, build_config, option_specs, to_cli_args
from hpcllm.errors import HpcllmError
from hpcllm.train import checkpoint as ckpt
from hpcllm.train.precision import LossScaler, clip_, grad_norm
from hpcllm.train.schedule import LRSchedule, lr_at
from tests.train.conftest import TINY, REPO, losses, run_train


def test_lr_warmup_then_cosine_to_floor():
    assert lr_at(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, 0.1) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    o = TrainConfig().optimizer
    o.warmup = 1000
    assert LRSchedule(o, 50).warmup == 50  # warmup capped at the run length


def test_loss_scaler_backoff_growth_and_state():
    s = LossScaler(True, init_scale=1024.0, window=2)
    s.update(overflow=True)
    assert s.scale == 512.0 and s.skipped == 1
    s.update(False)
    s.update(False)
    assert s.scale == 1024.0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 1024.0)
    s.unscale_([p])
    assert torch.equal(p.grad, torch.ones(3))
    t = LossScaler(True)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    off = LossScaler(False)
    loss = torch.tensor(2.0)
    assert off.scale_loss(loss) is loss


def test_grad_norm_and_clip():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    n = grad_norm([p])
    assert n == pytest.approx(5.0)
    clip_([p], n, 1.0)
    assert grad_norm([p]) == pytest.approx(1.0, rel=1e-5)
    p.grad[0] = float("inf")
    assert not math.isfinite(grad_norm([p]))


def _save(run, step, keep=2):
    files = {"model.pt": {"w": torch.full((2,), float(step))}, "trainer.json": {"step": step}, "config.json": {}}
    return ckpt.save(run, step, files, is_root=True, barrier=lambda: None, keep=keep)


def test_checkpoint_atomic_latest_and_retention(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    assert [d.name for d in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    # a half-written newer checkpoint is invisible and cleaned later
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-00000004.tmp" / "model.pt").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step-00000003"
    ckpt.clean_stale(tmp_path)
    assert not (tmp_path / "checkpoints" / "step-00000004.tmp").exists()
    # a stale pointer falls back to the newest complete directory
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    # rewriting the same step replaces it
    _save(tmp_path, 3)
    assert ckpt.load_torch(ckpt.latest_checkpoint(tmp_path) / "model.pt")["w"][0] == 3.0
    assert ckpt.resolve_resume(tmp_path / "fresh", "auto") is None
    with pytest.raises(HpcllmError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_checkpoint_loads_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "model.pt")
    with pytest.raises(HpcllmError, match="holds Python objects beyond tensors") as e:
        ckpt.load_torch(tmp_path / "model.pt")
    # never torch's advice to load with weights_only=False, which would run the file's code
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    st = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    torch.save(st, "/tmp/_hpcllm_rng.pt")
    ckpt.set_rng_state(torch.load("/tmp/_hpcllm_rng.pt", weights_only=True))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_config_precedence_toml_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 50\n[data]\nmicro_batch = 3\naccum = 2\n[parallel]\nhierarchical_allreduce = true\n'
                    'zero_stage = 2\n[model]\nmodel = "mini"\n')
    cfg = build_config(str(toml), accum=5)
    assert (cfg.steps, cfg.data.micro_batch, cfg.data.accum, cfg.model.model) == (50, 3, 5, "mini")
    assert cfg.parallel.hierarchical_allreduce is True and cfg.parallel.zero_stage == 2
    assert build_config(str(toml), zero_stage=3).parallel.zero_stage == 3
    toml.write_text("[parallel]\nzero_stage = 5\n")
    with pytest.raises(HpcllmError, match="zero-stage 5"):
        build_config(str(toml))
    toml.write_text("[data]\nmicro_bath = 3\n")
    with pytest.raises(HpcllmError, match="unknown key 'micro_bath' in \\[data\\]"):
        build_config(str(toml))
    toml.write_text('[precision]\nprecision = "fp8"\n')
    with pytest.raises(HpcllmError, match="must be one of"):
        build_config(str(toml))
    with pytest.raises(HpcllmError, match="--accum 0"):
        build_config(None, accum=0)


def test_click_options_are_generated_and_roundtrip():
    flags = {s.flag for s in option_specs()}
    for f in ["--data", "--out", "--model", "--n-layer", "--n-head", "--d-model", "--seq-len", "--micro-batch",
              "--accum", "--steps", "--lr", "--seed", "--precision", "--log-every", "--eval-every", "--ckpt-every",
              "--resume", "--grad-compression", "--fusion-threshold-mb", "--cycle-time-ms",
              "--hierarchical-allreduce", "--timeline", "--pipeline-stages", "--schedule", "--microbatches",
              "--balance", "--recompute", "--threads", "--peak-tflops", "--zero-stage"]:
        assert f in flags, f
    seen = {}

    @click.command()
    @add_train_options
    def cmd(**kw):
        seen.update(kw)

    argv = ["--data", "d", "--micro-batch", "4", "--no-hierarchical-allreduce", "--pipeline-stages", "2",
            "--schedule", "gpipe"]
    cmd(argv, standalone_mode=False)
    assert to_cli_args(seen) == argv
    cfg = build_config(**seen)
    assert cfg.data.path == "d" and cfg.parallel.schedule == "gpipe" and cfg.parallel.hierarchical_allreduce is False


def _cli(capsys, *args):
    """`hpcllm train ARGS` in process: these all fail in the checks before MPI/Horovod start."""
    from hpcllm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    err = capsys.readouterr().err
    return e.value.code, err


def test_bad_input_is_one_line_exit_2(dataset, tmp_path, capsys):
    code, err = _cli(capsys, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err and "missing" in err, err
    code, err = _cli(capsys, "--data", str(dataset), "--out", str(tmp_path / "o"), "--model", "nope")
    assert code == 2 and "unknown preset" in err
    code, err = _cli(capsys, "--data", str(dataset), "--out", str(tmp_path / "o"), "--seq-len", "100000")
    assert code == 2 and "fewer than one window" in err, err
    code, err = _cli(capsys, "--data", str(dataset), "--out", str(tmp_path / "o"), "--n-head", "5")
    assert code == 2 and "not divisible" in err, err
    code, err = _cli(capsys, "--data", str(dataset))
    assert code == 2 and "--out is required" in err, err
    assert not (tmp_path / "o").exists()


def test_resume_refuses_another_tokenizer_or_shape_before_step_1(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    base = [*TINY, "--data", str(dataset), "--out", str(out), "--micro-batch", "2"]
    run_train(base + ["--steps", "2"])
    code, err = _cli(capsys, *base, "--steps", "4")  # a fresh run over an old one
    assert code == 2 and "already holds checkpoints (newest step-00000002)" in err, err
    code, err = _cli(capsys, *base, "--steps", "4", "--resume", "auto", "--d-model", "64")
    assert code == 2 and "d_model 32 -> 64" in err, err
    trainer = out / "checkpoints" / "step-00000002" / "trainer.json"
    t = json.loads(trainer.read_text())
    t["tokenizer_sha256"] = "0" * 64
    trainer.write_text(json.dumps(t))
    code, err = _cli(capsys, *base, "--steps", "4", "--resume", "auto")
    assert code == 2 and "different tokenizer" in err, err
    assert max(losses(out)) == 2  # no step ran


def _stdlib_dataset(tmp_path, n_files=30):
    """A slice of the built-in corpus (Python stdlib sources, data_prep/build_stdlib_corpus.py)."""
    import importlib.util
    import os

    from hpcllm.data.preprocess import run_preprocess

    spec = importlib.util.spec_from_file_location("build_stdlib_corpus", REPO / "data_prep" / "build_stdlib_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = tmp_path / "stdlib.jsonl"
    with open(src, "w") as f:
        for root, rel in list(mod.stdlib_files(False))[:n_files]:
            with open(os.path.join(root, rel), encoding="utf-8") as g:
                f.write(json.dumps({"text": g.read(), "path": rel}) + "\n")
    run_preprocess([str(src)], str(tmp_path / "ds"), tokenizer="byte", val_fraction=0.1, workers=1)
    return tmp_path / "ds"


def test_loss_falls_on_the_builtin_corpus_and_metrics_are_complete(tmp_path):
    dataset = _stdlib_dataset(tmp_path)
    out = tmp_path / "run"
    r = run_train([*TINY, "--data", str(dataset), "--out", str(out), "--steps", "60", "--micro-batch", "8",
                   "--lr", "1e-2", "--log-every", "10", "--eval-every", "30", "--eval-batches", "4"])
    from hpcllm.train.metrics import read_metrics

    recs = read_metrics(out)
    train_recs = [x for x in recs if "loss" in x]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"):
        assert all(key in x for x in train_recs), key
    vals = [x["val_loss"] for x in recs if "val_loss" in x]
    assert len(vals) == 2 and vals[1] < vals[0]
    # a fresh model predicts ~uniformly over 257 bytes: loss ln(257) = 5.55; this tiny model
    # reaches ~3.2 in 60 steps (byte unigram statistics of Python source and some bigrams)
    assert train_recs[-1]["loss"] < 0.65 * math.log(257), train_recs
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.8, train_recs
    assert "global batch 8 sequences = 256 tokens" in r.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["n_layer"] == 2 and cfg["data"]["micro_batch"] == 8 and cfg["steps"] == 60


def test_horovod_env_from_flags(tmp_path):
    from hpcllm.parallel.data_parallel import horovod_env

    cfg = build_config(None, fusion_threshold_mb=32.0, cycle_time_ms=0.5, hierarchical_allreduce=True,
                       timeline="tl.json", stall_check_s=30.0, stall_shutdown_s=90.0)
    env = horovod_env(cfg.parallel)
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(32 * 1024 * 1024)
    assert env["HOROVOD_CYCLE_TIME"] == "0.5"
    assert env["HOROVOD_HIERARCHICAL_ALLREDUCE"] == "1"
    assert env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "30"
    assert env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "90"
    assert env["HOROVOD_TIMELINE"].endswith("/tl.json") and env["HOROVOD_TIMELINE"].startswith("/")
    # no --cycle-time-ms: by where the ranks compute (GPU ranks leave the cores to Horovod)
    assert horovod_env(build_config(None, device="cpu").parallel)["HOROVOD_CYCLE_TIME"] == "2"
    assert horovod_env(build_config(None, device="cuda").parallel)["HOROVOD_CYCLE_TIME"] == "0.1"


def test_mpi_env_yields_on_cpu_ranks_and_keeps_the_users_setting(monkeypatch):
    from hpcllm.parallel.data_parallel import mpi_env

    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    assert mpi_env(build_config(None, device="cpu").parallel) == {"OMPI_MCA_mpi_yield_when_idle": "1"}
    assert mpi_env(build_config(None, device="cuda").parallel) == {}
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "0")
    assert mpi_env(build_config(None, device="cpu").parallel) == {}


def test_cpu_peak_flops_per_cycle_by_vector_unit():
    from hpcllm.train.metrics import cpu_flops_per_cycle

    def info(vendor, family, flags):
        return f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: fpu {flags}\n"

    zen4 = info("AuthenticAMD", 25, "avx2 fma avx512f avx512_bf16")
    assert (cpu_flops_per_cycle(False, zen4), cpu_flops_per_cycle(True, zen4)) == (32, 64)  # 512-bit ops split in two
    sapphire = info("GenuineIntel", 6, "avx2 fma avx512f avx512_bf16 amx_bf16")
    assert (cpu_flops_per_cycle(False, sapphire), cpu_flops_per_cycle(True, sapphire)) == (64, 1024)
    skylake = info("GenuineIntel", 6, "avx2 fma avx512f")
    assert (cpu_flops_per_cycle(False, skylake), cpu_flops_per_cycle(True, skylake)) == (64, 64)
    zen3 = info("AuthenticAMD", 25, "avx2 fma")
    assert cpu_flops_per_cycle(False, zen3) == 32


def test_auto_precision_decision_rule_is_measured_speed_not_flags():
    from hpcllm.train.precision import BF16_MIN_SPEEDUP, MatmulProbe, choose_cpu_precision

    shape = (1024, 64, 256)
    # the Xeon that reports AVX512-BF16 without AMX: bf16 at half the fp32 rate -> fp32
    slow = MatmulProbe(shape, fp32=290e9, bf16=144e9, threads=2)
    choice, why = choose_cpu_precision(slow)
    assert choice == "fp32" and "0.50x" in why and "1024x64x256" in why
    # AMX (~7x) and Zen 4 (2.5x) -> bf16
    assert choose_cpu_precision(MatmulProbe(shape, fp32=100e9, bf16=700e9, threads=2))[0] == "bf16"
    assert choose_cpu_precision(MatmulProbe(shape, fp32=100e9, bf16=250e9, threads=2))[0] == "bf16"
    # a tie is not worth bf16's rounding
    assert choose_cpu_precision(MatmulProbe(shape, fp32=100e9, bf16=100e9 * (BF16_MIN_SPEEDUP - 0.01),
                                            threads=2))[0] == "fp32"


def test_matmul_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    import time

    from hpcllm.train.precision import cpu_matmul_probe

    monkeypatch.setenv("HPCLLM_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first = cpu_matmul_probe(256, 64, 256)
    took = time.perf_counter() - t0
    assert not first.cached and first.fp32 > 0 and first.bf16 > 0 and took < 2.0
    again = cpu_matmul_probe(256, 64, 256)
    assert again.cached and (again.fp32, again.bf16) == (first.fp32, first.bf16)
    assert (tmp_path / "matmul-probe.json").is_file()


def test_auto_precision_names_its_choice_in_the_log(dataset, tmp_path):
    import re

    from hpcllm.train.precision import BF16_MIN_SPEEDUP

    out = tmp_path / "run"
    r = run_train([*TINY, "--data", str(dataset), "--out", str(out), "--steps", "1", "--precision", "auto"],
                  env={"HPCLLM_CACHE": str(tmp_path / "cache")})
    m = re.search(r"precision auto -> (fp32|bf16): bf16 matmuls ran at ([0-9.]+)x the fp32 rate", r.stdout)
    assert m, r.stdout
    choice, ratio = m.group(1), float(m.group(2))
    assert (choice == "bf16") == (ratio >= BF16_MIN_SPEEDUP)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["precision_resolved"] == choice and "matmuls" in cfg["precision_reason"]
