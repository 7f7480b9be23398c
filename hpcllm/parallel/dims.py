"""ParallelDims: how a job's ranks are split into parallel dimensions, and where a rank sits.

Pure arithmetic (no MPI): the degrees of each dimension, validated once against the world
size, and rank <-> coordinates. The dimensions are laid out innermost first in
:data:`ORDER`: ``tp`` innermost, so a tensor-parallel group (whose collectives sit inside
every block) is consecutive ranks, packed within a node by a block mapping; then ``pp``, so a
pipeline's stages are the next-closest ranks; the ``dp`` replicas outermost, across nodes::

    rank = (dp_index * pp + stage) * tp + tp_index

A new dimension (``tp``, ``zero``) is one more entry in :data:`ORDER` and one more
field; :mod:`hpcllm.parallel.groups` builds the communicators of every dimension from
:meth:`ParallelDims.group_ranks` alone.

Expert parallelism (``ep`` = X) adds no ranks: it divides the data-parallel dimension (as in
Megatron). The ``dp`` replicas still read their own batches; each block of X consecutive
data-parallel coordinates is an *expert group* (its ranks hold different experts, ``ep``
coordinate ``dp % X``), and the ranks holding the same experts across groups form the
*expert-data-parallel* group (``edp``, coordinate ``dp // X``).
"""
from __future__ import annotations

from dataclasses import dataclass

from hpcllm.errors import HpcllmError

#: dimension names, innermost (consecutive ranks) first
ORDER = ("tp", "pp", "dp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel dimension; their product is the world size."""

    pp: int = 1
    dp: int = 1
    tp: int = 1
    ep: int = 1

    @classmethod
    def for_world(cls, world: int, pp: int = 1, tp: int = 1, ep: int = 1) -> "ParallelDims":
        """The layout for ``world`` ranks with ``pp`` pipeline stages of ``tp`` tensor-parallel
        ranks each (data parallelism takes the rest); raises one clear error per misfit."""
        if pp < 1:
            raise HpcllmError(f"--pipeline-stages {pp}: must be >= 1")
        if tp < 1:
            raise HpcllmError(f"--tensor-parallel {tp}: must be >= 1")
        part = pp * tp
        what = (f"--pipeline-stages {pp} x --tensor-parallel {tp}" if tp > 1 and pp > 1
                else f"--tensor-parallel {tp}" if tp > 1 else f"--pipeline-stages {pp}")
        unit = "tensor-parallel rank" if pp == 1 else "stage" if tp == 1 else "stage's tensor-parallel rank"
        if world < part:
            raise HpcllmError(f"{what}: needs at least {part} ranks, one per {unit} "
                              f"(e.g. mpirun -np {part} or srun -n {part}); this job has {world}")
        if world % part:
            raise HpcllmError(f"{what}: {world} ranks are not a multiple of {part} "
                              f"(world = tensor-parallel x stages x data-parallel replicas)")
        dp = world // part
        if ep < 1:
            raise HpcllmError(f"--expert-parallel {ep}: must be >= 1")
        if dp % ep:
            raise HpcllmError(f"--expert-parallel {ep}: must divide the {dp} data-parallel replicas "
                              f"(world {world} / ({what if part > 1 else '1 rank per replica'}))")
        return cls(pp=pp, dp=dp, tp=tp, ep=ep)

    @property
    def world(self) -> int:
        n = 1
        for d in ORDER:
            n *= getattr(self, d)
        return n

    def degrees(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in ORDER}

    def coords(self, rank: int) -> dict[str, int]:
        """``{"tp": tp_index, "pp": stage, "dp": replica}`` of a world rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside a world of {self.world}")
        out = {}
        for d in ORDER:
            n = getattr(self, d)
            out[d] = rank % n
            rank //= n
        return out

    def rank_of(self, **coords: int) -> int:
        """The world rank at ``coords`` (every dimension given)."""
        rank, stride = 0, 1
        for d in ORDER:
            rank += coords[d] * stride
            stride *= getattr(self, d)
        return rank

    def group_ranks(self, dim: str, rank: int) -> list[int]:
        """World ranks that differ from ``rank`` only in ``dim``, ordered by that coordinate
        (the members of ``rank``'s ``dim`` group)."""
        c = self.coords(rank)
        return [self.rank_of(**{**c, dim: i}) for i in range(getattr(self, dim))]

    def groups(self, dim: str) -> list[list[int]]:
        """Every ``dim`` group of the job, each ordered by its coordinate, in a fixed order
        (the same list on every rank: what Horovod process sets must be registered with)."""
        seen, out = set(), []
        for r in range(self.world):
            g = self.group_ranks(dim, r)
            if g[0] not in seen:
                seen.add(g[0])
                out.append(g)
        return out

    def expert_group_ranks(self, rank: int, dim: str = "ep") -> list[int]:
        """The world ranks of ``rank``'s expert group (``ep``: X consecutive data-parallel
        coordinates, ordered by expert-parallel rank) or expert-data-parallel group (``edp``)."""
        c, X = self.coords(rank), self.ep
        if dim == "ep":
            base = c["dp"] // X * X
            return [self.rank_of(**{**c, "dp": base + i}) for i in range(X)]
        return [self.rank_of(**{**c, "dp": j * X + c["dp"] % X}) for j in range(self.dp // X)]

    def expert_groups(self, dim: str = "ep") -> list[list[int]]:
        """Every ``ep`` (or ``edp``) group, in the same order on every rank."""
        seen, out = set(), []
        for r in range(self.world):
            g = self.expert_group_ranks(r, dim)
            if g[0] not in seen:
                seen.add(g[0])
                out.append(g)
        return out

    def describe(self) -> str:
        return " x ".join(f"{d}={getattr(self, d)}" for d in reversed(ORDER) if d != "tp" or self.tp > 1) \
            + (f" (ep={self.ep} within dp)" if self.ep > 1 else "")

    def to_dict(self) -> dict:
        # tp and ep only when used: layouts written before them read the same
        out = {d: n for d, n in self.degrees().items() if d != "tp" or n > 1}
        if self.ep > 1:
            out["ep"] = self.ep
        return out
