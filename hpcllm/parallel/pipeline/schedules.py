"""Pipeline schedules as pure per-rank instruction lists.

A schedule is, for each stage ``s`` of ``P`` and ``M`` micro-batches, the ordered list of
what that stage does in one training step: receive an activation, run a forward, send the
result on, receive an activation gradient, run a backward, send the input gradient back.
Nothing here knows about MPI or torch, so ordering, deadlock freedom and memory bounds are
unit-tested by simulating all ``P`` lists against each other (:func:`simulate`); the engine
(:mod:`hpcllm.parallel.pipeline.engine`) only executes a list.

Three schedules: GPipe, 1F1B and ZB-H1 (zero-bubble 1F1B).  ZB-H1 splits a backward pass
in two: ``bwd`` computes only the gradient of the stage's input (what the previous stage
waits for) and ``wgt`` later computes the weight gradients of the stage's linear layers,
which no other stage waits for, so ``wgt`` passes can fill time 1F1B spends idle.

Sends are non-blocking in the engine (``Isend`` from a small ring of preallocated buffers);
receives block.  :func:`simulate` models exactly that with a bounded number of unmatched
sends per channel, so a list that passes with ``send_slots=1`` cannot deadlock in the engine,
which keeps at least that many buffers per channel.
"""
from __future__ import annotations

import functools
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
#: deferred weight gradients of a micro-batch (zero-bubble schedules only; then ``bwd``
#: computes input gradients alone)
WGT = "wgt"
OPS = (RECV_FWD, FWD, SEND_FWD, RECV_BWD, BWD, SEND_BWD, WGT)


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


