"""Training and evaluation batches from a dataset directory.

A split's tokens (per corpus: its shards concatenated in manifest order) are cut into windows
of ``seq_len + 1`` tokens starting every ``seq_len`` tokens; ``x = w[:-1]``, ``y = w[1:]``.

Global order. Training consumes *slots* 0, 1, 2, ...; global step k is slots
``[k*G, (k+1)*G)`` with ``G = micro_batch * accum * dp_size``. Rank r takes the contiguous block
r of the step's slots, cut into ``accum`` micro-batches. Slot j goes to a corpus drawn from the
manifest weights by a counter-based hash of (seed, j), and takes that corpus' next position p;
position p is window ``perm(seed, corpus, epoch)[p mod n]`` with ``epoch = p // n``. The
permutation is a keyed Feistel network (cycle-walking), so it needs no memory whatever the
number of windows. Hence the windows of global step k depend only on (seed, k, G), never on
dp_size or accum, and resuming needs only the slot counter and per-corpus positions.

Shards are opened lazily per process (after a fork the child reopens its own maps).
"""
from __future__ import annotations

import bisect
import os

import numpy as np

from hpcllm.data.shards import open_tokens, read_manifest
from hpcllm.errors import HpcllmError

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser on a Python int (scalar key derivation)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix_np(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps, as intended)."""
    x = x.astype(np.uint64, copy=True)  # array (not scalar) integer ops wrap without warnings
    x ^= x >> _S30
    x *= _K1
    x ^= x >> _S27
    x *= _K2
    x ^= x >> _S31
    return x


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_K1, _K2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class FeistelPermutation:
    """A keyed pseudo-random permutation of ``range(n)`` evaluated pointwise in O(1) memory."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError("empty permutation")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(_mix(key * 8 + r + 1)) for r in range(self.ROUNDS)]

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            f = _mix_np(right ^ k) & self.mask
            left, right = right, left ^ f
        return (left << h) | right

    def __call__(self, idx) -> np.ndarray:
        x = self._round_trip(np.asarray(idx, dtype=np.uint64))
        bad = x >= np.uint64(self.n)
        while bad.any():  # cycle walking: stays a bijection of [0, n); domain < 4n
            x[bad] = self._round_trip(x[bad])
            bad = x >= np.uint64(self.n)
        return x.astype(np.int64)


