#!/usr/bin/env python3
"""The GPU path, measured: one prepared check for a CUDA machine (`make gpu-check`).

    python3 scripts/gpu_check.py                      # everything, at most 8 minutes
    python3 scripts/gpu_check.py --quick              # the core measurements, about 3 minutes
    python3 scripts/gpu_check.py --dry-run            # the plan: steps, budgets, commands
    python3 scripts/gpu_check.py --only env,install,horovod --deadline 300

On a machine without a CUDA device it prints one line ("no CUDA device ...") and exits 0.

On a CUDA machine it runs the steps below in order, under one global deadline (``--deadline``,
480 s): each step has its own budget (a subprocess timeout), starts only while enough time is
left, and ends as ``done``, ``skipped`` (with the reason) or ``failed`` (with the reason and the
end of its log), so one failing step never loses the others. The JSON (``--out``, default
``benchmarks/results/gpu-check-<device>.json``) is rewritten atomically before and after
every step: a run killed from outside still leaves every finished step and names the one that
was running. A table is printed at the end.

Steps (full budget in seconds; ``--quick`` runs the ones marked q, with fewer steps):

    env                  20  q  torch, CUDA, the device, compilers, cmake, MPI, nvcc, NCCL headers
    install              60  q  carried wheels (build/gpu-wheels, see scripts/gpu_prepare.py) and
                                hpcllm into a scratch prefix; never touches the preinstalled torch
    matmul               45  q  bf16/fp16/fp32 matmul rates (square sizes, best of), the "measured peak"
    data                 60  q  synthetic corpus -> `hpcllm preprocess` (byte tokenizer)
    train_1.3b_bf16     120  q  1.3B shape (24 x 2048, seq 2048), bf16, eager: tokens/s, MFU, memory
    train_124m_bf16      75  q  124M (12 x 768, seq 1024), bf16, eager; its checkpoint feeds generate
    generate             75  q  `hpcllm generate` (KV cache, --no-kv-cache, --int8 where it exists,
                                --prompts-file batches) and tokens/s of the Python API
    cuda_tests          150  q  pytest -m cuda tests/cuda (q: not slow)
    train_124m_fp16      60  q  fp16 with dynamic loss scaling
    train_1.3b_fp16     100
    train_124m_bf16_compile 120 --compile
    train_1.3b_bf16_compile 150 --compile
    pipeline            100     2 ranks x 1 GPU over mpi4py (CUDA-aware or staged), if an MPI runtime is there
    doctor               30     `hpcllm doctor`
    horovod             240     Horovod 0.28.1 from the carried sdist with NCCL (C++17 flag fix, NCCL
                                headers from the NVIDIA wheels), if a compiler, cmake, MPI and nvcc are there

Each training run is ``python3 -m hpcllm train --device cuda --log-every 1 --eval-every 0
--ckpt-every 0 ...`` for a fixed number of steps; tokens/s is the median of the steps after
the first three; MFU is reported against the matmul rate measured in the same run and against
the datasheet peak hpcllm uses (``hpcllm.train.metrics.GPU_PEAK_TFLOPS``); peak memory is the
CUDA allocator's peak (``peak_mem_bytes`` in metrics.jsonl) and the device's memory in use
(NVML, the whole process: context, cache, fragmentation), each against ``hpcllm.plan``'s
prediction for the same micro-batch and precision. The 1.3B runs are ended once their last
step is logged (their final checkpoint, 15 GB, is not what is measured).

hpcllm runs from the working tree (PYTHONPATH=<scratch site>:<repo>): it is pure Python, so
nothing needs building, the code measured is exactly the tree's, and no site-packages
directory is written, which leaves the preinstalled torch alone by construction. The install
step additionally proves the package installs (pip --no-deps --no-index --no-build-isolation
--target <scratch>) and that torch is the same file and version before and after.

This file only uses the standard library at import time (torch is imported inside the steps),
so a CPU machine without torch still gets the one-line answer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMAT = "hpcllm-gpu-check"
VERSION = 1
DEFAULT_DEADLINE_S = 480.0
#: seconds kept back at the end of the deadline for the summary, the table and the JSON
RESERVE_S = 8.0
DEFAULT_WHEELS = REPO / "build" / "gpu-wheels"
RESULTS_DIR = REPO / "benchmarks" / "results"
#: training steps at the start of a run left out of the throughput (compile, allocator, cuBLAS warm-up)
WARM_STEPS = 3
GiB = 1024 ** 3
#: "cuda". HPCLLM_GPU_CHECK_DEVICE=cpu rehearses the whole check on a CPU with tiny shapes (the
#: orchestration, the parsing, the JSON and the table; measures nothing): tests/test_gpu_check.py
DEVICE = os.environ.get("HPCLLM_GPU_CHECK_DEVICE", "cuda")
#: the model shape of every training run in a CPU rehearsal
REHEARSAL_SHAPE = ["--n-layer", "2", "--n-head", "2", "--d-model", "64", "--seq-len", "64", "--threads", "2"]


# --------------------------------------------------------------------------- small helpers


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (file names)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def one_line(text, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def tail(text: str, lines: int = 30, chars: int = 4000) -> str:
    out = "\n".join(text.splitlines()[-lines:])
    return out[-chars:]


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` to ``path`` so a reader (or a kill) sees the old file or the new one,
    never half of one: a temporary file in the same directory, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_jsonl(path) -> list[dict]:
    out = []
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


class Skip(Exception):
    """A step that cannot run here: recorded as skipped with this reason."""


class StepFailed(Exception):
    """A step that ran and failed: recorded with the reason and what it measured anyway."""

    def __init__(self, reason: str, data: dict | None = None):
        super().__init__(reason)
        self.data = data or {}


@dataclass
class ProcResult:
    rc: int | None
    seconds: float
    timed_out: bool
    stopped: bool
    """Ended by the caller's ``stop`` predicate (e.g. the last metrics record was written)."""
    output: str
    log: str | None = None

    def brief(self) -> dict:
        return {"rc": self.rc, "seconds": round(self.seconds, 1), "timed_out": self.timed_out,
                "stopped_after_result": self.stopped, "log": self.log}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_process(cmd, *, timeout: float, env=None, log=None, cwd=REPO, stop=None, poll_s: float = 0.5,
                input_text: str | None = None) -> ProcResult:
    """Run ``cmd`` in its own process group with its output in ``log`` (a temporary file when
    None); kill the whole group (SIGKILL: a SIGTERM would make `hpcllm train` checkpoint) past
    ``timeout`` seconds or once ``stop()`` returns true. Never raises for the child's failures."""
    own_log = log is None
    if own_log:
        fd, log = tempfile.mkstemp(prefix="gpu-check-", suffix=".log")
        os.close(fd)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timed_out = stopped = False
    with open(log, "w") as f:
        f.write("$ " + shlex.join(str(c) for c in cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                                    cwd=str(cwd), env=env, start_new_session=True, text=True)
        except OSError as e:
            f.write(f"cannot start: {e}\n")
            return ProcResult(None, 0.0, False, False, f"cannot start {cmd[0]}: {e}", None if own_log else str(log))
        if input_text is not None:
            try:
                proc.stdin.write(input_text)
                proc.stdin.close()
            except OSError:
                pass
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                elif stop is not None:
                    try:
                        stopped = bool(stop())
                    except Exception:  # noqa: BLE001 - a broken predicate must not leave the child running
                        stopped = False
                if timed_out or stopped:
                    _kill_group(proc)
                    rc = proc.wait()
                    break
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
    output = log.read_text(errors="replace").split("\n", 1)[-1]  # without the "$ command" line
    if own_log:
        os.unlink(log)
    return ProcResult(rc, time.monotonic() - t0, timed_out, stopped, output, None if own_log else str(log))


# --------------------------------------------------------------------------- GPU memory in use


class GpuMemory:
    """Memory in use on one GPU, as the driver counts it (every process: contexts, caching
    allocators, fragmentation), through NVML (ctypes, no CUDA context) or nvidia-smi."""

    def __init__(self, index: int | None = None):
        if index is None:  # CUDA device 0 is the first visible one; NVML counts all of them
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            index = int(first) if first.isdigit() else 0
        self.index, self.how, self._lib, self._handle = index, None, None, None
        try:
            import ctypes

            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() == 0:
                handle = ctypes.c_void_p()
                if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) == 0:
                    self._lib, self._handle, self.how = lib, handle, "nvml"
        except (OSError, AttributeError):
            pass
        if self.how is None and shutil.which("nvidia-smi"):
            self.how = "nvidia-smi"

    def used(self) -> int | None:
        if self.how == "nvml":
            import ctypes

            class Mem(ctypes.Structure):
                _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

            m = Mem()
            if self._lib.nvmlDeviceGetMemoryInfo(self._handle, ctypes.byref(m)) == 0:
                return int(m.used)
            return None
        if self.how == "nvidia-smi":
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", str(self.index)], capture_output=True, text=True, timeout=5).stdout
                return int(float(out.strip().splitlines()[0])) * 1024 ** 2
            except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
                return None
        return None

    def settle(self, timeout: float = 8.0, step_s: float = 0.25) -> int | None:
        """Wait (at most ``timeout``) until the memory in use stops falling, e.g. after a killed
        process's memory is released; returns the last reading."""
        last = self.used()
        end = time.monotonic() + timeout
        calm = 0
        while last is not None and time.monotonic() < end and calm < 4:
            time.sleep(step_s)
            u = self.used()
            if u is None:
                break
            calm = calm + 1 if u >= last - 16 * 1024 ** 2 else 0
            last = u
        return last


