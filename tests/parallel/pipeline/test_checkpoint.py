"""Pipeline checkpoints: resume with a different D (and partition) continues exactly;
`hpcllm export` consolidates the stage files into one file `hpcllm generate` loads."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcllm.errors import HpcllmError
from hpcllm.infer.export import export_checkpoint
from tests.cluster.mpi import REPO, run_mpi
from tests.parallel.pipeline.conftest import COMMON, ENV, STEPS, assert_same_params, losses, params

SCRIPT = Path(__file__).with_name("scripts") / "pp_train.py"
pytestmark = pytest.mark.mpi


def test_resume_with_other_dp_and_partition_then_export(reference, pp_dataset, tmp_path):
    base = tmp_path / "run"
    run = Path(f"{base}-1f1b")
    common = ["--data", pp_dataset, "--pipeline-stages", "2", *COMMON]
    # steps 1-2 on P=2 x D=2 (2 micro-batches per replica), checkpoint every step
    run_mpi([sys.executable, SCRIPT, base, "1f1b", "--", *common, "--microbatches", "2", "--steps", "2",
             "--ckpt-every", "1"], np=4, env=ENV, timeout=150).check()
    ck = run / "checkpoints" / "step-00000002"
    # one model and one optimizer file per stage (its first replica writes them)
    assert sorted(p.name for p in ck.glob("*-0000*.pt")) == [
        "model-00000.pt", "model-00001.pt", "optim-00000.pt", "optim-00001.pt"]
    # each tensor written once: the last stage's copy of the tied embedding is stage 0's
    assert "wte.weight" in torch.load(ck / "model-00000.pt", weights_only=True)
    assert "wte.weight" not in torch.load(ck / "model-00001.pt", weights_only=True)
    assert sorted(p.name for p in ck.glob("rng-rank*.pt")) == [f"rng-rank{r}.pt" for r in range(4)]
    # steps 3-4 on P=2 x D=1 (4 micro-batches: the same global batch), blocks moved 2,2 -> 1,3
    run_mpi([sys.executable, SCRIPT, base, "1f1b", "--", *common, "--microbatches", "4", "--steps", str(STEPS),
             "--resume", "auto", "--balance", "1,3"], np=2, env=ENV, timeout=150).check()
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)
    assert_same_params(params(run), params(reference), "resumed")

    # export: one file, no MPI, equal to the stage files merged; generate loads it
    out = tmp_path / "model.pt"
    src, written, stages = export_checkpoint(run, out)
    assert src.name == f"step-{STEPS:08d}" and stages == 2
    payload = torch.load(written, weights_only=True)
    assert payload["format"] == "hpcllm-model"
    assert_same_params({k: v for k, v in payload["model"].items() if k in params(run)}, params(run), "export")
    from click.testing import CliRunner

    from hpcllm.cli import cli
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "cli.pt")])
    assert res.exit_code == 0, res.output
    assert "2 pipeline stages" in res.output and (tmp_path / "cli.pt").is_file()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMPI_COMM_WORLD_RANK", None)
    r = subprocess.run([sys.executable, "-m", "hpcllm", "generate", str(written), "--prompt", "the ",
                        "--max-new-tokens", "8", "--temperature", "0"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the ") and len(r.stdout.strip()) > len("the")

    # the CLI on a damaged checkpoint: a one-line error, not a traceback
    (ck / "model-00001.pt").unlink()
    with pytest.raises(HpcllmError, match=r"a 2-stage pipeline checkpoint is missing model-00001.pt \(1 of its 2 tensor files"):
        export_checkpoint(ck, tmp_path / "bad.pt")
    r = subprocess.run([sys.executable, "-m", "hpcllm", "export", str(ck), "--out", str(tmp_path / "bad.pt")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_continue_data_parallel_checkpoint_as_pipeline(reference, pp_dataset, tmp_path):
    # the single-process run's step-2 checkpoint continued on P=2
    base = tmp_path / "run"
    run_mpi([sys.executable, SCRIPT, base, "gpipe", "--", "--data", pp_dataset, "--pipeline-stages", "2", *COMMON,
             "--microbatches", "4", "--steps", str(STEPS),
             "--resume", reference / "checkpoints" / "step-00000002"], np=2, env=ENV, timeout=150).check()
    run = Path(f"{base}-gpipe")
    assert losses(run) == pytest.approx(losses(reference)[2:], rel=1e-5, abs=1e-6)
    assert_same_params(params(run), params(reference), "from DP")
