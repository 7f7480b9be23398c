"""Sbatch scripts from the templates in slurm/templates/, and submitting them as chains.

    profile = load_profile("gpu4")
    job = TrainJob(sbatch=SbatchOptions(job_name="gpt", nodes=4, time="12:00:00"),
                   train_args=["--data", "data/ds", "--out", "runs/gpt", "--model", "124M"])
    text = render_train(job, profile)          # validated, every user value quoted
    ids = submit_chain([Script("train.sbatch", text)], directory="jobs/")

Nothing is written or submitted until every check has passed: an unknown profile, an
impossible request or a missing dataset raises HpcllmError first.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpcllm import __version__, exitcodes
from hpcllm.errors import HpcllmError
from hpcllm.launch import quoting as Q
from hpcllm.launch.profiles import LAUNCHERS, Profile, assets_dir

#: srun --wait: seconds a step's remaining tasks may run after its first task ended
SRUN_WAIT_S = 60

#: train config fields that are Horovod knobs -> the environment variable each sets
HOROVOD_KNOBS = {
    "hierarchical_allreduce": "HOROVOD_HIERARCHICAL_ALLREDUCE",
    "fusion_threshold_mb": "HOROVOD_FUSION_THRESHOLD",
    "cycle_time_ms": "HOROVOD_CYCLE_TIME",
    "timeline": "HOROVOD_TIMELINE",
    "stall_check_s": "HOROVOD_STALL_CHECK_TIME_SECONDS",
    "stall_shutdown_s": "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
}


@dataclass
class SbatchOptions:
    """The ``#SBATCH`` lines of a job; None means "not set" (the profile's default, else Slurm's)."""

    job_name: str | None = None
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    time: str | None = None
    nodes: int | None = None
    ntasks_per_node: int | None = None
    gpus_per_node: int | None = None
    gres: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    exclusive: bool | None = None
    constraint: str | None = None
    #: stdout/stderr file patterns (%x job name, %j job id, %A/%a array job/task)
    output: str | None = None
    error: str | None = None
    mail_user: str | None = None
    mail_type: str | None = None
    dependency: str | None = None
    chdir: str | None = None

    def with_defaults(self, defaults: dict) -> "SbatchOptions":
        """Fill unset fields from a profile's ``[sbatch]`` table."""
        known = set(self.__dataclass_fields__)
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise HpcllmError(f"profile [sbatch]: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass
class TrainJob:
    """A training job: sbatch options, the `hpcllm train` arguments and how to launch them."""

    sbatch: SbatchOptions = field(default_factory=SbatchOptions)
    #: `hpcllm train` arguments, passed through unchanged
    train_args: list = field(default_factory=list)
    #: srun, mpirun or horovodrun (None: the profile's)
    launcher: str | None = None
    #: requeue after a checkpointed stop at most this many times
    max_requeues: int = 5
    #: seconds before the time limit at which Slurm sends USR1 to the batch script
    signal_lead_s: int = 300
    #: False: no --signal/--requeue, a stop request just ends the job
    requeue: bool = True
    #: extra environment for this job (on top of the profile's)
    env: dict = field(default_factory=dict)
    #: how to run hpcllm on the compute nodes (None: see :func:`hpcllm_command`)
    hpcllm_cmd: list | None = None
    #: check that --data exists (off in a chain, where preprocessing makes it)
    check_data: bool = True


@dataclass
class PreprocessJob:
    """A preprocessing job array (one task per slice) and its merge job."""

    sbatch: SbatchOptions = field(default_factory=SbatchOptions)
    #: `hpcllm preprocess` arguments (inputs, --out and options), passed through unchanged
    preprocess_args: list = field(default_factory=list)
    #: array tasks T (--num-tasks T, --task-id from SLURM_ARRAY_TASK_ID)
    tasks: int = 1
    #: at most this many tasks run at once (--array=...%MAX); None: no limit
    max_parallel: int | None = None
    env: dict = field(default_factory=dict)
    hpcllm_cmd: list | None = None


def hpcllm_command(cmd: list | None, profile) -> list[str]:
    """How a job runs hpcllm: ``cmd`` when given; ``hpcllm`` from the job's PATH when the
    cluster profile sets the environment up (a venv, modules or setup lines); otherwise the
    installation that wrote the script, by the absolute path of its interpreter
    (``/path/to/venv/bin/python -m hpcllm``), so a script written from a virtualenv that the
    job does not activate still runs it on every node."""
    if cmd:
        return [str(c) for c in cmd]
    if profile.venv or profile.modules or profile.setup:
        return ["hpcllm"]
    return [os.path.abspath(sys.executable), "-m", "hpcllm"]


@dataclass
class Script:
    """A rendered batch script; ``after`` names the script it waits for (afterok)."""

    name: str
    text: str
    after: str | None = None


# --------------------------------------------------------------------------- rendering


def _jinja():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(assets_dir() / "templates")),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["q"] = Q.q
    env.filters["qjoin"] = Q.qjoin
    return env


