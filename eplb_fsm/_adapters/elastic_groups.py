"""The process groups of one elastic reconfiguration, as one process sees them.

A reconfiguration moves weights between the old and the new set of ranks, so
it needs a group spanning both (the *union*), and the new set needs its own
groups to serve on afterwards. Each comes twice, like the runtime's own: one
group for the weights (NCCL on GPU, gloo on CPU) and one gloo group for the
small agreement all-reduces, which must not queue behind weight traffic.

Why sets of *global* ranks instead of a rank mapping: a process group orders
its members by global rank, so the group ranks, the union layout and the
rank mapping (old rank -> new rank, -1 for a rank that leaves) all follow
from the two sets, on every process alike, with no exchange. The runtime
checks a caller's own `rank_mapping` against them.

Every process of the world calls `create`, members or not, in the same
order as every other group it creates. Why not torch's
``use_local_synchronization=True`` (only members call): torch names such a
group after the caller's count of existing groups, so a joining spare that
never joined the old EP group names the union group differently from the old
ranks, and the group never forms. The world-collective form names groups by
a counter that every process advances alike, and (without
``TORCH_DIST_INIT_BARRIER=1``) exchanges nothing with non-members, so a rank
that has already died does not hold the others up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["ElasticGroups"]


def _ranks(name: str, ranks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
        raise ValueError(f"{name} must be a sequence of global ranks, got {ranks!r}")
    out = tuple(ranks)
    if not out:
        raise ValueError(f"{name} must name at least one global rank")
    for rank in out:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"{name} holds {rank!r}; global ranks are ints >= 0")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a global rank twice: {list(out)}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class ElasticGroups:
    """Old and new rank sets (global ranks, ascending) and this process's groups.

    `new_group` / `new_cpu_group` are None on a leaving rank (and every group
    on a process outside both sets). Build with `create` on every process of
    the world, or pass groups you created yourself (same members).
    """

    old_ranks: tuple[int, ...]
    new_ranks: tuple[int, ...]
    union_group: Any
    union_cpu_group: Any
    new_group: Any
    new_cpu_group: Any

    @classmethod
    def create(cls, old_ranks: Sequence[int], new_ranks: Sequence[int], *,
               backend: str | None = None) -> ElasticGroups:
        """Create the groups; every process of the world calls it (module docstring).

        `backend` carries the weights (default: the world's backend); the
        agreement groups are always gloo.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ElasticGroups.create needs torch.distributed initialised")
        old, new = _ranks("old_ranks", old_ranks), _ranks("new_ranks", new_ranks)
        world = dist.get_world_size()
        if max(old + new) >= world:
            raise ValueError(f"old_ranks {list(old)} and new_ranks {list(new)} must be global "
                             f"ranks below the world size {world}")
        if not set(old) & set(new):
            raise ValueError("old_ranks and new_ranks share no rank; at least one rank must "
                             "stay to hand the balancer's state over")
        me = dist.get_rank()
        union = sorted(set(old) | set(new))
        backend = backend or dist.get_backend()
        made = [dist.new_group(ranks, backend=name)
                for ranks in (union, list(new)) for name in (backend, "gloo")]
        union_group, union_cpu, new_group, new_cpu = (
            g if me in ranks else None
            for g, ranks in zip(made, (union, union, new, new), strict=True))
        return cls(old, new, union_group, union_cpu, new_group, new_cpu)

    def __post_init__(self) -> None:
        object.__setattr__(self, "old_ranks", _ranks("old_ranks", self.old_ranks))
        object.__setattr__(self, "new_ranks", _ranks("new_ranks", self.new_ranks))

    @property
    def union_ranks(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.old_ranks) | set(self.new_ranks)))

    @property
    def rank_mapping(self) -> tuple[int, ...]:
        """Old rank -> new rank, -1 for a rank that leaves (vLLM's rank mapping)."""
        return tuple(self.new_ranks.index(g) if g in self.new_ranks else -1
                     for g in self.old_ranks)

    @property
    def old_to_union(self) -> tuple[int, ...]:
        return tuple(self.union_ranks.index(g) for g in self.old_ranks)

    @property
    def new_to_union(self) -> tuple[int, ...]:
        return tuple(self.union_ranks.index(g) for g in self.new_ranks)

    def role(self, global_rank: int) -> str:
        """``"stays"``, ``"leaves"``, ``"joins"`` or ``"idle"`` (in neither set)."""
        if global_rank in self.old_ranks:
            return "stays" if global_rank in self.new_ranks else "leaves"
        return "joins" if global_rank in self.new_ranks else "idle"
