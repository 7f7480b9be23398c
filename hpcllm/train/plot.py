"""PNG plots of training runs from their ``metrics.jsonl``: loss and throughput, runs overlaid.

Each line of ``RUN/metrics.jsonl`` is one JSON object per log interval (``step``, ``loss``,
``tokens_per_s``, ... and ``val_loss`` when evaluated; see hpcllm/train/metrics.py). Plotting
is a pure function of those files, so it runs anywhere (a login node, a laptop) without torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.errors import HpcllmError


@dataclass
class RunMetrics:
    """The series of one run, by step."""

    label: str
    path: Path
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    throughput: list[tuple[int, float]] = field(default_factory=list)


def read_metrics(run_dir: str | os.PathLike, label: str | None = None) -> RunMetrics:
    """Parse ``run_dir/metrics.jsonl``; a torn last line (a run killed mid-write) is skipped."""
    run = Path(run_dir)
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise HpcllmError(f"{path}: no metrics.jsonl (is {run} a training run directory?)")
    m = RunMetrics(label=label or run.resolve().name, path=path)
    lines = path.read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the writer was killed mid-line: keep what is complete
                break
            raise HpcllmError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise HpcllmError(f"{path}:{lineno}: expected an object with a 'step' field")
        step = int(rec["step"])
        if _num(rec.get("loss")):
            m.train.append((step, float(rec["loss"])))
        if _num(rec.get("val_loss")):
            m.val.append((step, float(rec["val_loss"])))
        if _num(rec.get("tokens_per_s")):
            m.throughput.append((step, float(rec["tokens_per_s"])))
    # a resumed run appends records for steps it already logged: the newest value wins
    m.train, m.val, m.throughput = (_last_per_step(s) for s in (m.train, m.val, m.throughput))
    if not (m.train or m.val or m.throughput):
        raise HpcllmError(f"{path}: no loss or throughput records yet")
    return m


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _last_per_step(series: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted(dict(series).items())


def _labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, or the full paths when two runs share a name."""
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in run_dirs]


def default_out_dir(run_dirs: list[str | os.PathLike]) -> Path:
    """One run: RUN/plots; several: ./plots."""
    return Path(run_dirs[0]) / "plots" if len(run_dirs) == 1 else Path("plots")


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``loss.png`` and ``throughput.png`` for the runs into ``out_dir``; return the paths."""
    if not run_dirs:
        raise HpcllmError("plot: give at least one run directory")
    paths = [Path(r) for r in run_dirs]
    runs = [read_metrics(p, label) for p, label in zip(paths, _labels(paths))]
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on compute or login nodes
    import matplotlib.pyplot as plt

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        if r.train:
            ax.plot(*zip(*r.train), color=c, lw=1.2, label=f"{r.label} train")
        if r.val:
            ax.plot(*zip(*r.val), color=c, lw=1.5, ls="--", marker="o", ms=3, label=f"{r.label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(runs):
        if r.throughput:
            ax.plot(*zip(*r.throughput), color=colors[i % len(colors)], lw=1.2, label=r.label)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s (all ranks)")
    ax.set_title("throughput")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if any(r.throughput for r in runs):
        ax.legend(fontsize=8)
    written.append(_save(fig, out / "throughput.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
