"""Keep experts that stay on a rank in the slots they already occupy.

A planner decides which experts each rank holds; the order of a rank's slots
is free (it changes no load). Given the placement in service, this reorders
each rank's slots of a new plan so that an expert the rank keeps stays in
its old slot (nothing to copy, not even locally), and the experts new to the
rank fill the remaining slots in the order the plan gave them. vLLM does the
same whenever it is handed the old map; unlike full relabeling (`relabel`),
ranks keep the sets the planner gave them.

Rule, per layer and rank, over the rank's slots ``j`` in order: if the old
expert at ``j`` is among the new plan's experts for the rank not yet placed,
it stays at ``j`` (its first such occurrence in the plan is used up); then
the plan's unused experts, in plan order, fill the free slots in order.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["keep_rank_slots"]

I64 = npt.NDArray[np.int64]


def keep_rank_slots(new: npt.ArrayLike, old: npt.ArrayLike, num_ranks: int) -> I64:
    """`new` [L, P] with each rank's slots reordered to keep `old`'s experts in place.

    Rank ``r`` holds slots ``r * P/R .. (r + 1) * P/R - 1``. Same shape and the
    same multiset of experts per rank and layer as `new`; ``-1`` (an empty slot)
    is an expert id like any other here.
    """
    new_arr = np.asarray(new, dtype=np.int64)
    old_arr = np.asarray(old, dtype=np.int64)
    if new_arr.shape != old_arr.shape or new_arr.ndim != 2:
        raise ValueError(f"new and old must be the same [L, P] shape, got {new_arr.shape} "
                         f"and {old_arr.shape}")
    num_physical = new_arr.shape[1]
    if num_ranks < 1 or num_physical % num_ranks:
        raise ValueError(f"num_ranks={num_ranks} must divide the {num_physical} slots")
    per_rank = num_physical // num_ranks
    out = new_arr.copy()
    # Small rows (a rank's slots): plain lists beat numpy calls here.
    for rank in range(num_ranks):
        cols = slice(rank * per_rank, (rank + 1) * per_rank)
        planned, before = new_arr[:, cols], old_arr[:, cols]
        for layer in np.flatnonzero((planned != before).any(axis=1)):
            out[layer, cols] = _keep_row(planned[layer].tolist(), before[layer].tolist())
    return out


def _keep_row(planned: list[int], before: list[int]) -> list[int]:
    unused = planned.copy()  # the plan's experts not placed yet, in plan order
    row: list[int | None] = [None] * len(planned)
    for slot, expert in enumerate(before):
        if expert in unused:
            unused.remove(expert)  # its first occurrence
            row[slot] = expert
    fill = iter(unused)
    return [next(fill) if expert is None else expert for expert in row]
