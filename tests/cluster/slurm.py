"""A throwaway Slurm cluster on localhost for the tests: munged, slurmctld, N virtual slurmd.

Everything (munge key and socket, slurm.conf, state, spool, TmpFS, logs, pid files) lives in
one temporary directory, and the ports are picked free at start, so a system Slurm or munge
on the same machine is never touched and two runs in a row do not collide.

    cluster = start_cluster(nodes=2)
    job = cluster.sbatch(["--wrap", "hostname"])
    info = cluster.wait(job)              # {"JobState": "COMPLETED", ...}
    cluster.stop()

Clients find the cluster through ``cluster.env`` (SLURM_CONF pointing at its slurm.conf,
OMPI_MCA_btl=self,tcp because Open MPI's shared-memory transport crashes between virtual
nodes on one host). Jobs inherit that environment (sbatch --export=ALL).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.slurm_conf import ClusterLayout, render_slurm_conf

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
#: job states after which a job never runs again (unless requeued by hand)
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


class SlurmStartError(RuntimeError):
    """The cluster did not come up; the message carries the daemons' log tails."""


def missing_binaries() -> list[str]:
    """Slurm/munge programs that are not installed (empty when the cluster can start)."""
    found = []
    for name in DAEMONS + CLIENTS:
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            found.append(name)
    return found


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


