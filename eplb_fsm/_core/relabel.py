"""Placement-aware relabeling: the same plan, put where the old experts already are.

Why this exists: a planner decides *what* each rank holds, but nothing in the
load figures depends on *which* physical rank holds it. Ranks are
interchangeable (within a node, for a hierarchical plan; anywhere, for a
global one), and so are whole nodes of a hierarchical plan (its nodes are
symmetric: each holds whole expert groups and the same number of ranks). A
planner that ignores the old placement picks an arbitrary labeling, and
almost every slot then receives new weights. Choosing the labeling that
keeps the most experts where they are is an assignment problem, which
`scipy.optimize.linear_sum_assignment` solves exactly.

Two steps, per layer:

1. Rank matching. ``overlap[a, b]`` counts the experts (as a multiset: two
   replicas of one expert on a rank count twice) that planned rank ``a``
   shares with old rank ``b``. Global plans (``num_nodes=1``): one assignment
   over all ranks, exact. Hierarchical plans: a node may only map to a whole
   node; an assignment over nodes by the experts they share picks the node
   matching, then one assignment per matched node pair picks the ranks. The
   node step optimises an upper bound, so it is checked against keeping the
   nodes in place (ranks still matched within each) and the better is kept:
   either way no result keeps fewer experts than the plan as given.
2. Slot placement within a rank: an expert the rank already holds stays in
   the slot it had; the others fill the freed slots in plan order.

Nothing else changes: each rank keeps the multiset of experts the planner gave
it, so replica counts, per-rank loads and balancedness are the planner's
(per-rank sums can differ in the last bit, as a rank's slots are summed in
another order). Only the moves shrink.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

__all__ = ["rank_overlap", "relabel"]

I64 = npt.NDArray[np.int64]


def _occurrence_keys(p2l: I64, num_ranks: int, num_ids: int, with_rank: bool) -> I64:
    """Key ``(layer, [rank,] expert, k)`` per slot, where ``k`` counts earlier slots
    of the same rank holding the same expert.

    Equal keys on two ranks pair their replicas one to one, which turns a
    multiset intersection into counting equal keys. `num_ids` bounds the
    expert ids plus one (``-1``, an empty slot, is keyed like an expert).
    """
    num_layers, num_physical = p2l.shape
    slots_per_rank = num_physical // num_ranks
    ids = p2l + 1
    group = (np.arange(num_layers)[:, None] * num_ranks
             + np.arange(num_physical)[None, :] // slots_per_rank)
    rank_key = (group * num_ids + ids).ravel()
    order = np.argsort(rank_key, kind="stable")
    sorted_key = rank_key[order]
    run_start = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    run_len = np.diff(np.r_[run_start, sorted_key.size])
    k = np.empty(sorted_key.size, dtype=np.int64)
    k[order] = np.arange(sorted_key.size) - np.repeat(run_start, run_len)
    if with_rank:
        return rank_key * slots_per_rank + k
    layer_expert = (np.arange(num_layers)[:, None] * num_ids + ids).ravel()
    return layer_expert * slots_per_rank + k


def _num_ids(*maps: I64) -> int:
    return int(max(m.max(initial=-1) for m in maps)) + 2


def rank_overlap(new: I64, old: I64, num_ranks: int) -> I64:
    """[L, R, R] multiset intersection sizes: ``[l, a, b]`` = experts that planned
    rank ``a`` of layer ``l`` shares with old rank ``b``."""
    num_layers, num_physical = new.shape
    slots_per_rank = num_physical // num_ranks
    num_ids = _num_ids(new, old)
    key_new = _occurrence_keys(new, num_ranks, num_ids, with_rank=False)
    key_old = _occurrence_keys(old, num_ranks, num_ids, with_rank=False)
    rank = np.broadcast_to(np.arange(num_physical) // slots_per_rank, new.shape).ravel()
    layer = np.repeat(np.arange(num_layers), num_physical)
    order = np.argsort(key_old, kind="stable")
    sorted_old = key_old[order]
    lo = np.searchsorted(sorted_old, key_new, side="left")
    count = np.searchsorted(sorted_old, key_new, side="right") - lo
    # Every (planned slot, old slot) pair with equal key is one shared replica.
    new_slot = np.repeat(np.arange(key_new.size), count)
    offset = np.arange(new_slot.size) - np.repeat(np.cumsum(count) - count, count)
    old_slot = order[np.repeat(lo, count) + offset]
    flat = (layer[new_slot] * num_ranks + rank[new_slot]) * num_ranks + rank[old_slot]
    counts = np.bincount(flat, minlength=num_layers * num_ranks * num_ranks)
    return counts.reshape(num_layers, num_ranks, num_ranks).astype(np.int64)


def _match_ranks(new: I64, old: I64, num_ranks: int, num_nodes: int) -> I64:
    """[L, R] planned rank -> physical rank keeping the most experts (module doc)."""
    overlap = rank_overlap(new, old, num_ranks)
    num_layers = overlap.shape[0]
    per_node = num_ranks // num_nodes
    target = np.empty((num_layers, num_ranks), dtype=np.int64)
    if num_nodes == 1 or per_node == 1:
        # One node, or one rank per node (node matching is rank matching then).
        for layer in range(num_layers):
            rows, cols = linear_sum_assignment(overlap[layer], maximize=True)
            target[layer, rows] = cols
        return target
    # Node matching. The exact value of a node pair is the best rank matching
    # inside the block, but N^2 small assignments per layer cost ~20 ms at
    # DeepSeek-V3's shape. Their upper bound -- the experts two nodes share,
    # as if ranks inside a node were free -- picks the node matching instead
    # (within 0.1% of the exact choice on the benchmark loads); the identity
    # node matching is scored too, and the better of the two is kept.
    node_overlap = rank_overlap(new, old, num_nodes)
    blocks = overlap.reshape(num_layers, num_nodes, per_node, num_nodes, per_node)
    identity = np.arange(num_nodes)
    local = np.arange(per_node)
    for layer in range(num_layers):
        _, node_cols = linear_sum_assignment(node_overlap[layer], maximize=True)
        best_value = -1
        for nodes in (node_cols, identity):
            value, ranks = 0, np.empty(num_ranks, dtype=np.int64)
            for a in range(num_nodes):
                b = int(nodes[a])
                block = blocks[layer, a, :, b, :]
                _, cols = linear_sum_assignment(block, maximize=True)
                value += int(block[local, cols].sum())
                ranks[a * per_node + local] = b * per_node + cols
            if value > best_value:
                best_value, target[layer] = value, ranks
            if np.array_equal(node_cols, identity):
                break
    return target


def relabel(new: I64, old: I64, num_ranks: int, num_nodes: int = 1) -> I64:
    """Permute the ranks of plan `new` (and nodes, if ``num_nodes > 1``) and the
    slots within each rank to keep as many experts of `old` in place as possible.

    `new` and `old` are [L, P] `physical_to_logical` maps of one shape; the
    result holds, on every rank, the same multiset of experts as some planned
    rank of the same node structure, so every load figure is unchanged.
    """
    new = np.asarray(new, dtype=np.int64)
    old = np.asarray(old, dtype=np.int64)
    num_layers, num_physical = new.shape
    slots_per_rank = num_physical // num_ranks
    target = _match_ranks(new, old, num_ranks, num_nodes)
    # Rank contents moved to their physical ranks.
    source = np.empty_like(target)
    np.put_along_axis(source, target, np.broadcast_to(np.arange(num_ranks), target.shape), 1)
    slot_src = (source[:, :, None] * slots_per_rank + np.arange(slots_per_rank)).reshape(
        num_layers, num_physical
    )
    moved = np.take_along_axis(new, slot_src, axis=1)
    # Within each rank, an item whose (rank, expert, occurrence) key the old map
    # has goes to that old slot; the rest fill the remaining slots in order.
    # Both filters keep (layer, rank) order and leave equal counts per rank.
    num_ids = _num_ids(moved, old)
    key_moved = _occurrence_keys(moved, num_ranks, num_ids, with_rank=True)
    key_old = _occurrence_keys(old, num_ranks, num_ids, with_rank=True)
    order = np.argsort(key_old, kind="stable")
    pos = np.minimum(np.searchsorted(key_old[order], key_moved), key_old.size - 1)
    old_slot = order[pos]
    hit = key_old[old_slot] == key_moved
    out = np.empty(num_layers * num_physical, dtype=np.int64)
    flat_moved = moved.ravel()
    out[old_slot[hit]] = flat_moved[hit]
    free = np.ones(out.size, dtype=bool)
    free[old_slot[hit]] = False
    out[free] = flat_moved[~hit]
    return out.reshape(num_layers, num_physical)
