"""Pipeline schedules as pure per-rank instruction lists.

A schedule is, for each stage ``s`` of ``P`` and ``M`` micro-batches, the ordered list of
what that stage does in one training step: receive an activation, run a forward, send the
result on, receive an activation gradient, run a backward, send the input gradient back.
Nothing here knows about MPI or torch, so ordering, deadlock freedom and memory bounds are
unit-tested by simulating all ``P`` lists against each other (:func:`simulate`); the engine
(:mod:`hpcllm.parallel.pipeline.engine`) only executes a list.

Sends are non-blocking in the engine (``Isend`` from a small ring of preallocated buffers);
receives block.  :func:`simulate` models exactly that with a bounded number of unmatched
sends per channel, so a list that passes with ``send_slots=1`` cannot deadlock in the engine,
which keeps at least that many buffers per channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

#: Operation names.  ``*_fwd`` move activations towards the last stage, ``*_bwd`` move
#: activation gradients towards the first.
RECV_FWD = "recv_fwd"
FWD = "fwd"
SEND_FWD = "send_fwd"
RECV_BWD = "recv_bwd"
BWD = "bwd"
SEND_BWD = "send_bwd"
OPS = (RECV_FWD, FWD, SEND_FWD, RECV_BWD, BWD, SEND_BWD)


@dataclass(frozen=True)
class Instr:
    """One step of a stage's program: ``op`` applied to micro-batch ``mb``."""

    op: str
    mb: int

    def __repr__(self) -> str:  # short form keeps failing-test output readable
        return f"{self.op}({self.mb})"


def _forward(stage: int, stages: int, mb: int) -> list[Instr]:
    out = []
    if stage > 0:
        out.append(Instr(RECV_FWD, mb))
    out.append(Instr(FWD, mb))
    if stage < stages - 1:
        out.append(Instr(SEND_FWD, mb))
    return out


def _backward(stage: int, stages: int, mb: int) -> list[Instr]:
    out = []
    if stage < stages - 1:
        out.append(Instr(RECV_BWD, mb))
    out.append(Instr(BWD, mb))
    if stage > 0:
        out.append(Instr(SEND_BWD, mb))
    return out


def _check(stage: int, stages: int, microbatches: int) -> None:
    if stages < 1 or microbatches < 1 or not 0 <= stage < stages:
        raise ValueError(f"bad schedule shape: stage {stage} of {stages}, {microbatches} micro-batches")


def gpipe(stage: int, stages: int, microbatches: int) -> list[Instr]:
    """GPipe: all ``M`` forwards, then all ``M`` backwards (in reverse order, so the last
    micro-batch's activations, the freshest, are freed first).  Holds ``M`` micro-batches of
    activations per stage."""
    _check(stage, stages, microbatches)
    prog: list[Instr] = []
    for mb in range(microbatches):
        prog += _forward(stage, stages, mb)
    for mb in reversed(range(microbatches)):
        prog += _backward(stage, stages, mb)
    return prog


def one_f_one_b(stage: int, stages: int, microbatches: int) -> list[Instr]:
    """1F1B (PipeDream-flush): ``P-s-1`` warm-up forwards, then alternate one forward and
    one backward, then the remaining backwards.  Stage ``s`` never holds more than ``P-s``
    (so at most ``P``) micro-batches of activations, independent of ``M``."""
    _check(stage, stages, microbatches)
    warmup = min(stages - stage - 1, microbatches)
    prog: list[Instr] = []
    for mb in range(warmup):
        prog += _forward(stage, stages, mb)
    for i in range(microbatches - warmup):
        prog += _forward(stage, stages, warmup + i)
        prog += _backward(stage, stages, i)
    for mb in range(microbatches - warmup, microbatches):
        prog += _backward(stage, stages, mb)
    return prog


