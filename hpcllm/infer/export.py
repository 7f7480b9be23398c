"""Export a checkpoint of any layout as the single file ``hpcllm generate`` loads without MPI.

Checkpoint tensors are keyed by the whole model's parameter names whatever wrote them
(:class:`hpcllm.train.checkpoint.CheckpointReader` finds each in its file), so an export is a
checked merge: every parameter of the model present (a damaged or partial checkpoint is a
one-line error), a version-1 pipeline checkpoint's two copies of the tied embedding equal,
then the payload of :func:`hpcllm.infer.generate.save_export` (``--int8``: the quantized
weights, each tensor once, and a ``quantization`` field that loading recognises).
"""
from __future__ import annotations

from pathlib import Path

import torch

from hpcllm.errors import HpcllmError
from hpcllm.train import checkpoint as ckpt

#: the tied embedding matrix (input embedding and output head)
TIED = "wte.weight"


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


def check_checkpoint(d: Path) -> int:
    """Number of pipeline stages the checkpoint was written with (0: without stages);
    raises on a damaged one."""
    reader = ckpt.CheckpointReader(d)
    layout = reader.layout()
    P = int(layout.get("pp", 1))
    if reader.version == 1 and P > 1:
        missing = [f"model-stage{s}.pt" for s in range(P) if not (d / f"model-stage{s}.pt").is_file()]
        if missing:
            raise HpcllmError(f"{d}: missing {', '.join(missing)} of a {P}-stage pipeline checkpoint")
        first = ckpt.load_torch(d / "model-stage0.pt")
        last = ckpt.load_torch(d / f"model-stage{P - 1}.pt")
        if TIED in first and TIED in last and not torch.equal(first[TIED], last[TIED]):
            diff = (first[TIED] - last[TIED]).abs().max().item()
            raise HpcllmError(f"{d}: the first and last stage's tied embedding copies differ (max {diff:.3g})")
    else:
        reader.check_files()
    return P if P > 1 else 0


def export_checkpoint(path, out, int8: bool = False) -> tuple[Path, Path, int]:
    """Write the single-file model for checkpoint or run directory ``path`` to ``out``
    (``int8``: its INT8 weight-only quantization, :mod:`hpcllm.infer.quantize`); returns
    (checkpoint used, file written, stages merged)."""
    from hpcllm.infer.generate import save_export

    from hpcllm.locking import lock_file

    d = find_checkpoint(path)
    stages = check_checkpoint(d)
    with lock_file(out):  # one writer of this file
        written = save_export(d, out, int8=int8)
    return d, written, stages