class TokenStream:
    """Shards concatenated into one token stream, read lazily per process."""

    def __init__(self, data_dir: str, entries: list[dict]):
        self.paths = [os.path.join(data_dir, e["path"]) for e in entries]
        sizes = np.array([int(e["tokens"]) for e in entries], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = int(self.starts[-1])
        self._starts_list = self.starts.tolist()
        self._pid = None
        self._arrays: list = []

    def _array(self, i: int):
        if self._pid != os.getpid():  # first use, or we are a forked child: own maps
            self._pid = os.getpid()
            self._arrays = [None] * len(self.paths)
        a = self._arrays[i]
        if a is None:
            a = open_tokens(self.paths[i])
            if isinstance(a, np.memmap):
                a = a.view(np.ndarray)  # plain ndarray slicing (no memmap subclass overhead); map stays alive
            self._arrays[i] = a
        return a

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start+length] of the stream, across shard boundaries."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[i])
        a = self._array(i)
        end = local + length
        if end <= len(a):
            return np.asarray(a[local:end])
        parts = [np.asarray(a[local:])]
        need = length - len(parts[0])
        while need > 0:
            i += 1
            b = self._array(i)
            parts.append(np.asarray(b[:need]))
            need -= len(parts[-1])
        return np.concatenate(parts)

    def windows(self, seq_len: int) -> int:
        return max(0, (self.total - 1) // seq_len)

    def read_windows(self, idx: np.ndarray, seq_len: int) -> np.ndarray:
        """Windows ``idx`` (in units of seq_len) as an int64 array (len(idx), seq_len + 1)."""
        L = seq_len + 1
        out = np.empty((len(idx), L), dtype=np.int64)
        if self._pid != os.getpid():
            self._array(0)  # (re)opens lazily for this process
        arrays, bounds = self._arrays, self._starts_list
        # plain-Python per-window work: this loop is the hot path of random access
        for r, w in enumerate(np.asarray(idx, dtype=np.int64).tolist()):
            start = w * seq_len
            s = bisect.bisect_right(bounds, start) - 1
            a = arrays[s]
            if a is None:
                a = self._array(s)
            lo = start - bounds[s]
            if lo + L <= len(a):
                out[r] = a[lo:lo + L]
            else:  # crosses into the next shard(s)
                out[r] = self.read(start, L)
        return out


class DatasetInfo:
    """What training needs to know about a dataset before building a model."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.manifest = m = read_manifest(data_dir)
        tok = m["tokenizer"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eod_id: int = int(tok["eod_id"])
        self.tokenizer_sha256: str = tok["sha256"]
        self.tokenizer_type: str = tok["type"]
        self.train_tokens: int = int(m["splits"]["train"]["tokens"])
        self.val_tokens: int = int(m["splits"]["val"]["tokens"])
        self.train_documents: int = int(m["splits"]["train"]["documents"])
        self.val_documents: int = int(m["splits"]["val"]["documents"])
        self.corpora: list[dict] = m.get("corpora") or [{"name": "default", "weight": 1.0}]

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise when token ids of this dataset would not fit the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise HpcllmError(
                f"{os.path.join(self.data_dir, 'manifest.json')}: dataset vocabulary {self.vocab_size} "
                f"({self.tokenizer_type} tokenizer) exceeds the model's vocab_size {model_vocab_size}")

    def windows(self, split: str, seq_len: int) -> int:
        return max(0, (int(self.manifest["splits"][split]["tokens"]) - 1) // seq_len)


def _corpus_streams(data_dir: str, manifest: dict, split: str) -> list[tuple[str, float, TokenStream]]:
    corpora = manifest.get("corpora") or [{"name": "default", "weight": 1.0}]
    default = corpora[0]["name"]
    out = []
    for c in corpora:
        entries = [e for e in manifest["splits"][split]["shards"] if e.get("corpus", default) == c["name"]]
        out.append((c["name"], float(c.get("weight", 1.0)), TokenStream(data_dir, entries)))
    return out


class BatchLoader:
    """Deterministic, resumable, rank-split batches; see the module docstring for the order."""

    def __init__(self, data_dir: str, split: str = "train", seq_len: int = 256, micro_batch: int = 8,
                 accum: int = 4, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 model_vocab_size: int | None = None):
        if not (0 <= dp_rank < dp_size):
            raise HpcllmError(f"dp_rank {dp_rank} outside dp_size {dp_size}")
        if seq_len < 1 or micro_batch < 1 or accum < 1:
            raise HpcllmError("seq_len, micro_batch and accum must be positive")
        self.info = DatasetInfo(data_dir)
        if model_vocab_size is not None:
            self.info.check_vocab(model_vocab_size)
        self.data_dir, self.split, self.seq_len = data_dir, split, seq_len
        self.micro_batch, self.accum, self.dp_rank, self.dp_size = micro_batch, accum, dp_rank, dp_size
        self.seed = int(seed)
        self.global_batch = micro_batch * accum * dp_size
        streams = _corpus_streams(data_dir, self.info.manifest, split)
        # corpora without a single window (or with weight 0) take no slots
        self.corpora = [(n, w, s) for n, w, s in streams if w > 0 and s.windows(seq_len) > 0]
        if not self.corpora:
            tokens = self.info.manifest["splits"][split]["tokens"]
            raise HpcllmError(f"{data_dir}: the {split} split has {tokens} tokens, fewer than one window of "
                              f"seq_len+1 = {seq_len + 1}")
        self.n_windows = [s.windows(seq_len) for _, _, s in self.corpora]
        w = np.array([c[1] for c in self.corpora], dtype=np.float64)
        self._cum = np.cumsum(w / w.sum())
        self._cum[-1] = 1.0
        self._slot_key = np.uint64(_mix(_mix(self.seed ^ 0x5EED) + 0xC0A7))
        self.slot = 0
        self.consumed = [0] * len(self.corpora)
        self._perms: dict = {}
        self._blocks: dict = {}

    # -- order -----------------------------------------------------------------------------
    def slot_corpora(self, slots: np.ndarray) -> np.ndarray:
        """The corpus index of each global slot: a weighted draw from a hash of (seed, slot)."""
        if len(self.corpora) == 1:
            return np.zeros(len(slots), dtype=np.int64)
        u = (_mix_np(np.asarray(slots, dtype=np.uint64) ^ self._slot_key) >> np.uint64(11)).astype(np.float64)
        u *= 1.0 / (1 << 53)
        return np.searchsorted(self._cum, u, side="right").astype(np.int64).clip(0, len(self.corpora) - 1)

    def _perm(self, c: int, epoch: int) -> FeistelPermutation:
        key = (c, epoch)
        p = self._perms.get(key)
        if p is None:
            if len(self._perms) > 16:
                self._perms.clear()
            p = self._perms[key] = FeistelPermutation(self.n_windows[c], _mix(_mix(_mix(self.seed) + c) + epoch))
        return p

    def step_windows(self, start_slot: int, consumed: list[int], count: int):
        """(corpus index, window index) of slots [start_slot, start_slot+count) given the
        per-corpus positions at start_slot; also returns the positions after them."""
        corp = self.slot_corpora(np.arange(start_slot, start_slot + count, dtype=np.int64))
        pos = np.empty(count, dtype=np.int64)
        after = list(consumed)
        for c in range(len(self.corpora)):
            mask = corp == c
            k = int(mask.sum())
            pos[mask] = consumed[c] + np.arange(k, dtype=np.int64)
            after[c] += k
        win = np.empty(count, dtype=np.int64)
        for c in range(len(self.corpora)):
            mask = corp == c
            if mask.any():
                win[mask] = self.windows_at(c, pos[mask])
        return corp, win, after

    #: positions per cached block of the permutation (positions are consumed in order, so one
    #: vectorised evaluation serves many steps)
    BLOCK = 1 << 14

    def windows_at(self, c: int, positions: np.ndarray) -> np.ndarray:
        """Window index of corpus ``c`` at each position (epoch-wise permutations)."""
        blocks = positions // self.BLOCK
        out = np.empty(len(positions), dtype=np.int64)
        for b in np.unique(blocks).tolist():
            cached = self._blocks.get((c, b))
            if cached is None:
                if len(self._blocks) >= 8:
                    self._blocks.pop(next(iter(self._blocks)))
                n = self.n_windows[c]
                p = np.arange(b * self.BLOCK, (b + 1) * self.BLOCK, dtype=np.int64)
                epochs = p // n
                cached = np.empty(len(p), dtype=np.int64)
                for e in np.unique(epochs).tolist():
                    m = epochs == e
                    cached[m] = self._perm(c, e)(p[m] % n)
                self._blocks[(c, b)] = cached
            m = blocks == b
            out[m] = cached[positions[m] - b * self.BLOCK]
        return out

    # -- batches ---------------------------------------------------------------------------
    def next_batch(self) -> list:
        """This rank's ``accum`` micro-batches (x, y) of the next global step."""
        import torch

        G, B = self.global_batch, self.micro_batch * self.accum
        corp, win, after = self.step_windows(self.slot, self.consumed, G)
        mine = slice(self.dp_rank * B, (self.dp_rank + 1) * B)
        corp, win = corp[mine], win[mine]
        data = np.empty((B, self.seq_len + 1), dtype=np.int64)
        for c, (_, _, stream) in enumerate(self.corpora):
            m = corp == c
            if m.any():
                data[m] = stream.read_windows(win[m], self.seq_len)
        self.slot += G
        self.consumed = after
        t = torch.from_numpy(data)
        mb = self.micro_batch
        return [(t[i * mb:(i + 1) * mb, :-1].contiguous(), t[i * mb:(i + 1) * mb, 1:].contiguous())
                for i in range(self.accum)]

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Passes over the (first) corpus so far, for logging."""
        return self.consumed[0] / self.n_windows[0]

    def state_dict(self) -> dict:
        return {"version": 1, "split": self.split, "seed": self.seed, "seq_len": self.seq_len,
                "slot": int(self.slot),
                "consumed": {n: int(k) for (n, _, _), k in zip(self.corpora, self.consumed)}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len") != self.seq_len or state.get("seed") != self.seed:
            raise HpcllmError(f"loader state was saved with seq_len {state.get('seq_len')} seed {state.get('seed')}, "
                              f"resuming with seq_len {self.seq_len} seed {self.seed}")
        self.slot = int(state["slot"])
        consumed = state.get("consumed", {})
        self.consumed = [int(consumed.get(n, 0)) for n, _, _ in self.corpora]


class EvalBatches:
    """A fixed list of evaluation micro-batches, the same on every call and every run.

    Windows of the split (all corpora concatenated, no shuffle) spaced evenly over it;
    ``num_batches * micro_batch * dp_size`` windows in all, rank r taking rows
    ``[r*micro_batch, (r+1)*micro_batch)`` of each global batch. Small splits wrap around.
    """

    def __init__(self, data_dir: str, split: str = "val", seq_len: int = 256, micro_batch: int = 8,
                 num_batches: int = 8, dp_rank: int = 0, dp_size: int = 1):
        info = DatasetInfo(data_dir)
        entries = info.manifest["splits"][split]["shards"]
        self.stream = TokenStream(data_dir, entries)
        self.seq_len, self.micro_batch, self.num_batches = seq_len, micro_batch, num_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        n = self.stream.windows(seq_len)
        if n == 0:
            raise HpcllmError(f"{data_dir}: the {split} split has {self.stream.total} tokens, fewer than one "
                              f"window of seq_len+1 = {seq_len + 1} (raise --val-fraction)")
        need = num_batches * micro_batch * dp_size
        self.windows = (np.arange(need, dtype=np.int64) * n) // need if n >= need else np.arange(need) % n

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        import torch

        per = self.micro_batch * self.dp_size
        for b in range(self.num_batches):
            rows = self.windows[b * per + self.dp_rank * self.micro_batch: b * per + (self.dp_rank + 1) * self.micro_batch]
            t = torch.from_numpy(self.stream.read_windows(rows, self.seq_len))
            yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
