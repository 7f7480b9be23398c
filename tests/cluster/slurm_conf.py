"""slurm.conf text for the throwaway localhost cluster used by the tests.

Kept apart from the process management in tests/cluster/slurm.py so the settings (and the
reason for each) can be read in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ClusterLayout:
    """Where a throwaway cluster keeps everything, and which ports it uses."""

    #: root directory; every state, spool, log and socket path lives below it
    root: Path
    #: the real hostname of this machine (each virtual node's NodeHostname)
    hostname: str
    #: slurmctld's port
    ctld_port: int
    #: one slurmd port per virtual node
    node_ports: list[int]
    #: CPUs advertised per virtual node (more than the machine has: config_overrides)
    cpus_per_node: int = 4
    #: memory advertised per virtual node, MiB
    mem_per_node: int = 4096
    #: seconds a requeued job is held before it may start again (AuthInfo cred_expire)
    cred_expire: int = 10
    cluster_name: str = "hpcllmtest"
    partition: str = "debug"
    node_prefix: str = "node"
    extra: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return [f"{self.node_prefix}{i + 1}" for i in range(len(self.node_ports))]

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"


def render_slurm_conf(lay: ClusterLayout) -> str:
    r = lay.root
    lines = [
        f"ClusterName={lay.cluster_name}",
        # 127.0.0.1 explicitly: the hostname may not resolve on every machine.
        f"SlurmctldHost={lay.hostname}(127.0.0.1)",
        f"SlurmctldPort={lay.ctld_port}",
        # Tests run as root in CI; a non-root developer runs the daemons as themselves.
        f"SlurmUser={_user()}",
        f"SlurmdUser={_user()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # Our own munged, so a system munged (another key) is never asked. cred_expire: a
        # requeued job is held this long (BeginTime) before it may start again, because its
        # old credentials stay revoked on the nodes until then: starting it earlier (e.g.
        # `scontrol update StartTime=now` right after the requeue) makes srun's step launch fail
        # ("Job credential revoked") -- and srun then exits 0. Default 120 s; 10 s for tests.
        f"AuthInfo=socket={lay.munge_socket},cred_expire={lay.cred_expire}",
        f"StateSaveLocation={r}/state",
        # %n: each virtual node needs its own spool and TmpFS, or the PMIx server
        # directories of two slurmd on one host collide.
        f"SlurmdSpoolDir={r}/spool/%n",
        f"TmpFS={r}/tmp/%n",
        f"SlurmctldPidFile={r}/run/slurmctld.pid",
        f"SlurmdPidFile={r}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={r}/log/slurmctld.log",
        f"SlurmdLogFile={r}/log/slurmd-%n.log",
        # an empty plugin stack: SPANK plugins of a system Slurm (/etc/slurm/plugstack.conf.d)
        # must not load here
        f"PlugStackConfig={r}/etc/plugstack.conf",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups in containers/VMs without delegation. linuxproc (process tree) rather
        # than pgid: with pgid every batch step lingers ~3 s after its script ends.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        # Trust slurm.conf's node sizes instead of the hardware: 2 virtual nodes x 4 CPUs on a
        # 2-core machine, so 2 nodes x 2 tasks (and a small array beside it) fit.
        "SlurmdParameters=config_overrides",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        # Schedule promptly: tests wait on dependencies and requeues. sched_interval: a requeued
        # job whose hold (BeginTime) ends is started by the main scheduler's periodic pass only
        # (backfill skips cycles when nothing changed), every 60 s by default.
        "SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=100000,batch_sched_delay=0",
        "ReturnToService=2",
        "SlurmctldTimeout=60",
        "SlurmdTimeout=120",
        "InactiveLimit=0",
        # Finished jobs stay visible to `scontrol show job` for 10 minutes (there is no
        # accounting database, so sacct cannot be used).
        "MinJobAge=600",
        "KillWait=5",
        "MessageTimeout=20",
        "JobRequeue=1",
        "MaxArraySize=1001",
        "MailProg=/bin/true",
        *lay.extra,
    ]
    for name, port in zip(lay.nodes, lay.node_ports):
        lines.append(
            f"NodeName={name} NodeHostname={lay.hostname} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={lay.cpus_per_node} Boards=1 SocketsPerBoard=1 CoresPerSocket={lay.cpus_per_node} "
            f"ThreadsPerCore=1 RealMemory={lay.mem_per_node} State=UNKNOWN"
        )
    lines.append(
        f"PartitionName={lay.partition} Nodes={','.join(lay.nodes)} Default=YES "
        "MaxTime=INFINITE State=UP OverSubscribe=NO"
    )
    return "\n".join(lines) + "\n"


def _user() -> str:
    import pwd
    import os

    return pwd.getpwuid(os.getuid()).pw_name