def sbatch_lines(opts: SbatchOptions, profile: Profile, extra: list[tuple[str, str | None]] = ()) -> list[str]:
    """Validated ``#SBATCH`` lines, in a fixed order."""
    o = opts
    pairs: list[tuple[str, object]] = []

    def add(name, value, check=None):
        if value is None or value is False:
            return
        if value is True:
            pairs.append((name, None))
            return
        pairs.append((name, check(value) if check else value))

    add("job-name", o.job_name, Q.job_name)
    add("account", o.account, lambda v: Q.word("--account", v))
    add("partition", o.partition, lambda v: Q.word("--partition", v))
    add("qos", o.qos, lambda v: Q.word("--qos", v))
    add("time", o.time, Q.time_limit)
    add("nodes", o.nodes, lambda v: _positive("--nodes", v))
    add("ntasks-per-node", o.ntasks_per_node, lambda v: _positive("--ntasks-per-node", v))
    if o.gres is not None:
        add("gres", o.gres, lambda v: Q.word("--gres", v))
    elif o.gpus_per_node:
        if profile.gpu_request == "gres":
            add("gres", f"gpu:{o.gpus_per_node}")
        else:
            add("gpus-per-node", o.gpus_per_node)
    add("cpus-per-task", o.cpus_per_task, lambda v: _positive("--cpus-per-task", v))
    add("mem", o.mem, Q.memory)
    add("exclusive", bool(o.exclusive))
    add("constraint", o.constraint, Q.constraint)
    add("output", o.output, lambda v: Q.no_control("--output", v))
    add("error", o.error, lambda v: Q.no_control("--error", v))
    add("mail-user", o.mail_user, Q.mail_user)
    add("mail-type", o.mail_type, Q.mail_type)
    add("dependency", o.dependency, Q.dependency)
    add("chdir", o.chdir, lambda v: Q.no_control("--chdir", v))
    pairs += list(extra)
    lines = []
    for name, value in pairs:
        lines.append(f"#SBATCH --{name}" if value is None else f"#SBATCH --{name}={Q.sbatch_value('--' + name, value)}")
    return lines


def _positive(name, v) -> int:
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise HpcllmError(f"{name}: expected a whole number, got {v!r}") from None
    if n < 1:
        raise HpcllmError(f"{name}: must be >= 1, got {n}")
    return n


def _env_pairs(*dicts) -> list[tuple[str, str]]:
    merged: dict[str, str] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if isinstance(v, bool):
                v = "1" if v else "0"
            merged[Q.env_name(k)] = Q.no_control(f"environment {k}", str(v))
    return list(merged.items())


def _common_context(profile: Profile, sbatch: list[str], env: list[tuple[str, str]], command: str) -> dict:
    for m in profile.modules:
        Q.no_control("profile modules", m)
    return {
        "version": __version__, "profile": profile, "sbatch_lines": sbatch, "env": env,
        "command": command, "modules": list(profile.modules), "venv": profile.venv,
        "setup": list(profile.setup), "REQUEUE": exitcodes.REQUEUE,
    }