SCHEDULES: dict[str, Callable[[int, int, int], list[Instr]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build_schedule(name: str, stage: int, stages: int, microbatches: int) -> list[Instr]:
    """The instruction list of ``stage`` for schedule ``name`` ("gpipe" or "1f1b")."""
    try:
        fn = SCHEDULES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    return fn(stage, stages, microbatches)


def peak_activations(prog: list[Instr]) -> int:
    """Most micro-batches whose forward ran and whose backward has not, over the program:
    the number of activation sets the stage must keep alive at once."""
    live = peak = 0
    for ins in prog:
        if ins.op == FWD:
            live += 1
            peak = max(peak, live)
        elif ins.op == BWD:
            live -= 1
    return peak


class Deadlock(RuntimeError):
    """Raised by :func:`simulate` when no stage can make progress."""


@dataclass
class SimResult:
    """Outcome of :func:`simulate`: ``trace`` is the global order in which instructions ran
    (as ``(stage, Instr)``), ``ticks`` the number of rounds, ``peak`` the activation peak per
    stage."""

    trace: list[tuple[int, Instr]]
    ticks: int
    peak: list[int]


def simulate(programs: list[list[Instr]], send_slots: int = 1) -> SimResult:
    """Run all stages' programs against each other.

    Model: a receive completes only when the matching send (same micro-batch, in FIFO order
    on that channel) has been issued; a send is non-blocking but a channel holds at most
    ``send_slots`` unreceived messages (the engine's ring of send buffers), beyond which the
    sender waits.  Every stage runs at most one instruction per round, so ``ticks`` is the
    length of the schedule in unit-time steps.  Raises :class:`Deadlock` if a round makes
    no progress, ``AssertionError`` if a receive would match the wrong micro-batch or the
    programs leave messages unreceived.
    """
    P = len(programs)
    pc = [0] * P
    # channel (src, dst, direction) -> FIFO of micro-batch ids in flight
    chan: dict[tuple[int, int, str], list[int]] = {}
    trace: list[tuple[int, Instr]] = []
    live = [0] * P
    peak = [0] * P
    ticks = 0
    while any(pc[s] < len(programs[s]) for s in range(P)):
        ran = []
        for s in range(P):
            if pc[s] >= len(programs[s]):
                continue
            ins = programs[s][pc[s]]
            if ins.op == SEND_FWD:
                q = chan.setdefault((s, s + 1, "f"), [])
                if len(q) >= send_slots:
                    continue
            elif ins.op == SEND_BWD:
                q = chan.setdefault((s, s - 1, "b"), [])
                if len(q) >= send_slots:
                    continue
            elif ins.op == RECV_FWD:
                q = chan.get((s - 1, s, "f"), [])
                if not q:
                    continue
                assert q[0] == ins.mb, f"stage {s} expects activation {ins.mb}, channel holds {q[0]}"
            elif ins.op == RECV_BWD:
                q = chan.get((s + 1, s, "b"), [])
                if not q:
                    continue
                assert q[0] == ins.mb, f"stage {s} expects gradient {ins.mb}, channel holds {q[0]}"
            ran.append((s, ins))
        if not ran:
            stuck = {s: programs[s][pc[s]] for s in range(P) if pc[s] < len(programs[s])}
            raise Deadlock(f"no stage can progress: {stuck}")
        # apply the round's effects after deciding, so a message sent in round t is
        # receivable in round t+1 (unit transfer latency)
        for s, ins in ran:
            if ins.op == SEND_FWD:
                chan[(s, s + 1, "f")].append(ins.mb)
            elif ins.op == SEND_BWD:
                chan[(s, s - 1, "b")].append(ins.mb)
            elif ins.op == RECV_FWD:
                chan[(s - 1, s, "f")].pop(0)
            elif ins.op == RECV_BWD:
                chan[(s + 1, s, "b")].pop(0)
            elif ins.op == FWD:
                live[s] += 1
                peak[s] = max(peak[s], live[s])
            elif ins.op == BWD:
                live[s] -= 1
            pc[s] += 1
            trace.append((s, ins))
        ticks += 1
    leftover = {k: v for k, v in chan.items() if v}
    assert not leftover, f"messages never received: {leftover}"
    return SimResult(trace=trace, ticks=ticks, peak=peak)


def ideal_bubble(stages: int, microbatches: int) -> float:
    """Fraction of a step a stage idles in the ideal pipeline: ``(P-1)/(M+P-1)``."""
    return (stages - 1) / (microbatches + stages - 1)