def zero_bubble_h1(stage: int, stages: int, microbatches: int) -> list[Instr]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): 1F1B's order of
    forwards and input-gradient backwards, with each micro-batch's weight-gradient pass
    (``wgt``) deferred to where the stage would otherwise wait.

    The lists come from an event simulation of all stages with unit costs (forward =
    input backward = weight backward): a stage runs its next 1F1B pass as soon as that pass
    can start, runs the oldest deferred ``wgt`` while the next pass waits for a message, and
    runs it anyway once ``P`` are deferred (the memory bound).  With ``M >= P`` that gives
    the ZB-H1 step length ``3M + P - 1`` units, against 1F1B's ``3(M + P - 1)``: a third of
    the bubble.  A stage holds at most ``P`` micro-batches between forward and backward (as
    1F1B) plus up to ``P`` deferred weight passes (their inputs and output gradients)."""
    _check(stage, stages, microbatches)
    return list(_zero_bubble_programs(stages, microbatches)[stage])


@functools.lru_cache(maxsize=64)
def _zero_bubble_programs(P: int, M: int) -> tuple[tuple[Instr, ...], ...]:
    order = [[i for i in one_f_one_b(s, P, M) if i.op in (FWD, BWD)] for s in range(P)]
    nxt = [0] * P
    clock = [0] * P
    deferred: list[list[int]] = [[] for _ in range(P)]
    arrives: dict[tuple[str, int, int], int] = {}  # (direction, to stage, mb) -> time
    progs: list[list[Instr]] = [[] for _ in range(P)]
    while any(nxt[s] < len(order[s]) or deferred[s] for s in range(P)):
        best = None  # (start time, stage, instr): the earliest action of any stage runs first
        for s in range(P):
            ready = None
            if nxt[s] < len(order[s]):
                ins = order[s][nxt[s]]
                need = ("f", s, ins.mb) if ins.op == FWD and s > 0 else \
                       ("b", s, ins.mb) if ins.op == BWD and s < P - 1 else None
                ready = clock[s] if need is None else arrives.get(need)
                if ready is not None:
                    ready = max(ready, clock[s])
            if deferred[s] and (ready is None or ready > clock[s] or len(deferred[s]) >= P):
                act = (clock[s], s, Instr(WGT, deferred[s][0]))
            elif ready is not None:
                act = (ready, s, order[s][nxt[s]])
            else:
                continue  # waiting for a message a stage behind it has yet to send
            if best is None or act[0] < best[0]:
                best = act
        assert best is not None, "zero-bubble generator stalled"  # 1F1B's order cannot deadlock
        start, s, ins = best
        clock[s] = start + 1
        if ins.op == WGT:
            deferred[s].pop(0)
            progs[s].append(ins)
            continue
        nxt[s] += 1
        if ins.op == FWD:
            progs[s] += _forward(s, P, ins.mb)
            if s < P - 1:
                arrives[("f", s + 1, ins.mb)] = clock[s]
        else:
            progs[s] += _backward(s, P, ins.mb)
            deferred[s].append(ins.mb)
            if s > 0:
                arrives[("b", s - 1, ins.mb)] = clock[s]
    return tuple(tuple(p) for p in progs)


SCHEDULES: dict[str, Callable[[int, int, int], list[Instr]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "zbh1": zero_bubble_h1}


def defers_weight_grads(program: list[Instr]) -> bool:
    """Whether ``program`` splits backward into input (``bwd``) and weight (``wgt``) passes."""
    return any(i.op == WGT for i in program)


def build_schedule(name: str, stage: int, stages: int, microbatches: int) -> list[Instr]:
    """The instruction list of ``stage`` for schedule ``name`` ("gpipe", "1f1b" or "zbh1")."""
    try:
        fn = SCHEDULES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    return fn(stage, stages, microbatches)


def peak_activations(prog: list[Instr]) -> int:
    """Most micro-batches whose forward ran and whose backward has not, over the program:
    the number of activation sets the stage must keep alive at once.  With deferred weight
    gradients a micro-batch counts until its ``wgt`` (an upper bound: ``bwd`` already frees
    all but the linear layers' inputs and output gradients)."""
    done = WGT if defers_weight_grads(prog) else BWD
    live = peak = 0
    for ins in prog:
        if ins.op == FWD:
            live += 1
            peak = max(peak, live)
        elif ins.op == done:
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
    done = [WGT if defers_weight_grads(p) else BWD for p in programs]
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
            elif ins.op == done[s]:
                live[s] -= 1
            pc[s] += 1
            trace.append((s, ins))
        ticks += 1
    leftover = {k: v for k, v in chan.items() if v}
    assert not leftover, f"messages never received: {leftover}"
    return SimResult(trace=trace, ticks=ticks, peak=peak)


#: relative cost of each pass for :func:`step_time`: a backward is twice a forward, half of
#: it input gradients and half weight gradients when a schedule splits them
UNIT_COSTS = {FWD: 1.0, BWD: 2.0, WGT: 1.0}


def step_time(programs: list[list[Instr]], costs: dict[str, float] | None = None) -> float:
    """Length of one step when every stage runs its program as early as its messages allow:
    passes cost ``costs[op]`` (:data:`UNIT_COSTS`; in a program with ``wgt`` passes, ``bwd``
    costs ``costs[BWD] - costs[WGT]``), messages arrive when sent, sends never block.  The
    time model behind the schedules' bubble claims (1F1B: ``3(M + P - 1)`` units)."""
    costs = dict(UNIT_COSTS if costs is None else costs)
    P = len(programs)
    cost = []
    for prog in programs:
        c = dict(costs)
        if defers_weight_grads(prog):
            c[BWD] = costs[BWD] - costs[WGT]
        cost.append(c)
    pc = [0] * P
    clock = [0.0] * P
    sent: dict[tuple[str, int, int], float] = {}  # (direction, to stage, mb) -> time
    progressed = True
    while progressed:
        progressed = False
        for s in range(P):
            while pc[s] < len(programs[s]):
                ins = programs[s][pc[s]]
                if ins.op in (RECV_FWD, RECV_BWD):
                    key = ("f" if ins.op == RECV_FWD else "b", s, ins.mb)
                    if key not in sent:
                        break
                    clock[s] = max(clock[s], sent[key])
                elif ins.op == SEND_FWD:
                    sent[("f", s + 1, ins.mb)] = clock[s]
                elif ins.op == SEND_BWD:
                    sent[("b", s - 1, ins.mb)] = clock[s]
                else:
                    clock[s] += cost[s][ins.op]
                pc[s] += 1
                progressed = True
    if any(pc[s] < len(programs[s]) for s in range(P)):
        raise Deadlock("programs wait for messages never sent")
    return max(clock)


def ideal_bubble(stages: int, microbatches: int) -> float:
    """Fraction of a step a stage idles in the ideal pipeline: ``(P-1)/(M+P-1)``."""
    return (stages - 1) / (microbatches + stages - 1)