# --------------------------------------------------------------------------- training


def parse_train_args(train_args: list[str]):
    """Parse `hpcllm train` arguments with train's own generated options (hpcllm/config.py).

    Returns (flags, TrainConfig); a bad option or value raises HpcllmError, so a typo fails
    here instead of after hours in the queue.
    """
    import click

    from hpcllm.config import add_train_options, build_config

    @click.command()
    @add_train_options
    def _probe(**kw):  # never invoked: only parsed
        pass

    try:
        ctx = _probe.make_context("hpcllm train", list(train_args))
    except click.UsageError as e:
        raise HpcllmError(f"hpcllm train options: {e.format_message()}") from None
    flags = dict(ctx.params)
    return flags, build_config(**flags)


def train_command_args(job: TrainJob, profile: Profile) -> tuple[list[str], dict, object]:
    """The final `hpcllm train` arguments, the Horovod environment and the parsed config."""
    args = [str(a) for a in job.train_args]
    for a in args:
        Q.no_control("hpcllm train argument", a)
    flags, cfg = parse_train_args(args)
    hvd_env: dict[str, str] = {}
    for knob, var in HOROVOD_KNOBS.items():
        value = flags.get(knob)
        if value is None and knob in profile.horovod:
            # a profile default: pass it to train too, which sets the Horovod env from its config
            value = profile.horovod[knob]
            args += _knob_flag(knob, value)
        if value is None:
            continue
        if knob == "fusion_threshold_mb":
            hvd_env[var] = str(int(float(value) * 1024 * 1024))
        elif knob == "hierarchical_allreduce":
            hvd_env[var] = hvd_env["HOROVOD_HIERARCHICAL_ALLGATHER"] = "1" if value else "0"
        elif isinstance(value, float) and value.is_integer():
            hvd_env[var] = str(int(value))  # Horovod parses the seconds knobs as integers
        else:
            hvd_env[var] = str(value)
    unknown = sorted(set(profile.horovod) - set(HOROVOD_KNOBS))
    if unknown:
        raise HpcllmError(f"{profile.path}: unknown [horovod] keys {', '.join(unknown)}; "
                          f"known: {', '.join(HOROVOD_KNOBS)}")
    if flags.get("resume") is None and job.requeue:
        # a requeued job must continue from its newest checkpoint; 'auto' starts fresh when none
        args += ["--resume", "auto"]
    if cfg.data.path is None:
        raise HpcllmError("hpcllm train options: --data DIR is required")
    if cfg.out is None:
        raise HpcllmError("hpcllm train options: --out RUN_DIR is required")
    if job.check_data and not (Path(cfg.data.path) / "manifest.json").is_file():
        raise HpcllmError(f"--data {cfg.data.path}: no dataset there (no manifest.json); run `hpcllm preprocess` "
                          "first or use `hpcllm slurm chain`")
    return args, hvd_env, cfg


def _knob_flag(knob: str, value) -> list[str]:
    flag = "--" + knob.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def resolve_train_sbatch(job: TrainJob, profile: Profile, pipeline_stages: int = 1) -> SbatchOptions:
    """Profile defaults, then checks of what the cluster can give and of the rank layout."""
    sb = job.sbatch.with_defaults(profile.sbatch)
    if sb.job_name is None:
        sb = replace(sb, job_name="hpcllm-train")
    if sb.output is None:
        sb = replace(sb, output="%x-%j.out")
    gpus = sb.gpus_per_node
    if gpus is not None and gpus > profile.gpus_per_node:
        raise HpcllmError(f"--gpus-per-node {gpus}: profile {profile.name!r} has "
                          f"{profile.gpus_per_node} GPU(s) per node")
    if sb.ntasks_per_node is None:
        # one rank per GPU; on CPU clusters one rank per node unless the profile says otherwise
        sb = replace(sb, ntasks_per_node=gpus or 1)
    if gpus and sb.ntasks_per_node > gpus:
        raise HpcllmError(f"--ntasks-per-node {sb.ntasks_per_node}: more ranks than the {gpus} GPU(s) per node")
    if profile.cpus_per_node and sb.ntasks_per_node * (sb.cpus_per_task or 1) > profile.cpus_per_node:
        raise HpcllmError(f"--ntasks-per-node {sb.ntasks_per_node} x --cpus-per-task {sb.cpus_per_task or 1}: "
                          f"more than the {profile.cpus_per_node} cores per node of profile {profile.name!r}")
    nodes = sb.nodes or 1
    world = nodes * sb.ntasks_per_node
    check_pipeline_layout(pipeline_stages, sb.ntasks_per_node, world)
    return sb


