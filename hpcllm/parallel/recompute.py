"""Activation recomputation per block, applied from outside the model (``--recompute``)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

_RECOMPUTED: dict[type, type] = {}


def _recomputed_class(cls: type) -> type:
    """A subclass of ``cls`` whose call runs under ``torch.utils.checkpoint``."""
    if cls not in _RECOMPUTED:
        def __call__(self, *args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(super(sub, self).__call__, *args, use_reentrant=False, **kwargs)
            return super(sub, self).__call__(*args, **kwargs)

        sub = type(f"Recomputed{cls.__name__}", (cls,), {"__call__": __call__})
        _RECOMPUTED[cls] = sub
    return _RECOMPUTED[cls]


def apply_recompute(blocks) -> int:
    """Recompute each block's activations in the backward pass: only a block's input is kept
    between forward and backward (``torch.utils.checkpoint``, non-reentrant). The blocks stay
    the same modules with the same parameters and names; returns how many were wrapped."""
    n = 0
    for blk in blocks:
        if type(blk) not in _RECOMPUTED.values():
            blk.__class__ = _recomputed_class(type(blk))
        n += 1
    return n


