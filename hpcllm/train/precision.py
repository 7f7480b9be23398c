"""Mixed precision: which dtype, the autocast context, and fp16 dynamic loss scaling."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hpcllm.errors import HpcllmError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 in /proc/cpuinfo. A flag, not a speed: on one Intel Xeon that
    reports AVX512-BF16 without AMX, bf16 matmuls ran at half the fp32 rate. Decisions use
    :func:`cpu_matmul_probe`; this only says which instructions exist (``doctor``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


#: bf16 is chosen on a CPU only where its matmuls measured at least this much faster than fp32
#: (the rest of a step, casts and elementwise work, gains less than the matmuls do)
BF16_MIN_SPEEDUP = 1.1
#: seconds each dtype's matmul is timed for (after one warm-up), at least 3 runs
PROBE_SECONDS = 0.15


@dataclass(frozen=True)
class MatmulProbe:
    """Measured matmul rates (FLOP/s) of one shape on this CPU."""

    shape: tuple
    fp32: float
    bf16: float
    threads: int
    cached: bool = False

    @property
    def bf16_speedup(self) -> float:
        return self.bf16 / self.fp32 if self.fp32 else 0.0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _probe_cache_path() -> Path:
    base = os.environ.get("HPCLLM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                          or os.path.expanduser("~/.cache"), "hpcllm")
    return Path(base) / "matmul-probe.json"


def _time_matmul(m: int, k: int, n: int, dtype, seconds: float) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    t0 = time.perf_counter()
    a @ b  # warm-up: thread pool, kernel selection, packing buffers
    first = time.perf_counter() - t0
    if first > seconds:  # one product (emulated bf16 on a large shape) already took the budget
        return 2.0 * m * k * n / first
    best, runs = float("inf"), 0
    end = time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if runs >= 3 and best * 3 > seconds:  # one slow (emulated) product: enough seen
            break
    return 2.0 * m * k * n / best


def cpu_matmul_probe(m: int, k: int, n: int, use_cache: bool = True) -> MatmulProbe:
    """fp32 and bf16 rates of an (m x k) @ (k x n) matmul on this CPU with this process's
    threads: measured once per (CPU model, torch version, threads, shape) and cached in
    ``~/.cache/hpcllm/matmul-probe.json`` (``$HPCLLM_CACHE``); well under a second."""
    threads = torch.get_num_threads()
    key = f"{_cpu_model()}|torch {torch.__version__}|{threads} threads|{m}x{k}x{n}"
    path = _probe_cache_path()
    if use_cache and (path, key) in _PROBES:  # measured before: not now
        return replace(_PROBES[(path, key)], cached=True)
    probe = _measure_or_read(path, key, m, k, n, threads, use_cache)
    if use_cache:
        _PROBES[(path, key)] = probe
    return probe


#: this process's probes: the cache file is read once per key (the precision choice and the
#: MFU peak ask for the same shape)
_PROBES: dict[tuple, "MatmulProbe"] = {}


def _measure_or_read(path: Path, key: str, m: int, k: int, n: int, threads: int, use_cache: bool) -> "MatmulProbe":
    """The cached rates of ``key`` in ``path``, else a measurement (written back)."""
    cache = {}
    if use_cache:
        try:
            cache = json.loads(path.read_text())
            hit = cache.get(key)
            if isinstance(hit, dict) and hit.get("fp32", 0) > 0 and hit.get("bf16", 0) > 0:
                return MatmulProbe((m, k, n), float(hit["fp32"]), float(hit["bf16"]), threads, cached=True)
        except (OSError, ValueError, AttributeError):
            cache = {}
    fp32 = _time_matmul(m, k, n, torch.float32, PROBE_SECONDS)
    bf16 = _time_matmul(m, k, n, torch.bfloat16, PROBE_SECONDS)
    if use_cache:
        try:
            from hpcllm.fileio import write_json_atomic

            cache = cache if isinstance(cache, dict) else {}
            cache[key] = {"fp32": fp32, "bf16": bf16, "measured": time.time()}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, cache)
        except OSError:
            pass  # a read-only home: measure again next time
    return MatmulProbe((m, k, n), fp32, bf16, threads)


def choose_cpu_precision(probe: MatmulProbe) -> tuple[str, str]:
    """The decision rule of ``--precision auto`` on a CPU: (precision, why)."""
    m, k, n = probe.shape
    r = probe.bf16_speedup
    what = (f"bf16 matmuls ran at {r:.2f}x the fp32 rate ({probe.bf16 / 1e9:.0f} vs {probe.fp32 / 1e9:.0f} "
            f"GFLOP/s, {m}x{k}x{n}, {probe.threads} thread{'s' if probe.threads != 1 else ''}"
            f"{', cached measurement' if probe.cached else ''})")
    if r >= BF16_MIN_SPEEDUP:
        return "bf16", what
    return "fp32", what + f"; bf16 needs >= {BF16_MIN_SPEEDUP}x"


def probe_shape(micro_batch: int, seq_len: int, d_model: int, mlp_ratio: int = 4) -> tuple[int, int, int]:
    """The model's MLP input projection for one micro-batch (rows capped at 4096)."""
    return min(micro_batch * seq_len, 4096), d_model, mlp_ratio * d_model