def check_pipeline_layout(stages: int, tasks_per_node: int, world: int) -> None:
    """With P pipeline stages, rank = dp_index * P + stage, and ranks are laid out in blocks
    (ranks 0..k-1 on the first node, ...): a pipeline's stages are consecutive ranks, so they
    stay within one node when P divides the ranks per node, or span whole nodes when the ranks
    per node divide P. Anything else would cut pipelines across nodes unevenly."""
    if stages <= 1:
        return
    if world % stages:
        raise HpcllmError(f"--pipeline-stages {stages}: the {world} ranks are not a multiple of the stages")
    if tasks_per_node % stages and stages % tasks_per_node:
        raise HpcllmError(f"--pipeline-stages {stages} with --ntasks-per-node {tasks_per_node}: pipelines "
                          "would straddle nodes; make one a multiple of the other")


def launcher_line(launcher: str, profile: Profile, command: list[str], cpus_per_task: int | None) -> str:
    """The launcher command line (started in the background by the template)."""
    cmd = Q.qjoin_wrapped(command)
    if launcher == "srun":
        # --kill-on-bad-exit=0: after a checkpointed stop every rank exits 75, and killing the
        # slower ranks when the first one exits would turn srun's status into 143 (no requeue).
        # A crashed rank still ends the job: the others exit at the watchdog's stall shutdown
        # (hpcllm.parallel.watchdog). --wait=60: a rank still running 60 s after another ended
        # (frozen, so its own watchdog cannot act) is killed; ranks ending a step normally all
        # leave the same final barrier within seconds of each other.
        parts = ["srun", "--mpi=pmix", "--kill-on-bad-exit=0", f"--wait={SRUN_WAIT_S}", "--distribution=block:block"]
        if cpus_per_task:
            # Slurm 22.05's srun does not take --cpus-per-task from the allocation
            parts.append('--cpus-per-task="$SLURM_CPUS_PER_TASK"')
        return " ".join(parts + [Q.qjoin(profile.srun_args), cmd]).replace("  ", " ")
    if launcher == "mpirun":
        mapping = '"ppr:${SLURM_NTASKS_PER_NODE}:node"'
        if cpus_per_task and cpus_per_task > 1:
            mapping = '"ppr:${SLURM_NTASKS_PER_NODE}:node:PE=${SLURM_CPUS_PER_TASK}"'
        parts = ["mpirun", '-np "$SLURM_NTASKS"', f"--map-by {mapping}", Q.qjoin(profile.mpirun_args), cmd]
        return " ".join(p for p in parts if p)
    if launcher == "horovodrun":
        parts = ["horovodrun", '-np "$SLURM_NTASKS"', '-H "$HPCLLM_HOSTS"', Q.qjoin(profile.horovodrun_args), cmd]
        return " ".join(p for p in parts if p)
    raise HpcllmError(f"--launcher {launcher}: expected one of {', '.join(LAUNCHERS)}")


