"""Partitioning blocks into stages: balance by cost, explicit lists, errors."""
import pytest

from hpcllm.errors import HpcllmError
from hpcllm.model.gpt import GPTConfig, block_param_count
from hpcllm.parallel.pipeline.partition import (
    Partition, PieceCosts, balance, explicit, make_partition, param_costs, parse_balance,
)


def brute_force(costs, P):
    import itertools
    n = len(costs.blocks)
    best = None
    for cuts in itertools.combinations(range(1, n), P - 1):
        b = (0,) + cuts + (n,)
        worst = max(sum(costs.blocks[b[s]:b[s + 1]]) + (costs.embed if s == 0 else 0)
                    + (costs.head if s == P - 1 else 0) for s in range(P))
        best = worst if best is None else min(best, worst)
    return best


def stage_max(costs, part):
    return max(sum(costs.blocks[i] for i in part.blocks(s)) + (costs.embed if s == 0 else 0)
               + (costs.head if s == part.stages - 1 else 0) for s in range(part.stages))


def test_even_costs_split_evenly():
    part = balance(PieceCosts(0, (1.0,) * 8, 0), 4)
    assert part.counts() == [2, 2, 2, 2]
    assert list(part.blocks(2)) == [4, 5] and part.stage_of_block(7) == 3


def test_heavy_head_and_embedding_get_fewer_blocks():
    part = balance(PieceCosts(3.0, (1.0,) * 12, 5.0), 3)
    assert part.counts()[0] < part.counts()[1] and part.counts()[2] < part.counts()[1]
    assert stage_max(PieceCosts(3.0, (1.0,) * 12, 5.0), part) == brute_force(PieceCosts(3.0, (1.0,) * 12, 5.0), 3)


@pytest.mark.parametrize("seed", range(20))
def test_balance_is_optimal(seed):
    import random
    rng = random.Random(seed)
    n, P = rng.randint(2, 9), None
    P = rng.randint(1, n)
    costs = PieceCosts(rng.random() * 3, tuple(rng.random() for _ in range(n)), rng.random() * 3)
    part = balance(costs, P)
    assert part.stages == P and sum(part.counts()) == n and min(part.counts()) >= 1
    assert stage_max(costs, part) == pytest.approx(brute_force(costs, P))


def test_explicit_and_errors():
    assert explicit([1, 3], 4, 2).bounds == ((0, 1), (1, 4))
    assert parse_balance("4,4,3,5") == [4, 4, 3, 5] and parse_balance(None) == "auto"
    assert parse_balance("Params") == "params"
    with pytest.raises(HpcllmError, match="sums to 5 blocks, the model has 4"):
        explicit([2, 3], 4, 2)
    with pytest.raises(HpcllmError, match="3 entries for 2 pipeline stages"):
        explicit([1, 1, 2], 4, 2)
    with pytest.raises(HpcllmError, match="at least one block"):
        explicit([0, 4], 4, 2)
    with pytest.raises(HpcllmError, match="expected auto, params"):
        parse_balance("4;4")
    with pytest.raises(HpcllmError, match="only 2 blocks"):
        balance(PieceCosts(0, (1.0, 1.0), 0), 3)


def test_param_costs_and_make_partition():
    cfg = GPTConfig(n_layer=6, n_head=2, d_model=32, seq_len=16, vocab_size=1000)
    c = param_costs(cfg)
    assert c.blocks == (float(block_param_count(cfg)),) * 6
    assert c.embed == cfg.padded_vocab * 32 + 16 * 32 and c.head == cfg.padded_vocab * 32 + 64
    part = make_partition(cfg, 2, "params")
    assert sum(part.counts()) == 6
    assert make_partition(cfg, 3, "1,2,3") == Partition.from_counts([1, 2, 3])
    measured = make_partition(cfg, 2, "auto", micro_batch=1)
    assert measured.stages == 2 and sum(measured.counts()) == 6
