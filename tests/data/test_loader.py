"""BatchLoader: window content, (dp_size, accum) invariance, exact resume, corpus weights,
vocab check, fixed eval batches, lazy per-process opening."""
import os

import numpy as np
import pytest
import torch

from hpcllm.data.loader import BatchLoader, DatasetInfo, EvalBatches, FeistelPermutation
from hpcllm.data.preprocess import run_preprocess
from hpcllm.data.shards import read_manifest, read_shard
from hpcllm.errors import HpcllmError
from tests.data.conftest import make_docs, write_jsonl


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    src = write_jsonl(d / "a.jsonl", make_docs(800, seed=7))
    run_preprocess([str(src)], str(d / "ds"), val_fraction=0.1, shard_tokens=9_000)  # many shards
    return d / "ds"


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    d = tmp_path_factory.mktemp("weighted")
    a = write_jsonl(d / "a.jsonl", ["A" * 50 + f" {i}" for i in range(300)])
    b = write_jsonl(d / "b.jsonl", ["B" * 50 + f" {i}" for i in range(3000)])
    run_preprocess([f"small={a}:3", f"big={b}:1"], str(d / "ds"), val_fraction=0, shard_tokens=5_000)
    return d / "ds"


def stream(ds, split="train"):
    m = read_manifest(str(ds))
    return np.concatenate([read_shard(os.path.join(ds, e["path"]))[0] for e in m["splits"][split]["shards"]])


def test_windows_are_shifted_slices_of_the_packed_stream(ds):
    tokens = stream(ds).astype(np.int64)
    seq = 64
    L = BatchLoader(str(ds), seq_len=seq, micro_batch=4, accum=2, seed=3)
    n = (len(tokens) - 1) // seq
    assert L.n_windows == [n]
    starts = {tuple(tokens[i * seq:i * seq + seq + 1]): i for i in range(n)}
    seen = []
    for _ in range(3):
        mbs = L.next_batch()
        assert len(mbs) == 2
        for x, y in mbs:
            assert x.dtype == torch.int64 and x.shape == (4, seq) and y.shape == (4, seq)
            assert torch.equal(x[:, 1:], y[:, :-1])
            for r in range(4):
                w = tuple(x[r].tolist()) + (int(y[r, -1]),)
                seen.append(starts[w])  # KeyError if not a real window (incl. across shard boundaries)
    assert len(set(seen)) == len(seen)  # a permutation: no window twice within an epoch


def test_permutation_is_a_bijection():
    for n in (1, 2, 7, 1000, 4097):
        p = FeistelPermutation(n, key=12345)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    a, b = FeistelPermutation(1000, 1)(np.arange(1000)), FeistelPermutation(1000, 2)(np.arange(1000))
    assert not np.array_equal(a, b)


def _global_windows(ds, dp_size, accum, micro_batch, steps, seq=32, seed=0):
    """Per global step, the sorted windows of all ranks together."""
    loaders = [BatchLoader(str(ds), seq_len=seq, micro_batch=micro_batch, accum=accum, dp_rank=r,
                           dp_size=dp_size, seed=seed) for r in range(dp_size)]
    out = []
    for _ in range(steps):
        rows = []
        for L in loaders:
            for x, y in L.next_batch():
                rows += [tuple(r) for r in torch.cat([x, y[:, -1:]], 1).tolist()]
        out.append(rows)
    return out


@pytest.mark.parametrize("dataset", ["ds", "weighted"])
def test_global_batches_are_the_same_for_any_dp_size_and_accum(dataset, request):
    d = request.getfixturevalue(dataset)
    ref = _global_windows(d, 1, 4, 2, steps=12)
    for dp, acc in ((2, 2), (4, 1)):
        got = _global_windows(d, dp, acc, 2, steps=12)
        # same windows in the same order: rank r's block r is the r-th slice of the global batch
        assert got == ref
    # the rank/accum split order itself: rank-major, then micro-batch
    flat = _global_windows(d, 8, 1, 1, steps=12)
    assert flat == ref


def test_resume_is_exact(ds, weighted):
    for d in (ds, weighted):
        a = BatchLoader(str(d), seq_len=32, micro_batch=3, accum=2, dp_rank=1, dp_size=2, seed=11)
        for _ in range(5):
            a.next_batch()
        state = a.state_dict()
        import json

        state = json.loads(json.dumps(state))  # JSON-able
        want = [a.next_batch() for _ in range(40)]  # crosses epoch boundaries on the small data
        b = BatchLoader(str(d), seq_len=32, micro_batch=3, accum=2, dp_rank=1, dp_size=2, seed=11)
        b.load_state_dict(state)
        got = [b.next_batch() for _ in range(40)]
        for w, g in zip(want, got):
            for (wx, wy), (gx, gy) in zip(w, g):
                assert torch.equal(wx, gx) and torch.equal(wy, gy)
    with pytest.raises(HpcllmError, match="seq_len"):
        BatchLoader(str(ds), seq_len=16, micro_batch=3, accum=2, seed=11).load_state_dict(state)


