"""Schedules as pure instruction lists: ordering, deadlock freedom, 1F1B memory bound."""
import pytest

from hpcllm.parallel.pipeline.schedules import (
    BWD, FWD, RECV_BWD, RECV_FWD, SEND_BWD, SEND_FWD, WGT, Deadlock, Instr, build_schedule,
    gpipe, ideal_bubble, one_f_one_b, peak_activations, simulate, step_time,
)

SHAPES = [(P, M) for P in range(1, 9) for M in (1, 2, 3, 4, 5, 7, 8, 13, 16, 32)]


def programs(name, P, M):
    return [build_schedule(name, s, P, M) for s in range(P)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zbh1"])
@pytest.mark.parametrize("P,M", SHAPES)
def test_every_microbatch_once_in_dependency_order(name, P, M):
    for s, prog in enumerate(programs(name, P, M)):
        for op in (FWD, BWD):
            assert sorted(i.mb for i in prog if i.op == op) == list(range(M))
        assert sorted(i.mb for i in prog if i.op == WGT) == (list(range(M)) if name == "zbh1" else [])
        pos = {(i.op, i.mb): k for k, i in enumerate(prog)}
        for mb in range(M):
            # a micro-batch's backward follows its forward; receives precede, sends follow
            assert pos[(FWD, mb)] < pos[(BWD, mb)]
            if name == "zbh1":  # the weight pass uses what the input pass stashed
                assert pos[(BWD, mb)] < pos[(WGT, mb)]
            if s > 0:
                assert pos[(RECV_FWD, mb)] < pos[(FWD, mb)] < pos[(BWD, mb)] < pos[(SEND_BWD, mb)]
            else:
                assert (RECV_FWD, mb) not in pos and (SEND_BWD, mb) not in pos
            if s < P - 1:
                assert pos[(FWD, mb)] < pos[(SEND_FWD, mb)] and pos[(RECV_BWD, mb)] < pos[(BWD, mb)]
            else:
                assert (SEND_FWD, mb) not in pos and (RECV_BWD, mb) not in pos


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zbh1"])
@pytest.mark.parametrize("P,M", SHAPES)
@pytest.mark.parametrize("slots", [1, 2])
def test_no_deadlock_and_matched_messages(name, P, M, slots):
    res = simulate(programs(name, P, M), send_slots=slots)
    assert len(res.trace) == sum(len(p) for p in programs(name, P, M))
    # the last stage's first backward cannot come before every stage ran micro-batch 0 forward
    first_bwd = next(k for k, (s, i) in enumerate(res.trace) if i.op == BWD)
    fwd0 = {s for s, i in res.trace[:first_bwd] if i.op == FWD and i.mb == 0}
    assert fwd0 == set(range(P))


@pytest.mark.parametrize("P,M", SHAPES)
def test_1f1b_activation_bound(P, M):
    for s, prog in enumerate(programs("1f1b", P, M)):
        assert peak_activations(prog) == min(P - s, M) <= P
    assert simulate(programs("1f1b", P, M)).peak == [min(P - s, M) for s in range(P)]


@pytest.mark.parametrize("P,M", [(2, 8), (4, 16), (8, 32)])
def test_gpipe_holds_all_microbatches(P, M):
    assert all(peak_activations(p) == M for p in programs("gpipe", P, M))


@pytest.mark.parametrize("P,M", [(1, 4), (2, 2), (2, 8), (4, 4), (4, 16), (8, 32)])
def test_1f1b_is_never_longer_than_gpipe(P, M):
    # same bubble, less memory: 1F1B must not pay for its memory bound with time
    t_gpipe = simulate(programs("gpipe", P, M)).ticks
    t_1f1b = simulate(programs("1f1b", P, M)).ticks
    assert t_1f1b <= t_gpipe
    if P == 1:
        assert t_1f1b == 2 * M
    assert ideal_bubble(P, M) == pytest.approx((P - 1) / (M + P - 1))


def test_1f1b_steady_state_alternates():
    prog = [i for i in one_f_one_b(0, 4, 8) if i.op in (FWD, BWD)]
    assert prog[:3] == [Instr(FWD, 0), Instr(FWD, 1), Instr(FWD, 2)]
    steady = prog[3:3 + 10]
    assert [i.op for i in steady] == [FWD, BWD] * 5
    assert prog[-3:] == [Instr(BWD, 5), Instr(BWD, 6), Instr(BWD, 7)]


def test_gpipe_order():
    prog = gpipe(1, 3, 3)
    assert prog == [Instr(RECV_FWD, 0), Instr(FWD, 0), Instr(SEND_FWD, 0),
                    Instr(RECV_FWD, 1), Instr(FWD, 1), Instr(SEND_FWD, 1),
                    Instr(RECV_FWD, 2), Instr(FWD, 2), Instr(SEND_FWD, 2),
                    Instr(RECV_BWD, 2), Instr(BWD, 2), Instr(SEND_BWD, 2),
                    Instr(RECV_BWD, 1), Instr(BWD, 1), Instr(SEND_BWD, 1),
                    Instr(RECV_BWD, 0), Instr(BWD, 0), Instr(SEND_BWD, 0)]


def test_simulator_detects_deadlock_and_mismatch():
    # both stages wait to receive before sending: a real deadlock
    bad = [[Instr(RECV_BWD, 0), Instr(FWD, 0), Instr(SEND_FWD, 0), Instr(BWD, 0)],
           [Instr(RECV_FWD, 0), Instr(FWD, 0), Instr(BWD, 0), Instr(SEND_BWD, 0)]]
    with pytest.raises(Deadlock):
        simulate(bad)
    swapped = [one_f_one_b(0, 2, 2), one_f_one_b(1, 2, 2)]
    swapped[1] = [Instr(i.op, 1 - i.mb) if i.op == RECV_FWD else i for i in swapped[1]]
    with pytest.raises(AssertionError, match="expects activation"):
        simulate(swapped)


@pytest.mark.parametrize("P,M", SHAPES)
def test_zbh1_keeps_1f1b_order_and_bounds_deferred_work(P, M):
    for s, (zb, ref) in enumerate(zip(programs("zbh1", P, M), programs("1f1b", P, M))):
        # without the weight passes it is 1F1B, messages included
        assert [i for i in zb if i.op != WGT] == ref
        deferred = peak = 0
        for i in zb:
            deferred += (i.op == BWD) - (i.op == WGT)
            peak = max(peak, deferred)
        assert peak <= P  # at most P micro-batches' weight work waits at once
        assert peak_activations(zb) <= min(P - s, M) + P


@pytest.mark.parametrize("P,M", [(P, M) for P in (2, 3, 4, 8) for M in (1, 2, 4, 8, 16, 32)])
def test_zbh1_cuts_the_bubble_to_a_third(P, M):
    one_f, zb = step_time(programs("1f1b", P, M)), step_time(programs("zbh1", P, M))
    assert one_f == 3 * (M + P - 1)  # unit costs: F = 1, B = 2, bubble (P - 1)(F + B)
    assert zb < one_f
    if M >= P:  # ZB-H1's bound: bubble (P - 1)(F + B - W), a third of 1F1B's
        assert zb == 3 * M + (P - 1)
    # and the engine-level simulation agrees that it cannot deadlock on one send slot
    simulate(programs("zbh1", P, M), send_slots=1)


def test_zbh1_example():
    # P=2, M=4: the last stage sends each input gradient before its weight pass; the first
    # stage fills its wait for gradient 1 with weight pass 0
    ops = lambda prog: [i for i in prog if i.op in (FWD, BWD, WGT)]
    assert ops(build_schedule("zbh1", 1, 2, 4)) == [
        Instr(FWD, 0), Instr(BWD, 0), Instr(FWD, 1), Instr(BWD, 1), Instr(WGT, 0), Instr(FWD, 2), Instr(BWD, 2),
        Instr(WGT, 1), Instr(FWD, 3), Instr(BWD, 3), Instr(WGT, 2), Instr(WGT, 3)]
    assert ops(build_schedule("zbh1", 0, 2, 4)) == [
        Instr(FWD, 0), Instr(FWD, 1), Instr(BWD, 0), Instr(FWD, 2), Instr(BWD, 1), Instr(WGT, 0), Instr(FWD, 3),
        Instr(BWD, 2), Instr(WGT, 1), Instr(WGT, 2), Instr(BWD, 3), Instr(WGT, 3)]


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        build_schedule("zigzag", 0, 2, 2)
