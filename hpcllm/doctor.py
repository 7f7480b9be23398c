"""`hpcllm doctor`: the environment report users paste into a bug report.

Each probe returns (name, value, ok). Probes that import heavy or fragile libraries
(torch, Horovod, mpi4py, h5py) run them inside a try block so one broken piece never hides
the rest of the report.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    value: str
    ok: bool = True


def _run(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"


def python_checks() -> list:
    from hpcllm import __version__
    return [Check("hpcllm", __version__), Check("python", f"{platform.python_version()} ({sys.executable})"),
            Check("platform", platform.platform())]


def torch_checks() -> list:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - report whatever broke
        return [Check("torch", f"not importable: {e}", False)]
    checks = [Check("torch", f"{torch.__version__} (threads {torch.get_num_threads()})")]
    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        checks.append(Check("cuda", f"{torch.version.cuda}, {torch.cuda.device_count()} x {', '.join(names)}, "
                                    f"nccl {'.'.join(map(str, torch.cuda.nccl.version()))}"))
    else:
        checks.append(Check("cuda", f"not available (torch built with CUDA {torch.version.cuda})"))
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(Check("bf16", "supported by the GPU" if bf16 else "no bf16 on this GPU (fp16 or fp32)"))
    else:
        # a flag is not a speed: measured, as --precision auto decides
        from hpcllm.train.precision import choose_cpu_precision, cpu_has_fast_bf16, cpu_matmul_probe

        choice, why = choose_cpu_precision(cpu_matmul_probe(1024, 1024, 1024))
        flags = "AMX/AVX512-BF16 reported" if cpu_has_fast_bf16() else "no AMX/AVX512-BF16"
        checks.append(Check("bf16", f"{why}; {flags}; --precision auto picks {choice}"))
    return checks


def mpi_checks() -> list:
    checks = []
    mpirun = shutil.which("mpirun")
    checks.append(Check("mpirun", f"{mpirun}: {_run([mpirun, '--version']).splitlines()[0]}" if mpirun
                        else "not found", bool(mpirun)))
    try:
        from mpi4py import MPI
        import mpi4py
        lib = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
        checks.append(Check("mpi4py", f"{mpi4py.__version__}, MPI {'.'.join(map(str, MPI.Get_version()))}: {lib}"))
        # the same decision the pipeline engine makes (device buffers to MPI, or staged copies)
        from hpcllm.parallel.pipeline.transport import cuda_aware_mpi
        aware, how = cuda_aware_mpi()
        checks.append(Check("cuda-aware MPI", f"yes ({how})" if aware else
                            f"no ({how}): the pipeline stages device buffers through host memory"))
    except Exception as e:  # noqa: BLE001
        checks.append(Check("mpi4py", f"not importable: {e}", False))
    return checks


def horovod_checks() -> list:
    try:
        import horovod
        import horovod.torch as hvd
    except Exception as e:  # noqa: BLE001
        return [Check("horovod", f"not importable: {e}", False)]
    built = {
        "frameworks": [n for n, f in [("PyTorch", lambda: True)] if f()],
        "controllers": [n for n, f in [("MPI", hvd.mpi_built), ("Gloo", hvd.gloo_built)] if f()],
        "tensor ops": [n for n, f in [("NCCL", hvd.nccl_built), ("DDL", hvd.ddl_built),
                                      ("CCL", hvd.ccl_built), ("MPI", hvd.mpi_built),
                                      ("Gloo", hvd.gloo_built)] if f()],
    }
    desc = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in built.items())
    return [Check("horovod", f"{horovod.__version__} ({desc})", "MPI" in built["controllers"])]


def horovod_init_check() -> Check:
    """hvd.init() for real: the only proof the MPI controller works in this environment."""
    try:
        import horovod.torch as hvd
        hvd.init()
        value = (f"rank {hvd.rank()}/{hvd.size()} local {hvd.local_rank()}/{hvd.local_size()} "
                 f"cross {hvd.cross_rank()}/{hvd.cross_size()}, mpi_enabled={hvd.mpi_enabled()}")
        return Check("horovod init", value, True)
    except Exception as e:  # noqa: BLE001
        return Check("horovod init", f"failed: {e}", False)


def hdf5_checks() -> list:
    try:
        import h5py
    except Exception as e:  # noqa: BLE001
        return [Check("h5py", f"not importable: {e}", False)]
    cfg = h5py.get_config()
    return [Check("h5py", f"{h5py.__version__}, HDF5 {h5py.version.hdf5_version}, "
                          f"parallel (MPI-IO) {'yes' if cfg.mpi else 'no'}; "
                          f"HDF5_USE_FILE_LOCKING={os.environ.get('HDF5_USE_FILE_LOCKING', 'unset')}")]


def slurm_checks() -> list:
    found = {c: shutil.which(c) for c in ("sbatch", "srun", "squeue", "scontrol", "sinfo")}
    have = [c for c, p in found.items() if p]
    if not found["sbatch"]:
        return [Check("slurm", "not found (hpcllm slurm can still write scripts)")]
    version = _run(["sbatch", "--version"])
    configured = version.startswith("slurm")
    if not configured:  # Slurm 22.05 clients need a configuration even for --version
        version = "installed, no cluster configuration reachable (SLURM_CONF / slurm.conf)"
    checks = [Check("slurm", f"{version.splitlines()[0]}; commands: {', '.join(have)}")]
    if found["srun"] and configured:
        pmix = "pmix" in _run(["srun", "--mpi=list"])
        checks.append(Check("srun --mpi=pmix", "available" if pmix else
                            "pmix plugin not listed (use mpirun inside the allocation)"))
    return checks


def topology_checks() -> list:
    from hpcllm.parallel.topology import Topology
    topo = Topology.from_env()
    return [Check("rank layout", topo.describe() + (f", job {topo.job_id}" if topo.job_id else "")),
            Check("threads per rank", str(topo.threads_per_rank()))]


def run_doctor(init_horovod: bool = True) -> list:
    checks = python_checks() + torch_checks() + mpi_checks() + horovod_checks()
    if init_horovod:
        checks.append(horovod_init_check())
    return checks + hdf5_checks() + slurm_checks() + topology_checks()


def format_report(checks, as_json: bool = False) -> str:
    if as_json:
        return json.dumps([c.__dict__ for c in checks], indent=2)
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{'  ' if c.ok else '!!'} {c.name:<{width}}  {c.value}" for c in checks)
