"""Script generation without Slurm: #SBATCH mapping, profiles, pass-through, quoting, checks."""
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from hpcllm.config import add_train_options, option_specs
from hpcllm.errors import HpcllmError
from hpcllm.launch import (PreprocessJob, SbatchOptions, TrainJob, available_profiles, load_profile,
                           render_preprocess, render_train)
from hpcllm.launch.slurm import check_pipeline_layout
from tests.launch.conftest import hpcllm


def sbatch_directives(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value if _ else True
    return out


def train_command(text: str) -> list[str]:
    """The words of the launcher line that starts training, as bash would split them."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if " train" in l and not l.startswith("#") and
                 l.split()[0] in ("srun", "mpirun", "horovodrun"))
    cmd = []
    for line in lines[start:]:
        cmd.append(line.rstrip("\\").rstrip(" &"))
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(cmd))
    return words[words.index("train") + 1:]


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    p = tmp_path / "s.sh"
    p.write_text(text)
    res = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def job(dataset, *args, **kw):
    return TrainJob(train_args=["--data", str(dataset), "--out", "runs/x", *args], **kw)


def test_sbatch_options_map_to_directives(dataset, tmp_path):
    sb = SbatchOptions(job_name="gpt small", account="proj1", partition="batch", qos="high", time="2-00:00:00",
                       nodes=4, ntasks_per_node=4, gpus_per_node=4, cpus_per_task=8, mem="64G", exclusive=True,
                       constraint="a100&ib", output="logs/%x-%j.out", error="logs/%x-%j.err",
                       mail_user="me@example.org", mail_type="END,fail", dependency="afterok:12:13")
    text = render_train(job(dataset, sbatch=sb), load_profile("gpu4"))
    d = sbatch_directives(text)
    assert d == {
        "--job-name": '"gpt small"', "--account": "proj1", "--partition": "batch", "--qos": "high",
        "--time": "2-00:00:00", "--nodes": "4", "--ntasks-per-node": "4", "--gpus-per-node": "4",
        "--cpus-per-task": "8", "--mem": "64G", "--exclusive": True, "--constraint": '"a100&ib"',
        "--output": "logs/%x-%j.out", "--error": "logs/%x-%j.err", "--mail-user": "me@example.org",
        "--mail-type": "END,FAIL", "--dependency": "afterok:12:13", "--signal": "B:USR1@300",
        "--requeue": True, "--open-mode": "append",
    }
    bash_syntax_ok(text, tmp_path)


def test_profile_defaults_and_gres(dataset, tmp_path):
    d = sbatch_directives(render_train(job(dataset), load_profile("gpu4")))
    # the 4-GPU profile: whole nodes, one rank per GPU
    assert (d["--partition"], d["--gpus-per-node"], d["--ntasks-per-node"], d["--exclusive"]) == ("gpu", "4", "4", True)
    prof = tmp_path / "site.toml"
    prof.write_text('gpus_per_node = 8\ngpu_request = "gres"\n[sbatch]\ngpus_per_node = 8\n')
    d = sbatch_directives(render_train(job(dataset), load_profile(str(prof))))
    assert d["--gres"] == "gpu:8" and "--gpus-per-node" not in d and d["--ntasks-per-node"] == "8"
    cpu = render_train(job(dataset, "--threads", "16"), load_profile("cpu"))
    d = sbatch_directives(cpu)
    assert "--gpus-per-node" not in d and d["--ntasks-per-node"] == "4" and d["--cpus-per-task"] == "16"
    assert "mpirun -np \"$SLURM_NTASKS\"" in cpu and "module load openmpi/4.1" in cpu


def test_all_profiles_load_and_render(dataset, tmp_path):
    assert {"default", "gpu4", "cpu"} <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert p.description
        text = render_train(job(dataset), p)
        assert "export HDF5_USE_FILE_LOCKING=FALSE" in text
        bash_syntax_ok(text, tmp_path)


def _value_for(spec):
    """A valid value that differs from the default (the config's own checks still apply)."""
    if spec.choices:
        return spec.choices[-1]
    if spec.type is bool:
        return not spec.default
    if spec.type is float:
        return spec.default / 2 if spec.default else 0.5
    if spec.type is int:
        return {"d_model": 96, "moe_top_k": 2, "moe_experts": 4}.get(
            spec.name, spec.default + 1 if spec.default is not None else 3)
    return f"v {spec.name} 'x'"


def test_every_train_option_passes_through_unchanged(dataset):
    """Each `hpcllm train` flag given to the generator reaches `hpcllm train` in the script with
    the same value (parsed back with train's own options)."""
    given = {}
    args = []
    for spec in option_specs():
        if spec.param in ("data", "out"):
            continue
        value = _value_for(spec)
        given[spec.param] = value
        args += [spec.flag] if spec.type is bool else [spec.flag, str(value)]
    # a layout every option applies to: stages (for --schedule/--microbatches/--balance),
    # --accum equal to --microbatches, and no --compile with the zbh1 schedule
    # (and no tensor parallelism: ZeRO does not combine with it yet; its flags are checked below)
    args += ["--pipeline-stages", "2", "--accum", str(given["microbatches"]), "--no-compile", "--steps", "5",
             "--timeline", "/tmp/tl x.json", "--tensor-parallel", "1", "--no-sequence-parallel"]
    given.update(pipeline_stages=2, accum=given["microbatches"], compile=False, steps=5, timeline="/tmp/tl x.json",
                 tensor_parallel=1, sequence_parallel=False)
    text = render_train(job(dataset, *args, sbatch=SbatchOptions(ntasks_per_node=2)), load_profile("default"))

    @click.command()
    @add_train_options
    def probe(**kw):
        pass

    parsed = probe.make_context("train", train_command(text)).params
    for param, value in given.items():
        assert parsed[param] == value, param
    assert parsed["data"] == str(dataset) and parsed["out"] == "runs/x"
    # the Horovod knobs are also exported for the whole job
    assert "export HOROVOD_TIMELINE='/tmp/tl x.json'" in text
    assert "export HOROVOD_HIERARCHICAL_ALLREDUCE=1" in text
    assert "export HOROVOD_HIERARCHICAL_ALLGATHER=1" in text  # ZeRO's parameter all-gathers follow
    assert parsed["zero_stage"] == 1  # --zero-stage passes through (1: it composes with the stages)
    tp = render_train(job(dataset, "--tensor-parallel", "2", "--sequence-parallel", "--pipeline-stages", "2",
                          sbatch=SbatchOptions(ntasks_per_node=4)), load_profile("default"))
    tp_parsed = probe.make_context("train", train_command(tp)).params
    assert tp_parsed["tensor_parallel"] == 2 and tp_parsed["sequence_parallel"] is True
    assert "export HOROVOD_FUSION_THRESHOLD=33554432" in text  # 32 MiB (half the default)


def test_resume_auto_added_and_profile_knobs_reach_train(dataset):
    text = render_train(job(dataset), load_profile("gpu4"))
    words = train_command(text)
    assert words[-2:] == ["--resume", "auto"]
    # profile knobs: exported and passed as flags, so train's own config agrees
    assert "--hierarchical-allreduce" in words and "export HOROVOD_HIERARCHICAL_ALLREDUCE=1" in text
    assert "--resume" not in train_command(render_train(job(dataset, requeue=False), load_profile("gpu4")))
    assert train_command(render_train(job(dataset, "--resume", "runs/x/checkpoints/step-00000010"),
                                      load_profile("default"))).count("--resume") == 1


@pytest.mark.parametrize("launcher,expect", [
    ("srun", "srun --mpi=pmix --kill-on-bad-exit=0 --wait=60 --distribution=block:block"),
    ("mpirun", 'mpirun -np "$SLURM_NTASKS" --map-by "ppr:${SLURM_NTASKS_PER_NODE}:node"'),
    ("horovodrun", 'horovodrun -np "$SLURM_NTASKS" -H "$HPCLLM_HOSTS"'),
])
def test_launchers(dataset, tmp_path, launcher, expect):
    text = render_train(job(dataset, launcher=launcher), load_profile("default"))
    assert expect in text
    bash_syntax_ok(text, tmp_path)
    # launched in the background and waited for, so the USR1 trap runs while training runs
    assert "launcher_pid=$!" in text and 'wait "$launcher_pid"' in text
    assert "trap 'forward_stop USR1' USR1" in text
    if launcher == "horovodrun":
        # horovodrun's children (its mpirun) get the signal too
        assert 'pkill --signal "$1" -P "$launcher_pid"' in text


def test_requeue_logic_in_script(dataset):
    text = render_train(job(dataset, max_requeues=7), load_profile("default"))
    assert 'if [ "$status" -eq 75 ]; then' in text
    assert 'if [ "$restarts" -ge 7 ]; then' in text
    assert 'job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in text
    assert 'scontrol requeue "$job"' in text
    no = render_train(job(dataset, requeue=False), load_profile("default"))
    assert "scontrol requeue" not in no and "--signal" not in no and "--requeue" not in no


def test_preprocess_array_and_merge(corpus, tmp_path):
    pj = PreprocessJob(preprocess_args=[str(corpus / "*.jsonl"), "--out", "ds out", "--item-bytes", "4096"],
                       tasks=4, max_parallel=2, sbatch=SbatchOptions(cpus_per_task=2))
    array, merge = render_preprocess(pj, load_profile("default"))
    d = sbatch_directives(array)
    assert d["--array"] == "0-3%2" and d["--output"] == "%x-%A_%a.out" and d["--cpus-per-task"] == "2"
    cmd = next(l for l in array.splitlines() if " preprocess " in l and not l.startswith(("#", "echo")))
    # the installation that rendered it (the default profile sets up no environment)
    assert shlex.split(cmd) == [sys.executable, "-m", "hpcllm", "preprocess", str(corpus / "*.jsonl"), "--out",
                                "ds out", "--item-bytes", "4096", "--num-tasks", "4", "--task-id",
                                "$SLURM_ARRAY_TASK_ID"]
    assert 'preprocess merge \'ds out\'' in merge and "--array" not in merge
    for t in (array, merge):
        bash_syntax_ok(t, tmp_path)


def test_array_larger_than_the_data_is_refused(corpus):
    pj = PreprocessJob(preprocess_args=[str(corpus / "*.jsonl"), "--out", "x", "--item-bytes", "1000000"],
                       tasks=3)
    with pytest.raises(HpcllmError, match=r"--tasks 3: more array tasks than the 2 work unit"):
        render_preprocess(pj, load_profile("default"))


def test_pipeline_layout():
    check_pipeline_layout(2, 4, 8)    # two pipelines per node
    check_pipeline_layout(8, 4, 16)   # a pipeline spans two whole nodes
    with pytest.raises(HpcllmError, match="straddle"):
        check_pipeline_layout(3, 4, 12)
    with pytest.raises(HpcllmError, match="not a multiple"):
        check_pipeline_layout(4, 2, 6)


@pytest.mark.parametrize("extra,message", [
    (["--profile", "nosuch"], "unknown cluster profile 'nosuch'"),
    (["--profile", "gpu4", "--gpus-per-node", "8"], "--gpus-per-node 8: profile 'gpu4' has 4 GPU(s) per node"),
    (["--gpus-per-node", "1"], None),  # allowed on the default profile
    (["--profile", "cpu", "--gpus-per-node", "1"], "profile 'cpu' has 0 GPU(s)"),
    (["--profile", "cpu", "-c", "32"], "more than the 64 cores per node"),
    (["--job-name", "a\nb"], "control characters"),
    (["--job-name", "a/b"], "'/' is not allowed"),
    (["--partition", "x;rm"], "--partition"),
    (["--time", "soon"], "--time"),
    (["--env", "A B=1"], "environment variable name"),
    (["--pipeline-stages", "3", "--ntasks-per-node", "2", "-N", "3"], "straddle"),
    (["--steps", "0"], "--steps 0"),
])
def test_bad_requests_fail_before_writing(dataset, tmp_path, extra, message):
    script = tmp_path / "job.sbatch"
    res = hpcllm(["slurm", "train", "-o", script, "--data", dataset, "--out", tmp_path / "run", *extra])
    if message is None:
        assert res.returncode == 0, res.stderr
        assert script.is_file()
        return
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in res.stderr
    assert not script.exists()


def test_missing_dataset_fails_before_writing(tmp_path):
    script = tmp_path / "job.sbatch"
    res = hpcllm(["slurm", "train", "-o", script, "--data", tmp_path / "nope", "--out", tmp_path / "run"])
    assert res.returncode == 2 and "no dataset there" in res.stderr and not script.exists()


def test_chain_dry_run_writes_nothing(corpus, tmp_path):
    out_dir = tmp_path / "jobs"
    res = hpcllm(["slurm", "chain", "--dry-run", "-o", out_dir, "--tasks", "2", "--max-parallel", "1",
                  "--preprocess", f"'{corpus}/*.jsonl' --out {tmp_path}/ds --item-bytes 4096",
                  "-N", "2", "--ntasks-per-node", "2", "--out", tmp_path / "run", "--steps", "5"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not out_dir.exists()
    text = res.stdout
    assert text.count("#!/bin/bash") == 3
    assert "#SBATCH --array=0-1%1" in text
    cmds = text.split("# ===== sbatch commands =====")[1].strip().splitlines()
    assert cmds == [
        f"PREPROCESS_ID=$(sbatch --parsable {out_dir}/preprocess.sbatch)",
        f"PREPROCESS_MERGE_ID=$(sbatch --parsable --dependency=afterok:$PREPROCESS_ID {out_dir}/preprocess-merge.sbatch)",
        f"TRAIN_ID=$(sbatch --parsable --dependency=afterok:$PREPROCESS_MERGE_ID {out_dir}/train.sbatch)",
    ]
    # training reads what preprocessing writes
    assert f"--data {tmp_path}/ds" in text


def test_injection_is_quoted(dataset, tmp_path):
    evil = "x'; touch PWNED; echo '$(touch PWNED2)`touch PWNED3`"
    text = render_train(job(dataset, "--timeline", evil, sbatch=SbatchOptions(job_name="n $(touch PWNED4)"),
                            env={"NOTE": evil}), load_profile("default"))
    assert sbatch_directives(text)["--job-name"] == '"n $(touch PWNED4)"'
    assert train_command(text)[train_command(text).index("--timeline") + 1] == evil
    # the environment block, run by bash, sets the values literally and runs nothing
    env_block = "\n".join(l for l in text.splitlines() if l.startswith("export "))
    res = subprocess.run(["bash", "-c", env_block + '\nprintf %s "$NOTE"'], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.stdout == evil
    assert list(tmp_path.iterdir()) == []


def test_examples_are_current():
    from hpcllm.launch.examples import main

    assert main(["--check"]) == 0, "run: python -m hpcllm.launch.examples"
