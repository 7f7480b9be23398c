"""Mixed precision: which dtype, the autocast context, and fp16 dynamic loss scaling."""
from __future__ import annotations

import contextlib
import math

import torch

from hpcllm.errors import HpcllmError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls much faster than fp32 (elsewhere bf16 is emulated)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' becomes bf16 where the hardware runs it fast, else fp32; others are checked."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if name not in DTYPES:
        raise HpcllmError(f"--precision {name}: expected auto, fp32, bf16 or fp16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HpcllmError("--precision bf16: this GPU has no bf16 support (use fp16)")
    return name


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