class PeakSampler:
    """Samples :class:`GpuMemory` in a thread while a child runs; ``peak`` is the largest."""

    def __init__(self, mem: GpuMemory | None, interval_s: float | None = None):
        self.mem = mem
        self.interval = interval_s or (0.1 if mem is not None and mem.how == "nvml" else 1.0)
        self.peak = None
        self.baseline = mem.used() if mem is not None and mem.how else None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.baseline is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            u = self.mem.used()
            if u is not None and (self.peak is None or u > self.peak):
                self.peak = u

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def delta(self) -> int | None:
        if self.peak is None or self.baseline is None:
            return None
        return max(0, self.peak - self.baseline)


# --------------------------------------------------------------------------- the steps


@dataclass
class Step:
    name: str
    budget_s: float
    min_s: float
    what: str
    quick: bool = False
    needs: tuple = ()
    fn: object = None


@dataclass
class TrainRun:
    model: str
    precision: str
    compile: bool
    micro_batch: int
    steps: int
    quick_steps: int
    keep: bool
    """Keep the run directory and let the final checkpoint be written (generation reads it)."""


TRAIN_RUNS = {
    "train_1.3b_bf16": TrainRun("1.3B", "bf16", False, 8, 20, 10, False),
    "train_124m_bf16": TrainRun("124M", "bf16", False, 16, 30, 12, True),
    "train_124m_fp16": TrainRun("124M", "fp16", False, 16, 30, 12, False),
    "train_1.3b_fp16": TrainRun("1.3B", "fp16", False, 8, 20, 10, False),
    "train_124m_bf16_compile": TrainRun("124M", "bf16", True, 16, 30, 12, False),
    "train_1.3b_bf16_compile": TrainRun("1.3B", "bf16", True, 8, 20, 10, False),
}


def train_args(run: TrainRun, data, out, steps: int, micro_batch: int | None = None,
               device: str = "cuda") -> list[str]:
    """The `hpcllm train` arguments of one measured run (``device`` is cpu only in the CPU
    rehearsal of tests/test_gpu_check.py)."""
    args = ["train", "--data", str(data), "--out", str(out), "--model", run.model, "--steps", str(steps),
            "--micro-batch", str(micro_batch or run.micro_batch), "--precision", run.precision,
            "--device", device, "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0",
            "--warmup", "2", "--keep-checkpoints", "1"]
    return args + (["--compile"] if run.compile else [])


def make_steps() -> list[Step]:
    s = [
        Step("env", 20, 3, "torch, CUDA and the device; compilers, cmake, MPI, nvcc, NCCL headers", True, (), step_env),
        Step("install", 60, 10, "carried wheels and hpcllm into a scratch prefix (torch untouched)", True, (), step_install),
        Step("matmul", 45, 15, "measured bf16/fp16/fp32 matmul rates (square sizes, best)", True, (), step_matmul),
        Step("data", 60, 10, "synthetic corpus -> hpcllm preprocess (byte tokenizer)", True, (), step_data),
    ]
    budgets = {"train_1.3b_bf16": (120, 45, True), "train_124m_bf16": (75, 25, True),
               "train_124m_fp16": (60, 25, True), "train_1.3b_fp16": (100, 45, False),
               "train_124m_bf16_compile": (120, 45, False), "train_1.3b_bf16_compile": (150, 60, False)}
    train = {name: Step(name, b, m, f"hpcllm train {r.model} {r.precision}{' --compile' if r.compile else ''}, "
                        f"{r.steps} steps (quick {r.quick_steps}), micro-batch {r.micro_batch}", q, ("data",),
                        _train_step(name))
             for name, (b, m, q) in budgets.items() for r in [TRAIN_RUNS[name]]}
    s += [train["train_1.3b_bf16"], train["train_124m_bf16"],
          Step("generate", 75, 20, "hpcllm generate: KV cache, --no-kv-cache, --int8 (where it exists), batches; "
               "tokens/s", True, ("train_124m_bf16",), step_generate),
          Step("cuda_tests", 150, 40, "pytest -m cuda tests/cuda (quick: not slow)", True, (), step_cuda_tests),
          train["train_124m_fp16"], train["train_1.3b_fp16"], train["train_124m_bf16_compile"],
          train["train_1.3b_bf16_compile"],
          Step("pipeline", 100, 30, "2-rank pipeline on one GPU over mpi4py (CUDA-aware or staged), if MPI is there",
               False, ("data",), step_pipeline),
          Step("doctor", 30, 10, "hpcllm doctor", False, (), step_doctor),
          Step("horovod", 240, 120, "build Horovod 0.28.1 with NCCL from the carried sdist, if the tools are there",
               False, (), step_horovod)]
    return s


def step_names() -> list[str]:
    return [st.name for st in make_steps()]


def parse_step_list(text: str | None, option: str) -> list[str]:
    """``--only``/``--skip``'s comma-separated names; an unknown one is a usage error (exit 2)."""
    if not text:
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = step_names()
    bad = [n for n in names if n not in known]
    if bad:
        print(f"gpu_check: {option} {','.join(bad)}: unknown step(s); steps: {', '.join(known)}", file=sys.stderr)
        raise SystemExit(2)
    return names


def select_steps(args) -> list[Step]:
    """The steps this invocation runs, in order: all (or the --quick ones), or --only's, minus --skip's."""
    only = parse_step_list(args.only, "--only")
    skip = set(parse_step_list(args.skip, "--skip"))
    out = []
    for st in make_steps():
        if only:
            chosen = st.name in only
        else:
            chosen = st.quick or not args.quick
        if chosen and st.name not in skip:
            out.append(st)
    return out


# --------------------------------------------------------------------------- the run


class Check:
    """One run of the check: the deadline, the scratch directory, the JSON, the steps' state."""

    def __init__(self, args, steps: list[Step], out: Path, device: dict | None = None):
        self.args, self.steps, self.out = args, steps, Path(out)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + float(args.deadline)
        self.quick = bool(getattr(args, "quick", False))
        scratch = getattr(args, "scratch", None)
        self.scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="hpcllm-gpu-check-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        logs = getattr(args, "logs", None)
        self.logs = Path(logs) if logs else self.scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.site = self.scratch / "site"
        self.py = sys.executable
        #: where the training runs compute: cuda; cpu only in a rehearsal (see DEVICE)
        self.device = DEVICE
        self.state: dict = {"pythonpath": [str(REPO)]}
        self.gpu_mem = None
        self.results = {
            "format": FORMAT, "version": VERSION, "started": now_iso(), "finished": None, "complete": False,
            "command": [Path(sys.argv[0]).name] + sys.argv[1:] if sys.argv else [],
            "options": {"quick": self.quick, "deadline_s": float(args.deadline),
                        "only": getattr(args, "only", None), "skip": getattr(args, "skip", None)},
            "device": device or {}, "scratch": str(self.scratch), "logs": str(self.logs),
            "steps": {}, "summary": {},
        }
        for st in steps:
            self.results["steps"][st.name] = {"status": "pending", "what": st.what}

    # ---- time
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # ---- output
    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        write_json_atomic(self.out, self.results)

    def say(self, msg: str) -> None:
        print(f"[gpu-check {self.elapsed():5.0f}s] {msg}", flush=True)

    # ---- environment of the children
    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        paths = list(self.state.get("pythonpath", [str(REPO)]))
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["HPCLLM_CACHE"] = str(self.scratch / "cache")
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.scratch / "inductor"))
        env["PIP_NO_INDEX"] = "1"
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        env.update(extra or {})
        return env

    def hpcllm(self, *args) -> list[str]:
        return [self.py, "-m", "hpcllm", *map(str, args)]

    def worker(self, name: str, *args) -> list[str]:
        return [self.py, str(Path(__file__).resolve()), "--worker", name, *map(str, args)]

    # ---- steps
    def run_step(self, st: Step) -> dict:
        rec = self.results["steps"].setdefault(st.name, {"what": st.what})
        budget_full = st.budget_s
        left = self.remaining() - RESERVE_S
        budget = min(budget_full, left)
        missing = [n for n in st.needs if self.results["steps"].get(n, {}).get("status") != "done"]
        rec.update(budget_s=round(budget, 1), started=now_iso())
        if missing:
            dep = missing[0]
            status = self.results["steps"].get(dep, {}).get("status", "not selected")
            rec.update(status="skipped", reason=f"needs step {dep} ({status})", seconds=0.0)
        elif budget < st.min_s:
            rec.update(status="skipped", seconds=0.0,
                       reason=f"not enough time left: {max(0.0, left):.0f} s before the {self.args.deadline:.0f} s "
                              f"deadline, the step needs at least {st.min_s:.0f} s")
        else:
            rec["status"] = "running"
            self.save()
            self.say(f"{st.name}: {st.what} (budget {budget:.0f} s)")
            t = time.monotonic()
            try:
                data = st.fn(self, budget) or {}
                status = data.pop("status", "done")
                rec.update(data)
                rec["status"] = status
            except Skip as e:
                rec.update(status="skipped", reason=one_line(e))
            except StepFailed as e:
                rec.update(e.data)
                rec.update(status="failed", reason=one_line(e))
            except Exception as e:  # noqa: BLE001 - one step's bug must not lose the others
                rec.update(status="failed", reason=one_line(f"{type(e).__name__}: {e}"),
                           traceback=tail(traceback.format_exc(), 20))
            rec["seconds"] = round(time.monotonic() - t, 1)
        rec["finished"] = now_iso()
        self.say(f"{st.name}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else "")
                 + (f" in {rec['seconds']:.1f} s" if rec.get("seconds") else ""))
        self.save()
        return rec

    def run(self) -> dict:
        self.save()
        try:
            for st in self.steps:
                self.run_step(st)
        finally:
            try:
                self.results["summary"] = summarize(self)
            except Exception as e:  # noqa: BLE001
                self.results["summary"] = {"error": one_line(f"{type(e).__name__}: {e}")}
            self.results["finished"] = now_iso()
            self.results["complete"] = all(r.get("status") in ("done", "skipped", "failed")
                                           for r in self.results["steps"].values())
            self.save()
        return self.results


