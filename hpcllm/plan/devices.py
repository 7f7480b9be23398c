"""Device profiles: memory, peak FLOP rates and interconnect bandwidths of one accelerator.

Built-in profiles cover the common NVIDIA data-centre GPUs and a CPU node; users describe
their own hardware in TOML (``hpcllm plan --device mycluster.toml``)::

    [device]
    name = "mi250x-gcd"
    memory_gb = 64              # usable device memory, GiB
    devices_per_node = 8
    peak_tflops = { bf16 = 191.5, fp32 = 47.9 }
    intra_node_gbps = 100       # GB/s per device, ring allreduce bus bandwidth inside a node
    inter_node_gbps = 100       # GB/s per node (all NICs together)
    overhead_gb = 1.5           # runtime context, library workspaces, allocator slack
    mfu = 0.35                  # default model-FLOPs utilisation for time estimates
    # kind = "cpu"              # host memory: memory_gb is per node, shared by its ranks
    # base = "h100"             # start from a built-in profile, override the keys given

Numbers are the vendors' dense (no sparsity) peak rates. The bandwidths are what a ring
collective achieves ("bus bandwidth"), not the marketing bidirectional sum: NVLink on an
H100 SXM is sold as 900 GB/s bidirectional, NCCL measures about 450 GB/s bus bandwidth.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace

from hpcllm.errors import HpcllmError
from hpcllm.train.precision import cpu_matmul_probe

GiB = 1024**3
GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device and the node it sits in."""

    name: str
    """Profile name, e.g. ``h100-80gb``."""
    memory_bytes: int
    """Memory one device offers to the training process, in bytes."""
    peak_flops: dict = field(default_factory=dict)
    """Dense peak FLOP/s by compute precision: keys ``bf16``, ``fp16``, ``fp32``."""
    devices_per_node: int = 8
    """Devices in one node (the usual ``--ntasks-per-node``)."""
    intra_node_bandwidth: float = 100 * GB
    """Ring allreduce bus bandwidth between devices of one node, bytes/s."""
    inter_node_bandwidth: float = 25 * GB
    """Network bandwidth of one node (all its NICs), bytes/s."""
    overhead_bytes: int = 2 * GiB
    """Fixed memory per process besides the model: runtime context, kernels, workspaces."""
    mfu: float = 0.4
    """Model-FLOPs utilisation assumed for time estimates (fraction of peak)."""
    kind: str = "gpu"
    """``gpu`` or ``cpu``: selects how the memory model treats host memory."""
    heap_retention: float = 0.0
    """Fraction of the memory freed and reallocated each step that the allocator keeps
    (fragmentation); 0 for GPUs, whose caching allocator slack is part of ``overhead_bytes``."""
    lowp_bytes_per_param: float = 0.0
    """Resident bytes per matmul parameter that 16-bit autocast adds beyond the 16-bit weight
    copies (CPU: fp32 conversion buffers of bf16 GEMMs and weight gradients)."""

    def flops(self, precision: str) -> float:
        """Peak FLOP/s of the precision the matmuls run in (``bf16``/``fp16``/``fp32``)."""
        key = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}.get(precision, precision)
        if key in self.peak_flops:
            return float(self.peak_flops[key])
        if key == "fp16" and "bf16" in self.peak_flops:
            return float(self.peak_flops["bf16"])
        raise HpcllmError(f"device {self.name}: no peak FLOP/s for precision {precision!r}")


