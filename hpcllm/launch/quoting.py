"""Putting user values into batch scripts without letting them become shell code.

Two places take values, with different rules:

* the script body is bash: every value goes through :func:`shlex.quote` (``q`` in the
  templates), so ``$(...)``, backticks, quotes and spaces stay literal text;
* ``#SBATCH`` lines are read by sbatch, not bash: there a newline would start a new script
  line, so control characters are refused, and a value with spaces is wrapped in double quotes
  (which sbatch strips), so a double quote inside the value is refused too.
"""
from __future__ import annotations

import re
import shlex

from hpcllm.errors import HpcllmError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE", re.I)
_MEM = re.compile(r"\d+[KMGT]?", re.I)
_WORD = re.compile(r"[A-Za-z0-9_.+@:,=\-]+")
_MAIL_TYPES = {"NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT",
               "TIME_LIMIT", "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS"}


def q(value) -> str:
    """Shell-quote one value for the script body."""
    return shlex.quote(str(value))


def qjoin(values) -> str:
    """Shell-quote every word of a command line."""
    return " ".join(q(v) for v in values)


def qjoin_wrapped(values, indent: str = "    ") -> str:
    """Like :func:`qjoin`, with a line continuation before each ``--option`` (readable scripts)."""
    out = []
    for v in values:
        v = str(v)
        if out and v.startswith("--"):
            out.append(" \\\n" + indent)
        elif out:
            out.append(" ")
        out.append(q(v))
    return "".join(out)


def no_control(name: str, value: str) -> str:
    value = str(value)
    if _CONTROL.search(value):
        raise HpcllmError(f"{name}: control characters (newline, tab, ...) are not allowed: {value!r}")
    return value


def sbatch_value(name: str, value) -> str:
    """Format a value for an ``#SBATCH --name=VALUE`` line (sbatch strips double quotes)."""
    value = no_control(name, str(value))
    if '"' in value:
        raise HpcllmError(f"{name}: a double quote cannot appear in an #SBATCH line: {value!r}")
    if value == "" or re.search(r"[\s'#\\$`;&|<>()*?!{}\[\]~]", value):
        return f'"{value}"'
    return value


def job_name(value: str) -> str:
    """Job names: any printable text but '/' (it goes into %x file names) and '"'."""
    value = no_control("--job-name", value)
    if not value or len(value) > 200:
        raise HpcllmError(f"--job-name: must be 1 to 200 characters, got {len(value)}")
    if "/" in value:
        raise HpcllmError(f"--job-name: '/' is not allowed (Slurm puts the name into file names via %x): {value!r}")
    return value


def word(name: str, value: str) -> str:
    """Account, partition, qos, constraint...: Slurm identifiers, no spaces or shell syntax."""
    value = str(value)
    if not _WORD.fullmatch(value):
        raise HpcllmError(f"{name}: expected letters, digits and _.+@:,=- only, got {value!r}")
    return value


def constraint(value: str) -> str:
    value = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.\-&|\[\]*():,!]+", value):
        raise HpcllmError(f"--constraint: unexpected characters in {value!r}")
    return value


def time_limit(value: str) -> str:
    """A Slurm time limit (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, UNLIMITED)
    whose fields are in range (25:99:99 is not a time)."""
    value = str(value)
    if not _TIME.fullmatch(value):
        raise HpcllmError(f"--time: expected MINUTES, HH:MM:SS or D-HH[:MM[:SS]], got {value!r}")
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return value
    days, _, clock = value.rpartition("-")
    fields = [int(x) for x in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        limits = [("hours", 24), ("minutes", 60), ("seconds", 60)]
    else:  # MINUTES, MM:SS, HH:MM:SS
        limits = {1: [("minutes", None)], 2: [("minutes", None), ("seconds", 60)],
                  3: [("hours", None), ("minutes", 60), ("seconds", 60)]}[len(fields)]
    for v, (what, lim) in zip(fields, limits):
        if lim is not None and v >= lim:
            raise HpcllmError(f"--time {value}: {what} must be < {lim}")
    return value


def memory(value: str) -> str:
    value = str(value)
    if not _MEM.fullmatch(value):
        raise HpcllmError(f"--mem: expected a number with optional K/M/G/T suffix, got {value!r}")
    return value


def mail_type(value: str) -> str:
    parts = [p.strip().upper() for p in str(value).split(",") if p.strip()]
    bad = [p for p in parts if p not in _MAIL_TYPES]
    if bad or not parts:
        raise HpcllmError(f"--mail-type: unknown {', '.join(bad) or value!r}; use {', '.join(sorted(_MAIL_TYPES))}")
    return ",".join(parts)


def mail_user(value: str) -> str:
    value = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.+\-]+(@[A-Za-z0-9_.\-]+)?", value):
        raise HpcllmError(f"--mail-user: not an e-mail address or user name: {value!r}")
    return value


def dependency(value: str) -> str:
    value = str(value)
    if not re.fullmatch(r"[A-Za-z_]+(:[0-9_+]+)+([,?][A-Za-z_]+(:[0-9_+]+)+)*|singleton", value):
        raise HpcllmError(f"--dependency: expected TYPE:JOBID[:JOBID...][,TYPE:JOBID...], got {value!r}")
    return value


def env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(str(value)):
        raise HpcllmError(f"environment variable name {value!r}: letters, digits and _ only, not starting with a digit")
    return str(value)


def env_assignment(text: str) -> tuple[str, str]:
    """Parse ``KEY=VALUE`` from the command line."""
    key, sep, value = str(text).partition("=")
    if not sep:
        raise HpcllmError(f"--env: expected KEY=VALUE, got {text!r}")
    return env_name(key), no_control(f"--env {key}", value)
