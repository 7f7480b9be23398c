"""Cut the GPT's blocks into ``P`` contiguous pipeline stages.

The first stage always holds the embedding, the last the final norm, the head and the loss;
the transformer blocks in between are split so the costliest stage is as cheap as possible.
A piece's cost is its parameter count (``balance="params"``: balances memory), a measured
forward+backward time (``balance="auto"``: balances time), or the user gives the number of
blocks per stage (``balance="4,4,3,5"``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from hpcllm.errors import HpcllmError


@dataclass(frozen=True)
class Partition:
    """Which blocks each stage runs: ``bounds[s] = (first, end)``, blocks ``first..end-1``."""

    bounds: tuple[tuple[int, int], ...]

    @property
    def stages(self) -> int:
        return len(self.bounds)

    def blocks(self, stage: int) -> range:
        """Indices (into ``GPT.blocks``) of the blocks stage ``stage`` holds."""
        return range(*self.bounds[stage])

    def counts(self) -> list[int]:
        return [end - start for start, end in self.bounds]

    def stage_of_block(self, block: int) -> int:
        for s, (start, end) in enumerate(self.bounds):
            if start <= block < end:
                return s
        raise IndexError(block)

    @classmethod
    def from_counts(cls, counts: list[int]) -> "Partition":
        bounds, start = [], 0
        for c in counts:
            bounds.append((start, start + c))
            start += c
        return cls(tuple(bounds))


@dataclass(frozen=True)
class PieceCosts:
    """Cost of the pieces a stage can hold, in any unit (parameters, seconds)."""

    embed: float
    blocks: tuple[float, ...]
    head: float


def parse_balance(spec: str | None) -> str | list[int]:
    """``"auto"``, ``"params"`` or a comma-separated list of blocks per stage."""
    spec = (spec or "auto").strip().lower()
    if spec in ("auto", "params"):
        return spec
    try:
        counts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise HpcllmError(f"--balance {spec!r}: expected auto, params or a list of blocks per stage like 4,4,3,5") from None
    return counts


def balance(costs: PieceCosts, stages: int) -> Partition:
    """The contiguous split of ``costs.blocks`` into ``stages`` non-empty stages (embedding
    added to the first, head to the last) minimising the largest stage cost; ties go to the
    split whose later stages are lighter, since the last stage also runs the loss."""
    n = len(costs.blocks)
    if stages < 1:
        raise HpcllmError(f"--pipeline-stages {stages}: must be at least 1")
    if n < stages:
        raise HpcllmError(f"--pipeline-stages {stages}: the model has only {n} blocks; each stage needs at least one")
    prefix = [0.0]
    for c in costs.blocks:
        prefix.append(prefix[-1] + c)

    def stage_cost(s: int, i: int, j: int) -> float:
        c = prefix[j] - prefix[i]
        if s == 0:
            c += costs.embed
        if s == stages - 1:
            c += costs.head
        return c

    # best[s][j]: minimal max cost of putting blocks [0, j) into stages 0..s-1
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], stage_cost(s - 1, i, j))
                # ">=": prefer the latest cut among equals, i.e. earlier stages take more
                if v <= best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    return Partition(tuple(reversed(bounds)))


def explicit(counts: list[int], n_layer: int, stages: int) -> Partition:
    """The user's list of blocks per stage, checked against the model and ``stages``."""
    spec = ",".join(map(str, counts))
    if len(counts) != stages:
        raise HpcllmError(f"--balance {spec}: {len(counts)} entries for {stages} pipeline stages")
    if any(c < 1 for c in counts):
        raise HpcllmError(f"--balance {spec}: every stage needs at least one block")
    if sum(counts) != n_layer:
        raise HpcllmError(f"--balance {spec}: sums to {sum(counts)} blocks, the model has {n_layer}")
    return Partition.from_counts(counts)


def param_costs(cfg) -> PieceCosts:
    """Parameter counts of the embedding, each block and the head (tied: the last stage
    keeps its own copy of the embedding matrix, so it counts there too; untied: its lm_head)."""
    from hpcllm.model.gpt import block_param_count

    embed = cfg.padded_vocab * cfg.d_model + (cfg.seq_len * cfg.d_model if cfg.pos_emb == "learned" else 0)
    head = cfg.padded_vocab * cfg.d_model + cfg.norm_params
    # a mixture of experts counts the parameters a token uses (its compute), not all E experts
    return PieceCosts(embed=float(embed), blocks=tuple(float(block_param_count(cfg, i, active=True))
                                                      for i in range(cfg.n_layer)), head=float(head))


def measured_costs(cfg, micro_batch: int, device="cpu", autocast=None, repeats: int = 3) -> PieceCosts:
    """Forward+backward seconds of the embedding, one block and the head+loss on one
    micro-batch (the blocks are identical, so one is timed and stands for all).
    ``autocast`` is the run's forward context factory."""
    import contextlib

    import torch

    from hpcllm.model.gpt import GPT, lm_loss

    ctx = autocast or contextlib.nullcontext
    dev = torch.device(device)
    model = GPT(cfg, layers=range(1), embed=True, head=True).to(dev)
    block = model.block_list()[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len), generator=g).to(dev)
    h = torch.randn(micro_batch, cfg.seq_len, cfg.d_model, generator=g).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        fn()  # warm-up: allocator, kernels
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - t) / repeats

    def run_embed():
        with ctx():
            out = model.embed(x)
        out.float().sum().backward()

    def run_block():
        hh = h.detach().requires_grad_(True)
        with ctx():
            out = block(hh)
        out.float().sum().backward()

    def run_head():
        hh = h.detach().requires_grad_(True)
        with ctx():
            loss = lm_loss(model.logits(hh), x)
        loss.backward()

    t_block = timed(run_block)
    return PieceCosts(embed=timed(run_embed), blocks=(t_block,) * cfg.n_layer, head=timed(run_head))


def make_partition(cfg, stages: int, spec: str | None, micro_batch: int = 1, device="cpu",
                   autocast=None, comm=None) -> Partition:
    """The partition for ``--balance spec``.  With ``auto`` the costs are measured on rank 0
    of ``comm`` and broadcast, so every rank derives the same partition."""
    how = parse_balance(spec)
    if isinstance(how, list):
        return explicit(how, cfg.n_layer, stages)
    if how == "params":
        return balance(param_costs(cfg), stages)
    costs = None
    if comm is None or comm.Get_rank() == 0:
        costs = measured_costs(cfg, micro_batch, device=device, autocast=autocast)
    if comm is not None:
        costs = comm.bcast(costs, root=0)
    return balance(costs, stages)