# Peak rates: NVIDIA A100 / H100 / H200 SXM datasheets, dense tensor-core bf16/fp16. The fp32
# entry is the plain FP32 rate, not TF32: PyTorch keeps TF32 off for fp32 matmuls by default.
BUILTIN = {
    "a100-40gb": DeviceProfile(
        name="a100-40gb", memory_bytes=40 * GiB,
        peak_flops={"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        devices_per_node=8, intra_node_bandwidth=230 * GB, inter_node_bandwidth=100 * GB,
        overhead_bytes=int(1.5 * GiB), mfu=0.4),
    "a100-80gb": DeviceProfile(
        name="a100-80gb", memory_bytes=80 * GiB,
        peak_flops={"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        devices_per_node=8, intra_node_bandwidth=230 * GB, inter_node_bandwidth=100 * GB,
        overhead_bytes=int(1.5 * GiB), mfu=0.4),
    "h100-80gb": DeviceProfile(
        name="h100-80gb", memory_bytes=80 * GiB,
        peak_flops={"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        devices_per_node=8, intra_node_bandwidth=450 * GB, inter_node_bandwidth=400 * GB,
        overhead_bytes=2 * GiB, mfu=0.4),
    "h200-141gb": DeviceProfile(
        name="h200-141gb", memory_bytes=int(141 * GB),
        peak_flops={"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        devices_per_node=8, intra_node_bandwidth=450 * GB, inter_node_bandwidth=400 * GB,
        overhead_bytes=2 * GiB, mfu=0.4),
}

ALIASES = {
    "a100": "a100-80gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb",
    "h100": "h100-80gb", "h100-80": "h100-80gb", "h200": "h200-141gb", "h200-141": "h200-141gb",
    "cpu-node": "cpu",
}

#: Fixed memory a CPU training process holds besides parameters, optimizer state and
#: activations: autograd engine and oneDNN/OpenMP thread pools, allocator slack, transient
#: buffers of the backward pass. Calibrated on a 2-core AMD EPYC (torch 2.13, glibc malloc):
#: the peak RSS growth of a 1-layer, width-64 model, whose tensors are negligible. The
#: cases of tests/plan/test_measured.py and benchmarks/plan_check.py check all three constants.
CPU_OVERHEAD_BYTES = 84 * 1024**2
#: Fraction of the per-step churn (activations, gradients, temporaries) glibc's heap keeps
#: resident as fragmentation on CPUs: fitted on fp32 runs of 2-4 layers at widths 256 and
#: 1024 (with MALLOC_MMAP_THRESHOLD_ fixed, the excess disappears).
CPU_HEAP_RETENTION = 0.3
#: Resident bytes per matmul parameter that bf16 autocast adds on a CPU beyond the bf16
#: weight copies: fitted on a bf16 1-layer width-1024 run on a CPU without bf16 instructions.
CPU_LOWP_BYTES_PER_PARAM = 4.0

#: Fraction of the measured large-GEMM rate a whole training step reaches on a CPU
#: (layer norms, softmax, GELU, AdamW and Python overhead run far below the GEMM rate).
CPU_MFU = 0.4


def cpu_profile(measure: bool = True) -> DeviceProfile:
    """This machine as a one-device 'node': its RAM and, if ``measure``, its GEMM rate.

    A CPU has no datasheet peak that PyTorch reaches, so the 'peak' of the CPU profile is the
    rate of a large square matmul measured here (fp32 and bf16), and ``mfu`` is the fraction
    of it a full training step achieves.
    """
    try:
        import psutil
        mem = int(psutil.virtual_memory().total)
    except Exception:  # psutil is a dependency, but keep `plan` usable without it
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = measure_gemm_flops() if measure else {"fp32": 1e11, "bf16": 1e11}
    return DeviceProfile(
        name="cpu", memory_bytes=mem, peak_flops=peak, devices_per_node=1,
        intra_node_bandwidth=10 * GB, inter_node_bandwidth=10 * GB,
        overhead_bytes=CPU_OVERHEAD_BYTES, mfu=CPU_MFU, kind="cpu", heap_retention=CPU_HEAP_RETENTION,
        lowp_bytes_per_param=CPU_LOWP_BYTES_PER_PARAM)


_GEMM_CACHE: dict = {}


def measure_gemm_flops(seconds: float = 1.0) -> dict:
    """FLOP/s of a 1024^3 matmul on this CPU in fp32 and bf16: the measurement ``--precision
    auto`` and MFU use (:func:`hpcllm.train.precision.cpu_matmul_probe`, cached per machine).
    ``seconds`` is kept for callers; the probe bounds its own time."""
    if _GEMM_CACHE:
        return dict(_GEMM_CACHE)
    probe = cpu_matmul_probe(1024, 1024, 1024)
    out = {"fp32": probe.fp32, "bf16": probe.bf16, "fp16": probe.bf16}
    _GEMM_CACHE.update(out)
    return dict(out)


def _load_toml(path: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise HpcllmError(f"{path}: cannot read device profile: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise HpcllmError(f"{path}: invalid TOML: {e}") from None


def profile_from_toml(path: str) -> DeviceProfile:
    """Read a user-defined profile from the ``[device]`` table of a TOML file."""
    data = _load_toml(path)
    dev = data.get("device")
    if not isinstance(dev, dict):
        raise HpcllmError(f"{path}:1: no [device] table")
    known = {"name", "memory_gb", "devices_per_node", "peak_tflops", "intra_node_gbps",
             "inter_node_gbps", "overhead_gb", "mfu", "kind", "base", "heap_retention"}
    unknown = sorted(set(dev) - known)
    if unknown:
        raise HpcllmError(f"{path}: [device] has unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    base = get_profile(dev["base"], measure_cpu=False) if "base" in dev else None
    if base is None and ("memory_gb" not in dev or "peak_tflops" not in dev):
        raise HpcllmError(f"{path}: [device] needs memory_gb and peak_tflops (or base = \"h100\")")

    def num(key, lo=0.0):
        v = dev[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= lo:
            raise HpcllmError(f"{path}: [device] {key} must be a number > {lo:g}, got {v!r}")
        return float(v)

    kw = {"name": str(dev.get("name", os.path.splitext(os.path.basename(path))[0]))}
    if "memory_gb" in dev:
        kw["memory_bytes"] = int(num("memory_gb") * GiB)
    if "peak_tflops" in dev:
        pk = dev["peak_tflops"]
        if not isinstance(pk, dict) or not pk:
            raise HpcllmError(f"{path}: [device] peak_tflops must be a table like "
                              "{ bf16 = 989, fp32 = 67 }")
        for k, v in pk.items():
            if k not in ("bf16", "fp16", "fp32") or not isinstance(v, (int, float)) or v <= 0:
                raise HpcllmError(f"{path}: [device] peak_tflops.{k} = {v!r}: keys bf16/fp16/fp32, "
                                  "values > 0")
        kw["peak_flops"] = {k: float(v) * 1e12 for k, v in pk.items()}
    if "devices_per_node" in dev:
        v = dev["devices_per_node"]
        if not isinstance(v, int) or v < 1:
            raise HpcllmError(f"{path}: [device] devices_per_node must be an integer >= 1")
        kw["devices_per_node"] = v
    if "intra_node_gbps" in dev:
        kw["intra_node_bandwidth"] = num("intra_node_gbps") * GB
    if "inter_node_gbps" in dev:
        kw["inter_node_bandwidth"] = num("inter_node_gbps") * GB
    if "overhead_gb" in dev:
        v = dev["overhead_gb"]
        if not isinstance(v, (int, float)) or v < 0:
            raise HpcllmError(f"{path}: [device] overhead_gb must be a number >= 0")
        kw["overhead_bytes"] = int(v * GiB)
    if "mfu" in dev:
        v = num("mfu")
        if v > 1:
            raise HpcllmError(f"{path}: [device] mfu must be in (0, 1], got {v}")
        kw["mfu"] = v
    if "heap_retention" in dev:
        v = dev["heap_retention"]
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise HpcllmError(f"{path}: [device] heap_retention must be in [0, 1)")
        kw["heap_retention"] = float(v)
    if "kind" in dev:
        if dev["kind"] not in ("gpu", "cpu"):
            raise HpcllmError(f"{path}: [device] kind must be \"gpu\" or \"cpu\"")
        kw["kind"] = dev["kind"]
    if base is not None:
        return replace(base, **kw)
    return DeviceProfile(**kw)


def get_profile(name: str, measure_cpu: bool = True) -> DeviceProfile:
    """A built-in profile by name or alias, ``cpu`` for this machine, or a TOML file path."""
    if name.endswith(".toml") or os.sep in name:
        return profile_from_toml(name)
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return cpu_profile(measure=measure_cpu)
    if key in BUILTIN:
        return BUILTIN[key]
    raise HpcllmError(f"unknown device {name!r}; built-in: {', '.join(list(BUILTIN) + ['cpu'])} "
                      "(aliases a100, h100, h200), or a path to a .toml profile")
