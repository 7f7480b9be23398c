"""The one training loop's guards hold for a pipeline too: a BPE checkpoint that `hpcllm
generate` and `hpcllm export` load, the NaN stop, the `--out already holds checkpoints` guard,
flags a layout would ignore refused with one line, one checkpoint writer per stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.mpi import REPO, run_mpi
from tests.parallel.pipeline.conftest import COMMON, ENV
from tests.train.conftest import make_text, run_train, train_cmd

SCRIPT = Path(__file__).with_name("scripts") / "pp_train.py"
pytestmark = pytest.mark.mpi


def _pp(base, np_, *args, check=True, env=None):
    res = run_mpi([sys.executable, SCRIPT, base, "none", "--", "--pipeline-stages", "2", *COMMON, *args], np=np_,
                  env={**ENV, **(env or {})}, timeout=150)
    return res.check() if check else res


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory):
    from hpcllm.data.preprocess import run_preprocess
    from hpcllm.data.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("bpe")
    docs = make_text(200, seed=5)
    tok = train_bpe(iter(docs), 320, str(d / "tok.json"), min_frequency=1)
    src = d / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    run_preprocess([str(src)], str(d / "ds"), tokenizer=tok.path, val_fraction=0.1, workers=1)
    return d / "ds"


def test_pipeline_with_bpe_checkpoint_generates_and_exports(bpe_dataset, tmp_path):
    base = tmp_path / "run"
    _pp(base, 2, "--data", bpe_dataset, "--microbatches", "2", "--steps", "2", "--ckpt-every", "0")
    run = Path(f"{base}-none")
    ck = run / "checkpoints" / "step-00000002"
    # the tokenizer is copied byte for byte (not re-encoded as JSON text)
    assert (ck / "tokenizer.json").read_bytes() == (bpe_dataset / "tokenizer.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    gen = [sys.executable, "-m", "hpcllm", "generate", "--prompt", "the model ", "--max-new-tokens", "8",
           "--temperature", "0"]
    direct = subprocess.run(gen[:4] + [str(run)] + gen[4:], capture_output=True, text=True, env=env, timeout=120)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.startswith("the model ")
    out = tmp_path / "model.pt"
    r = subprocess.run([sys.executable, "-m", "hpcllm", "export", str(run), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "2 pipeline stages" in r.stdout, r.stderr
    # the export embeds the tokenizer: generation needs neither the checkpoint nor the dataset
    import shutil

    shutil.rmtree(run)
    exported = subprocess.run(gen[:4] + [str(out)] + gen[4:], capture_output=True, text=True, env=env, timeout=120)
    assert exported.returncode == 0 and exported.stdout == direct.stdout, exported.stderr


def test_pipeline_nan_loss_stops_every_rank_without_a_checkpoint(pp_dataset, tmp_path):
    base = tmp_path / "run"
    # rank 0 is the first stage, which computes no loss: the hook marks its step bad anyway
    res = _pp(base, 2, "--data", pp_dataset, "--steps", "6", "--ckpt-every", "2", check=False,
              env={"HPCLLM_TEST_NAN_AT": "4,0"})
    assert res.returncode != 0 and not res.timed_out
    assert "non-finite loss at step 4 on rank 0" in res.stderr, res.output()
    run = Path(f"{base}-none")
    assert sorted(d.name for d in (run / "checkpoints").glob("step-*")) == ["step-00000002"]


def test_pipeline_refuses_an_out_holding_checkpoints(pp_dataset, tmp_path):
    base = tmp_path / "run"
    _pp(base, 2, "--data", pp_dataset, "--steps", "1")
    # the real command line: one `error:` line per rank, no traceback
    res = run_mpi(train_cmd("--out", f"{base}-none", "--data", pp_dataset, "--pipeline-stages", "2", "--steps", "2",
                            *COMMON), np=2, env=ENV, timeout=150)
    assert res.returncode == 2 and "already holds checkpoints" in res.stderr, res.output()
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args,msg", [
    (["--schedule", "zbh1"], "--schedule applies to pipeline stages only"),
    (["--microbatches", "4"], "--microbatches applies to pipeline stages only"),
    (["--balance", "1,1"], "--balance applies to pipeline stages only"),
    (["--pipeline-stages", "2", "--accum", "2", "--microbatches", "4"], "--accum 2 and --microbatches 4"),
    (["--pipeline-stages", "2"], "--pipeline-stages 2: needs at least 2 ranks"),
    (["--pipeline-stages", "9"], "the model has only 4 layers"),
])
def test_flags_a_layout_would_ignore_are_one_line_errors(pp_dataset, tmp_path, args, msg):
    r = run_train(["--data", str(pp_dataset), "--out", str(tmp_path / "run"), "--steps", "1", *COMMON, *args],
                  check=False)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_stop_signal_during_pipeline_startup_is_a_stop_at_step_1(pp_dataset, tmp_path):
    """SIGUSR1 to a stage while the job starts (before MPI and the model) is not fatal: the
    ranks stop together after the first step, checkpoint it and exit 75."""
    import signal

    from hpcllm import exitcodes
    from tests.train.conftest import kill_tree, mpi_popen, rank_pids, train_cmd as cmd, wait_for

    out = tmp_path / "run"
    marks = tmp_path / "marks"
    marks.mkdir()
    p = mpi_popen(cmd("--out", out, "--data", pp_dataset, "--pipeline-stages", "2", "--steps", "5", *COMMON), np=2,
                  env={"HPCLLM_TEST_STARTUP_PAUSE": f"{marks}:3", "HPCLLM_PIPELINE_TIMEOUT": "60"},
                  marker=f"startup-{tmp_path.name}")
    try:
        wait_for(lambda: (marks / "rank-1").exists(), 60, "rank 1's startup")
        os.kill(rank_pids(f"startup-{tmp_path.name}")[1], signal.SIGUSR1)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        kill_tree(p)
    assert p.returncode == exitcodes.REQUEUE, stdout + stderr
    assert "stop requested (on another rank) at step 1" in stdout
    assert (out / "checkpoints" / "step-00000001" / "trainer.json").is_file()