# --------------------------------------------------------------------------- step: env


def _tool(name: str, extra_dirs=()) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def find_nvcc() -> str | None:
    """nvcc on the PATH, under $CUDA_HOME, /usr/local/cuda*, or from an NVIDIA wheel (nvidia/*/bin)."""
    dirs = [Path(os.environ[k]) / "bin" for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    dirs += [Path("/usr/local/cuda/bin")] + sorted(Path("/usr/local").glob("cuda-*/bin"), reverse=True)
    for d in site_dirs():
        dirs += sorted(d.glob("nvidia/*/bin")) + sorted(d.glob("nvidia/*/*/bin"))
    return _tool("nvcc", dirs)


def site_dirs() -> list[Path]:
    import site
    import sysconfig

    out = []
    paths = sysconfig.get_paths()
    for p in [paths.get("purelib"), paths.get("platlib"), *getattr(site, "getsitepackages", lambda: [])()]:
        if p and Path(p).is_dir() and Path(p) not in out:
            out.append(Path(p))
    return out


def find_nccl() -> dict | None:
    """nccl.h and libnccl.so* from the NVIDIA wheels torch depends on (nvidia/nccl/ for CUDA 12,
    nvidia/<other>/ layouts searched too), or the system's."""
    headers = []
    for d in site_dirs():
        headers += sorted(d.glob("nvidia/*/include/nccl.h")) + sorted(d.glob("nvidia/*/*/include/nccl.h"))
    headers += [p for p in (Path("/usr/include/nccl.h"), Path("/usr/local/cuda/include/nccl.h")) if p.is_file()]
    for inc in headers:
        base = inc.parent.parent
        libs = (sorted((base / "lib").glob("libnccl.so*")) + sorted(base.glob("lib*/libnccl.so*"))
                + sorted(base.glob("lib/*/libnccl.so*")))
        if libs:
            return {"include": str(inc.parent), "lib": str(libs[0].parent), "libfile": str(libs[0])}
    return None


def python_h() -> bool:
    import sysconfig

    inc = sysconfig.get_paths().get("include")
    return bool(inc) and (Path(inc) / "Python.h").is_file()


def cuda_status() -> tuple[bool, str]:
    """(a CUDA device is usable, what was seen) without creating a CUDA context."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
    except Exception as e:  # noqa: BLE001 - torch missing or broken: no CUDA either
        return False, f"torch is not importable: {one_line(e, 120)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = torch.cuda.is_available()
            n = torch.cuda.device_count() if ok else 0
    except Exception as e:  # noqa: BLE001
        return False, f"torch {torch.__version__}: {one_line(e, 120)}"
    if not ok or n == 0:
        built = torch.version.cuda
        return False, (f"torch {torch.__version__} " + (f"built with CUDA {built} sees none" if built
                                                         else "is a CPU build"))
    return True, f"{n} x {torch.cuda.get_device_name(0)}"


def device_info() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    info = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "capability": list(torch.cuda.get_device_capability(0)), "total_memory_bytes": int(p.total_memory),
            "multiprocessors": getattr(p, "multi_processor_count", None),
            "bf16_supported": bool(torch.cuda.is_bf16_supported()), "torch": torch.__version__,
            "torch_file": torch.__file__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # noqa: BLE001
        info["nccl"] = f"unavailable ({one_line(e, 80)})"
    info["slug"] = slug(info["name"])
    return info


def rehearsal_device() -> dict:
    import torch

    return {"name": "CPU rehearsal", "slug": "cpu-rehearsal", "count": 0, "total_memory_bytes": 16 * GiB,
            "torch": torch.__version__, "torch_file": torch.__file__, "cuda": torch.version.cuda,
            "rehearsal": "HPCLLM_GPU_CHECK_DEVICE=cpu: tiny shapes on the CPU; nothing here is a GPU measurement"}


def step_env(ck: Check, budget: float) -> dict:
    import torch

    out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "device": device_info() if ck.device == "cuda" else rehearsal_device()}
    try:
        with open("/proc/meminfo") as f:
            out["host_memory_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    du = shutil.disk_usage(ck.scratch)
    out["scratch_free_bytes"] = du.free
    bindir = Path(sys.executable).parent
    tools = {t: _tool(t, [bindir]) for t in ("cc", "gcc", "g++", "c++", "cmake", "make", "ninja", "mpicc", "mpicxx",
                                                "mpirun", "mpiexec", "nvidia-smi", "git")}
    tools["nvcc"] = find_nvcc()
    out["tools"] = tools
    out["python_h"] = python_h()
    out["nccl_files"] = find_nccl()
    if tools.get("nvidia-smi"):
        r = run_process(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                         "--format=csv,noheader"], timeout=min(15, budget))
        out["nvidia_smi"] = one_line(r.output, 400)
    mem = GpuMemory()
    out["gpu_memory_query"] = mem.how
    ck.gpu_mem = mem if mem.how else None
    if tools.get("git"):
        r = run_process(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=10)
        out["git_commit"] = r.output.strip() if r.rc == 0 else None
    out["torch_threads"] = torch.get_num_threads()
    ck.state["env"] = out
    return out


# --------------------------------------------------------------------------- step: install


WHEEL_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-.*\.whl$")


def wheel_dist(path: Path) -> tuple[str, str] | None:
    m = WHEEL_NAME.match(path.name)
    return (m.group("name").replace("_", "-").lower(), m.group("version")) if m else None


PROBE_TORCH = ("import json, importlib.metadata as m, torch\n"
               "print(json.dumps({'torch': torch.__version__, 'file': torch.__file__}))\n")


def _json_line(text: str):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def installed_versions(py: str, names, env=None) -> dict:
    """name -> version installed for ``py`` (None: absent), from a fresh interpreter."""
    code = ("import json, sys, importlib.metadata as m\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try:\n        out[n] = m.version(n)\n    except m.PackageNotFoundError:\n        out[n] = None\n"
            "print(json.dumps(out))\n")
    r = run_process([py, "-c", code, *names], timeout=30, env=env)
    return _json_line(r.output) or {}


def unzip_wheel(whl: Path, target: Path) -> None:
    """Install a wheel by unpacking it (what pip does for a pure-Python wheel, minus scripts)."""
    import zipfile

    with zipfile.ZipFile(whl) as z:
        z.extractall(target)


def step_install(ck: Check, budget: float) -> dict:
    end = time.monotonic() + budget
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    before = _json_line(run_process([ck.py, "-c", PROBE_TORCH], timeout=60, env=clean).output)
    if not before:
        raise StepFailed("torch does not import in a clean interpreter")
    ck.site.mkdir(parents=True, exist_ok=True)
    wheels_dir = Path(ck.args.wheels)
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    sdists = sorted(p.name for p in wheels_dir.glob("*.tar.gz")) if wheels_dir.is_dir() else []
    out = {"torch_before": before, "wheels_dir": str(wheels_dir), "carried_sdists": sdists, "wheels": {}, "warnings": []}
    dists = {w: wheel_dist(w) for w in wheels}
    have = installed_versions(ck.py, [d[0] for d in dists.values() if d], env=clean) if dists else {}
    pip_ok = run_process([ck.py, "-m", "pip", "--version"], timeout=30, env=clean).rc == 0
    out["pip"] = pip_ok
    todo = []
    for w, d in dists.items():
        if d is None:
            out["wheels"][w.name] = "not a wheel name; ignored"
        elif d[0] == "cmake" and shutil.which("cmake"):
            out["wheels"][w.name] = f"a cmake is on the PATH ({shutil.which('cmake')}): left out"
        elif have.get(d[0]):
            out["wheels"][w.name] = f"preinstalled {d[0]} {have[d[0]]}: left alone"
        else:
            todo.append(w)
    if todo:
        if pip_ok:
            r = run_process([ck.py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-warn-script-location",
                             "--disable-pip-version-check", "--target", ck.site, *todo],
                            timeout=max(5, min(60, end - time.monotonic())), env=ck.env(), log=ck.logs / "install-wheels.log")
            ok = r.rc == 0
        else:
            ok = False
        for w in todo:
            if not ok:
                unzip_wheel(w, ck.site)  # no pip (or it failed): unpacked as is
            out["wheels"][w.name] = "installed" if ok else "unpacked (pip unavailable or failed)"
    ck.state["pythonpath"] = [str(REPO), str(ck.site)]
    # hpcllm itself as a package, into its own prefix: that it installs offline without deps
    target = ck.scratch / "hpcllm-install"
    if pip_ok:
        r = run_process([ck.py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                         "--no-warn-script-location", "--disable-pip-version-check", "--target", target, REPO],
                        timeout=max(5, min(90, end - time.monotonic())), env=ck.env(), log=ck.logs / "install-hpcllm.log")
        if r.rc == 0:
            code = "import json, hpcllm, torch; print(json.dumps({'hpcllm': hpcllm.__file__, 'torch': torch.__version__}))"
            probe = run_process([ck.py, "-c", code], timeout=60, cwd=ck.scratch,
                                env={**clean, "PYTHONPATH": os.pathsep.join([str(target), str(ck.site)])})
            got = _json_line(probe.output) or {}
            inside = str(got.get("hpcllm", "")).startswith(str(target))
            out["hpcllm_install"] = {"status": "done" if inside else "failed", "target": str(target), **got}
            if not inside:
                out["warnings"].append("hpcllm installed but imports from elsewhere: " + one_line(probe.output, 200))
        else:
            out["hpcllm_install"] = {"status": "failed", "reason": one_line(tail(r.output, 3), 300),
                                     "log": r.log}
            out["warnings"].append("hpcllm did not install with pip (the check runs it from the tree)")
    else:
        out["hpcllm_install"] = {"status": "skipped", "reason": "no pip for this interpreter"}
    after = _json_line(run_process([ck.py, "-c", PROBE_TORCH], timeout=60, env=ck.env()).output)
    out["torch_after"] = after
    if after != before:
        raise StepFailed(f"torch changed: before {before}, after {after}", out)
    # everything the train/generate path imports, with the final PYTHONPATH
    code = ("import hpcllm.cli, hpcllm.train.trainer, hpcllm.infer.generate, hpcllm.data.preprocess, "
            "hpcllm.plan.memory, h5py, numpy, click\nprint('imports ok')")
    r = run_process([ck.py, "-c", code], timeout=60, env=ck.env())
    out["imports"] = "ok" if r.rc == 0 else one_line(tail(r.output, 3), 300)
    names = ["torch", "numpy", "h5py", "mpi4py", "click", "jinja2", "tokenizers", "safetensors", "transformers",
             "matplotlib", "pyarrow", "tqdm", "psutil", "pytest", "pytest-timeout", "setuptools", "zstandard",
             "tensorboard", "triton", "horovod", "cloudpickle", "pyyaml", "packaging", "cmake"]
    out["packages"] = installed_versions(ck.py, names, env=ck.env())
    ck.state["packages"] = out["packages"]
    if r.rc != 0:
        raise StepFailed("hpcllm's modules do not import: " + out["imports"], out)
    if out["warnings"]:
        out["reason"] = "; ".join(out["warnings"])
    return out


# --------------------------------------------------------------------------- step: matmul


def worker_matmul(args: list[str]) -> None:
    """Best matmul rate per dtype over square sizes (CUDA events, after warm-up)."""
    import torch

    spec = json.loads(args[0]) if args else {}
    sizes = spec.get("sizes", [2048, 4096, 8192, 12288, 16384])
    dtypes = spec.get("dtypes", ["bf16", "fp16", "fp32"])
    budget = float(spec.get("seconds", 20))
    shapes = spec.get("shapes", [])
    dev = torch.device(spec.get("device", "cuda"))
    cuda = dev.type == "cuda"
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    end = time.monotonic() + budget
    out = {"tf32_allowed": bool(torch.backends.cuda.matmul.allow_tf32), "rates": {}, "shapes": {}}

    class Clock:  # CUDA events on a GPU (the rehearsal: the host clock)
        def __init__(self):
            self.ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None

        def start(self):
            if cuda:
                self.ev[0].record()
            else:
                self.t = time.perf_counter()

        def seconds(self) -> float:
            if cuda:
                self.ev[1].record()
                self.ev[1].synchronize()
                return self.ev[0].elapsed_time(self.ev[1]) / 1e3
            return time.perf_counter() - self.t

    def rate(m, k, n, dtype) -> float:
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(k, n, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        clock = Clock()
        clock.start()
        a @ b
        one = max(clock.seconds(), 1e-6)
        reps = int(min(50, max(3, 0.25 / one)))
        best = float("inf")
        for _ in range(2):
            clock.start()
            for _ in range(reps):
                a @ b
            best = min(best, clock.seconds() / reps)
        del a, b
        return 2.0 * m * k * n / best

    for name in dtypes:
        per = {}
        for n in sizes if name != "fp32" else [s for s in sizes if s <= 8192]:
            if time.monotonic() > end:
                break
            per[str(n)] = rate(n, n, n, table[name])
        if per:
            best = max(per, key=per.get)
            out["rates"][name] = {"best_flops": per[best], "best_size": int(best), "by_size": per}
    for m, k, n in shapes:
        if time.monotonic() > end:
            break
        out["shapes"][f"{m}x{k}x{n}"] = rate(m, k, n, torch.bfloat16)
    if cuda:
        torch.cuda.empty_cache()
    print(json.dumps(out))


def step_matmul(ck: Check, budget: float) -> dict:
    shapes = [[16384, 2048, 8192], [16384, 8192, 2048], [16384, 2048, 6144], [16384, 768, 3072]]
    sizes = [2048, 4096, 8192] if ck.quick else [2048, 4096, 8192, 12288, 16384]
    if ck.device == "cpu":  # rehearsal
        shapes, sizes = [[256, 64, 256]], [128, 256]
    spec = {"sizes": sizes, "seconds": max(5.0, budget - 12), "shapes": shapes, "device": ck.device}
    r = run_process(ck.worker("matmul", json.dumps(spec)), timeout=budget, env=ck.env(), log=ck.logs / "matmul.log")
    res = _json_line(r.output)
    if r.rc != 0 or not res:
        raise StepFailed(f"matmul worker exited {r.rc}{' (timed out)' if r.timed_out else ''}: "
                         + one_line(tail(r.output, 3)), {"log": r.log})
    rates = {k: v["best_flops"] for k, v in res["rates"].items()}
    ck.state["matmul"] = rates
    res["tflops"] = {k: round(v / 1e12, 1) for k, v in rates.items()}
    try:
        import torch

        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from hpcllm.train.metrics import device_peak_tflops

        sheet = device_peak_tflops(torch.device(ck.device, 0) if ck.device == "cuda" else torch.device("cpu"),
                                   "bf16", 1)
        ck.state["datasheet_tflops"] = sheet
        res["datasheet_bf16_tflops"] = round(sheet, 1)
        if "bf16" in rates:
            res["measured_over_datasheet"] = round(rates["bf16"] / 1e12 / sheet, 3)
    except Exception as e:  # noqa: BLE001
        res["datasheet_bf16_tflops"] = f"unknown ({one_line(e, 100)})"
    return res


# --------------------------------------------------------------------------- step: data


WORDS = ("the cluster node rank gradient shard token model batch scheduler job loss weight layer "
         "pipeline stage replica checkpoint optimizer step epoch kernel memory device tensor stream "
         "queue partition buffer signal network socket file process thread core cache page").split()
VERBS = ("allreduces checkpoints trains requeues broadcasts samples shards gathers scatters loads "
         "writes reads compiles schedules restarts measures balances packs splits merges").split()


def synthetic_corpus(path: Path, docs: int, seed: int = 0) -> int:
    """JSON lines of templated English-like documents (learnable, deterministic); bytes written."""
    import random

    rng = random.Random(seed)
    n = 0
    with open(path, "w") as f:
        for i in range(docs):
            sents = []
            for _ in range(rng.randint(12, 40)):
                w = rng.sample(WORDS, 4)
                sents.append(f"{w[0]} {w[1]} {rng.choice(VERBS)} {w[2]} of {w[3]} {rng.randint(0, 999)}.")
            text = f"Document {i}. " + " ".join(s.capitalize() for s in sents)
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            n += len(line)
    return n


def step_data(ck: Check, budget: float) -> dict:
    src = ck.scratch / "corpus.jsonl"
    out = ck.scratch / "data"
    docs = 2500 if ck.quick else 5000
    size = synthetic_corpus(src, docs)
    shutil.rmtree(out, ignore_errors=True)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    r = run_process(ck.hpcllm("preprocess", src, "--out", out, "--tokenizer", "byte", "--val-fraction", "0.02",
                              "--workers", workers, "--no-progress"),
                    timeout=budget - 2, env=ck.env(), log=ck.logs / "preprocess.log")
    if r.rc != 0:
        raise StepFailed(f"hpcllm preprocess exited {r.rc}: " + one_line(tail(r.output, 3)), {"log": r.log})
    manifest = json.loads((out / "manifest.json").read_text())
    train_tokens = manifest["splits"]["train"]["tokens"]
    ck.state["data"] = str(out)
    if train_tokens < 8 * 2049:
        raise StepFailed(f"only {train_tokens} training tokens")
    return {"corpus_bytes": size, "documents": docs, "train_tokens": train_tokens,
            "val_tokens": manifest["splits"]["val"]["tokens"], "preprocess_s": round(r.seconds, 1), "dir": str(out)}


# --------------------------------------------------------------------------- steps: training


def summarize_metrics(records: list[dict], warm: int = WARM_STEPS) -> dict:
    """Throughput and memory of a run's metrics.jsonl (``log_every`` 1), steps after ``warm``."""
    recs = [r for r in records if "tokens_per_s" in r and "step" in r]
    if not recs:
        return {"steps_logged": 0}
    steady = recs[warm:] if len(recs) > warm else recs[-1:]
    tps = [float(r["tokens_per_s"]) for r in steady]
    st = [float(r["step_time_s"]) for r in steady if "step_time_s" in r]
    mfu = [float(r["mfu"]) for r in steady if "mfu" in r]
    out = {"steps_logged": len(recs), "steps_measured": len(steady), "first_step_s": recs[0].get("step_time_s"),
           "tokens_per_s": statistics.median(tps), "tokens_per_s_best": max(tps),
           "step_time_s": statistics.median(st) if st else None,
           "mfu_datasheet": statistics.median(mfu) if mfu else None,
           "loss_first": recs[0].get("loss"), "loss_last": recs[-1].get("loss"),
           "skipped_steps": sum(int(r.get("skipped", 0) or 0) for r in recs)}
    peaks = [max(r["peak_mem_bytes"]) for r in recs if r.get("peak_mem_bytes")]
    if peaks:
        out["peak_alloc_bytes"] = max(peaks)
    states = [r["model_state_bytes"][0] for r in recs if r.get("model_state_bytes") and r["model_state_bytes"][0]]
    if states:
        out["model_state_bytes"] = states[-1]
    if "loss_scale" in recs[-1]:
        out["loss_scale_last"] = recs[-1]["loss_scale"]
    return out


def plan_profile(device_name: str, total_memory: int):
    """hpcllm.plan's device profile for this GPU (a built-in one when the name matches)."""
    from dataclasses import replace

    from hpcllm.plan.devices import get_profile

    name = device_name.upper()
    for key, prof in (("H200", "h200"), ("H100", "h100"), ("A100", None)):
        if key in name:
            if prof is None:
                prof = "a100-80gb" if total_memory > 45 * GiB else "a100-40gb"
            return get_profile(prof, measure_cpu=False)
    return replace(get_profile("h100", measure_cpu=False), name=slug(device_name), memory_bytes=int(total_memory))


def predict_memory(model_cfg: dict, micro_batch: int, precision: str, device_name: str, total_memory: int,
                   recompute: bool = False) -> dict:
    """`hpcllm plan`'s per-device memory for this exact run (its config.json's model section)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from hpcllm.model.gpt import GPTConfig
    from hpcllm.plan.memory import Setup, Shape, memory_per_device

    cfg = GPTConfig(**model_cfg)
    prof = plan_profile(device_name, total_memory)
    m = memory_per_device(Shape.from_config(cfg), Setup(micro_batch=micro_batch, precision=precision,
                                                         recompute=recompute), prof)
    return {"profile": prof.name, "total_bytes": int(m.total), "overhead_bytes": int(m.overhead),
            "tensors_bytes": int(m.total - m.overhead - m.allocator_slack), "phase": m.phase,
            "terms": {k: int(v) for k, v in m.rows()}}


def flops_of(model_cfg: dict) -> tuple[int, int]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from hpcllm.model.gpt import GPTConfig, flops_per_token, param_count

    cfg = GPTConfig(**model_cfg)
    return int(flops_per_token(cfg)), int(param_count(cfg))


def compile_ready(ck: Check) -> str | None:
    """Why torch.compile cannot work here (Triton builds its launcher with a C compiler against
    Python.h), or None."""
    env = ck.state.get("env") or {}
    tools = env.get("tools") or {}
    if not (tools.get("cc") or tools.get("gcc") or _tool("cc") or _tool("gcc")):
        return "no C compiler (Triton compiles its CUDA launcher with cc)"
    if not env.get("python_h", python_h()):
        return "no Python.h for this interpreter (Triton's launcher needs the Python headers)"
    return None


def run_training(ck: Check, budget: float, name: str, run: TrainRun, extra_args=(), steps: int | None = None) -> dict:
    data = ck.state.get("data")
    if not data:
        raise Skip("no dataset")
    if run.compile:
        why = compile_ready(ck)
        if why:
            raise Skip(why)
    steps = steps or (run.quick_steps if ck.quick else run.steps)
    if ck.device == "cpu":
        steps = min(steps, 6)  # a rehearsal: the flow, not the numbers
    mb = run.micro_batch
    if run.model == "1.3B" and getattr(ck.args, "micro_batch_large", None):
        mb = ck.args.micro_batch_large
    if run.model == "124M" and getattr(ck.args, "micro_batch_small", None):
        mb = ck.args.micro_batch_small
    out = ck.scratch / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    if ck.device == "cpu" and not extra_args:
        extra_args = REHEARSAL_SHAPE
    cmd = ck.hpcllm(*train_args(run, data, out, steps, mb, ck.device), *extra_args)
    metrics = out / "metrics.jsonl"

    def last_logged() -> bool:  # the measured steps are in: the final checkpoint is not measured
        recs = read_jsonl(metrics)
        return bool(recs) and max(int(r.get("step", 0)) for r in recs) >= steps

    if ck.gpu_mem is None:
        mem = GpuMemory()
        ck.gpu_mem = mem if mem.how else None
    if ck.gpu_mem is not None:
        ck.gpu_mem.settle()  # the previous run's memory is released after its process is gone
    with PeakSampler(ck.gpu_mem) as sampler:
        r = run_process(cmd, timeout=budget - 2, env=ck.env(), log=ck.logs / f"{name}.log",
                        stop=None if run.keep else last_logged)
    recs = read_jsonl(metrics)
    res = {"model": run.model, "precision": run.precision, "compile": run.compile, "micro_batch": mb,
           "steps": steps, "command": shlex.join(["python3", "-m", "hpcllm", *cmd[3:]]), "process": r.brief()}
    res.update(summarize_metrics(recs))
    cfg = {}
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        pass
    model_cfg = cfg.get("model") or {}
    if model_cfg:
        fpt, params = flops_of(model_cfg)
        res.update(flops_per_token=fpt, params=params, seq_len=model_cfg.get("seq_len"),
                   tokens_per_step=mb * int(model_cfg.get("seq_len", 0)))
        rate = (ck.state.get("matmul") or {}).get(run.precision)
        if rate and res.get("tokens_per_s"):
            res["mfu_measured"] = res["tokens_per_s"] * fpt / rate
            res["matmul_tflops"] = round(rate / 1e12, 1)
        dev = ck.results.get("device") or {}
        try:
            pred = predict_memory(model_cfg, mb, run.precision, dev.get("name", ""), int(dev.get("total_memory_bytes", 0)))
            res["plan"] = pred
            if res.get("peak_alloc_bytes"):
                res["alloc_over_plan_tensors"] = res["peak_alloc_bytes"] / pred["tensors_bytes"]
        except Exception as e:  # noqa: BLE001
            res["plan"] = {"error": one_line(f"{type(e).__name__}: {e}", 200)}
    if sampler.delta() is not None:
        res["device_peak_bytes"] = sampler.delta()
        res["device_baseline_bytes"] = sampler.baseline
        if isinstance(res.get("plan"), dict) and res["plan"].get("total_bytes"):
            res["device_over_plan_total"] = res["device_peak_bytes"] / res["plan"]["total_bytes"]
    m = re.search(r"torch\.compile: (\d+) graphs? compiled, (\d+) graph breaks?", r.output)
    if m:
        res["compiled_graphs"], res["graph_breaks"] = int(m.group(1)), int(m.group(2))
    ck.state.setdefault("runs", {})[name] = {"dir": str(out), "kept": run.keep}
    ok = (r.rc == 0 or r.stopped) and res.get("steps_logged", 0) >= steps
    if not ok:
        why = ("timed out" if r.timed_out else f"exited {r.rc}") + f" after {r.seconds:.0f} s with " \
              f"{res.get('steps_logged', 0)}/{steps} steps logged"
        res["log_tail"] = tail(r.output, 25)
        if not run.keep:
            shutil.rmtree(out, ignore_errors=True)
        raise StepFailed(why + ": " + one_line(tail(r.output, 2), 200), res)
    if run.keep:
        if not (out / "checkpoints" / "latest").exists():
            raise StepFailed("no checkpoint at the end of the run", res)
    else:
        shutil.rmtree(out, ignore_errors=True)  # a 1.3B run dir can hold a partial 15 GB checkpoint
    if run.precision == "fp16" and res.get("skipped_steps", 0) >= steps:
        raise StepFailed(f"every fp16 step overflowed ({res['skipped_steps']} skipped)", res)
    return res


def _train_step(name: str):
    def fn(ck: Check, budget: float) -> dict:
        return run_training(ck, budget, name, TRAIN_RUNS[name])
    fn.__name__ = f"step_{name}"
    return fn


# --------------------------------------------------------------------------- step: generate


def worker_generate(args: list[str]) -> None:
    """tokens/s of hpcllm.infer.generate on CUDA: KV cache, recomputation, a batch, INT8."""
    import inspect
    from dataclasses import replace

    import torch

    from hpcllm.infer.generate import SampleConfig, generate_batch, generate_ids, load_model

    spec = json.loads(args[0])
    run, n = spec["run"], int(spec.get("tokens", 256))
    device = spec.get("device", "cuda")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    lm = load_model(run, device=device)
    tok = lm.tokenizer
    prompt = tok.encode("The scheduler ")
    kw = dict(seq_len=lm.seq_len, vocab_size=tok.vocab_size, eod_id=tok.eod_id)
    out = {"seq_len": lm.seq_len}

    def timed(fn):
        sync()
        t = time.perf_counter()
        res = fn()
        sync()
        return res, time.perf_counter() - t

    def bench(model, label, kv, batch=1):
        s = SampleConfig(max_new_tokens=n, temperature=0.8, top_k=50, seed=0, kv_cache=kv, stop_at_eod=False)
        generate_ids(model, prompt, replace(s, max_new_tokens=8), **kw)  # warm-up
        if batch == 1:
            ids, dt = timed(lambda: generate_ids(model, prompt, s, **kw))
            count = len(ids)
        else:
            rows, dt = timed(lambda: generate_batch(model, [prompt] * batch, s, batch_size=batch, **kw))
            count = sum(len(r) for r in rows)
        out[label] = {"tokens": count, "seconds": round(dt, 3), "tokens_per_s": count / dt, "batch": batch}

    bench(lm.model, "kv_cache", True)
    bench(lm.model, "no_kv_cache", False)
    bench(lm.model, "kv_cache_batch8", True, batch=8)
    greedy = SampleConfig(max_new_tokens=64, temperature=0, stop_at_eod=False)
    a = generate_ids(lm.model, prompt, replace(greedy, kv_cache=True), **kw)
    b = generate_ids(lm.model, prompt, replace(greedy, kv_cache=False), **kw)
    out["greedy_kv_equals_recompute"] = a == b
    if a != b:
        out["greedy_first_difference"] = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
    if "int8" in inspect.signature(load_model).parameters:
        lm8 = load_model(run, device=device, int8=True)
        bench(lm8.model, "int8_kv_cache", True)
        c = generate_ids(lm8.model, prompt, replace(greedy, kv_cache=True), **kw)
        out["int8_greedy_agreement"] = sum(x == y for x, y in zip(a, c)) / max(1, len(a))
    else:
        out["int8"] = "hpcllm.infer.generate.load_model has no int8 parameter"
    print(json.dumps(out))


GENERATED = re.compile(r"generated (\d+) tokens for (\d+) prompts in ([0-9.]+) s \(([0-9.]+) tokens/s\)")


def step_generate(ck: Check, budget: float) -> dict:
    end = time.monotonic() + budget
    run = (ck.state.get("runs") or {}).get("train_124m_bf16", {}).get("dir")
    if not run or not Path(run, "checkpoints").is_dir():
        raise Skip("no 124M checkpoint")
    left = lambda: max(5.0, end - time.monotonic())  # noqa: E731
    h = run_process(ck.hpcllm("generate", "--help"), timeout=min(60, left()), env=ck.env())
    int8 = "--int8" in h.output
    out = {"int8_option": int8, "cli": {}}
    modes = [("kv_cache", []), ("no_kv_cache", ["--no-kv-cache"])] + ([("int8", ["--int8"])] if int8 else [])
    failures = []
    n_cli, n_batch = (16, 16) if ck.device == "cpu" else (64, 128)
    for mode, flags in modes:
        r = run_process(ck.hpcllm("generate", run, "--prompt", "The scheduler ", "--max-new-tokens", n_cli,
                                  "--temperature", 0, "--device", ck.device, *flags),
                        timeout=min(60, left()), env=ck.env(), log=ck.logs / f"generate-{mode}.log")
        text = r.output
        out["cli"][mode] = {"rc": r.rc, "seconds": round(r.seconds, 1), "text": one_line(text, 160)}
        if r.rc != 0:
            failures.append(f"generate {' '.join(flags) or '(KV cache)'} exited {r.rc}: {one_line(tail(r.output, 2), 120)}")
    if not int8:
        out["cli"]["int8"] = {"status": "skipped", "reason": "hpcllm generate has no --int8 option"}
    if out["cli"]["kv_cache"].get("rc") == 0 and out["cli"]["no_kv_cache"].get("rc") == 0:
        out["cli_greedy_kv_equals_recompute"] = out["cli"]["kv_cache"]["text"] == out["cli"]["no_kv_cache"]["text"]
    prompts = ck.scratch / "prompts.txt"
    prompts.write_text("".join(f"The {w} \n" for w in WORDS[:8]))
    r = run_process(ck.hpcllm("generate", run, "--prompts-file", prompts, "--batch-size", 8, "--max-new-tokens", n_batch,
                              "--device", ck.device), timeout=min(60, left()), env=ck.env(),
                    log=ck.logs / "generate-batch.log")
    m = GENERATED.search(r.output)
    out["cli"]["prompts_file_batch8"] = {"rc": r.rc, "seconds": round(r.seconds, 1),
                                         **({"tokens": int(m.group(1)), "tokens_per_s": float(m.group(4))} if m else {})}
    if r.rc != 0:
        failures.append(f"generate --prompts-file exited {r.rc}")
    tokens = 32 if ck.device == "cpu" else 128 if ck.quick else 256
    r = run_process(ck.worker("generate", json.dumps({"run": run, "tokens": tokens, "device": ck.device})),
                    timeout=min(90, left()), env=ck.env(), log=ck.logs / "generate-bench.log")
    bench = _json_line(r.output)
    if bench:
        out["api"] = bench
    else:
        failures.append(f"generation benchmark exited {r.rc}{' (timed out)' if r.timed_out else ''}: "
                        f"{one_line(tail(r.output, 2), 160)}")
    if failures:
        raise StepFailed("; ".join(failures), out)
    return out


# --------------------------------------------------------------------------- step: cuda tests


def parse_junit(path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                failed.append({"test": name, "message": one_line(el.get("message") or el.text or "", 300)})
        el = case.find("skipped")
        if el is not None:
            skipped.append({"test": name, "reason": one_line(el.get("message") or "", 200)})
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {**total, "failed_tests": failed[:30], "skipped_tests": skipped[:20]}


def step_cuda_tests(ck: Check, budget: float) -> dict:
    xml = ck.scratch / "cuda-tests.xml"
    xml.unlink(missing_ok=True)
    marker = "cuda and not slow" if ck.quick else "cuda"
    cmd = [ck.py, "-m", "pytest", "tests/cuda", "-m", marker, "-q", "-rfEs", "-p", "no:cacheprovider",
           "-o", "addopts=", "--junitxml", str(xml)]
    if (ck.state.get("packages") or {}).get("pytest-timeout"):
        cmd += ["--timeout", "120"]
    r = run_process(cmd, timeout=budget - 2, env=ck.env(), log=ck.logs / "cuda-tests.log")
    res = {"command": shlex.join(["python3", *cmd[1:]]), "process": r.brief()}
    if xml.is_file():
        res.update(parse_junit(xml))
    summary = next((ln for ln in reversed(r.output.splitlines()) if re.search(r"\d+ (passed|failed|error)", ln)), "")
    res["summary_line"] = summary.strip("= ").strip()
    if r.timed_out:
        raise StepFailed(f"timed out after {r.seconds:.0f} s: {res['summary_line']}", res)
    if r.rc == 5 or res.get("tests", 0) == 0:
        raise StepFailed("no cuda test ran", res)
    if ck.device == "cuda" and res.get("passed", 0) == 0:
        first = (res.get("skipped_tests") or [{}])[0].get("reason", "")
        raise StepFailed(f"every cuda test was skipped ({first})", res)
    if r.rc != 0 or res.get("failures") or res.get("errors"):
        res["log_tail"] = tail(r.output, 40)
        raise StepFailed(f"{res.get('failures', 0)} failed, {res.get('errors', 0)} errors: "
                         + ", ".join(f["test"].split("::")[-1] for f in res.get("failed_tests", [])[:5]), res)
    return res


# --------------------------------------------------------------------------- step: pipeline over MPI


def worker_mpi_probe(args: list[str]) -> None:
    from mpi4py import MPI

    from hpcllm.parallel.pipeline.transport import cuda_aware_mpi, transport_for

    aware, how = cuda_aware_mpi()
    print(json.dumps({"library": one_line(MPI.Get_library_version().replace("\x00", ""), 200), "vendor": list(MPI.get_vendor()),
                      "cuda_aware": aware, "how": how, "transport": transport_for(DEVICE)}))


def worker_hpcllm(args: list[str]) -> int:
    """`hpcllm ARGS` under an MPI launcher whose ranks hpcllm's topology does not read (it knows
    Open MPI's OMPI_COMM_WORLD_* and Slurm's variables): MPICH/Intel MPI's PMI_* are mapped."""
    env = os.environ
    if "OMPI_COMM_WORLD_SIZE" not in env and "SLURM_PROCID" not in env and "PMI_SIZE" in env:
        env["OMPI_COMM_WORLD_SIZE"] = env["PMI_SIZE"]
        env["OMPI_COMM_WORLD_RANK"] = env.get("PMI_RANK", "0")
        env["OMPI_COMM_WORLD_LOCAL_RANK"] = env.get("MPI_LOCALRANKID", env.get("PMI_RANK", "0"))
        env["OMPI_COMM_WORLD_LOCAL_SIZE"] = env.get("MPI_LOCALNRANKS", env["PMI_SIZE"])
    from hpcllm.cli import main

    return main(args)


