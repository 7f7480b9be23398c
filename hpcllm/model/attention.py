"""Block-sparse causal attention: a local window, global tokens and random key blocks.

``--attention local`` (window only) or ``bigbird`` (window + global + random). Query ``i``
may see key ``j`` when ``j <= i`` and at least one of:

- ``i - j < W`` (the causal local band: W keys per query, itself included);
- ``j < G`` or ``i < G`` (the first G tokens are global: every query sees them, and they see
  every earlier token);
- key block ``j // B`` is one of the R random blocks of query block ``i // B`` (each drawn
  among the earlier blocks not already in the band or the global blocks, from a generator
  seeded by ``(seed, layer, query block)``: the same on every rank, stage and restart, and
  independent of T, so the pattern for a shorter sequence is a prefix of a longer one's).

:class:`SparsePattern` lists, per query block of size B, the key blocks that hold allowed
pairs (deduplicated, padded to a fixed count, padding masked out) and the element mask of
those blocks. :func:`sparse_attention` gathers those key/value blocks
(``(n_qblocks, n_keyblocks, B, hd)``), computes the scores with batched matmuls, masks them,
takes a max-subtracted softmax over exactly the allowed keys and the weighted sum: no T x T
tensor anywhere, memory O(T x keys per query), forward and backward through autograd (the
gather's backward is an index_add). Global query rows (i < G) need no dense part of their
own: they sit in query blocks < ceil(G / B), whose earlier key blocks are all global blocks.

This module knows nothing of parallelism: it sees (batch, heads, T, hd) tensors, whatever
heads a tensor-parallel rank holds, and the layer index it is built with (the global one,
also in a pipeline slice).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import torch
import torch.nn.functional as F

ATTENTIONS = ("dense", "local", "bigbird")


def _block_seed(seed: int, layer: int, qblock: int) -> int:
    digest = hashlib.sha256(f"attention/{seed}/{layer}/{qblock}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: the kernel's query chunk: query blocks are grouped into chunks of about this many rows
#: (a multiple of the block size): larger kernel tiles, fewer gathered keys per row for a
#: band. T=8192, 4 heads x 64, fp32, forward + backward on 2 (shared) cores, chunks of
#: 64 / 128 / 256 rows: local W=256 B=64 851 / 679 / 643 ms, bigbird (G=64, R=3) 1445 / 1077 /
#: 1491 ms.
KERNEL_CHUNK = 128


def default_chunk(block: int) -> int:
    return block * max(1, KERNEL_CHUNK // block)


class SparsePattern:
    """Which (query chunk, key block) pairs, and which elements in them, one layer computes.

    The pattern itself is defined on blocks of ``block`` positions (random blocks are drawn
    per query block); the kernel groups ``chunk // block`` query blocks into one chunk and
    gathers the union of their key blocks.
    """

    def __init__(self, T: int, window: int, global_tokens: int = 0, random_blocks: int = 0, block: int = 64,
                 seed: int = 0, layer: int = 0, chunk: int | None = None):
        if window < 1 or block < 1 or global_tokens < 0 or random_blocks < 0 or T < 1:
            raise ValueError("sparse attention needs T >= 1, window >= 1, block >= 1, global >= 0, random >= 0")
        chunk = default_chunk(block) if chunk is None else chunk
        if chunk < block or chunk % block:
            raise ValueError(f"the kernel chunk {chunk} must be a multiple of the block {block}")
        self.T, self.W, self.G, self.R, self.B, self.C = T, window, global_tokens, random_blocks, block, chunk
        self.seed, self.layer = seed, layer
        B, m = block, chunk // block
        nc = -(-T // chunk)
        nb = nc * m  # key/query blocks of the padded length
        n_global = -(-global_tokens // B)
        #: (nb, nb): key block kb is one of query block qb's random blocks
        rand_table = torch.zeros(nb, nb, dtype=torch.bool)
        block_lists = []
        for qb in range(nb):
            lo = max(0, (qb * B - window + 1) // B)  # first block the band of this query block touches
            chosen = set(range(lo, qb + 1)) | set(range(min(n_global, qb + 1)))
            if random_blocks and qb * B < T:
                cand = [b for b in range(qb) if b not in chosen]
                if cand:
                    g = torch.Generator().manual_seed(_block_seed(seed, layer, qb))
                    for p in torch.randperm(len(cand), generator=g)[:random_blocks].tolist():
                        rand_table[qb, cand[p]] = True
                        chosen.add(cand[p])
            block_lists.append(chosen)
        rows = [sorted(set().union(*block_lists[c * m:(c + 1) * m])) for c in range(nc)]
        self.n_q, self.n_k, self.n_blocks = nc, max(len(r) for r in rows), nb
        idx = torch.zeros(nc, self.n_k, dtype=torch.long)
        valid = torch.zeros(nc, self.n_k, dtype=torch.bool)
        for c, blocks in enumerate(rows):
            idx[c, :len(blocks)] = torch.tensor(blocks)
            valid[c, :len(blocks)] = True
        #: (n_q chunks, n_k) key block per slot; valid: the slot is not padding
        self.index, self.valid, self.rand_table = idx, valid, rand_table
        # element mask (n_q, C, n_k * B): the rule applied to the gathered positions
        i = (torch.arange(nc)[:, None] * chunk + torch.arange(chunk)[None, :])[:, :, None]  # (nc, C, 1)
        j = (idx[:, :, None] * B + torch.arange(B)[None, None, :]).reshape(nc, 1, self.n_k * B)
        slot_ok = valid.repeat_interleave(B, dim=1)[:, None, :]
        # padded keys (j >= T) are never seen by a real query; a padded query sees itself
        self.mask = slot_ok & self.allowed(i, j) & ((j < T) | (j == i))
        self._bias: dict = {}

    # ------------------------------------------------------------------ queries on the pattern

    def allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The element rule for broadcastable position tensors ``i`` (queries) and ``j`` (keys)
        (positions below the padded length)."""
        rule = (i - j < self.W) | (j < self.G) | (i < self.G)
        if self.R:
            table = self.rand_table.to(i.device)
            rule = rule | table[(i // self.B).clamp(max=self.n_blocks - 1), (j // self.B).clamp(max=self.n_blocks - 1)]
        return (j <= i) & rule

    def dense_mask(self, T: int | None = None) -> torch.Tensor:
        """(T, T) boolean mask of the same pattern (for tests and the generation cache path)."""
        T = self.T if T is None else T
        p = torch.arange(T)
        return self.allowed(p[:, None], p[None, :])

    def attended_pairs(self) -> int:
        """Allowed (query, key) pairs of the T real positions (the FLOPs count these)."""
        m = self.mask.reshape(self.n_q * self.C, -1)[:self.T]
        return int(m.sum())  # padded queries are excluded by the slice

    def density(self) -> float:
        """Allowed pairs over the causal T (T + 1) / 2."""
        return self.attended_pairs() / (self.T * (self.T + 1) / 2)

    def digest(self) -> str:
        """A hash of the pattern (key blocks and element mask): equal on every rank and restart."""
        h = hashlib.sha256()
        for t in (self.index, self.valid, self.rand_table, self.mask):
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def device_mask(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(element mask (1, n_q, C, n_k * B), flat key block index (n_q * n_k,)) on a device, cached."""
        key = str(device)
        if key not in self._bias:
            self._bias[key] = (self.mask[None].to(device), self.index.reshape(-1).to(device))
        return self._bias[key]


@lru_cache(maxsize=256)
def get_pattern(T: int, window: int, global_tokens: int, random_blocks: int, block: int, seed: int,
                layer: int, chunk: int | None = None) -> SparsePattern:
    """The pattern of one layer for length T, built once."""
    return SparsePattern(T, window, global_tokens, random_blocks, block, seed, layer, chunk)


def _fused_available(q, k, mask) -> bool:
    """Whether SDPA runs a fused (flash / memory-efficient) kernel for these block tensors."""
    try:
        return int(torch._fused_sdp_choice(q, k, k, mask)) > 0
    except Exception:  # private API gone: assume the fused path (SDPA chooses at run time)
        return True


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                     impl: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + pattern mask) v for (batch, heads, T, hd) tensors, computing
    only the pattern's (query chunk, key block) pairs. Memory O(T x n_k x B / C).

    The key/value blocks of each query block are gathered (``index_select``; its backward is
    an ``index_add``), then each query block attends to its n_k x B gathered keys under the
    pattern's element mask: ``impl="sdpa"`` through ``F.scaled_dot_product_attention`` with the
    query blocks as its head dimension (a fused flash kernel with a running max and
    log-sum-exp, on CPUs too: fp32 at T=8192, 4 heads x 64, W=256: 0.70 s forward + backward
    against 2.5 s for the explicit version on 2 cores), ``impl="matmul"`` by explicit batched
    matmuls and a max-subtracted softmax (memory O(T x n_k x B) per head for the
    probabilities). ``auto``: sdpa where PyTorch has a fused kernel for the tensors, else matmul.
    """
    Bt, H, T, hd = q.shape
    if T != pattern.T:
        raise ValueError(f"pattern built for T={pattern.T}, got {T}")
    B, C, nq, nk, nb = pattern.B, pattern.C, pattern.n_q, pattern.n_k, pattern.n_blocks
    pad = nq * C - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    mask, flat = pattern.device_mask(q.device)
    qb = q.reshape(Bt * H, nq, C, hd)
    # gather the key/value blocks each query chunk sees: (Bt * H, nq, nk * B, hd)
    kg = k.reshape(Bt * H, nb, B, hd).index_select(1, flat).reshape(Bt * H, nq, nk * B, hd)
    vg = v.reshape(Bt * H, nb, B, hd).index_select(1, flat).reshape(Bt * H, nq, nk * B, hd)
    if impl == "auto":
        impl = "sdpa" if _fused_available(qb, kg, mask) else "matmul"
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(qb, kg, vg, attn_mask=mask)
    elif impl == "matmul":
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        scores = torch.matmul(qb, kg.transpose(-1, -2)) * (hd ** -0.5) + bias
        # each row has at least its own key, so no row is all -inf; 16-bit softmax accumulates in fp32
        y = torch.matmul(torch.softmax(scores, dim=-1), vg)
    else:
        raise ValueError(f"impl must be auto, sdpa or matmul, not {impl!r}")
    y = y.reshape(Bt, H, nq * C, hd)
    return y[:, :, :T] if pad else y


def pattern_for(cfg, T: int, layer: int) -> SparsePattern:
    """The pattern of a sparse GPTConfig's layer for length T (cached)."""
    G, R = (cfg.attention_global, cfg.attention_random) if cfg.attention == "bigbird" else (0, 0)
    return get_pattern(T, cfg.attention_window, G, R, cfg.attention_block, cfg.attention_seed, layer)


def describe(cfg) -> str:
    """One line for the run log: the pattern and its density at seq_len."""
    if cfg.attention == "dense":
        return "attention dense (causal)"
    p = pattern_for(cfg, cfg.seq_len, 0)
    parts = [f"window {cfg.attention_window}"]
    if cfg.attention == "bigbird":
        parts += [f"global {cfg.attention_global}", f"random {cfg.attention_random} x {cfg.attention_block}"]
    return (f"attention {cfg.attention} ({', '.join(parts)}, block {cfg.attention_block}): "
            f"{p.attended_pairs() / cfg.seq_len:.1f} keys per query, density {p.density():.4f} of causal "
            f"at seq_len {cfg.seq_len}; pattern sha256 {p.digest()[:12]}")
