"""Swap search on a placement, vectorised across layers (the "refined" policy).

Why: DeepSeek's packing is greedy (heaviest item to the lightest rank with
room) and stops there; on skewed loads it leaves the heaviest rank 0.1-2.5%
above the mean, so balancedness ends at 0.976-0.999 where 1.0 is reachable.
Exchanging one expert of a heavy rank with a lighter one of another rank
keeps every rank's slot count and every replica count, and fixes most of it.

A swap of per-replica loads ``x`` (heavy rank ``h``) and ``y`` (rank ``r``)
moves ``d = x - y`` from ``h`` to ``r``. It is accepted only when
``0 < d < load[h] - load[r]``: both ranks then end strictly below ``load[h]``,
so a layer's maximum never rises and the sum of squared rank loads strictly
falls (the search cannot cycle).

Two phases, both doing one numpy step per round for all layers at once:

1. pairs: rank the ranks by load, pair the k-th heaviest with the k-th
   lightest and swap within every pair at once (R/2 swaps per round);
2. heaviest: swap the heaviest rank with the partner (among all ranks) and
   items that bring the pair's larger load lowest, until the layer is
   within `STOP` of its mean or no swap helps.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["PAIR_ROUNDS", "STOP", "refine_swaps", "slot_weights"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Phase 2 leaves a layer alone once its heaviest rank is within this fraction
#: of the mean (balancedness >= 1 / (1 + STOP)): further swaps gain < 0.05%.
STOP = 5e-4
#: Phase 1 rounds; after a few, pairs are within one item's granularity.
PAIR_ROUNDS = 8


def slot_weights(load: F64, ids: I64) -> tuple[F64, I64]:
    """Per-slot load (expert load split evenly over its replicas) and replica counts.

    `ids` are expert ids in ``[0, E]`` where ``E`` (one past the last expert)
    marks an empty slot; `load` is [L, E + 1] with a zero last column.
    """
    num_layers, width = load.shape
    key = ids + width * np.arange(num_layers)[:, None]
    counts = np.bincount(key.ravel(), minlength=num_layers * width).reshape(num_layers, width)
    per_replica = load / np.maximum(counts, 1)
    return np.take_along_axis(per_replica, ids, axis=1), counts


def _swap(sw: F64, ids: I64, layer: I64, a: I64, b: I64) -> None:
    ids[layer, a], ids[layer, b] = ids[layer, b], ids[layer, a]
    sw[layer, a], sw[layer, b] = sw[layer, b], sw[layer, a]


def _pair_round(sw: F64, ids: I64, num_ranks: int) -> bool:
    """One phase-1 round in place; False when no pair found a swap."""
    num_layers, num_physical = sw.shape
    per_rank = num_physical // num_ranks
    half = num_ranks // 2
    rows = np.arange(num_layers)[:, None]
    sw3 = sw.reshape(num_layers, num_ranks, per_rank)
    rank_load = sw3.sum(axis=2)
    order = np.argsort(rank_load, axis=1, kind="stable")
    light, heavy = order[:, :half], order[:, ::-1][:, :half]
    gap = rank_load[rows, heavy] - rank_load[rows, light]
    # |2d - gap| < gap  <=>  0 < d < gap; smallest |2d - gap| is the most even pair.
    hi2 = 2.0 * sw3[rows, heavy]
    lo2 = 2.0 * sw3[rows, light] + gap[..., None]
    miss = np.abs(hi2[..., :, None] - lo2[..., None, :]).reshape(num_layers, half, -1)
    best = miss.argmin(axis=2)
    good = np.take_along_axis(miss, best[..., None], axis=2)[..., 0] < gap
    layer, pair = np.nonzero(good)
    if layer.size == 0:
        return False
    pick = best[layer, pair]
    a = heavy[layer, pair] * per_rank + pick // per_rank
    b = light[layer, pair] * per_rank + pick % per_rank
    _swap(sw, ids, layer, a, b)
    return True


def best_heaviest_swap(sw3: F64) -> tuple[I64, I64, I64, F64, F64]:
    """Best swap of each layer's heaviest rank with any other rank.

    `sw3` is [n, R, S]. Returns ``(slot_a, slot_b, valid, pair_max, top)``:
    the two slots (flat, within the layer), whether the swap is acceptable
    (module doc), the larger of the two ranks' loads after it, and the
    heaviest rank's load before it.
    """
    n, num_ranks, per_rank = sw3.shape
    ar = np.arange(n)
    rank_load = sw3.sum(axis=2)
    heavy = rank_load.argmax(axis=1)
    top = rank_load[ar, heavy]
    gap = top[:, None] - rank_load
    # The pair's new maximum is top + (|2d - gap| - gap) / 2: minimise
    # |2d - gap| - gap, which is negative exactly when 0 < d < gap.
    hi2 = 2.0 * sw3[ar, heavy]
    lo2 = 2.0 * sw3 + gap[..., None]
    score = hi2[:, :, None, None] - lo2[:, None, :, :]
    np.abs(score, out=score)
    score -= gap[:, None, :, None]
    flat = score.reshape(n, -1)
    best = flat.argmin(axis=1)
    least = flat[ar, best]
    valid = least < 0
    i, rest = np.divmod(best, num_ranks * per_rank)
    r, j = np.divmod(rest, per_rank)
    pair_max = top + np.minimum(least, 0.0) / 2.0
    return heavy * per_rank + i, r * per_rank + j, valid, pair_max, top


def refine_swaps(load: F64, ids: I64, num_ranks: int, rounds: int) -> I64:
    """Improve `ids` ([L, P], empty slots as ``E``) by swaps; returns a new array.

    `load` is [L, E + 1] (zero last column). No layer's heaviest rank gets
    heavier (module doc); `rounds` caps phase 2 (phase 1 runs `PAIR_ROUNDS`).
    """
    ids = ids.copy()
    num_layers, num_physical = ids.shape
    if num_ranks < 2 or rounds < 1:
        return ids
    per_rank = num_physical // num_ranks
    sw, _ = slot_weights(load, ids)
    for _ in range(min(PAIR_ROUNDS, rounds)):
        if not _pair_round(sw, ids, num_ranks):
            break
    limit = load.sum(axis=1) / num_ranks * (1.0 + STOP)
    active = np.arange(num_layers)
    for _ in range(rounds):
        if active.size == 0:
            break
        a, b, valid, _, top = best_heaviest_swap(sw[active].reshape(-1, num_ranks, per_rank))
        keep = valid & (top > limit[active])
        active, a, b = active[keep], a[keep], b[keep]
        _swap(sw, ids, active, a, b)
    return ids