def mpi_launcher(ck: Check) -> tuple[str, str] | None:
    """(mpirun or mpiexec, its flavour: openmpi, mpich or other), or None."""
    bindir = Path(ck.py).parent
    exe = _tool("mpirun", [bindir]) or _tool("mpiexec", [bindir])
    if not exe:
        return None
    text = run_process([exe, "--version"], timeout=20).output
    if "Open MPI" in text or "OpenRTE" in text or "prterun" in text.lower():
        return exe, "openmpi"
    return exe, ("mpich" if "HYDRA" in text.upper() or "mpich" in text.lower() else "other")


#: variables the ranks need from the launching environment (Open MPI passes only those named)
RANK_ENV = ("PYTHONPATH", "HPCLLM_CACHE", "PYTHONUNBUFFERED", "HPCLLM_CUDA_AWARE_MPI", "TORCHINDUCTOR_CACHE_DIR")


def launch_command(exe: str, flavour: str, ranks: int, env: dict) -> list[str]:
    if flavour == "openmpi":
        cmd = [exe, "-np", str(ranks), "--oversubscribe", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        for var in RANK_ENV:
            if var in env:
                cmd += ["-x", var]
        return cmd
    return [exe, "-n", str(ranks)]  # Hydra (MPICH, Intel MPI) passes the whole environment


def step_pipeline(ck: Check, budget: float) -> dict:
    end = time.monotonic() + budget
    left = lambda: max(5.0, end - time.monotonic())  # noqa: E731
    data = ck.state.get("data")
    launcher = mpi_launcher(ck)
    if launcher is None:
        raise Skip("no MPI runtime: neither mpirun nor mpiexec is on the PATH")
    exe, flavour = launcher
    probe = run_process(ck.worker("mpi_probe"), timeout=min(30, left()), env=ck.env(), log=ck.logs / "mpi-probe.log")
    info = _json_line(probe.output)
    if not info:
        raise Skip(f"mpi4py cannot start MPI here ({'timed out' if probe.timed_out else f'exit {probe.rc}'}: "
                   f"{one_line(tail(probe.output, 2), 160)})")
    out = {"launcher": exe, "flavour": flavour, "mpi": info, "runs": {}}
    shape = ["--model", "small", "--n-layer", "8", "--n-head", "16", "--d-model", "1024", "--seq-len", "512",
             "--micro-batch", "8", "--precision", "bf16", "--device", ck.device, "--steps", "12", "--log-every", "1",
             "--eval-every", "0", "--ckpt-every", "0", "--warmup", "2", "--stall-shutdown-s", "60"]
    if ck.device == "cpu":  # rehearsal
        shape = shape[:2] + REHEARSAL_SHAPE[:-2] + ["--threads", "1"] + shape[10:]
        shape[shape.index("--precision") + 1] = "fp32"
        shape[shape.index("--steps") + 1] = "4"
    modes = [("pipeline", {})]
    if info.get("cuda_aware"):
        modes.append(("pipeline_staged", {"HPCLLM_CUDA_AWARE_MPI": "0"}))
    failures = []
    for mode, extra in modes:
        run = ck.scratch / "runs" / mode
        shutil.rmtree(run, ignore_errors=True)
        env = ck.env(extra)
        cmd = launch_command(exe, flavour, 2, env) + ck.worker("hpcllm", "train", "--data", data, "--out", run, *shape,
                                                             "--pipeline-stages", 2, "--microbatches", 4)
        r = run_process(cmd, timeout=min(60, left()), env=env, log=ck.logs / f"{mode}.log")
        recs = read_jsonl(run / "metrics.jsonl")
        res = {"transport": "staged" if extra else info.get("transport"), "process": r.brief(), **summarize_metrics(recs)}
        res["losses"] = [r_.get("loss") for r_ in recs if "loss" in r_]
        out["runs"][mode] = res
        if r.rc != 0:
            res["log_tail"] = tail(r.output, 25)
            failures.append(f"{mode} exited {r.rc}{' (timed out)' if r.timed_out else ''}: {one_line(tail(r.output, 2), 160)}")
        shutil.rmtree(run, ignore_errors=True)
    # the same global batch in one process: the pipeline must compute the same losses
    run = ck.scratch / "runs" / "pipeline_reference"
    r = run_process(ck.hpcllm("train", "--data", data, "--out", run, *shape, "--accum", 4),
                    timeout=min(60, left()), env=ck.env(), log=ck.logs / "pipeline-reference.log")
    ref = [x.get("loss") for x in read_jsonl(run / "metrics.jsonl") if "loss" in x]
    shutil.rmtree(run, ignore_errors=True)
    out["reference_losses"] = ref
    for mode, res in out["runs"].items():
        if ref and res.get("losses"):
            d = abs(res["losses"][0] - ref[0]) / abs(ref[0])
            res["step1_loss_rel_diff"] = d
            res["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(res["losses"], ref))
            if d > 1e-2:
                failures.append(f"{mode}: step-1 loss {res['losses'][0]:.5f} vs one process {ref[0]:.5f}")
    if failures:
        raise StepFailed("; ".join(failures), out)
    return out


# --------------------------------------------------------------------------- step: doctor


def step_doctor(ck: Check, budget: float) -> dict:
    r = run_process(ck.hpcllm("doctor"), timeout=budget - 1, env=ck.env(), log=ck.logs / "doctor.log")
    out = {"rc": r.rc, "output": tail(r.output, 60, 6000)}
    if r.timed_out:
        raise StepFailed(f"timed out after {r.seconds:.0f} s", out)
    if r.rc not in (0, 1):  # 1: Horovod missing or not initialising, which this machine may well be
        raise StepFailed(f"hpcllm doctor exited {r.rc}", out)
    return out


# --------------------------------------------------------------------------- step: horovod


CXX_WRAPPER = """#!/usr/bin/env bash
# Horovod's CMake pins -std=c++14; torch >= 2.1 headers need C++17 (as scripts/install.sh does)
args=()
for a in "$@"; do [ "$a" = "-std=c++14" ] && a="-std=c++17"; args+=("$a"); done
exec {real} "${{args[@]}}"
"""


def step_horovod(ck: Check, budget: float) -> dict:
    wheels = Path(ck.args.wheels)
    sdist = sorted(wheels.glob("horovod-*.tar.gz")) if wheels.is_dir() else []
    env_info = ck.state.get("env") or {}
    tools = env_info.get("tools") or {}
    cxx = tools.get("g++") or tools.get("c++") or _tool("g++") or _tool("c++")
    cmake = tools.get("cmake") or _tool("cmake", [ck.site / "bin"])
    mpicc = tools.get("mpicc") or _tool("mpicc")
    nvcc = tools.get("nvcc") or find_nvcc()
    nccl = env_info.get("nccl_files") or find_nccl()
    missing = [what for what, ok in (("the Horovod sdist in " + str(wheels) + " (scripts/gpu_prepare.py)", sdist),
                                     ("a C++ compiler", cxx), ("cmake", cmake), ("an MPI (mpicc)", mpicc),
                                     ("nvcc (CUDA toolkit, for Horovod's CUDA kernels)", nvcc),
                                     ("NCCL headers and library", nccl)) if not ok]
    if missing:
        raise Skip("missing " + ", ".join(missing))
    import torch

    wrap = ck.scratch / "cxx-wrapper"
    wrap.mkdir(exist_ok=True)
    for cc in ("g++", "c++"):
        p = wrap / cc
        p.write_text(CXX_WRAPPER.format(real=shlex.quote(cxx)))
        p.chmod(0o755)
    # an unversioned libnccl.so for the linker (the wheels ship libnccl.so.2 only)
    libdir = ck.scratch / "nccl-lib"
    libdir.mkdir(exist_ok=True)
    link = libdir / "libnccl.so"
    if not link.exists():
        link.symlink_to(nccl["libfile"])
    major, minor = torch.cuda.get_device_capability(0)
    cuda_home = str(Path(nvcc).resolve().parent.parent)
    extra = {"HOROVOD_WITH_PYTORCH": "1", "HOROVOD_WITH_MPI": "1", "HOROVOD_WITHOUT_GLOO": "1",
             "HOROVOD_WITHOUT_TENSORFLOW": "1", "HOROVOD_WITHOUT_MXNET": "1", "HOROVOD_GPU_OPERATIONS": "NCCL",
             "HOROVOD_NCCL_INCLUDE": nccl["include"], "HOROVOD_NCCL_LIB": str(libdir), "HOROVOD_NCCL_LINK": "SHARED",
             "HOROVOD_CUDA_HOME": cuda_home, "HOROVOD_BUILD_CUDA_CC_LIST": f"{major}{minor}",
             "CXX": str(wrap / "g++"), "CC": tools.get("gcc") or "gcc", "MAKEFLAGS": f"-j{os.cpu_count() or 4}",
             "PATH": os.pathsep.join([str(ck.site / "bin"), str(Path(cmake).parent), os.environ.get("PATH", "")]),
             "LD_LIBRARY_PATH": os.pathsep.join([nccl["lib"], os.environ.get("LD_LIBRARY_PATH", "")])}
    v = run_process([cmake, "--version"], timeout=10)
    mm = re.search(r"cmake version (\d+)", v.output)
    if mm and int(mm.group(1)) >= 4:
        extra["CMAKE_POLICY_VERSION_MINIMUM"] = "3.5"  # cmake 4 breaks Horovod's vendored third-party CMake files
    outdir = ck.scratch / "horovod-wheel"
    shutil.rmtree(outdir, ignore_errors=True)
    r = run_process([ck.py, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", outdir,
                     sdist[-1]], timeout=budget - 20, env=ck.env(extra), log=ck.logs / "horovod-build.log")
    out = {"sdist": sdist[-1].name, "env": {k: v for k, v in extra.items() if k.startswith("HOROVOD_")},
           "build": r.brief()}
    built = sorted(outdir.glob("horovod-*.whl"))
    if r.rc != 0 or not built:
        out["log_tail"] = tail(r.output, 40)
        errs = [ln for ln in r.output.splitlines() if "error" in ln.lower()]
        raise StepFailed(("timed out" if r.timed_out else f"build exited {r.rc}") + ": "
                         + one_line(errs[0] if errs else tail(r.output, 2), 240), out)
    target = ck.scratch / "horovod-site"
    run_process([ck.py, "-m", "pip", "install", "--no-index", "--no-deps", "--target", target, built[0]],
                timeout=60, env=ck.env())
    code = ("import json, horovod.torch as hvd\nhvd.init()\nprint(json.dumps({'nccl_built': bool(hvd.nccl_built()), "
            "'mpi_built': bool(hvd.mpi_built()), 'cuda_built': bool(hvd.cuda_built()), 'size': hvd.size()}))")
    chk = run_process([ck.py, "-c", code], timeout=60,
                      env=ck.env({"PYTHONPATH": os.pathsep.join([str(target), str(ck.site), str(REPO)])}))
    got = _json_line(chk.output)
    out["wheel"] = built[0].name
    out["check"] = got or one_line(tail(chk.output, 3), 300)
    if not got or not got.get("nccl_built"):
        raise StepFailed("built, but horovod.torch does not report NCCL", out)
    return out


# --------------------------------------------------------------------------- summary and table


def summarize(ck: Check) -> dict:
    steps = ck.results["steps"]
    goals = {}
    cands = [(n, steps[n]) for n in ("train_1.3b_bf16", "train_1.3b_bf16_compile")
             if n in steps and steps[n].get("mfu_measured") is not None]
    if cands:
        best = max(cands, key=lambda c: c[1]["mfu_measured"])
        goals["mfu_1.3b_bf16"] = {"goal": ">= 0.45 of the measured bf16 matmul rate",
                                  "value": round(best[1]["mfu_measured"], 3), "run": best[0],
                                  "all": {n: round(s["mfu_measured"], 3) for n, s in cands},
                                  "met": best[1]["mfu_measured"] >= 0.45}
    else:
        goals["mfu_1.3b_bf16"] = {"goal": ">= 0.45 of the measured bf16 matmul rate", "met": None,
                                  "reason": "no 1.3B bf16 run with a measured matmul rate"}
    mem = {}
    for name in TRAIN_RUNS:
        s = steps.get(name) or {}
        if s.get("device_over_plan_total") is not None or s.get("alloc_over_plan_tensors") is not None:
            mem[name] = {k: round(s[k], 3) for k in ("device_over_plan_total", "alloc_over_plan_tensors") if s.get(k)}
    main = mem.get("train_1.3b_bf16") or {}
    ratio = main.get("device_over_plan_total", main.get("alloc_over_plan_tensors"))
    goals["memory_vs_plan"] = {"goal": "peak memory within 10% of hpcllm plan (1.3B bf16 eager: device memory vs "
                                       "the plan's total; allocator peak vs the plan minus its framework overhead)",
                               "value": ratio, "runs": mem,
                               "met": None if ratio is None else abs(ratio - 1) <= 0.10}
    t = steps.get("cuda_tests") or {}
    goals["cuda_tests"] = {"goal": "all cuda tests pass", "passed": t.get("passed"), "failed": t.get("failures"),
                           "errors": t.get("errors"), "skipped": t.get("skipped"),
                           "met": None if "tests" not in t else (t.get("status") == "done")}
    counts = {}
    for s in steps.values():
        counts[s.get("status")] = counts.get(s.get("status"), 0) + 1
    return {"goals": goals, "status_counts": counts, "elapsed_s": round(ck.elapsed(), 1)}


def _g(x) -> str:
    return "-" if x is None else f"{x / GiB:.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_table(results: dict) -> str:
    dev = results.get("device") or {}
    steps = results.get("steps") or {}
    lines = [f"hpcllm gpu-check: {dev.get('name', '?')} ({_g(dev.get('total_memory_bytes'))} GiB), "
             f"torch {dev.get('torch', '?')}, CUDA {dev.get('cuda', '?')}; {results.get('elapsed_s', 0):.0f} s"]
    mm = steps.get("matmul") or {}
    if mm.get("tflops"):
        lines.append("matmul (measured, best square size): " + ", ".join(f"{k} {v} TFLOP/s" for k, v in mm["tflops"].items())
                     + f"; datasheet bf16 {mm.get('datasheet_bf16_tflops')} TFLOP/s")
    hdr = ("run", "tokens/s", "step ms", "MFU meas", "MFU sheet", "alloc GiB", "device GiB", "plan GiB", "alloc/plan-ovh",
           "device/plan", "notes")
    rows = []
    for name in TRAIN_RUNS:
        s = steps.get(name)
        if not s or s.get("status") not in ("done", "failed") or "tokens_per_s" not in s:
            continue
        plan = s.get("plan") or {}
        notes = []
        if s.get("status") == "failed":
            notes.append("FAILED")
        if s.get("graph_breaks") is not None:
            notes.append(f"{s['compiled_graphs']} graphs/{s['graph_breaks']} breaks")
        if s.get("skipped_steps"):
            notes.append(f"{s['skipped_steps']} skipped")
        if s.get("loss_scale_last"):
            notes.append(f"scale {s['loss_scale_last']:g}")
        def ratio(k, s=s):
            return "-" if s.get(k) is None else f"{s[k]:.2f}"
        rows.append((name, f"{s['tokens_per_s']:,.0f}", f"{1e3 * s['step_time_s']:.0f}" if s.get("step_time_s") else "-",
                     _pct(s.get("mfu_measured")), _pct(s.get("mfu_datasheet")), _g(s.get("peak_alloc_bytes")),
                     _g(s.get("device_peak_bytes")), _g(plan.get("total_bytes")), ratio("alloc_over_plan_tensors"),
                     ratio("device_over_plan_total"), ", ".join(notes)))
    if rows:
        widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
        fmt = "  ".join(f"{{:<{w}}}" if i in (0, len(hdr) - 1) else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines += [fmt.format(*hdr), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    gen = steps.get("generate") or {}
    api = gen.get("api") or {}
    if api:
        parts = [f"{k} {v['tokens_per_s']:,.0f} tok/s" for k, v in api.items() if isinstance(v, dict) and "tokens_per_s" in v]
        b = (gen.get("cli") or {}).get("prompts_file_batch8", {})
        if b.get("tokens_per_s"):
            parts.append(f"CLI --prompts-file x8 {b['tokens_per_s']:,.0f} tok/s")
        lines.append("generate (124M, fp32 weights): " + "; ".join(parts)
                     + f"; greedy KV == recompute: {api.get('greedy_kv_equals_recompute')}")
    lines.append("steps:")
    for name, s in steps.items():
        extra = f"  {s['reason']}" if s.get("reason") else ""
        lines.append(f"  {name:<26} {s.get('status', '?'):<8} {s.get('seconds', 0) or 0:>6.1f} s{extra}")
    goals = (results.get("summary") or {}).get("goals") or {}
    if goals:
        lines.append("goals:")
        for name, g in goals.items():
            met = {True: "met", False: "NOT met", None: "not measured"}[g.get("met")]
            val = g.get("value")
            if name == "cuda_tests" and g.get("passed") is not None:
                val = f"{g['passed']} passed, {g.get('failed')} failed, {g.get('errors')} errors, {g.get('skipped')} skipped"
            lines.append(f"  {name:<16} {met:<12} {val if val is not None else ''}  ({g['goal']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the plan (--dry-run)


def render_plan(args, steps: list[Step]) -> str:
    quick = args.quick
    out = Path(args.out) if args.out else RESULTS_DIR / "gpu-check-<device>.json"
    wheels = Path(args.wheels)
    found = sorted(p.name for p in wheels.iterdir()) if wheels.is_dir() else []
    lines = [f"gpu-check plan: {len(steps)} step(s), deadline {args.deadline:.0f} s{' (quick)' if quick else ''}",
             f"  results: {out}", f"  carried wheels: {wheels} ({len(found)} file(s){': ' + ', '.join(found) if found else ''})",
             f"  scratch: {args.scratch or 'a new temporary directory'}"]
    total = 0.0
    for st in steps:
        total += st.budget_s
        lines.append(f"  {st.name:<26} budget {st.budget_s:>4.0f} s (min {st.min_s:>3.0f} s)  {st.what}")
        if st.name in TRAIN_RUNS:
            r = TRAIN_RUNS[st.name]
            cmd = ["python3", "-m", "hpcllm", *train_args(r, "<scratch>/data", f"<scratch>/runs/{st.name}",
                                                            r.quick_steps if quick else r.steps)]
            lines.append(f"      {shlex.join(cmd)}")
    lines.append(f"  budgets add up to {total:.0f} s; steps that would start with less than their minimum left "
                 f"before the deadline are skipped")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


WORKERS = {"matmul": worker_matmul, "generate": worker_generate, "mpi_probe": worker_mpi_probe,
           "hpcllm": worker_hpcllm}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.py", description="hpcllm's GPU path, measured (see the module doc).")
    p.add_argument("--out", help="results JSON [default: benchmarks/results/gpu-check-<device>.json]")
    p.add_argument("--quick", action="store_true", help="the core steps with fewer training steps (about 3 minutes)")
    p.add_argument("--skip", help="comma-separated steps to leave out")
    p.add_argument("--only", help="comma-separated steps to run (in the usual order)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--list", action="store_true", help="print the step names and exit")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="seconds for the whole run [480]")
    p.add_argument("--scratch", help="scratch directory [a new temporary directory]")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch directory (runs, logs, data)")
    p.add_argument("--logs", help="directory for the steps' logs [<scratch>/logs]")
    p.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="carried wheels and sdists [build/gpu-wheels]")
    p.add_argument("--micro-batch-large", type=int, default=None, help="micro-batch of the 1.3B runs [8]")
    p.add_argument("--micro-batch-small", type=int, default=None, help="micro-batch of the 124M runs [16]")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return int(WORKERS[argv[1]](argv[2:]) or 0)
    args = build_parser().parse_args(argv)
    if args.deadline <= 0:
        raise SystemExit("gpu_check: --deadline must be > 0")
    if args.list:
        print("\n".join(step_names()))
        return 0
    steps = select_steps(args)
    if args.dry_run:
        print(render_plan(args, steps))
        return 0
    ok, why = cuda_status() if DEVICE == "cuda" else (True, "a CPU rehearsal")
    if not ok:
        print(f"no CUDA device ({why}): nothing to check; run scripts/gpu_check.py on a machine with an NVIDIA GPU")
        return 0
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    dev = device_info() if DEVICE == "cuda" else rehearsal_device()
    out = Path(args.out) if args.out else RESULTS_DIR / f"gpu-check-{dev['slug']}.json"
    if DEVICE != "cuda" and not args.out:  # a rehearsal's numbers are no result
        out = Path(tempfile.gettempdir()) / "gpu-check-cpu-rehearsal.json"
    ck = Check(args, steps, out, device=dev)
    ck.say(f"{dev['name']}, torch {dev['torch']}, CUDA {dev['cuda']}; {len(steps)} steps, deadline "
           f"{args.deadline:.0f} s; results {out}; scratch {ck.scratch}")
    try:
        ck.run()
    finally:
        if not args.keep_scratch and not args.scratch:  # our own temporary directory: all but the logs
            for p in ck.scratch.iterdir():
                if p.resolve() != ck.logs.resolve():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
            if not any(ck.scratch.iterdir()):
                ck.scratch.rmdir()
    print(render_table(ck.results), flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
