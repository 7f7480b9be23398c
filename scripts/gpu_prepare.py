#!/usr/bin/env python3
"""Prepare, on a CPU machine with network access, what must travel to the GPU machine for
`make gpu-check` (scripts/gpu_check.py): the packages that machine lacks, as files under
``build/gpu-wheels/`` (ignored by git; pass it as a carried path to the machine).

    python3 scripts/gpu_prepare.py --dry-run          # what it would fetch, and the size budget
    python3 scripts/gpu_prepare.py                    # fetch (pip download), check the size
    python3 scripts/gpu_prepare.py --groups test      # only what the cuda tests need

The GPU machine has PyTorch with CUDA, numpy, h5py, mpi4py, click, jinja2, tokenizers,
safetensors, transformers, matplotlib, pyarrow, tqdm, psutil and pytest, Python 3.12 on
x86-64, and no network. hpcllm's training and generation path imports nothing beyond those
(zstandard only for .zst corpora, tensorboard optionally), so what travels is:

=========  ============================================================================
group      packages
=========  ============================================================================
test       pytest-timeout: pytest.ini sets ``timeout = 600``, which only that plugin reads
install    setuptools: pip builds hpcllm with ``--no-build-isolation`` (torch on Python 3.12
           normally brings it; a 0.9 MB safety net)
horovod    the Horovod 0.28.1 source (built there against its torch, with NCCL), its runtime
           dependencies cloudpickle, pyyaml, packaging, and cmake < 4 in case the machine has
           none (cmake 4 breaks Horovod's vendored gloo), the largest file by far
extra      zstandard (not needed by the check; ``--groups ...,extra``)
=========  ============================================================================

Wheels are fetched for CPython 3.12 on manylinux x86-64 without dependencies (``pip download
--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ... --no-deps``), the
Horovod sdist with ``--no-binary :all:``. Everything that travels, the working tree and this
directory, must stay under the machine's 64 MiB: the files are checked against that limit
(minus ``--margin-mib``) and, if it is exceeded, the lowest-priority packages are dropped
(and deleted) until it fits; the result is written to ``DEST/manifest.json``.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / "build" / "gpu-wheels"
MiB = 1024 ** 2
LIMIT_MIB = 64
MARGIN_MIB = 4
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
DEFAULT_GROUPS = ("test", "install", "horovod")
#: what the GPU machine already has (the issue's list): never fetched
PREINSTALLED = ("torch", "numpy", "h5py", "mpi4py", "click", "jinja2", "tokenizers", "safetensors", "transformers",
                "matplotlib", "pyarrow", "tqdm", "psutil", "pytest")


@dataclass(frozen=True)
class Package:
    spec: str
    group: str
    why: str
    priority: int
    """Lower is kept first when the size limit forces a choice."""
    kind: str = "wheel"
    """'wheel' (binary for the GPU machine's Python and platform) or 'sdist' (source)."""

    @property
    def name(self) -> str:
        return re.split(r"[<>=!~ ;\[]", self.spec, maxsplit=1)[0].strip().lower().replace("_", "-")

    def pattern(self) -> str:
        """Glob of the files pip writes for it (names normalise '-' to '_' in wheels)."""
        stem = self.name.replace("-", "_")
        return f"{stem}-*.tar.gz" if self.kind == "sdist" else f"{stem}-*.whl"


PACKAGES = (
    Package("pytest-timeout", "test", "pytest.ini's `timeout = 600` is read by this plugin only", 1),
    Package("setuptools", "install", "pip builds hpcllm with --no-build-isolation (if the machine has none)", 2),
    Package("horovod==0.28.1", "horovod", "Horovod's source, built on the GPU machine against its torch with NCCL",
            3, "sdist"),
    Package("cloudpickle", "horovod", "Horovod's runtime dependency (horovodrun)", 4),
    Package("pyyaml", "horovod", "Horovod's runtime dependency", 4),
    Package("packaging", "horovod", "Horovod's setup and runtime", 4),
    Package("cmake<4", "horovod", "Horovod's build if the machine has no cmake (cmake 4 breaks its vendored gloo)", 8),
    Package("zstandard", "extra", "hpcllm reads .zst corpora with it (the check does not)", 9),
)


def select(groups, with_=(), without=()) -> list[Package]:
    want = set(groups)
    pk = [p for p in PACKAGES if p.group in want or p.name in with_]
    for name in with_:
        if not any(p.name == name for p in pk):
            pk.append(Package(name, "extra", "asked for with --with", 9))
    out = [p for p in pk if p.name not in without]
    bad = [p.name for p in out if p.name in PREINSTALLED]
    if bad:
        raise SystemExit(f"gpu_prepare: {', '.join(bad)}: already on the GPU machine; not carried")
    return out


def tree_bytes(root: Path = REPO) -> int:
    """Bytes of the working tree that travels (tracked and untracked files git does not ignore)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, timeout=60, check=True).stdout
        names = [n for n in out.decode(errors="surrogateescape").split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "runs", "data"}
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(d, f), root) for f in files]
    total = 0
    for n in names:
        try:
            total += os.lstat(root / n).st_size
        except OSError:
            pass  # deleted since the listing
    return total


def files_of(pkg: Package, dest: Path) -> list[Path]:
    return sorted(p for p in dest.glob("*") if fnmatch.fnmatch(p.name.lower(), pkg.pattern().lower()))


def pip_command(pkgs: list[Package], dest: Path, kind: str, python: str = sys.executable) -> list[str]:
    base = [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "-d", str(dest)]
    if kind == "wheel":
        base += ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
                 "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none"]
        for plat in PLATFORMS + ("any",):
            base += ["--platform", plat]
    else:
        base += ["--no-binary", ":all:", "--no-build-isolation"]
    return base + [p.spec for p in pkgs]


def fit(sizes: dict[str, int], priority: dict[str, int], budget: int) -> tuple[list[str], list[str]]:
    """(kept, dropped) package names: drop the highest priority numbers (largest first among
    equals) until the sizes fit in ``budget`` bytes."""
    kept = sorted(sizes, key=lambda n: (priority[n], sizes[n]))
    dropped = []
    while kept and sum(sizes[n] for n in kept) > budget:
        dropped.append(kept.pop())
    return kept, dropped


def plan(args) -> dict:
    dest = Path(args.dest)
    pkgs = select(args.groups.split(","), tuple(args.with_ or ()), tuple(args.without or ()))
    tree = tree_bytes()
    limit, margin = int(args.limit_mib * MiB), int(args.margin_mib * MiB)
    entries = []
    for p in pkgs:
        have = files_of(p, dest) if dest.is_dir() else []
        entries.append({**asdict(p), "name": p.name, "present": [f.name for f in have],
                        "bytes": sum(f.stat().st_size for f in have)})
    return {"dest": str(dest), "limit_bytes": limit, "margin_bytes": margin, "tree_bytes": tree,
            "budget_bytes": limit - margin - tree, "packages": entries,
            "commands": [pip_command([p for p in pkgs if p.kind == k], dest, k) for k in ("wheel", "sdist")
                         if any(p.kind == k for p in pkgs)]}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(args, p: dict) -> dict:
    dest = Path(p["dest"])
    dest.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_FIND_LINKS", None)  # a local directory of this machine's own wheels is no source here
    pkgs = [Package(e["spec"], e["group"], e["why"], e["priority"], e["kind"]) for e in p["packages"]]
    for kind in ("wheel", "sdist"):
        todo = [k for k in pkgs if k.kind == kind and not files_of(k, dest)]
        if not todo:
            continue
        cmd = pip_command(todo, dest, kind)
        print("[gpu-prepare] $ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if r.returncode != 0:
            err = "\n".join(ln for ln in r.stderr.splitlines() if "is ignored: it is neither" not in ln)
            raise SystemExit(f"gpu_prepare: pip download failed ({r.returncode}):\n{err[-3000:]}")
    files = {k.name: files_of(k, dest) for k in pkgs}
    missing = [n for n, fs in files.items() if not fs]
    if missing:
        raise SystemExit(f"gpu_prepare: nothing downloaded for {', '.join(missing)}")
    sizes = {n: sum(f.stat().st_size for f in fs) for n, fs in files.items()}
    kept, dropped = fit(sizes, {k.name: k.priority for k in pkgs}, p["budget_bytes"])
    for n in dropped:
        for f in files[n]:
            f.unlink()
    known = {f.name for n in kept for f in files[n]}
    strays = [f.name for f in dest.iterdir() if f.is_file() and f.name not in known and f.name != "manifest.json"]
    manifest = {"format": "hpcllm-gpu-wheels", "python": PYTHON_VERSION, "platforms": list(PLATFORMS),
                "limit_bytes": p["limit_bytes"], "tree_bytes": p["tree_bytes"],
                "files": [{"file": f.name, "bytes": f.stat().st_size, "sha256": sha256(f), "package": n,
                           "group": next(k.group for k in pkgs if k.name == n)} for n in kept for f in files[n]],
                "dropped_for_size": dropped, "other_files": strays}
    manifest["total_bytes"] = p["tree_bytes"] + sum(e["bytes"] for e in manifest["files"])
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def render(p: dict) -> str:
    lines = [f"gpu-prepare plan -> {p['dest']} (carry it to the GPU machine)",
             f"  size: working tree {p['tree_bytes'] / MiB:.1f} MiB; limit {p['limit_bytes'] / MiB:.0f} MiB, margin "
             f"{p['margin_bytes'] / MiB:.0f} MiB: {p['budget_bytes'] / MiB:.1f} MiB left for packages"]
    for e in p["packages"]:
        have = f"present ({', '.join(e['present'])}, {e['bytes'] / MiB:.1f} MiB)" if e["present"] else "to fetch"
        lines.append(f"  [{e['group']}] {e['spec']:<18} {e['kind']:<5} prio {e['priority']}  {have}  {e['why']}")
    for c in p["commands"]:
        lines.append("  would run: " + " ".join(c))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_prepare.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(DEFAULT_DEST), help="directory to fill [build/gpu-wheels]")
    ap.add_argument("--groups", default=",".join(DEFAULT_GROUPS), help="test,install,horovod[,extra]")
    ap.add_argument("--with", dest="with_", action="append", help="one more package (repeatable)")
    ap.add_argument("--without", action="append", help="leave a package out (repeatable)")
    ap.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="what may travel in all [64]")
    ap.add_argument("--margin-mib", type=float, default=MARGIN_MIB, help="kept free under the limit [4]")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for each pip download")
    ap.add_argument("--dry-run", action="store_true", help="print what would be fetched; no network")
    ap.add_argument("--json", action="store_true", help="print the plan (or the manifest) as JSON")
    args = ap.parse_args(argv)
    unknown = set(args.groups.split(",")) - {p.group for p in PACKAGES}
    if unknown:
        ap.error(f"--groups: unknown {', '.join(sorted(unknown))}")
    p = plan(args)
    if p["budget_bytes"] <= 0:
        raise SystemExit(f"gpu_prepare: the working tree alone ({p['tree_bytes'] / MiB:.1f} MiB) leaves nothing "
                         f"under {args.limit_mib:g} MiB")
    if args.dry_run:
        print(json.dumps(p, indent=1) if args.json else render(p))
        return 0
    manifest = fetch(args, p)
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        for e in manifest["files"]:
            print(f"[gpu-prepare] {e['file']}  {e['bytes'] / MiB:.2f} MiB  ({e['group']})")
        if manifest["dropped_for_size"]:
            print(f"[gpu-prepare] dropped to stay under the limit: {', '.join(manifest['dropped_for_size'])}")
        print(f"[gpu-prepare] travels: {manifest['total_bytes'] / MiB:.1f} MiB of {args.limit_mib:g} MiB "
              f"(tree + {Path(p['dest']).name}); wrote {Path(p['dest']) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
