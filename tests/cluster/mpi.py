"""Run Python under a real `mpirun` and collect each rank's result.

In the test::

    res = run_mpi([sys.executable, script, "--steps", "3"], np=2)
    res.check()                      # raises with both output streams if it failed
    assert res.results[0] == res.results[1]

In the script, on every rank::

    from tests.cluster.mpi import report
    report({"loss": loss, "params": [...]})   # one JSON object per rank

``hosts=["nodeA", "nodeB"]`` runs on a *virtual multi-host* layout without Slurm: each host
name maps to its own loopback address (127.0.0.2, 127.0.0.3, ...) and Open MPI starts one
daemon per host through an rsh agent that runs it in a private UTS namespace with that host
name, so MPI, Horovod and hpcllm see ``len(hosts)`` nodes (local_size x cross_size).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RSH_AGENT = Path(__file__).with_name("rsh_agent.sh")
RESULT_DIR_ENV = "HPCLLM_TEST_RESULT_DIR"


@dataclass
class MpiResult:
    args: list
    returncode: int
    stdout: str
    stderr: str
    results: list = field(default_factory=list)
    elapsed_s: float = 0.0
    timed_out: bool = False

    def output(self) -> str:
        return (f"$ {' '.join(map(str, self.args))}\n[exit {self.returncode}"
                f"{', timed out' if self.timed_out else ''}, {self.elapsed_s:.1f}s]\n"
                f"--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}")

    def check(self) -> "MpiResult":
        if self.returncode != 0 or self.timed_out:
            raise AssertionError("mpirun failed:\n" + self.output())
        return self


def _rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def report(obj) -> None:
    """Save this rank's JSON-able result for ``MpiResult.results`` (no-op outside run_mpi)."""
    out = os.environ.get(RESULT_DIR_ENV)
    if not out:
        return
    path = Path(out) / f"rank-{_rank()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def ensure_virtual_hosts(hosts) -> None:
    """Map each virtual host name to its own loopback address in /etc/hosts (needs root)."""
    text = Path("/etc/hosts").read_text()
    known = {name for line in text.splitlines() if not line.lstrip().startswith("#")
             for name in line.split()[1:]}
    missing = [h for h in hosts if h not in known]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"virtual hosts {missing} are not in /etc/hosts and we are not root")
    used = {line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")}
    lines, n = [], 2
    for h in missing:
        while f"127.0.0.{n}" in used:
            n += 1
        lines.append(f"127.0.0.{n} {h}  # hpcllm test virtual host")
        used.add(f"127.0.0.{n}")
    with open("/etc/hosts", "a") as f:
        f.write(("" if text.endswith("\n") else "\n") + "\n".join(lines) + "\n")


def mpirun_command(np: int, hosts=None, extra=()) -> list:
    """The mpirun prefix used by the tests (and shown in failures so it can be rerun by hand)."""
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none",
           "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if hosts:
        per_host = -(-np // len(hosts))
        cmd += ["--host", ",".join(f"{h}:{per_host}" for h in hosts),
                "--mca", "plm_rsh_agent", str(RSH_AGENT),
                "--mca", "plm_rsh_no_tree_spawn", "1",
                "--mca", "btl", "self,tcp"]
    return cmd + list(extra)


def run_mpi(cmd, np: int = 2, env: dict | None = None, timeout: float = 180,
            hosts=None, mpirun_args=(), cwd=None) -> MpiResult:
    """Run ``cmd`` (a list, e.g. [sys.executable, script, ...]) on ``np`` ranks under real mpirun.

    On timeout the whole process group (mpirun and every rank) is killed and the result has
    ``timed_out=True``.
    """
    if hosts:
        ensure_virtual_hosts(hosts)
    result_dir = tempfile.mkdtemp(prefix="hpcllm-mpi-")
    full_env = dict(os.environ)
    full_env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH", "")])),
        RESULT_DIR_ENV: result_dir,
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    })
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    exports = []
    for key in sorted(set((env or {}).keys()) | {"PYTHONPATH", RESULT_DIR_ENV}):
        exports += ["-x", key]
    args = mpirun_command(np, hosts, mpirun_args) + exports + [str(c) for c in cmd]
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd or REPO, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc, result_dir)
        out, err = proc.communicate()
    elapsed = time.monotonic() - start
    results = []
    for r in range(np):
        p = Path(result_dir) / f"rank-{r}.json"
        results.append(json.loads(p.read_text()) if p.exists() else None)
    shutil.rmtree(result_dir, ignore_errors=True)
    return MpiResult(args, proc.returncode, out, err, results, elapsed, timed_out)


def kill_group(proc: subprocess.Popen, marker: str | None = None) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started.

    Ranks on virtual hosts run under Open MPI daemons that may sit in other process groups;
    ``marker`` (a string in their environment, the result dir) finds those too.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if not marker:
        return
    needle = marker.encode()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if needle in (pid_dir / "environ").read_bytes():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
