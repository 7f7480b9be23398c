"""Training metrics: throughput, MFU, RUN_DIR/metrics.jsonl, its scalars as TensorBoard event
files in RUN_DIR/tensorboard/ (:mod:`hpcllm.train.tensorboard`) and the console line (rank 0).

One JSON object per log interval::

    {"step": 100, "loss": 3.21, "lr": 0.0006, "grad_norm": 0.84, "tokens_per_s": 51234.0,
     "mfu": 0.121, "step_time_s": 0.53, "sync_time_s": 0.02, "tokens": 3276800, "loss_scale": 65536.0,
     "skipped": 0, "time": 1700000000.0}

plus, per rank (lists in rank order), ``model_state_bytes`` (parameters + gradients + optimizer
states at the first optimizer step: ZeRO shards them), ``peak_mem_bytes`` (peak RSS, or the
CUDA allocator's peak) and ``start_mem_bytes`` (the process before the model was built), and
``comm_s``: the last step's waits for gradient communication (``allreduce_s``; ZeRO
``reduce_scatter_s`` and ``all_gather_s``), plus ``val_loss`` on lines where the validation loss was computed (an eval-only line has
``step`` and ``val_loss``). ``tokens_per_s`` is global (all ranks); ``mfu`` is the achieved
FLOP/s (``flops_per_token`` x tokens/s) over the peak of all devices.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


def current_memory_bytes(device) -> int:
    """This process's memory now: CUDA tensors allocated on a GPU, else the resident set."""
    if getattr(device, "type", device) == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device) -> int:
    """This process's peak memory so far: the CUDA caching allocator's peak on a GPU, else the
    peak resident set size (``ru_maxrss``)."""
    if getattr(device, "type", device) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

#: Dense peak TFLOP/s per device for (bf16/fp16, fp32) matmuls; matched as substrings of
#: the CUDA device name, first match wins. fp32 on Ampere+ counts TF32 tensor cores.
GPU_PEAK_TFLOPS = [
    ("H200", 989.0, 494.0), ("H100 PCIe", 756.0, 378.0), ("H100", 989.0, 494.0),
    ("GH200", 989.0, 494.0), ("A100", 312.0, 156.0), ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0), ("A40", 150.0, 75.0), ("A10", 125.0, 62.5), ("L4", 121.0, 60.0),
    ("V100", 125.0, 15.7), ("T4", 65.0, 8.1), ("MI300X", 1307.0, 654.0), ("MI250X", 383.0, 96.0),
]


def cpu_flops_per_cycle(low_precision: bool, cpuinfo: str | None = None) -> int:
    """Per-core FLOPs per cycle from the CPU's vector units (2 FMA pipes assumed).

    AMD Zen 4 (family 25 with AVX-512) runs each 512-bit instruction as two 256-bit halves,
    so it gets the AVX2 rate per cycle; measured here: bf16 matmuls at 165 GFLOP/s per 2.6 GHz
    core = 64 FLOPs/cycle, not 128. ``cpuinfo``: the text of /proc/cpuinfo (read when None).
    """
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            cpuinfo = ""
    if low_precision and "amx_bf16" in cpuinfo:
        return 1024  # AMX: 16x32 bf16 tile FMA per cycle
    if "avx512f" in cpuinfo:
        n = 128 if (low_precision and "avx512_bf16" in cpuinfo) else 64
        return n // 2 if _double_pumped_avx512(cpuinfo) else n
    if "avx2" in cpuinfo or "fma" in cpuinfo:
        return 32
    return 8


def _double_pumped_avx512(cpuinfo: str) -> bool:
    """AMD Zen 4: AVX-512 on 256-bit datapaths."""
    vendor = family = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key == "cpu family" and family is None:
            family = value.strip()
        if vendor is not None and family is not None:
            break
    return vendor == "AuthenticAMD" and family == "25"


def device_peak_tflops(device: torch.device, precision: str, threads: int, override: float | None = None,
                       bf16_speedup: float | None = None) -> float:
    """Peak TFLOP/s of one device (one rank): ``override`` (--peak-tflops) when given; a GPU
    from the table (bf16/fp16 vs fp32 column); a CPU estimated as threads x clock x fp32
    FLOPs/cycle, times the bf16/fp32 matmul speed ratio measured on this machine in 16-bit
    precision (:func:`hpcllm.train.precision.cpu_matmul_probe`, ``bf16_speedup`` when the
    caller has it): a flag is not a speed (rough: set --peak-tflops for a number you trust)."""
    if override:
        return float(override)
    low = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, single in GPU_PEAK_TFLOPS:
            if key in name:
                return half if low else single
        return 100.0
    ghz = 2.5
    try:
        import psutil

        f = psutil.cpu_freq()
        if f and f.max:
            ghz = f.max / 1000.0
        elif f and f.current:
            ghz = f.current / 1000.0
    except Exception:
        pass
    fp32 = threads * ghz * 1e9 * cpu_flops_per_cycle(False) / 1e12
    if not low:
        return fp32
    if bf16_speedup is None:
        from hpcllm.train.precision import cpu_matmul_probe

        bf16_speedup = cpu_matmul_probe(1024, 1024, 1024).bf16_speedup
    return fp32 * bf16_speedup


