"""Elastic expert parallelism, the pure part: rank mappings, plans and union maps.

A deployment of R ranks becomes one of R' ranks. vLLM describes the change
with a *rank mapping*: ``rank_mapping[old_rank]`` is the rank's new rank, or
``-1`` if it leaves; new ranks that no old rank maps to are *joining* ranks.

Why the shapes are what they are:

- **Slots per rank stay constant.** A rank's expert tensors keep their shape
  (``num_local_physical_experts`` slots), so nothing is reallocated on a
  surviving rank and a joining rank allocates exactly what its peers hold.
  The number of physical slots follows the rank count, ``P' = R' * local``,
  and so does the number of redundant slots, ``P' - E`` (which must stay
  ``>= 0``).
- **One rank space for the move.** Moving weights off leaving ranks onto
  joining ones is an ordinary transfer once both placements are written in a
  *union* rank space holding every rank that is in the old or the new set:
  a joining rank holds only empty (``-1``) slots in the old map, a leaving
  rank only empty slots in the new map. The transfer plan already treats an
  empty old slot as "receive" and an empty new slot as "vacated", so the
  weight mover needs nothing new.
- **Keep survivors' experts in place.** The new plan is relabeled against
  the old placement written in the new rank space (survivors' old slots at
  their new rank, joining ranks empty), so surviving ranks keep what they
  hold wherever the plan allows, and bytes move mostly to joining ranks and
  off leaving ones.
- **Nodes follow the ranks.** With several nodes, ranks per node
  (``R / num_nodes``) are kept and the new node count is ``R' / (R /
  num_nodes)``. When that does not divide, a hierarchical plan is impossible
  and the global policy is used instead (the plan says so in
  `ElasticPlan.note`, which the runtime logs as a warning).

Losing experts. A leaving rank that dies before it sent its slots takes them
with it: an expert whose every replica sat on ranks that could not hand off
has no copy left (`lost_experts`). `salvage_maps` writes the transfer that
moves everything that *does* have a surviving copy; the lost experts keep
their slots in the new placement (every expert must be routable) and must be
reloaded by the engine (say, from disk).

Numpy only; no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .arrays import as_id_array, check_count
from .placement import Placement
from .planning import plan, policy_needs_old_placement

__all__ = [
    "ElasticPlan",
    "UnionLayout",
    "check_rank_mapping",
    "default_union_layout",
    "lost_experts",
    "maps_in_union",
    "old_in_new_ranks",
    "plan_elastic",
    "salvage_in_union",
    "salvage_maps",
]

IntArray = npt.NDArray[np.int64]


def check_rank_mapping(rank_mapping: Any, num_new_ranks: int) -> IntArray:
    """Validate ``rank_mapping`` (old rank -> new rank or -1) for `num_new_ranks` ranks.

    Rules, each with its own message: a 1-D sequence of ints, one per old rank;
    each entry -1 (the rank leaves) or a new rank in ``[0, num_new_ranks)``; no
    new rank named twice; at least one old rank stays (it hands the state over
    to joining ranks). New ranks no entry names are the joining ranks, so the
    new ranks are always exactly ``0 .. num_new_ranks - 1``.
    """
    check_count("num_new_ranks", num_new_ranks)
    mapping = as_id_array("rank_mapping", rank_mapping, 1)
    if mapping.size < 1:
        raise ValueError("rank_mapping must name at least one old rank")
    if int(mapping.max()) >= num_new_ranks:
        raise ValueError(f"rank_mapping maps old rank {int(np.argmax(mapping))} to new rank "
                         f"{int(mapping.max())}; new ranks must be in [0, {num_new_ranks}) "
                         f"(num_new_ranks={num_new_ranks})")
    kept = mapping[mapping >= 0]
    if kept.size == 0:
        raise ValueError("rank_mapping sends every old rank away (-1); at least one must stay "
                         "to hand its state over to the new ranks")
    values, counts = np.unique(kept, return_counts=True)
    if np.any(counts > 1):
        twice = int(values[np.argmax(counts > 1)])
        olds = [int(r) for r in np.flatnonzero(mapping == twice)]
        raise ValueError(f"rank_mapping maps old ranks {olds} to the same new rank {twice}; "
                         "each new rank may take at most one old rank")
    return mapping


@dataclass(frozen=True)
class UnionLayout:
    """Where each old and each new rank sits in the union rank space.

    ``old_to_union[r]`` is old rank r's union index, or -1 when its slots are
    not part of the move (it could not hand off); ``new_to_union[n]`` is new
    rank n's union index. A union index may host one old and one new rank (a
    surviving rank), or only one of them (a leaving or a joining rank).
    """

    old_to_union: tuple[int, ...]
    new_to_union: tuple[int, ...]
    num_union: int

    def __post_init__(self) -> None:
        check_count("num_union", self.num_union)
        for name, indices in (("old_to_union", self.old_to_union),
                              ("new_to_union", self.new_to_union)):
            present = [u for u in indices if u != -1]
            if any(not 0 <= u < self.num_union for u in present):
                raise ValueError(f"{name} holds {indices}; each must be -1 or in "
                                 f"[0, num_union={self.num_union})")
            if len(set(present)) != len(present):
                raise ValueError(f"{name} holds {indices}; a union rank may appear once")
        if -1 in self.new_to_union:
            raise ValueError("new_to_union must place every new rank (no -1)")

    @property
    def leaving(self) -> tuple[int, ...]:
        """Union indices that hold an old rank and no new one."""
        new = set(self.new_to_union)
        return tuple(u for u in self.old_to_union if u != -1 and u not in new)

    @property
    def joining(self) -> tuple[int, ...]:
        """Union indices that hold a new rank and no old one."""
        old = set(self.old_to_union)
        return tuple(u for u in self.new_to_union if u not in old)


def default_union_layout(rank_mapping: Any, num_new_ranks: int) -> UnionLayout:
    """Old rank r at union index r; joining ranks after them in new-rank order.

    The runtime builds its layout from the union process group instead (union
    index = rank in that group); this one is for planning without processes.
    """
    mapping = check_rank_mapping(rank_mapping, num_new_ranks)
    new_to_union = [-1] * num_new_ranks
    for old, new in enumerate(mapping.tolist()):
        if new >= 0:
            new_to_union[new] = old
    joined = len(mapping)
    for new in range(num_new_ranks):
        if new_to_union[new] < 0:
            new_to_union[new] = joined
            joined += 1
    return UnionLayout(tuple(range(len(mapping))), tuple(new_to_union), joined)


def _blocks(p2l: IntArray, num_ranks: int, name: str) -> tuple[IntArray, int]:
    if p2l.shape[1] % num_ranks:
        raise ValueError(f"{name} has {p2l.shape[1]} slots per layer, not a multiple of its "
                         f"{num_ranks} ranks")
    local = p2l.shape[1] // num_ranks
    return p2l.reshape(p2l.shape[0], num_ranks, local), local


def maps_in_union(old_physical_to_logical: Any, new_physical_to_logical: Any,
                  layout: UnionLayout) -> tuple[IntArray, IntArray]:
    """Both maps in the union rank space: [L, U * local] each.

    Union slots of a rank absent from one side are -1 on that side; an old
    rank with union index -1 is dropped (its slots are not available).
    """
    old = as_id_array("old_physical_to_logical", old_physical_to_logical, 2)
    new = as_id_array("new_physical_to_logical", new_physical_to_logical, 2)
    if old.shape[0] != new.shape[0]:
        raise ValueError(f"old_physical_to_logical has {old.shape[0]} layers but "
                         f"new_physical_to_logical has {new.shape[0]}")
    old_b, local = _blocks(old, len(layout.old_to_union), "old_physical_to_logical")
    new_b, new_local = _blocks(new, len(layout.new_to_union), "new_physical_to_logical")
    if local != new_local:
        raise ValueError(f"slots per rank must stay constant: {local} in the old map, "
                         f"{new_local} in the new one")
    shape = (old.shape[0], layout.num_union, local)
    old_u = np.full(shape, -1, dtype=np.int64)
    new_u = np.full(shape, -1, dtype=np.int64)
    for rank, union in enumerate(layout.old_to_union):
        if union >= 0:
            old_u[:, union] = old_b[:, rank]
    for rank, union in enumerate(layout.new_to_union):
        new_u[:, union] = new_b[:, rank]
    return old_u.reshape(old.shape[0], -1), new_u.reshape(old.shape[0], -1)


def old_in_new_ranks(old_physical_to_logical: Any, rank_mapping: Any,
                     num_new_ranks: int) -> IntArray:
    """The old map written in the new rank space: [L, R' * local].

    A surviving rank's old slots sit at its new rank; joining ranks are empty;
    leaving ranks' slots are dropped. What the new ranks hold before any move.
    """
    mapping = check_rank_mapping(rank_mapping, num_new_ranks)
    layout = UnionLayout(tuple(int(m) for m in mapping), tuple(range(num_new_ranks)),
                         num_new_ranks)
    old = as_id_array("old_physical_to_logical", old_physical_to_logical, 2)
    _, local = _blocks(old, len(mapping), "old_physical_to_logical")
    filler = np.full((old.shape[0], num_new_ranks * local), -1, dtype=np.int64)
    return maps_in_union(old, filler, layout)[0]


def lost_experts(old_physical_to_logical: Any, dead_ranks: Sequence[int],
                 num_ranks: int) -> dict[int, tuple[int, ...]]:
    """Per layer, the logical experts whose every replica lived on `dead_ranks`.

    Layers with nothing lost are left out, so ``{}`` means nothing was lost.
    An expert with a replica on any live rank is not lost: it can be copied
    from there.
    """
    old = as_id_array("old_physical_to_logical", old_physical_to_logical, 2)
    blocks, _ = _blocks(old, check_count("num_ranks", num_ranks), "old_physical_to_logical")
    dead = sorted({int(r) for r in dead_ranks})
    if any(not 0 <= r < num_ranks for r in dead):
        raise ValueError(f"dead_ranks {dead} must be ranks in [0, {num_ranks})")
    alive = [r for r in range(num_ranks) if r not in dead]
    lost: dict[int, tuple[int, ...]] = {}
    for layer in range(old.shape[0]):
        held = set(blocks[layer, dead].ravel().tolist()) - {-1}
        kept = set(blocks[layer, alive].ravel().tolist())
        gone = tuple(sorted(held - kept))
        if gone:
            lost[layer] = gone
    return lost


def salvage_maps(current_physical_to_logical: Any, new_physical_to_logical: Any,
                 layout: UnionLayout) -> tuple[IntArray, IntArray, dict[int, tuple[int, ...]]]:
    """The transfer that is still possible over the new ranks alone.

    `current_physical_to_logical` [L, U * local] is what the union ranks'
    weights hold now (layers already committed hold the new union map). The
    new ranks keep their own slots; leaving ranks are gone. Returns the old
    and new maps in the new rank space, with every slot of a lost expert
    emptied in the new map (nothing can be sent for it), and the lost experts
    per layer.
    """
    current = as_id_array("current_physical_to_logical", current_physical_to_logical, 2)
    blocks, local = _blocks(current, layout.num_union, "current_physical_to_logical")
    new = as_id_array("new_physical_to_logical", new_physical_to_logical, 2)
    num_new = len(layout.new_to_union)
    if new.shape != (current.shape[0], num_new * local):
        raise ValueError(f"new_physical_to_logical has shape {new.shape}, expected "
                         f"{(current.shape[0], num_new * local)}")
    held = blocks[:, list(layout.new_to_union)].reshape(current.shape[0], -1)
    gone = [u for u in range(layout.num_union) if u not in set(layout.new_to_union)]
    lost = lost_experts(current, gone, layout.num_union)
    # Experts the new ranks never held and nobody else holds either are lost too.
    for layer in range(new.shape[0]):
        missing = set(new[layer].tolist()) - set(held[layer].tolist()) - {-1}
        missing -= set(blocks[layer].ravel().tolist())
        if missing:
            lost[layer] = tuple(sorted(set(lost.get(layer, ())) | missing))
    transfer_new = new.copy()
    for layer, experts in lost.items():
        transfer_new[layer, np.isin(transfer_new[layer], experts)] = -1
    return held, transfer_new, dict(sorted(lost.items()))


def salvage_in_union(current_physical_to_logical: Any, new_physical_to_logical: Any,
                     dead_ranks: Sequence[int], num_union: int,
                     ) -> tuple[IntArray, IntArray, dict[int, tuple[int, ...]]]:
    """The transfer still possible over the union when `dead_ranks` (union ranks)
    could not hand off: from every live copy, on new *and* leaving ranks.

    `current_physical_to_logical` [L, U * local] is what the union's weights hold
    now, `new_physical_to_logical` the new placement in union space. Returns the
    current map with the dead ranks' slots emptied (nothing can be sent from
    them), the new map with every slot of a lost expert emptied, and the lost
    experts per layer: those in the new placement with no live copy anywhere.
    """
    current = as_id_array("current_physical_to_logical", current_physical_to_logical, 2)
    blocks, _ = _blocks(current, check_count("num_union", num_union),
                        "current_physical_to_logical")
    new = as_id_array("new_physical_to_logical", new_physical_to_logical, 2)
    if new.shape != current.shape:
        raise ValueError(f"new_physical_to_logical has shape {new.shape}, expected "
                         f"{current.shape} (both in union space)")
    dead = sorted({int(r) for r in dead_ranks})
    if any(not 0 <= r < num_union for r in dead):
        raise ValueError(f"dead_ranks {dead} must be union ranks in [0, {num_union})")
    held_blocks = blocks.copy()
    held_blocks[:, dead] = -1
    held = held_blocks.reshape(current.shape)
    target = new.copy()
    lost: dict[int, tuple[int, ...]] = {}
    for layer in range(new.shape[0]):
        missing = tuple(sorted(set(new[layer].tolist()) - set(held[layer].tolist()) - {-1}))
        if missing:
            lost[layer] = missing
            target[layer, np.isin(target[layer], missing)] = -1
    return held, target, lost


@dataclass(frozen=True)
class ElasticPlan:
    """The placement for the new rank set and how it was planned."""

    placement: Placement
    num_ranks: int
    num_nodes: int
    policy: str
    note: str | None  # why the configured policy or node count was not used


def plan_elastic(load: Any, old: Placement, rank_mapping: Any, num_new_ranks: int, *,
                 num_groups: int = 1, num_nodes: int = 1, policy: str = "default",
                 minimize_moves: bool = True,
                 policy_options: Any = None) -> ElasticPlan:
    """Plan `old`'s model for `num_new_ranks` ranks from `load` [L, E].

    `num_nodes` is the old deployment's node count: ranks per node are kept
    and the new node count derived (see module docstring). With
    `minimize_moves`, the plan keeps survivors' experts where they are.
    """
    if not isinstance(old, Placement):
        raise ValueError(f"old must be a Placement, got {type(old).__name__}")
    mapping = check_rank_mapping(rank_mapping, num_new_ranks)
    num_old = len(mapping)
    if old.num_physical % num_old:
        raise ValueError(f"old placement has {old.num_physical} slots, not a multiple of the "
                         f"{num_old} old ranks rank_mapping names")
    num_nodes = check_count("num_nodes", num_nodes)
    if num_old % num_nodes:
        raise ValueError(f"num_nodes={num_nodes} must divide the {num_old} old ranks")
    local = old.num_physical // num_old
    physical = num_new_ranks * local
    if physical < old.num_logical:
        raise ValueError(f"{num_new_ranks} ranks x {local} slots per rank = {physical} slots, "
                         f"fewer than the {old.num_logical} logical experts: every expert "
                         "needs a slot, so the deployment cannot shrink that far")
    per_node = num_old // num_nodes
    notes = []
    if num_nodes == 1:
        new_nodes = 1  # one node: no node structure to keep
    else:
        new_nodes = num_new_ranks // per_node if num_new_ranks % per_node == 0 else 0
    options = policy_options
    if new_nodes == 0:
        notes.append(f"{num_new_ranks} ranks do not fill whole nodes of {per_node} ranks; "
                     "planning with the global policy")
        policy, new_nodes, options = "global", 1, None
    if policy_needs_old_placement(policy):
        notes.append(f"policy {policy!r} plans moves within one rank count; planning the new "
                     "rank count with the default policy")
        policy, options = "default", None
    # The old map in the new rank space (joining ranks empty) is what relabeling
    # keeps in place; it lacks the leaving ranks' experts, hence allow_missing.
    keep = Placement(old_in_new_ranks(old.physical_to_logical, mapping, num_new_ranks),
                     old.num_logical, allow_missing=True)
    placement = plan(load, physical, num_groups, new_nodes, num_new_ranks, policy=policy,
                     old_placement=keep, minimize_moves=bool(minimize_moves),
                     policy_options=options)
    return ElasticPlan(placement, num_new_ranks, new_nodes, policy,
                       "; ".join(notes) if notes else None)