def test_epochs_reshuffle_and_cover_everything(ds):
    L = BatchLoader(str(ds), seq_len=256, micro_batch=1, accum=1, seed=0)
    n = L.n_windows[0]
    first = [L.step_windows(j, [j], 1)[1][0] for j in range(n)]
    second = [L.step_windows(j, [j], 1)[1][0] for j in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second


def test_corpora_are_sampled_by_weight(weighted):
    L = BatchLoader(str(weighted), seq_len=16, micro_batch=8, accum=1, seed=0)
    names = [c[0] for c in L.corpora]
    assert names == ["small", "big"]
    for _ in range(500):
        L.next_batch()
    # the draw itself: 3:1 weights over 20k slots, deterministic from the seed
    corp = L.slot_corpora(np.arange(20_000))
    frac = (corp == 0).mean()
    assert abs(frac - 0.75) < 0.02
    assert L.state_dict()["consumed"]["small"] + L.state_dict()["consumed"]["big"] == 500 * 8
    assert abs(L.state_dict()["consumed"]["small"] / 4000 - 0.75) < 0.05
    # the small corpus is repeated (more epochs), the big one is not exhausted
    assert L.consumed[0] > L.n_windows[0] and L.consumed[1] < L.n_windows[1]
    # windows really come from their corpus: count windows made only of A-text vs B-text
    L2 = BatchLoader(str(weighted), seq_len=16, micro_batch=8, accum=1, seed=0)
    a = b = 0
    for _ in range(200):
        x, _ = L2.next_batch()[0]
        a += int(((x == ord("A")).sum(1) > 0).sum())
        b += int(((x == ord("B")).sum(1) > 0).sum())
    assert abs(a / (a + b) - 0.75) < 0.05


def test_vocab_mismatch_is_a_clear_error(ds):
    info = DatasetInfo(str(ds))
    assert info.vocab_size == 257 and info.eod_id == 256 and info.train_tokens > 0
    info.check_vocab(257)
    with pytest.raises(HpcllmError, match="vocabulary 257 .* exceeds the model's vocab_size 256"):
        info.check_vocab(256)
    with pytest.raises(HpcllmError, match="exceeds"):
        BatchLoader(str(ds), seq_len=8, micro_batch=1, accum=1, model_vocab_size=100)
    with pytest.raises(HpcllmError, match="fewer than one window"):
        BatchLoader(str(ds), seq_len=10**9, micro_batch=1, accum=1)


def test_eval_batches_are_fixed_and_split_across_ranks(ds):
    one = [torch.cat([x, y[:, -1:]], 1) for x, y in EvalBatches(str(ds), seq_len=32, micro_batch=4, num_batches=3)]
    again = [torch.cat([x, y[:, -1:]], 1) for x, y in EvalBatches(str(ds), seq_len=32, micro_batch=4, num_batches=3)]
    assert len(one) == 3 and all(torch.equal(a, b) for a, b in zip(one, again))
    val = stream(ds, "val").astype(np.int64)
    assert tuple(one[0][0].tolist()) == tuple(val[:33])
    r0 = list(EvalBatches(str(ds), seq_len=32, micro_batch=2, num_batches=3, dp_rank=0, dp_size=2))
    r1 = list(EvalBatches(str(ds), seq_len=32, micro_batch=2, num_batches=3, dp_rank=1, dp_size=2))
    for b in range(3):
        both = torch.cat([r0[b][0], r1[b][0]])
        assert torch.equal(both, one[b][:, :-1])


def test_shards_open_lazily_per_process(ds):
    L = BatchLoader(str(ds), seq_len=32, micro_batch=2, accum=1, seed=0)
    stream_ = L.corpora[0][2]
    assert all(a is None for a in stream_._arrays) if stream_._arrays else True
    before = L.next_batch()[0][0]
    assert stream_._pid == os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must open its own maps, and read the same data
        try:
            L.load_state_dict({"seq_len": 32, "seed": 0, "slot": 0, "consumed": {"default": 0}})
            x = L.next_batch()[0][0]
            ok = torch.equal(x, before) and stream_._pid == os.getpid()
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
