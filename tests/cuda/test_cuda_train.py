"""`hpcllm train --device cuda` end to end: --device/--precision auto pick CUDA and bf16, the
metrics carry the CUDA allocator's peak and MFU against the GPU's peak, fp16 keeps a loss
scale, --recompute and --compile keep the losses, and the pipeline's staged (and, where MPI is
CUDA-aware, direct) transport moves CUDA tensors intact."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.cuda.conftest import compile_unavailable
from tests.train.conftest import REPO, TINY, losses, run_train

pytestmark = pytest.mark.cuda


def _metrics(run):
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _tiny(precision):
    args = list(TINY)
    args[args.index("--precision") + 1] = precision
    return args


def test_auto_device_and_precision_train_on_cuda_in_bf16(cuda_dataset, tmp_path):
    from hpcllm.model.gpt import GPTConfig, flops_per_token
    from hpcllm.train.metrics import device_peak_tflops

    run = tmp_path / "run"
    r = run_train(["--data", str(cuda_dataset), "--out", str(run), "--steps", "3", "--device", "auto",
                   "--ckpt-every", "0", *_tiny("auto")])
    config = json.loads((run / "config.json").read_text())
    want = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert config["precision_resolved"] == want
    assert "on cuda:0" in r.stdout and f"precision auto -> {want}" in r.stdout
    recs = _metrics(run)
    assert len(recs) == 3 and all(math.isfinite(x["loss"]) for x in recs)
    total = torch.cuda.get_device_properties(0).total_memory
    for x in recs:
        assert 0 < x["peak_mem_bytes"][0] < total  # the CUDA allocator's peak, not the host's RSS
    fpt = flops_per_token(GPTConfig(**config["model"]))
    peak = device_peak_tflops(torch.device("cuda", 0), want, 1) * 1e12
    last = recs[-1]
    assert last["mfu"] == pytest.approx(last["tokens_per_s"] * fpt / peak, rel=1e-6)


def test_fp16_on_cuda_logs_the_loss_scale(cuda_dataset, tmp_path):
    run = tmp_path / "run"
    run_train(["--data", str(cuda_dataset), "--out", str(run), "--steps", "3", "--device", "cuda",
               "--ckpt-every", "0", *_tiny("fp16")])
    recs = _metrics(run)
    assert len(recs) == 3 and all("loss_scale" in x for x in recs)
    assert json.loads((run / "config.json").read_text())["precision_resolved"] == "fp16"


def test_recompute_on_cuda_keeps_the_losses(cuda_dataset, tmp_path):
    common = ["--data", str(cuda_dataset), "--steps", "3", "--device", "cuda", "--ckpt-every", "0", *TINY]
    run_train(["--out", str(tmp_path / "plain"), *common])
    run_train(["--out", str(tmp_path / "recompute"), "--recompute", *common])
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "recompute")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_compile_on_cuda_compiles_one_graph_and_keeps_the_losses(cuda_dataset, tmp_path):
    why = compile_unavailable()
    if why:
        pytest.skip(why)
    common = ["--data", str(cuda_dataset), "--steps", "3", "--device", "cuda", "--ckpt-every", "0", *_tiny("bf16")]
    run_train(["--out", str(tmp_path / "eager"), *common])
    r = run_train(["--out", str(tmp_path / "compiled"), "--compile", *common], timeout=300)
    assert "torch.compile:" in r.stdout and "0 graph breaks" in r.stdout, r.stdout
    assert "torch.compile: 0 graphs" not in r.stdout
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=2e-2)


TRANSPORT = textwrap.dedent("""
    import json, sys
    import torch
    try:
        from mpi4py import MPI
    except Exception as e:  # no MPI library for mpi4py here
        print(json.dumps({"skip": f"mpi4py: {type(e).__name__}: {e}"})); sys.exit(0)
    import hpcllm.parallel.pipeline.transport as tr
    modes = [sys.argv[1]]
    results = {}
    for mode in modes:
        real = tr.transport_for
        tr.transport_for = lambda device, mode=mode: mode
        try:
            shape = (2, 8, 16)
            send = tr.Channel(MPI.COMM_SELF, 0, shape, torch.bfloat16, "cuda", tag_base=100, timeout=30)
            recv = tr.Channel(MPI.COMM_SELF, 0, shape, torch.bfloat16, "cuda", tag_base=100, timeout=30)
            xs = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(3)]
            recv.expect(range(3))
            ok = []
            for i, x in enumerate(xs):
                send.send(x, i)
                got = recv.recv_owned(i)
                ok.append(got.device.type == "cuda" and got.dtype == torch.bfloat16 and torch.equal(got, x))
            send.flush()
            results[mode] = {"mode": send.mode, "ok": all(ok)}
        finally:
            tr.transport_for = real
    results["cuda_aware"] = list(tr.cuda_aware_mpi())
    print(json.dumps(results))
""")


@pytest.mark.parametrize("mode", ["staged", "cuda-aware"])
def test_pipeline_transport_moves_cuda_tensors_intact(mode, tmp_path):
    pytest.importorskip("mpi4py")
    if mode == "cuda-aware":
        probe = subprocess.run([sys.executable, "-c", "import json\nfrom hpcllm.parallel.pipeline.transport import "
                                "cuda_aware_mpi\nprint(json.dumps(list(cuda_aware_mpi())))"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        aware = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else [False, probe.stderr]
        if not aware[0]:
            pytest.skip(f"MPI is not CUDA-aware here ({aware[1]})")
    script = tmp_path / "transport.py"
    script.write_text(TRANSPORT)
    try:
        r = subprocess.run([sys.executable, str(script), mode], cwd=REPO, capture_output=True, text=True, timeout=90,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        pytest.skip("MPI did not start as a singleton within 90 s")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert res[mode] == {"mode": mode, "ok": True}, res