def resolve_precision(name: str, device: torch.device, shape: tuple | None = None, measure: bool = True,
                      bcast=None) -> tuple[str, str]:
    """(precision, why). 'auto' becomes bf16 where it runs faster: on a GPU with bf16 support;
    on a CPU where a bf16 matmul of ``shape`` measured faster than fp32 (see
    :func:`choose_cpu_precision`). In a job, one rank measures (``measure``) and ``bcast``
    gives every rank its decision, so ranks never train in different precisions."""
    if name == "auto":
        if device.type == "cuda":
            # emulated bf16 (V100, T4) is slower than fp32: native support only
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
            return ("bf16", "the GPU supports bf16") if ok else ("fp32", "the GPU has no bf16")
        decision = None
        if measure:
            decision = choose_cpu_precision(cpu_matmul_probe(*(shape or (1024, 1024, 1024))))
        return bcast(decision) if bcast is not None else decision
    if name not in DTYPES:
        raise HpcllmError(f"--precision {name}: expected auto, fp32, bf16 or fp16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise HpcllmError("--precision bf16: this GPU has no bf16 support (use fp16)")
    return name, "as asked"


def autocast(precision: str, device: torch.device):
    """The forward-pass context: ``torch.autocast`` for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class LossScaler:
    """Dynamic loss scale for fp16 (identity when disabled).

    The caller multiplies the loss by :attr:`scale` before backward, unscales the
    *synchronized* gradients, checks them for inf/NaN (agreed across ranks), and then calls
    :meth:`update`: an overflow halves the scale and the step is skipped; ``window``
    consecutive good steps double it.
    """

    def __init__(self, enabled: bool, init_scale: float = 65536.0, window: int = 1000,
                 backoff: float = 0.5, growth: float = 2.0, min_scale: float = 2.0 ** -24):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.window, self.backoff, self.growth, self.min_scale = window, backoff, growth, min_scale
        self.good_steps = 0
        self.skipped = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.min_scale, self.scale * self.backoff)
            self.good_steps = 0
            self.skipped += 1
        else:
            self.good_steps += 1
            if self.good_steps >= self.window:
                self.scale *= self.growth
                self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "skipped": self.skipped}

    def load_state_dict(self, d: dict) -> None:
        if self.enabled and d.get("enabled"):
            self.scale, self.good_steps = float(d["scale"]), int(d["good_steps"])
            self.skipped = int(d.get("skipped", 0))


@torch.no_grad()
def grad_norm(params) -> float:
    """Global L2 norm of the gradients (inf/NaN when any gradient is not finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False))


@torch.no_grad()
def clip_(params, norm: float, max_norm: float) -> None:
    """Scale gradients so their global norm is at most ``max_norm`` (given their norm)."""
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
