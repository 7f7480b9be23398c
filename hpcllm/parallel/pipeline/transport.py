"""Moving tensors between pipeline stages with mpi4py, without pickling.

Tensors travel as raw buffers: fp32 as float32, bf16/fp16 as their 16 bits viewed as int16
(numpy has no bfloat16, and MPI only needs the bytes).  On CUDA the buffer is handed to MPI
directly when the MPI library is CUDA-aware, otherwise it is staged through a pinned host
copy.  :func:`cuda_aware_mpi` is the detection ``hpcllm doctor`` reports.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from functools import lru_cache

import torch

#: Seconds a pipeline rank waits for a peer before declaring the job dead and aborting it.
DEFAULT_TIMEOUT_S = float(os.environ.get("HPCLLM_PIPELINE_TIMEOUT", "600"))

_RAW16 = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


class PeerTimeout(RuntimeError):
    """A peer stage did not send or receive within the timeout: it is presumed dead."""


@lru_cache(maxsize=1)
def cuda_aware_mpi() -> tuple[bool, str]:
    """``(supported, how we know)`` for passing device pointers to MPI.

    ``HPCLLM_CUDA_AWARE_MPI=0/1`` overrides; then MPIX_Query_cuda_support through mpi4py
    when it exposes it, Open MPI's build flag from ``ompi_info``, and MPICH/Cray's
    ``MPICH_GPU_SUPPORT_ENABLED``.
    """
    env = os.environ.get("HPCLLM_CUDA_AWARE_MPI")
    if env is not None:
        return env.strip() not in ("0", "false", "no", ""), "HPCLLM_CUDA_AWARE_MPI"
    try:
        from mpi4py import MPI
    except ImportError:
        return False, "mpi4py not importable"
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query()), "MPIX_Query_cuda_support"
        except Exception:  # noqa: BLE001 - not implemented by this MPI
            pass
    lib = MPI.Get_library_version()
    if "Open MPI" in lib and shutil.which("ompi_info"):
        try:
            out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True,
                                 timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            if line.startswith("mca:mpi:base:param:mpi_built_with_cuda_support:value:"):
                return line.rsplit(":", 1)[1].strip() == "true", "ompi_info mpi_built_with_cuda_support"
        return False, "ompi_info (no CUDA support flag)"
    if os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1":
        return True, "MPICH_GPU_SUPPORT_ENABLED=1"
    return False, "no detection method for this MPI"


def transport_for(device) -> str:
    """``"host"`` (CPU tensors), ``"cuda-aware"`` or ``"staged"`` (device tensors copied
    through pinned host memory)."""
    if torch.device(device).type != "cuda":
        return "host"
    return "cuda-aware" if cuda_aware_mpi()[0] else "staged"


def wire_view(t: torch.Tensor):
    """The object handed to MPI for tensor ``t`` (contiguous): a numpy view on CPU (16-bit
    floats as int16), the tensor itself (``__cuda_array_interface__``) on a CUDA-aware GPU."""
    if t.dtype in _RAW16:
        t = t.view(_RAW16[t.dtype])
    if t.device.type == "cpu":
        return t.numpy()
    return t


#: Seconds a wait polls MPI without sleeping before backing off to short sleeps. With one
#: rank per core (a real job) spinning gives the lowest latency; when ranks outnumber cores
#: (tests), the sleeps leave the core to the rank that has work.
SPIN_S = float(os.environ.get("HPCLLM_PIPELINE_SPIN_S", "0.002"))


def wait(req, timeout: float = DEFAULT_TIMEOUT_S, what: str = "message") -> None:
    """Wait for an MPI request, giving up after ``timeout`` seconds.

    MPI's own Wait has no timeout, so a dead peer would hang the job forever: poll
    (``Test`` drives MPI's progress engine) for up to :data:`SPIN_S`, then with sleeps
    growing to 0.5 ms, and raise :class:`PeerTimeout` at the deadline.
    """
    if req.Test():
        return
    start = time.perf_counter()
    deadline = start + timeout
    pause = 0.0
    while not req.Test():
        now = time.perf_counter()
        if now - start > SPIN_S:
            if now > deadline:
                raise PeerTimeout(f"no {what} from the peer stage in {timeout:.0f}s: it is presumed dead")
            pause = min(max(pause * 2, 2e-5), 5e-4)
            time.sleep(pause)


class Channel:
    """One direction between two stages: a ring of ``slots`` preallocated buffers.

    Sending copies the tensor into the next free slot and posts an ``Isend``; the copy lets
    the caller free or reuse its tensor immediately and the send overlap the next compute.
    A slot is reused only after its previous send completed.  Receiving pre-posts ``Irecv``
    for the next expected micro-batches as soon as a slot is free, so the transfer happens
    while this stage computes.
    """

    def __init__(self, comm, peer: int, shape, dtype, device, tag_base: int, slots: int = 2,
                 timeout: float = DEFAULT_TIMEOUT_S):
        self.comm, self.peer, self.tag_base, self.timeout = comm, peer, tag_base, timeout
        self.device = torch.device(device)
        self.mode = transport_for(self.device)
        wire_device = "cpu" if self.mode == "staged" else self.device
        pin = self.mode == "staged"
        self.bufs = [torch.empty(shape, dtype=dtype, device=wire_device, pin_memory=pin) for _ in range(slots)]
        self.wire = [wire_view(b) for b in self.bufs]
        self.reqs = [None] * slots
        self.tags = [None] * slots
        self.next = 0

    def _tag(self, mb: int) -> int:
        return self.tag_base + 2 * mb

    # -- sending ---------------------------------------------------------------------------
    def send(self, t: torch.Tensor, mb: int) -> None:
        k = self.next
        self.next = (k + 1) % len(self.bufs)
        if self.reqs[k] is not None:
            wait(self.reqs[k], self.timeout, "receive of an earlier message")
        self.bufs[k].copy_(t.detach())
        if self.device.type == "cuda":
            # the copy (and, cuda-aware, the buffer MPI reads) must be complete before MPI
            torch.cuda.current_stream(self.device).synchronize()
        self.reqs[k] = self.comm.Isend(self.wire[k], dest=self.peer, tag=self._tag(mb))

    def progress(self) -> None:
        """Let MPI move outstanding messages: without an asynchronous progress thread a
        rendezvous transfer only advances inside MPI calls, so the engine calls this
        between computations."""
        for r in self.reqs:
            if r is not None:
                r.Test()
                break

    def flush(self) -> None:
        """Wait until every posted send was received (end of a step)."""
        for k, r in enumerate(self.reqs):
            if r is not None:
                wait(r, self.timeout, "receive of a sent message")
                self.reqs[k] = None

    # -- receiving -------------------------------------------------------------------------
    def expect(self, mbs) -> None:
        """Set the micro-batch ids this channel will receive, in order, and pre-post as many
        receives as there are slots."""
        self.pending = list(mbs)
        self.slot_of: dict[int, int] = {}
        self.next = 0
        for k in range(len(self.bufs)):
            self._post(k)

    def _post(self, k: int) -> None:
        if not self.pending:
            self.reqs[k] = None
            return
        mb = self.pending.pop(0)
        self.slot_of[mb] = k
        self.reqs[k] = self.comm.Irecv(self.wire[k], source=self.peer, tag=self._tag(mb))

    def recv(self, mb: int) -> torch.Tensor:
        """Wait for micro-batch ``mb`` and return its buffer (valid until :meth:`release`)."""
        k = self.slot_of[mb]
        wait(self.reqs[k], self.timeout, f"message for micro-batch {mb}")
        self.reqs[k] = None
        buf = self.bufs[k]
        if self.mode == "staged":
            return buf.to(self.device, non_blocking=False)
        return buf

    def recv_owned(self, mb: int) -> torch.Tensor:
        """Like :meth:`recv`, but a tensor the caller owns, and the slot is released at once
        (a copy of the buffer; staged transfers already are one)."""
        buf = self.recv(mb)
        out = buf if self.mode == "staged" else buf.clone()
        self.release(mb)
        return out

    def release(self, mb: int) -> None:
        """The buffer of ``mb`` may be overwritten: post the next receive into it."""
        self._post(self.slot_of.pop(mb))
