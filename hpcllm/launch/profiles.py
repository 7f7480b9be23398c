"""Cluster profiles: what differs from one cluster to the next, in a small TOML file.

A profile is ``slurm/profiles/NAME.toml`` (shipped in the package as hpcllm.slurm_assets) or
the path of any TOML file. Profiles are written by the people who run a cluster and are
trusted: their ``setup`` lines go into scripts verbatim. Values typed on the command line
never are (see hpcllm/launch/quoting.py).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
import importlib.util
from pathlib import Path

from hpcllm.errors import HpcllmError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LAUNCHERS = ("srun", "mpirun", "horovodrun")


def assets_dir() -> Path:
    """The directory holding templates/, profiles/ and examples/ (installed or in the repo).

    Found with find_spec, without importing the package (so no __pycache__ appears in slurm/).
    """
    spec = importlib.util.find_spec("hpcllm.slurm_assets")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "slurm"  # a source tree that is not installed


@dataclass
class Profile:
    """One cluster's settings; every field has a default so a profile states only what differs."""

    #: profile name (the file name without .toml)
    name: str = "default"
    #: one line shown by `hpcllm slurm profiles`
    description: str = ""
    #: launcher used when --launcher is not given: srun (srun --mpi=pmix), mpirun, horovodrun
    launcher: str = "srun"
    #: accelerators per node on this cluster (0: CPU only); the upper bound for --gpus-per-node
    gpus_per_node: int = 0
    #: how GPUs are requested: "gpus-per-node" (--gpus-per-node=N) or "gres" (--gres=gpu:N)
    gpu_request: str = "gpus-per-node"
    #: CPU cores per node (0: unknown, not checked)
    cpus_per_node: int = 0
    #: `module load` lines, in order
    modules: list = field(default_factory=list)
    #: virtualenv directory to activate (empty: none); `~` and $VARS are expanded by the job
    venv: str = ""
    #: extra shell lines run before training (trusted, verbatim)
    setup: list = field(default_factory=list)
    #: environment exported in every job (values are quoted)
    env: dict = field(default_factory=dict)
    #: Horovod knobs exported in training jobs (names as in `hpcllm slurm train --hvd-*`)
    horovod: dict = field(default_factory=dict)
    #: extra arguments for each launcher
    srun_args: list = field(default_factory=list)
    mpirun_args: list = field(default_factory=list)
    horovodrun_args: list = field(default_factory=list)
    #: defaults for sbatch options (keys as the CLI options with _: time, partition, ...)
    sbatch: dict = field(default_factory=dict)
    #: where the profile was read from
    path: str = ""

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise HpcllmError(f"{self.path or self.name}: launcher must be one of {', '.join(LAUNCHERS)}, "
                              f"got {self.launcher!r}")
        if self.gpu_request not in ("gpus-per-node", "gres"):
            raise HpcllmError(f"{self.path or self.name}: gpu_request must be 'gpus-per-node' or 'gres'")
        # the venv is written unquoted so that $HOME and ~ expand in the job: allow no shell syntax
        if self.venv and not re.fullmatch(r"[\w./~${}+@:-]+", self.venv):
            raise HpcllmError(f"{self.path or self.name}: venv {self.venv!r}: unexpected characters")
        if not re.fullmatch(r"[\w.+-]+", self.name):
            raise HpcllmError(f"profile name {self.name!r}: letters, digits and ._+- only")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in (assets_dir() / "profiles").glob("*.toml"))


def load_profile(spec: str | None) -> Profile:
    """A profile by name (``slurm/profiles/NAME.toml``) or by path to a TOML file."""
    spec = spec or "default"
    path = Path(spec).expanduser()
    if not (spec.endswith(".toml") or "/" in spec):
        path = assets_dir() / "profiles" / f"{spec}.toml"
    if not path.is_file():
        raise HpcllmError(f"unknown cluster profile {spec!r}: available: {', '.join(available_profiles())}, "
                          "or the path of a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HpcllmError(f"{path}: {e}") from None
    known = {f.name for f in fields(Profile)} - {"name", "path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HpcllmError(f"{path}: unknown profile keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Profile(name=path.stem, path=str(path), **data)
