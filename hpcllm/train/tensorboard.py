"""TensorBoard event files in ``RUN/tensorboard/``: the scalars of ``metrics.jsonl``, same steps.

Written by :class:`hpcllm.train.metrics.MetricsLogger` from each record it writes, so the
event files come from the rank that writes ``metrics.jsonl`` and hold the same values. The
``tensorboard`` package is optional: without it training goes on and says so once.
"""
from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"

#: metrics.jsonl key -> TensorBoard tag
TAGS = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "mfu": "train/mfu",
    "loss_scale": "train/loss_scale",
}


class TensorBoardWriter:
    """One ``SummaryWriter`` on ``RUN/tensorboard/``; does nothing when it cannot be made."""

    def __init__(self, run_dir, start_step: int, echo=print):
        self.writer = None
        self.echo = echo
        self.log_dir = log_dir = Path(run_dir) / TENSORBOARD_DIR
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # ImportError, or a broken install (e.g. a protobuf mismatch)
            echo(f"[hpcllm] TensorBoard event files are off ({type(e).__name__}: {e}); "
                 "enable them with `pip install tensorboard`")
            return
        try:
            # A resumed run logs the steps after its checkpoint again, and metrics.jsonl was cut
            # back to start_step: purge_step makes TensorBoard drop the earlier files' points
            # from start_step + 1 on, so each tag keeps one point per step, in order.
            self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        # like metrics.jsonl: a log must not end the run (a full disk fails the checkpoints)
        self.writer = None
        self.echo(f"[hpcllm] warning: {self.log_dir}: cannot write TensorBoard event files "
                  f"({e.strerror or e}); training goes on without them")

    def write(self, rec: dict) -> None:
        """The record's scalars at its step, flushed (the files are complete after each record)."""
        if self.writer is None:
            return
        try:
            for key, tag in TAGS.items():
                value = rec.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(tag, float(value), global_step=int(rec["step"]))
            self.writer.flush()
        except OSError as e:  # the writer thread's write error, raised here
            self._give_up(e)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
                self.writer = None
            except OSError as e:
                self._give_up(e)
