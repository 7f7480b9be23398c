"""Bad input and faults, each reproduced first: a full disk (a real small tmpfs) while writing
a checkpoint, a run directory, shards or an export; a manifest that is JSON but not a
manifest; numeric flags out of range; a prompt that is not UTF-8; error messages that would
quote a whole file; misleading messages; sbatch scripts that depend on PATH."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.mpi import REPO
from tests.train.conftest import TINY, build_dataset, make_text, run_train

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "hpcllm", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kw)


def one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("faults") / "ds", n_docs=150)


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a given size (root only): ``mount(size)`` returns its directory;
    ``resize(size)`` grows it in place."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    state = {"mounted": False}

    def mount(size: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        state["mounted"] = True
        return mnt

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    mount.resize = resize
    yield mount
    if state["mounted"]:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(data, small_disk, tmp_path):
    disk = small_disk("1300k")  # config + two checkpoints of this model fit, a third does not
    out = disk / "run"
    r = run_train([*TINY, "--data", str(data), "--out", str(out), "--steps", "8", "--ckpt-every", "1",
                   "--keep-checkpoints", "10"], check=False)
    line = one_line_error(r, "cannot write the checkpoint of step", "No space left on device", "free",
                          "the latest stays step-")
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts and not any(n.endswith(".tmp") for n in ckpts), ckpts  # the half-written one is gone
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == ckpts[-1] and f"the latest stays {latest}" in line
    # the previous checkpoint is intact: it generates, and the run resumes once there is room
    g = cli("generate", out, "--prompt", "the ", "--max-new-tokens", "4", "--temperature", "0")
    assert g.returncode == 0, g.stderr
    small_disk.resize("20m")
    r = run_train([*TINY, "--data", str(data), "--out", str(out), "--steps", "8", "--ckpt-every", "1",
                   "--keep-checkpoints", "10", "--resume", "auto"])
    assert f"at step {int(latest[5:])}" in r.stdout


def test_disk_full_for_the_run_directory_and_the_export(data, small_disk, tmp_path):
    disk = small_disk("64k")
    with open(disk / "filler", "wb") as f:  # fill it up
        try:
            f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    r = run_train([*TINY, "--data", str(data), "--out", str(disk / "run"), "--steps", "1"], check=False)
    one_line_error(r, "cannot write the run directory", "No space left on device", "free")
    ok = tmp_path / "ok"
    run_train([*TINY, "--data", str(data), "--out", str(ok), "--steps", "1"])
    r = cli("export", ok, "--out", disk / "model.pt")
    one_line_error(r, "cannot write the exported model", "No space left")
    assert not (disk / "model.pt").exists() and not list(disk.glob("model.pt.tmp*"))


def test_disk_full_while_preprocessing_resumes_to_the_same_dataset(small_disk, tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_text(6000, seed=4)))
    ref = tmp_path / "ref"
    args = ["--workers", "1", "--shard-tokens", "20000", "--item-bytes", "16384", "--no-progress"]
    assert cli("preprocess", src, "--out", ref, *args).returncode == 0
    disk = small_disk("400k")
    out = disk / "ds"
    r = cli("preprocess", src, "--out", out, *args)
    one_line_error(r, "cannot write the dataset", "No space left", "rerun the same command to resume")
    small_disk.resize("50m")
    r = cli("preprocess", src, "--out", out, *args)
    assert r.returncode == 0, r.stderr
    assert cli("inspect", out, "--verify").returncode == 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert [e["sha256"] for e in a["splits"]["train"]["shards"]] == [e["sha256"] for e in b["splits"]["train"]["shards"]]


# --------------------------------------------------------------------------- bad manifests


@pytest.mark.parametrize("mutate,field", [
    (lambda m: m.pop("splits"), "field 'splits' is missing"),
    (lambda m: m.pop("tokenizer"), "field 'tokenizer' is missing"),
    (lambda m: m["splits"].update(val=None), "field 'splits.val' must be an object, not null"),
    (lambda m: m["splits"]["train"].update(tokens="many"), "field 'splits.train.tokens' must be an integer >= 0"),
    (lambda m: m["tokenizer"].update(vocab_size=None), "field 'tokenizer.vocab_size' must be an integer >= 1"),
    (lambda m: m["splits"]["train"]["shards"][0].update(path="../../etc/passwd"),
     "field 'splits.train.shards[0].path' must be a path inside the dataset"),
])
def test_a_json_manifest_that_is_not_a_manifest(data, tmp_path, mutate, field):
    d = tmp_path / "ds"
    shutil.copytree(data, d)
    m = json.loads((d / "manifest.json").read_text())
    mutate(m)
    (d / "manifest.json").write_text(json.dumps(m))
    where = f"{d / 'manifest.json'}: {field}"
    one_line_error(cli("inspect", d), where)
    one_line_error(cli("train", *TINY, "--data", d, "--out", tmp_path / "run", "--steps", "1"), where)
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"text": "a document long enough to be kept by the cleaning"}) + "\n")
    one_line_error(cli("preprocess", src, "--out", d, "--no-progress"), where)


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("args,message", [
    (["train", "--beta1", "1.5"], "--beta1 1.5: must be in [0, 1)"),
    (["train", "--beta2", "-0.1"], "--beta2 -0.1: must be in [0, 1)"),
    (["train", "--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["train", "--weight-decay", "nan"], "--weight-decay nan: must be a finite number >= 0"),
    (["train", "--decay-steps", "-1"], "--decay-steps -1: must be >= 1"),
    (["train", "--microbatches", "0", "--pipeline-stages", "2"], "--microbatches 0: must be >= 1"),
    (["generate", "run", "--max-new-tokens", "-5"], "--max-new-tokens -5: must be >= 1"),
    (["generate", "run", "--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (["preprocess", "x", "--out", "y", "--val-fraction", "2"], "--val-fraction 2: must be in [0, 1]"),
    (["plan", "--mfu", "1.5"], "--mfu 1.5: must be in (0, 1]"),
    (["slurm", "train", "--time", "25:99:99", "--data", "DATA", "--out", "o"], "--time 25:99:99: minutes must be < 60"),
])
def test_numeric_flags_are_range_checked_when_parsed(args, message, data, tmp_path):
    one_line_error(cli(*[str(data) if a == "DATA" else a for a in args], cwd=tmp_path), message)


def test_toml_values_are_range_checked_too(data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optimizer]\nbeta1 = 1.0\n")
    one_line_error(cli("train", "--config", cfg, "--data", data, "--out", tmp_path / "r"), "--beta1 1: must be in [0, 1)")


def test_help_shows_the_ranges():
    r = cli("train", "--help")
    assert "[in [0, 1)]" in r.stdout.replace("\n", " ").replace("  ", " ") or "in [0, 1)" in r.stdout


# --------------------------------------------------------------------------- generate, messages


def test_a_prompt_that_is_not_utf8_is_replaced_with_a_note(data, tmp_path):
    from hpcllm.data.tokenizer import train_bpe

    run = tmp_path / "run"
    run_train([*TINY, "--data", str(data), "--out", str(run), "--steps", "1"])
    bad = b"the \xff\xfe cluster"
    r = subprocess.run([sys.executable, "-m", "hpcllm", "generate", str(run), "--prompt", bad, "--max-new-tokens", "4",
                        "--temperature", "0"], capture_output=True, env=ENV, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "note: --prompt is not valid UTF-8 (byte 0xff at character 4); 2 invalid bytes replaced with U+FFFD" in err
    assert r.stdout.decode().startswith("the \ufffd\ufffd cluster")
    # the BPE tokenizer takes the same rule
    tok = train_bpe(iter(make_text(50)), 300, str(tmp_path / "tok.json"), min_frequency=1)
    from hpcllm.infer.generate import valid_prompt

    fixed, note = valid_prompt(os.fsdecode(bad))
    assert tok.encode(fixed) and note


def test_a_bad_tokenizer_json_is_quoted_as_an_excerpt(tmp_path):
    big = tmp_path / "tok.json"
    big.write_text('{"model": {"type": "BPE", "vocab": {' + ", ".join(f'"t{i}": {i}' for i in range(6000)) + "}}")
    assert big.stat().st_size > 60_000
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"text": "a document long enough to be kept by the cleaning step"}) + "\n")
    line = one_line_error(cli("preprocess", src, "--out", tmp_path / "ds", "--tokenizer", big), str(big))
    assert len(line) < 700


def test_a_non_model_file_is_not_met_with_unsafe_advice(tmp_path):
    evil = tmp_path / "evil.pt"
    # a pickle of an arbitrary Python object (here a datetime): a safe load refuses it
    subprocess.run([sys.executable, "-c", "import torch, datetime; "
                    f"torch.save({{'model': datetime.datetime.now()}}, {str(evil)!r})"], check=True, env=ENV)
    line = one_line_error(cli("generate", evil, "--prompt", "x"), str(evil))
    assert "weights_only" not in line and "never loads" in line


# --------------------------------------------------------------------------- sbatch scripts


def test_sbatch_scripts_run_the_installation_that_wrote_them(data, tmp_path):
    from hpcllm.launch import TrainJob, load_profile, render_train

    job = TrainJob(train_args=["--data", str(data), "--out", "runs/x"])
    text = render_train(job, load_profile("default"))  # a profile that sets up nothing
    assert f"{sys.executable} -m hpcllm train" in text or f"{os.path.abspath(sys.executable)} -m hpcllm train" in text
    # a profile that sets up the environment (venv, modules) keeps `hpcllm` from its PATH
    text = render_train(job, load_profile("cpu"))
    assert " hpcllm train" in text and "-m hpcllm train" not in text


def test_a_killed_exports_half_written_file_is_removed_by_the_next(data, tmp_path):
    run = tmp_path / "run"
    run_train([*TINY, "--data", str(data), "--out", str(run), "--steps", "1"])
    out = tmp_path / "model.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f"model.pt.tmp{dead.pid}"
    stale.write_bytes(b"half a file")
    r = cli("export", run, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and not stale.exists()