def render_train(job: TrainJob, profile: Profile) -> str:
    """The training batch script: launcher in the background, USR1/TERM forwarded to it,
    requeue on exit status REQUEUE (75) only, at most ``max_requeues`` times."""
    launcher = job.launcher or profile.launcher
    if launcher not in LAUNCHERS:
        raise HpcllmError(f"--launcher {launcher}: expected one of {', '.join(LAUNCHERS)}")
    args, hvd_env, cfg = train_command_args(job, profile)
    sb = resolve_train_sbatch(job, profile, cfg.parallel.pipeline_stages)
    if job.max_requeues < 0:
        raise HpcllmError(f"--max-requeues {job.max_requeues}: must be >= 0")
    if job.signal_lead_s < 1:
        raise HpcllmError(f"--signal-lead {job.signal_lead_s}: must be >= 1 second")
    extra = [("signal", f"B:USR1@{int(job.signal_lead_s)}"), ("requeue", None), ("open-mode", "append")] \
        if job.requeue else []
    lines = sbatch_lines(sb, profile, extra)
    env = _env_pairs(profile.env, hvd_env, job.env)
    command = [*hpcllm_command(job.hpcllm_cmd, profile), "train", *args]
    ctx = _common_context(profile, lines, env, launcher_line(launcher, profile, command, sb.cpus_per_task))
    ctx.update(launcher=launcher, requeue=job.requeue, max_requeues=int(job.max_requeues),
               cpus_per_task=sb.cpus_per_task, kind="train")
    return _jinja().get_template("train.sbatch.j2").render(**ctx)


# --------------------------------------------------------------------------- preprocessing


def parse_preprocess_args(preprocess_args: list[str]) -> dict:
    """Parse `hpcllm preprocess` arguments with its own Click command, when it exists."""
    import click

    for a in preprocess_args:
        Q.no_control("hpcllm preprocess argument", str(a))
    try:
        from hpcllm.commands.data import preprocess as pre_cmd
    except ImportError:  # the data area is not installed: pass through unchecked
        return {}
    try:
        ctx = pre_cmd.make_context("hpcllm preprocess", [str(a) for a in preprocess_args])
    except click.UsageError as e:
        raise HpcllmError(f"hpcllm preprocess options: {e.format_message()}") from None
    return dict(ctx.params)


def _preprocess_out(params: dict, args: list[str]) -> str:
    for key in ("out", "output", "out_dir"):
        if params.get(key):
            return str(params[key])
    for i, a in enumerate(args):  # without the data command: find --out by hand
        if a in ("--out", "-o") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    raise HpcllmError("hpcllm preprocess options: --out DIR is required")


def count_work_units(inputs: list[str], params: dict) -> int:
    """How many work units the preprocessing splits across tasks (hpcllm.data.sources):
    more array tasks than that would leave tasks with nothing to do."""
    from hpcllm.data.sources import SourceOptions, parse_inputs, plan_units, resolve_files

    files = resolve_files(parse_inputs([str(i) for i in inputs]))
    opts = SourceOptions(text_key=params.get("text_key") or "text", txt_split=params.get("txt_split") or "none",
                         item_bytes=params.get("item_bytes") or (1 << 20))
    return len(plan_units(files, opts))


