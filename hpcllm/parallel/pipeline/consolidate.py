"""Consolidate a pipeline checkpoint (one ``model-stage{s}.pt`` per stage) into the single
file ``hpcllm generate`` loads without MPI.

The stage files already use the whole model's parameter names, so consolidation is a
checked merge: every stage file present, the first and last stage's copies of the tied
embedding equal, then the export format of :func:`hpcllm.train.generate.save_export`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hpcllm.errors import HpcllmError
from hpcllm.parallel.pipeline.stage import TIED
from hpcllm.train import checkpoint as ckpt


def find_checkpoint(path) -> Path:
    """A checkpoint directory, or the latest complete one of a run directory."""
    p = Path(path)
    if ckpt.is_complete(p):
        return p
    if (p / "checkpoints").is_dir():
        found = ckpt.latest_checkpoint(p)
        if found is not None:
            return found
    if p.is_file():
        raise HpcllmError(f"{p}: is a file; export takes a checkpoint directory or a run directory")
    raise HpcllmError(f"{p}: not a complete checkpoint (step-*/ with trainer.json and model files) "
                      "or a run directory holding one")


def check_pipeline_checkpoint(d: Path) -> int:
    """Number of stages (0 for a data-parallel checkpoint); raises on a damaged one."""
    stages = sorted(d.glob("model-stage*.pt"))
    if not stages:
        return 0
    trainer = ckpt.load_json(d / "trainer.json")
    P = int((trainer.get("pipeline") or {}).get("stages") or len(stages))
    missing = [f"model-stage{s}.pt" for s in range(P) if not (d / f"model-stage{s}.pt").is_file()]
    if missing:
        raise HpcllmError(f"{d}: missing {', '.join(missing)} of a {P}-stage pipeline checkpoint")
    first = ckpt.load_torch(d / "model-stage0.pt")
    last = ckpt.load_torch(d / f"model-stage{P - 1}.pt")
    if TIED in first and TIED in last and not torch.equal(first[TIED], last[TIED]):
        diff = (first[TIED] - last[TIED]).abs().max().item()
        raise HpcllmError(f"{d}: the first and last stage's tied embedding copies differ (max {diff:.3g})")
    return P


def export_checkpoint(path, out) -> tuple[Path, Path, int]:
    """Write the single-file model for checkpoint or run directory ``path`` to ``out``;
    returns (checkpoint used, file written, stages merged)."""
    from hpcllm.train.generate import save_export

    d = find_checkpoint(path)
    stages = check_pipeline_checkpoint(d)
    written = save_export(d, out)
    return d, written, stages
