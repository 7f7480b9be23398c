"""ParallelDims: how a job's ranks are split into parallel dimensions, and where a rank sits.

Pure arithmetic (no MPI): the degrees of each dimension, validated once against the world
size, and rank <-> coordinates. The dimensions are laid out innermost first in
:data:`ORDER`: ``pp`` innermost, so a pipeline's stages are consecutive ranks (a block
mapping packs them within a node, where their point-to-point traffic stays) and the ``dp``
replicas of a stage are ``pp`` ranks apart::

    rank = dp_index * pp + stage

A new dimension (``tp``, ``ep``, ``zero``) is one more entry in :data:`ORDER` and one more
field; :mod:`hpcllm.parallel.groups` builds the communicators of every dimension from
:meth:`ParallelDims.group_ranks` alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpcllm.errors import HpcllmError

#: dimension names, innermost (consecutive ranks) first
ORDER = ("pp", "dp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel dimension; their product is the world size."""

    pp: int = 1
    dp: int = 1

    @classmethod
    def for_world(cls, world: int, pp: int = 1) -> "ParallelDims":
        """The layout for ``world`` ranks with ``pp`` pipeline stages (data parallelism takes
        the rest); raises one clear error per misfit."""
        if pp < 1:
            raise HpcllmError(f"--pipeline-stages {pp}: must be >= 1")
        if world < pp:
            raise HpcllmError(f"--pipeline-stages {pp}: needs at least {pp} ranks, one per stage "
                              f"(e.g. mpirun -np {pp} or srun -n {pp}); this job has {world}")
        if world % pp:
            raise HpcllmError(f"--pipeline-stages {pp}: {world} ranks are not a multiple of {pp} "
                              f"(world = stages x data-parallel replicas)")
        return cls(pp=pp, dp=world // pp)

    @property
    def world(self) -> int:
        n = 1
        for d in ORDER:
            n *= getattr(self, d)
        return n

    def degrees(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in ORDER}

    def coords(self, rank: int) -> dict[str, int]:
        """``{"pp": stage, "dp": replica}`` of a world rank."""
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

    def describe(self) -> str:
        return " x ".join(f"{d}={getattr(self, d)}" for d in reversed(ORDER))

    def to_dict(self) -> dict:
        return self.degrees()