@dataclass
class SlurmCluster:
    """A running localhost cluster; use ``env`` for every client command."""

    layout: ClusterLayout
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------------ info
    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def conf(self) -> Path:
        return self.layout.conf

    @property
    def nodes(self) -> list[str]:
        return self.layout.nodes

    @property
    def partition(self) -> str:
        return self.layout.partition

    def logs(self, lines: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.layout.log_dir.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{_tail(path, lines)}")
        return "\n".join(parts)

    # --------------------------------------------------------------- clients
    def run(self, args: list[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, srun, scontrol, ...) against this cluster."""
        env = dict(self.env)
        env.update(kw.pop("env", None) or {})
        res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, args))} exited {res.returncode}\nstdout:\n{res.stdout}\n"
                f"stderr:\n{res.stderr}"
            )
        return res

    def sbatch(self, args: list[str], **kw) -> str:
        """Submit with ``sbatch --parsable ARGS``; returns the job id."""
        res = self.run(["sbatch", "--parsable", *args], **kw)
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` as one dict per job record (array tasks give several)."""
        try:
            res = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=30)
        except subprocess.TimeoutExpired:  # an overloaded machine: the caller polls again
            return []
        if res.returncode != 0:
            return []
        records = []
        for line in res.stdout.splitlines():
            if not line.strip():
                continue
            rec = {}
            # key=value pairs; values never contain " Key=" but may contain spaces
            for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line):
                rec[m.group(1)] = m.group(2)
            records.append(rec)
        return records

    def state(self, job_id: str) -> str:
        recs = self.job(job_id)
        if not recs:
            return "UNKNOWN"
        return recs[0].get("JobState", "UNKNOWN")

    def wait(self, job_id: str, timeout: float = 120, states: set[str] | None = None,
             poll: float = 0.25) -> list[dict[str, str]]:
        """Wait until every record of the job is in one of ``states`` (default: final).

        Returns the records; raises TimeoutError with the job and the logs if it takes longer.
        """
        states = states or FINAL_STATES
        deadline = time.monotonic() + timeout
        recs: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            recs = self.job(job_id)
            if recs and all(r.get("JobState") in states for r in recs):
                return recs
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)} after {timeout}s: "
            f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in recs]}\n{self.logs()}"
        )

    def wait_until(self, predicate, timeout: float = 60, poll: float = 0.25, what: str = "condition"):
        """Poll ``predicate()`` until it returns a truthy value; returns that value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"{what} not reached after {timeout}s\n{self.logs()}")

    def release(self, job_id: str) -> None:
        """Let a held job start now (``scontrol update StartTime=now``).

        Do not use it on a job requeued less than ``layout.cred_expire`` seconds ago: its
        revoked credentials make the step launch fail. The cluster holds requeued jobs only
        that long (10 s), so waiting for them is cheap.
        """
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def node_states(self) -> dict[str, str]:
        try:
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=30)
        except subprocess.TimeoutExpired:
            return {}
        out = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    # ------------------------------------------------------------- lifecycle
    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.layout.log_dir / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.root, start_new_session=True,
        )
        log.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise SlurmStartError(f"{name} exited with status {p.returncode} during start\n{self.logs()}")

    def start(self, timeout: float = 60) -> None:
        lay = self.layout
        for d in ("etc", "munge", "state", "spool", "tmp", "run", "log"):
            (lay.root / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        for n in lay.nodes:
            (lay.root / "spool" / n).mkdir(exist_ok=True, mode=0o700)
            (lay.root / "tmp" / n).mkdir(exist_ok=True, mode=0o700)
        lay.conf.write_text(render_slurm_conf(lay))
        (lay.root / "etc" / "plugstack.conf").write_text("")
        # munge refuses group/world-readable keys; its own random key for this cluster only
        key = lay.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force",
            f"--socket={lay.munge_socket}", f"--key-file={key}",
            f"--pid-file={lay.root}/run/munged.pid", f"--seed-file={lay.root}/munge/munged.seed",
            f"--log-file={lay.log_dir}/munged.log",
        ])
        deadline = time.monotonic() + timeout
        while not lay.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmStartError(f"munged did not create {lay.munge_socket}\n{self.logs()}")
            time.sleep(0.05)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", str(lay.conf)])
        # slurmd registers with slurmctld; start it once slurmctld answers
        self.wait_until(lambda: self._check_alive() or self.run(["scontrol", "ping"], check=False).returncode == 0,
                        timeout=timeout, poll=0.1, what="slurmctld answering scontrol ping")
        for n in lay.nodes:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(lay.conf)])

        def all_idle():
            self._check_alive()
            states = self.node_states()
            return len(states) == len(lay.nodes) and all(s == "idle" for s in states.values())

        try:
            self.wait_until(all_idle, timeout=timeout, poll=0.2, what=f"nodes {lay.nodes} idle")
        except TimeoutError as e:
            raise SlurmStartError(f"{e}\nnode states: {self.node_states()}") from None

    def stop(self, remove: bool | None = None) -> None:
        """Cancel every job, stop the daemons and every process of this cluster.

        The directory is removed unless ``remove`` is False or HPCLLM_KEEP_SLURM=1 is set
        (to read the daemon logs after a failed run).
        """
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self.run(["scancel", "--full", f"--partition={self.partition}"], check=False, timeout=10)
                # give slurmstepd a moment to kill job steps the normal way
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    res = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                    if res.returncode != 0 or not res.stdout.strip():
                        break
                    time.sleep(0.2)
            except subprocess.TimeoutExpired:
                pass  # slurmctld not answering: the kills below still clean up
        for name in sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld")):
            _terminate(self.procs[name])
        # slurmstepd and job tasks outlive slurmd; they all carry our SLURM_CONF
        for pid in _pids_with_env("SLURM_CONF", str(self.conf)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.procs.clear()
        if remove is None:
            remove = os.environ.get("HPCLLM_KEEP_SLURM") != "1"
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _terminate(p: subprocess.Popen, wait: float = 5) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except OSError:
        p.terminate()
    try:
        p.wait(wait)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            p.kill()
        p.wait(5)


def _pids_with_env(key: str, value: str) -> list[int]:
    needle = f"{key}={value}".encode() + b"\0"
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env or env.startswith(needle):
            pids.append(int(entry))
    return pids


def start_cluster(nodes: int = 2, cpus_per_node: int = 4, root: str | Path | None = None,
                  timeout: float = 60, extra_conf: list[str] | None = None, cred_expire: int = 10) -> SlurmCluster:
    """Start munged, slurmctld and ``nodes`` slurmd; return once every node is idle.

    Raises SlurmStartError (with log tails) when something does not come up; whatever did
    start is stopped again.
    """
    missing = missing_binaries()
    if missing:
        raise SlurmStartError(f"Slurm/munge programs not installed: {', '.join(missing)}")
    # the ports are free when picked but could be taken before the daemons bind them: one retry
    for attempt in (1, 2):
        try:
            return _start_once(nodes, cpus_per_node, root, timeout, extra_conf, cred_expire)
        except SlurmStartError:
            if attempt == 2:
                raise


def _start_once(nodes, cpus_per_node, root, timeout, extra_conf, cred_expire) -> SlurmCluster:
    # short path: munge's socket path must fit in sun_path (108 bytes)
    root = Path(root) if root else Path(tempfile.mkdtemp(prefix="hpcllm-slurm-", dir="/tmp"))
    ports = _free_ports(1 + nodes)
    lay = ClusterLayout(root=root, hostname=socket.gethostname().split(".")[0],
                        ctld_port=ports[0], node_ports=ports[1:], cpus_per_node=cpus_per_node,
                        extra=list(extra_conf or []), cred_expire=cred_expire)
    env = dict(os.environ)
    env.update({
        "SLURM_CONF": str(lay.conf),
        # shared memory between virtual nodes of one host crashes Open MPI
        "OMPI_MCA_btl": "self,tcp",
    })
    # a client run from inside another allocation must not pick up that job's settings
    for k in list(env):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
            del env[k]
    cluster = SlurmCluster(layout=lay, env=env)
    try:
        cluster.start(timeout=timeout)
    except BaseException:
        cluster.stop()  # the SlurmStartError already carries the log tails
        raise
    return cluster