def truncate_metrics(run_dir, after_step: int) -> None:
    """Drop records beyond ``after_step`` (rank 0, on resume: the interrupted run may have
    logged steps past its last checkpoint, which the resumed run logs again)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if int(rec.get("step", 0)) <= after_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class MetricsLogger:
    """Aggregates steps into log intervals; rank 0 writes the jsonl and prints the line.

    ``tensorboard_from``: the step training starts from (the resumed checkpoint's, or 0):
    the enabled logger also writes each record's scalars to ``RUN/tensorboard/`` event files
    (:mod:`hpcllm.train.tensorboard`); None: no event files. :meth:`close` ends them.
    """

    def __init__(self, run_dir, *, enabled: bool, flops_per_token: int, peak_flops_total: float,
                 tokens_per_step: int, total_steps: int, echo=print, tensorboard_from: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self.tokens_per_step = tokens_per_step
        self.total_steps = total_steps
        self.echo = echo
        self.tensorboard = None
        if enabled and tensorboard_from is not None:  # the rank that writes metrics.jsonl, no other
            from hpcllm.train.tensorboard import TensorBoardWriter

            self.tensorboard = TensorBoardWriter(run_dir, tensorboard_from, echo=echo)
        self._reset()

    def close(self) -> None:
        """Close the event files (their last records are already flushed)."""
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _reset(self):
        self._losses, self._time, self._sync, self._steps = [], 0.0, 0.0, 0

    def step(self, loss: float, step_time_s: float, sync_time_s: float = 0.0) -> None:
        """One optimizer step: its global mean loss, wall time, and the time spent waiting
        for the gradient allreduce (the part not hidden behind the backward pass)."""
        self._losses.append(loss)
        self._time += step_time_s
        self._sync += sync_time_s
        self._steps += 1

    def flush(self, step: int, **fields) -> dict | None:
        """Write one record for the steps since the last flush (``step`` = steps done)."""
        if not self._steps:
            return None
        step_time = self._time / self._steps
        tps = self.tokens_per_step / step_time if step_time > 0 else 0.0
        rec = {"step": step, "loss": sum(self._losses) / len(self._losses), **fields,
               "tokens_per_s": tps, "mfu": tps * self.flops_per_token / self.peak_flops_total,
               "step_time_s": step_time, "sync_time_s": self._sync / self._steps,
               "tokens": step * self.tokens_per_step, "time": time.time()}
        self._reset()
        self.write(rec)
        if self.enabled:
            self.echo(self.console_line(rec))
        return rec

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(_finite(rec)) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:
            # a full disk must not end a run for its log: say so once, keep training (the
            # checkpoints, which do matter, fail with their own error)
            if not getattr(self, "_write_warned", False):
                from hpcllm.fileio import free_space

                print(f"warning: {self.path}: cannot append metrics ({e.strerror or e}; {free_space(self.path)}); "
                      "training goes on without them", flush=True)
                self._write_warned = True
        if self.tensorboard is not None:
            self.tensorboard.write(rec)

    def console_line(self, rec: dict) -> str:
        parts = [f"step {rec['step']:>{len(str(self.total_steps))}}/{self.total_steps}"]
        if "loss" in rec:
            parts.append(f"loss {rec['loss']:.4f}")
        if "val_loss" in rec:
            parts.append(f"val {rec['val_loss']:.4f}")
        if "lr" in rec:
            parts.append(f"lr {rec['lr']:.2e}")
        if "grad_norm" in rec:
            parts.append(f"gnorm {rec['grad_norm']:.3f}")
        if "tokens_per_s" in rec:
            parts.append(f"{_si(rec['tokens_per_s'])} tok/s")
            parts.append(f"mfu {100 * rec['mfu']:.1f}%")
            parts.append(f"{rec['step_time_s'] * 1000:.0f} ms/step")
        if "moe_aux_loss" in rec:  # mixture of experts: balance, drops, all-to-all share
            moe = f"aux {rec['moe_aux_loss']:.3f} load {rec['moe_load_max_mean']:.2f}"
            if rec.get("moe_dropped"):
                moe += f" drop {100 * rec['moe_dropped']:.1f}%"
            if "moe_all_to_all_share" in rec:
                moe += f" a2a {100 * rec['moe_all_to_all_share']:.0f}%"
            parts.append(moe)
        if rec.get("skipped"):
            parts.append(f"skipped {rec['skipped']}")
        return " | ".join(parts)


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _finite(rec: dict) -> dict:
    """JSON has no inf/NaN: write them as strings so the file stays parseable."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
