"""`hpcllm slurm preprocess|train|chain|profiles`: write (and optionally submit) sbatch scripts.

Thin Click layer over hpcllm.launch: options become SbatchOptions / TrainJob / PreprocessJob,
the library renders, checks and submits.
"""
from __future__ import annotations

from pathlib import Path

import click

from hpcllm.config import add_train_options, to_cli_args
from hpcllm.errors import HpcllmError
from hpcllm.options import AT_LEAST_1, NON_NEGATIVE, number

PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def sbatch_options(func):
    """The sbatch options, under sbatch's own names."""
    opts = [
        click.option("--profile", default="default", show_default=True,
                     help="Cluster profile: a name from slurm/profiles/ or a path to a .toml file."),
        click.option("--job-name", "-J", default=None, help="Job name (%x in file patterns)."),
        click.option("--account", "-A", default=None, help="Account to charge."),
        click.option("--partition", "-p", default=None, help="Partition (queue)."),
        click.option("--qos", default=None, help="Quality of service."),
        click.option("--time", "-t", "time_limit", default=None, help="Time limit: MINUTES, HH:MM:SS or D-HH:MM."),
        click.option("--cpus-per-task", "-c", type=number(int, AT_LEAST_1), default=None, help="Cores per task (threads per rank)."),
        click.option("--mem", default=None, help="Memory per node, e.g. 64G."),
        click.option("--exclusive", is_flag=True, default=None, help="Whole nodes only."),
        click.option("--constraint", "-C", default=None, help="Node features, e.g. a100."),
        click.option("--output", "stdout_pattern", default=None,
                     help="Job stdout file [default: %x-%j.out; arrays %x-%A_%a.out]."),
        click.option("--error", "stderr_pattern", default=None, help="Job stderr file [default: with stdout]."),
        click.option("--mail-user", default=None, help="Where Slurm sends mail."),
        click.option("--mail-type", default=None, help="When: BEGIN,END,FAIL,REQUEUE,ALL..."),
        click.option("--dependency", "-d", default=None, help="Start after other jobs, e.g. afterok:1234."),
        click.option("--chdir", "-D", default=None, help="Working directory of the job [default: where submitted]."),
        click.option("--env", "env_vars", multiple=True, metavar="KEY=VALUE",
                     help="Export this in the job (repeatable); the value is quoted."),
        click.option("--hpcllm-cmd", default=None,
                     help="How the job runs hpcllm, e.g. 'python -m hpcllm' or a full path [default: "
                          "this installation's interpreter, `/path/to/python -m hpcllm`; `hpcllm` when the "
                          "profile sets up the environment (venv, modules, setup)]."),
        click.option("--submit", is_flag=True, help="Submit with sbatch --parsable and print the job ids."),
        click.option("--dry-run", is_flag=True, help="Print the scripts and sbatch commands; write nothing."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _sbatch(kw: dict, **extra):
    from hpcllm.launch.slurm import SbatchOptions

    return SbatchOptions(
        job_name=kw.pop("job_name"), account=kw.pop("account"), partition=kw.pop("partition"),
        qos=kw.pop("qos"), time=kw.pop("time_limit"), cpus_per_task=kw.pop("cpus_per_task"),
        mem=kw.pop("mem"), exclusive=kw.pop("exclusive"), constraint=kw.pop("constraint"),
        output=kw.pop("stdout_pattern"), error=kw.pop("stderr_pattern"), mail_user=kw.pop("mail_user"),
        mail_type=kw.pop("mail_type"), dependency=kw.pop("dependency"), chdir=kw.pop("chdir"), **extra)


def _cmd(value):
    """--hpcllm-cmd as words, or None (the default: see hpcllm.launch.slurm.hpcllm_command)."""
    from hpcllm.launch.slurm import shell_split

    return shell_split(value) if value else None


def _env(pairs) -> dict:
    from hpcllm.launch.quoting import env_assignment

    return dict(env_assignment(p) for p in pairs)


def _emit(scripts, target: str | None, default_dir: str, submit: bool, dry_run: bool, single_file: bool):
    """Write (or print) the scripts, then submit them if asked."""
    from hpcllm.launch.slurm import describe_chain, submit_chain, write_scripts

    if single_file and target:
        directory = str(Path(target).parent)
    else:
        directory = target or default_dir
    if dry_run:
        for s in scripts:
            click.echo(f"# ===== {Path(directory) / s.name} =====")
            click.echo(s.text, nl=False)
        click.echo("# ===== sbatch commands =====")
        click.echo(describe_chain(scripts, directory))
        return
    if submit:
        ids = submit_chain(scripts, directory)
        for s, job_id in zip(scripts, ids):
            click.echo(f"{job_id}\t{s.name}")
        return
    for p in write_scripts(scripts, directory):
        click.echo(str(p))


@click.group()
def slurm():
    """Write sbatch scripts for preprocessing arrays, training and whole chains (and submit them).

    Scripts come from templates in slurm/templates/ with a cluster profile (slurm/profiles/);
    every value you give is validated or shell-quoted. Read them, or add --submit.
    """


@slurm.command("profiles")
def profiles_cmd():
    """List the cluster profiles shipped with hpcllm."""
    from hpcllm.launch.profiles import available_profiles, load_profile

    for name in available_profiles():
        click.echo(f"{name:10s} {load_profile(name).description}")


def _train_job_options(func):
    opts = [
        click.option("--nodes", "-N", type=number(int, AT_LEAST_1), default=None, help="Nodes."),
        click.option("--ntasks-per-node", type=number(int, AT_LEAST_1), default=None,
                     help="Ranks per node [default: GPUs per node, else 1 or the profile's]."),
        click.option("--gpus-per-node", type=number(int, NON_NEGATIVE), default=None, help="GPUs per node (at most the profile's)."),
        click.option("--gres", default=None, help="Generic resources instead of --gpus-per-node, e.g. gpu:a100:4."),
        click.option("--launcher", type=click.Choice(["srun", "mpirun", "horovodrun"]), default=None,
                     help="srun --mpi=pmix, mpirun inside the allocation, or horovodrun [default: the profile's]."),
        click.option("--max-requeues", type=number(int, NON_NEGATIVE), default=5, show_default=True,
                     help="Requeue after a checkpointed stop at most this many times."),
        click.option("--signal-lead", type=number(int, NON_NEGATIVE), default=300, show_default=True,
                     help="Seconds before the time limit when the job checkpoints and requeues (USR1)."),
        click.option("--requeue/--no-requeue", default=True, show_default=True,
                     help="Requeue after a checkpointed stop (time limit, preemption)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _split_train_kwargs(kw: dict) -> dict:
    """Pop the generated `hpcllm train` options out of kw; returns them."""
    from hpcllm.config import option_specs

    names = {s.param for s in option_specs()} | {"config_file"}
    return {k: kw.pop(k) for k in list(kw) if k in names}


def _train_job(kw: dict, check_data: bool, extra_args=()):
    from hpcllm.launch.slurm import TrainJob, shell_split

    train_flags = _split_train_kwargs(kw)
    sb = _sbatch(kw, nodes=kw.pop("nodes"), ntasks_per_node=kw.pop("ntasks_per_node"),
                 gpus_per_node=kw.pop("gpus_per_node"), gres=kw.pop("gres"))
    return TrainJob(
        sbatch=sb, train_args=to_cli_args(train_flags) + list(extra_args), launcher=kw.pop("launcher"),
        max_requeues=kw.pop("max_requeues"), signal_lead_s=kw.pop("signal_lead"), requeue=kw.pop("requeue"),
        env=_env(kw.pop("env_vars")), hpcllm_cmd=_cmd(kw.pop("hpcllm_cmd")), check_data=check_data)


def _common_pop(kw):
    return kw.pop("profile"), kw.pop("submit"), kw.pop("dry_run")


@slurm.command("train")
@sbatch_options
@_train_job_options
@click.option("-o", "--script", "script", type=click.Path(), default=None,
              help="Write the script here [default: ./train.sbatch].")
@add_train_options
@click.pass_context
def train_cmd(ctx, **kw):
    """A training job: every `hpcllm train` option is accepted and passed on unchanged.

    The script launches the ranks in the background, forwards USR1 (sent --signal-lead seconds
    before the time limit) and TERM to them, and requeues itself when training exits with
    status 75 after a checkpoint; the requeued job resumes with --resume auto.
    """
    from hpcllm.launch.profiles import load_profile
    from hpcllm.launch.slurm import Script, render_train

    profile_name, submit, dry_run = _common_pop(kw)
    script = kw.pop("script")
    job = _train_job(kw, check_data=True)
    text = render_train(job, load_profile(profile_name))
    name = Path(script).name if script else "train.sbatch"
    _emit([Script(name, text)], script, ".", submit, dry_run, single_file=True)


def _prep_options(func):
    opts = [
        click.option("--tasks", type=number(int, AT_LEAST_1), required=True, help="Array tasks T: --array=0-(T-1)."),
        click.option("--max-parallel", type=number(int, AT_LEAST_1), default=None, help="At most this many tasks at once (%MAX)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _prep_job(kw, args):
    from hpcllm.launch.slurm import PreprocessJob, shell_split

    return PreprocessJob(sbatch=_sbatch(kw), preprocess_args=list(args), tasks=kw.pop("tasks"),
                         max_parallel=kw.pop("max_parallel"), env=_env(kw.pop("env_vars")),
                         hpcllm_cmd=_cmd(kw.pop("hpcllm_cmd")))


@slurm.command("preprocess", context_settings=PASSTHROUGH)
@sbatch_options
@_prep_options
@click.option("-o", "--script", "script", type=click.Path(), default=None,
              help="Write the array script here [default: ./preprocess.sbatch]; the merge script goes "
                   "beside it as NAME-merge.sbatch.")
@click.pass_context
def preprocess_cmd(ctx, **kw):
    """A preprocessing job array plus its merge job (afterok on the whole array).

    Everything after the options (best after `--`) is passed to `hpcllm preprocess` unchanged,
    inputs and --out included; each task adds --num-tasks T --task-id $SLURM_ARRAY_TASK_ID.

    \b
    hpcllm slurm preprocess --tasks 16 --max-parallel 8 -c 8 -o prep.sbatch -- \\
        'corpus/*.jsonl.zst' --out data/corpus --tokenizer tok.json
    """
    from hpcllm.launch.profiles import load_profile
    from hpcllm.launch.slurm import Script, render_preprocess

    profile_name, submit, dry_run = _common_pop(kw)
    script = kw.pop("script")
    job = _prep_job(kw, ctx.args)
    array_text, merge_text = render_preprocess(job, load_profile(profile_name))
    name = Path(script).name if script else "preprocess.sbatch"
    stem = name[: -len(".sbatch")] if name.endswith(".sbatch") else name
    scripts = [Script(name, array_text)]
    if merge_text is not None:
        scripts.append(Script(f"{stem}-merge.sbatch", merge_text, after=name))
    _emit(scripts, script, ".", submit, dry_run, single_file=True)


@slurm.command("chain")
@sbatch_options
@_train_job_options
@_prep_options
@click.option("--preprocess", "preprocess_args", required=True, metavar="ARGS",
              help="`hpcllm preprocess` arguments as one string: inputs, --out DIR, options. The "
                   "training --data defaults to that --out.")
@click.option("--prep-cpus-per-task", type=number(int, AT_LEAST_1), default=None, help="Cores per preprocessing task.")
@click.option("--prep-time", default=None, help="Time limit of each preprocessing task and of the merge.")
@click.option("--prep-mem", default=None, help="Memory of each preprocessing task.")
@click.option("--prep-partition", default=None, help="Partition for preprocessing [default: --partition].")
@click.option("-o", "--script-dir", "script_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for preprocess.sbatch, preprocess-merge.sbatch, train.sbatch [default: .].")
@add_train_options
@click.pass_context
def chain_cmd(ctx, **kw):
    """Preprocessing array -> merge (afterok) -> training (afterok), in one go.

    The sbatch options (--nodes, --time, ...) and every `hpcllm train` option are for the
    training job; --prep-* set the preprocessing jobs. With --submit, prints the three job ids.
    """
    from dataclasses import replace

    from hpcllm.launch.profiles import load_profile
    from hpcllm.launch.slurm import (PreprocessJob, Script, _preprocess_out, parse_preprocess_args,
                                     render_preprocess, render_train, shell_split)

    profile_name, submit, dry_run = _common_pop(kw)
    profile = load_profile(profile_name)
    script_dir = kw.pop("script_dir")
    prep_args = shell_split(kw.pop("preprocess_args"))
    tasks, max_parallel = kw.pop("tasks"), kw.pop("max_parallel")
    prep_cpus, prep_time, prep_mem = kw.pop("prep_cpus_per_task"), kw.pop("prep_time"), kw.pop("prep_mem")
    prep_partition = kw.pop("prep_partition")
    out = _preprocess_out(parse_preprocess_args(prep_args), prep_args)
    extra = []
    if kw.get("data") is None and kw.get("config_file") is None:
        extra = ["--data", out]
    elif kw.get("data") is not None and Path(kw["data"]).resolve() != Path(out).resolve():
        raise HpcllmError(f"--data {kw['data']} differs from the preprocessing --out {out}")
    env_pairs = kw["env_vars"]
    hpcllm_cmd = kw["hpcllm_cmd"]
    base = {k: kw[k] for k in ("account", "qos", "mail_user", "mail_type", "chdir", "constraint")}
    job = _train_job(kw, check_data=False, extra_args=extra)
    from hpcllm.launch.slurm import SbatchOptions

    prep_sb = SbatchOptions(job_name=f"{job.sbatch.job_name or 'hpcllm'}-prep", time=prep_time,
                            cpus_per_task=prep_cpus, mem=prep_mem,
                            partition=prep_partition or job.sbatch.partition, **base)
    # the preprocessing jobs do not take the training job's default sbatch settings from the profile
    prep_profile = replace(profile, sbatch={k: v for k, v in profile.sbatch.items()
                                            if k in ("account", "qos", "partition", "time")})
    prep = PreprocessJob(sbatch=prep_sb, preprocess_args=prep_args, tasks=tasks, max_parallel=max_parallel,
                         env=_env(env_pairs), hpcllm_cmd=_cmd(hpcllm_cmd))
    array_text, merge_text = render_preprocess(prep, prep_profile)
    train_text = render_train(job, profile)
    scripts = [Script("preprocess.sbatch", array_text)]
    if merge_text is not None:
        scripts.append(Script("preprocess-merge.sbatch", merge_text, after="preprocess.sbatch"))
    scripts.append(Script("train.sbatch", train_text, after=scripts[-1].name))
    _emit(scripts, script_dir, ".", submit, dry_run, single_file=False)