def render_preprocess(job: PreprocessJob, profile: Profile, check_inputs: bool = True) -> tuple[str, str | None]:
    """The array script (one slice per task) and the merge script (None for one task, which
    writes the dataset itself)."""
    args = [str(a) for a in job.preprocess_args]
    params = parse_preprocess_args(args)
    out = _preprocess_out(params, args)
    tasks = _positive("--tasks", job.tasks)
    if job.max_parallel is not None:
        _positive("--max-parallel", job.max_parallel)
    inputs = params.get("inputs")
    if inputs and check_inputs:
        units = count_work_units(list(inputs), params)
        if tasks > units:
            raise HpcllmError(f"--tasks {tasks}: more array tasks than the {units} work unit(s) of the inputs "
                              f"(about one per --item-bytes of input): use --tasks {units} or fewer")
    for flag in ("--num-tasks", "--task-id"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            raise HpcllmError(f"{flag} is set by the job array; leave it out of the preprocess options")
    sb = job.sbatch.with_defaults(profile.sbatch)
    sb = replace(sb, nodes=1, ntasks_per_node=1, gpus_per_node=None, gres=None)
    name = sb.job_name or "hpcllm-preprocess"
    array_spec = f"0-{tasks - 1}" + (f"%{int(job.max_parallel)}" if job.max_parallel else "")
    array_sb = replace(sb, job_name=name, output=sb.output or "%x-%A_%a.out")
    merge_sb = replace(sb, job_name=f"{name}-merge", output=sb.output or "%x-%j.out",
                       dependency=None, time=sb.time)
    env = _env_pairs(profile.env, job.env)
    hp = hpcllm_command(job.hpcllm_cmd, profile)
    array_cmd = (Q.qjoin([*hp, "preprocess", *args, "--num-tasks", str(tasks)])
                 + ' --task-id "$SLURM_ARRAY_TASK_ID"')
    merge_cmd = Q.qjoin([*hp, "preprocess", "merge", out])
    jinja = _jinja()
    array_ctx = _common_context(profile, sbatch_lines(array_sb, profile, [("array", array_spec)]), env, array_cmd)
    array_ctx.update(kind="preprocess", tasks=tasks, out=out)
    merge_ctx = _common_context(profile, sbatch_lines(merge_sb, profile), env, merge_cmd)
    merge_ctx.update(kind="merge", tasks=tasks, out=out)
    array_text = jinja.get_template("preprocess.sbatch.j2").render(**array_ctx)
    if tasks == 1:
        return array_text, None
    return array_text, jinja.get_template("merge.sbatch.j2").render(**merge_ctx)


# --------------------------------------------------------------------------- files, submission


def write_scripts(scripts: list[Script], directory: str | os.PathLike) -> list[Path]:
    """Write each script as DIRECTORY/NAME (executable); returns the paths."""
    from hpcllm.fileio import write_error

    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error("the batch scripts", d, e) from None
    paths = []
    for s in scripts:
        p = d / s.name
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        try:  # a reader (sbatch, another writer) sees the old script or the new one, never half of one
            tmp.write_text(s.text)
            tmp.chmod(0o755)
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error("the batch script", p, e) from None
        paths.append(p)
    return paths


def sbatch_command(path: str | os.PathLike, dependency: str | None = None) -> list[str]:
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    return cmd + [str(path)]


def describe_chain(scripts: list[Script], directory: str | os.PathLike) -> str:
    """The sbatch commands a submission runs, as a shell snippet (printed by --dry-run)."""
    var = {s.name: re.sub(r"\W", "_", Path(s.name).stem).upper() + "_ID" for s in scripts}
    lines = []
    for s in scripts:
        dep = f" --dependency=afterok:${var[s.after]}" if s.after else ""
        lines.append(f"{var[s.name]}=$(sbatch --parsable{dep} {Q.q(Path(directory) / s.name)})")
    return "\n".join(lines)


def submit_chain(scripts: list[Script], directory: str | os.PathLike, env: dict | None = None) -> list[str]:
    """Write the scripts, then ``sbatch --parsable`` each, with ``afterok`` on the one it
    follows. Returns the job ids in order."""
    if shutil.which("sbatch", path=(env or os.environ).get("PATH")) is None:
        raise HpcllmError("sbatch not found: run this on a Slurm login node (or use --dry-run / -o)")
    paths = write_scripts(scripts, directory)
    ids: dict[str, str] = {}
    out = []
    for s, p in zip(scripts, paths):
        dep = ids[s.after] if s.after else None
        res = subprocess.run(sbatch_command(p, dep), capture_output=True, text=True, env=env)
        if res.returncode != 0:
            done = ", ".join(f"{k}={v}" for k, v in ids.items())
            raise HpcllmError(f"sbatch {p} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
                              + (f" (already submitted: {done})" if done else ""))
        job_id = res.stdout.strip().split(";")[0]
        ids[s.name] = job_id
        out.append(job_id)
    return out


def shell_split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise HpcllmError(f"cannot split {text!r}: {e}") from None
