"""Learning-rate schedule: linear warmup, then cosine decay to a floor. A pure function of
the step, so resuming needs only the step (the parameters are checked on resume)."""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for 0-based optimizer step ``step``.

    Warmup: ``lr * (step + 1) / warmup`` for ``step < warmup``; then a half cosine from ``lr``
    at ``warmup`` to ``lr * min_lr_ratio`` at ``decay_steps``; constant after.
    """
    min_lr = lr * min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class LRSchedule:
    """``lr_at`` bound to an OptimizerConfig and the run length."""

    def __init__(self, ocfg, total_steps: int):
        self.lr = ocfg.lr
        self.warmup = min(ocfg.warmup, total_steps)
        self.decay_steps = ocfg.decay_steps or total_steps
        self.min_lr_ratio = ocfg.min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_at(step, self.lr, self.warmup, self.decay_steps, self.min_lr_ratio)

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "warmup": self.warmup, "decay_steps": self.decay_steps,
                "min_lr_ratio": self.min_lr_ratio}
