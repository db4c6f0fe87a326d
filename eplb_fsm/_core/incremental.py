"""Incremental planning: few moves that bring balance close to a fresh plan's.

Why: a plan made from scratch after a small drift in load changes almost
every slot, and every changed slot is an expert's weights (tens to hundreds
of MB) crossing the network. Most of that buys nothing: the old placement is
usually a few well-chosen moves away from a balance close to the fresh one.

1. Search. Each layer gets a ceiling ``tau = mean / aim`` on its per-rank
   load and works down the excess ``sum_r max(0, load_r - tau)`` from the
   old placement, round by round, all layers at once. A round does one of:
   - a split, first of all: while an expert's per-replica load is above a
     cap (a margin over the fresh plan's largest), no swap can pack it, so
     it gets one more replica in place of the cheapest spare one;
   - swaps: the heaviest ranks each trade one expert with one of the
     lightest, paired to remove the most excess in total (an assignment
     problem); the pairs share no rank, so their effects simply add up;
     2 slots per swap, replica counts unchanged;
   - a replication: an expert of an overloaded rank gains a replica by
     overwriting a spare replica of another expert (or an empty slot); 1
     slot, and every rank holding the expert gets lighter at once -- this is
     how replica counts follow a drifting load.
   Swaps or replication, whichever removes more excess per slot written.
   Every move yields a recorded state: its slots changed against the old
   placement and the layer's balancedness.
2. Choice. Each layer has a menu of states (0, 1, 2, ... moves, and the fresh
   plan relabeled onto the old placement as the last resort). The menus are
   reduced to their upper concave hulls, whose segments are taken in order of
   balancedness gained per slot, across layers, until the mean balancedness
   reaches the bar (set by the policy, ``policies.py``: the fresh plan's
   balancedness minus the tolerance). The fresh plan everywhere always
   reaches it.

Every changed slot counts as one expert's bytes, so "gain per byte" and "gain
per slot" order moves alike (a local copy, when the rank already held the
expert, is counted too: an upper bound on the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from .balance import balancedness_per_layer, rank_load_from_physical
from .refine import slot_weights

__all__ = ["Trace", "choose_states", "incremental_search", "layer_balancedness", "replay"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

#: Experts considered for an extra replica, and donors of one, per layer and round.
RECIPIENTS, DONORS = 4, 8
#: Heaviest and lightest ranks matched for swaps per layer and round.
HEAVY, LIGHT = 8, 8


def layer_balancedness(load: F64, ids: I64, num_ranks: int) -> F64:
    """[L] mean/max of per-rank load (1.0 for an idle layer), computed by
    `balance.py` itself (so guarantees checked here hold there, to the bit)."""
    sw, _ = slot_weights(load, ids)
    return balancedness_per_layer(rank_load_from_physical(sw, num_ranks))


def _excess(rank_load: F64, tau: F64) -> F64:
    return np.maximum(rank_load - tau, 0.0)


def _pair_swaps(
    sw3: F64, rank_load: F64, tau: F64, heavy_count: int, light_count: int
) -> tuple[I64, I64, I64, F64, F64, F64]:
    """Disjoint swaps between the heaviest and the lightest ranks, matched to
    remove the most excess in total (an assignment problem per layer).

    Returns ``(heavy, slot_a, slot_b, gain, new_heavy, new_light)``, each [n, H]:
    the heavy rank, flat slots, excess removed (0: no swap) and the new loads.
    """
    n, _, per_rank = sw3.shape
    rows = np.arange(n)[:, None]
    order = np.argsort(rank_load, axis=1, kind="stable")
    heavy, light = order[:, ::-1][:, :heavy_count], order[:, :light_count]
    lh, ll = rank_load[rows, heavy], rank_load[rows, light]  # [n, H], [n, K]
    # A swap moving d = x - y from heavy to light removes excess
    #   e_h - max(0, |d - m| - w),  m = (lh - ll) / 2,  w = tau - (lh + ll) / 2
    # (when the light rank is not overloaded): the best swap of a pair is the
    # one closest to the even split m, found as min |2x - 2y - (lh - ll)|.
    gap = lh[:, :, None] - ll[:, None, :]  # [n, H, K]
    hx = 2.0 * sw3[rows, heavy][:, :, None, :, None] - gap[:, :, :, None, None]
    miss = hx - 2.0 * sw3[rows, light][:, None, :, None, :]  # [n, H, K, S, S]
    np.abs(miss, out=miss)
    best = miss.reshape(n, heavy_count, light_count, -1).argmin(axis=3)  # [n, H, K]
    i, j = np.divmod(best, per_rank)
    r3 = rows[:, :, None]
    moved = sw3[r3, heavy[:, :, None], i] - sw3[r3, light[:, None, :], j]
    t = tau[:, None, None]
    pair_score = (_excess(lh, tau[:, None])[:, :, None] + _excess(ll, tau[:, None])[:, None, :]
                  - _excess(lh[:, :, None] - moved, t) - _excess(ll[:, None, :] + moved, t))
    match = np.full((n, heavy_count), -1, dtype=np.int64)
    for layer in np.flatnonzero((pair_score > 0).any(axis=(1, 2))):
        h, k = linear_sum_assignment(np.maximum(pair_score[layer], 0.0), maximize=True)
        match[layer, h] = k
    k = np.maximum(match, 0)
    hh = np.arange(heavy_count)[None, :]
    g = np.where(match >= 0, np.maximum(pair_score[rows, hh, k], 0.0), 0.0)
    ii, jj, mv = i[rows, hh, k], j[rows, hh, k], moved[rows, hh, k]
    lr = np.take_along_axis(light, k, axis=1)
    return heavy, heavy * per_rank + ii, lr * per_rank + jj, g, lh - mv, rank_load[rows, lr] + mv


def _split(load: F64, ids3: I64, counts: I64, rank_load: F64, cap: F64) -> tuple[B, I64, I64]:
    """Give the expert with the largest per-replica load one more replica, where
    that load is above `cap` (what a fresh plan reaches): no swap can pack a
    replica that outweighs a rank's share, so this must come first.

    The replica replaces the donor replica (of the expert whose per-replica
    load after losing one is least, and stays within `cap`) on the lightest
    rank holding one. Returns ``(split, slot, x)`` per layer.
    """
    n = ids3.shape[0]
    width = load.shape[1]
    empty = width - 1
    ar = np.arange(n)
    present = counts >= 1
    per_replica = np.where(present, load / np.maximum(counts, 1), -np.inf)
    per_replica[:, empty] = -np.inf
    x = per_replica.argmax(axis=1)
    after = np.where((counts >= 2) | (np.arange(width) == empty),
                     load / np.maximum(counts - 1, 1), np.inf)
    after[~present] = np.inf
    after[ar, x] = np.inf
    after[after > cap[:, None]] = np.inf
    y = after.argmin(axis=1)
    split = (per_replica[ar, x] > cap) & np.isfinite(after[ar, y])
    where = np.where(ids3 == y[:, None, None], rank_load[:, :, None], np.inf).reshape(n, -1)
    return split, where.argmin(axis=1), x


def _count_on_ranks(ids3: I64, experts: I64) -> I64:
    """[n, C, R]: how many slots of each rank hold each of `experts` [n, C].
    A loop over the few slots of a rank beats one [n, C, R, S] comparison."""
    out = (ids3[:, None, :, 0] == experts[:, :, None]).astype(np.int64)
    for slot in range(1, ids3.shape[2]):
        out += ids3[:, None, :, slot] == experts[:, :, None]
    return out


def _replication(
    load: F64, ids3: I64, counts: I64, rank_load: F64, tau: F64, cap: F64
) -> tuple[I64, I64, F64]:
    """Best "one more replica of x in place of a spare replica of y" per layer.

    Returns ``(slot, x, gain)``; gain is the excess removed (0 where none).
    """
    n, num_ranks, per_rank = ids3.shape
    width = load.shape[1]
    empty = width - 1  # id of an empty slot (zero load)
    ar = np.arange(n)
    exc = _excess(rank_load, tau[:, None])
    # Recipients: experts whose extra replica would relieve overloaded ranks most.
    cnt = np.maximum(counts, 1).astype(np.float64)
    drop = load / cnt - load / (cnt + 1.0)  # per replica, per expert
    slot_relief = np.minimum(np.repeat(exc, per_rank, axis=1),
                             np.take_along_axis(drop, ids3.reshape(n, -1), axis=1))
    key = ids3.reshape(n, -1) + width * ar[:, None]
    relief = np.bincount(key.ravel(), slot_relief.ravel(), n * width).reshape(n, width)
    relief[:, empty] = 0.0
    nx_ = min(RECIPIENTS, width)
    x = np.argpartition(-relief, nx_ - 1, axis=1)[:, :nx_]  # [n, X]
    ok_x = np.take_along_axis(relief, x, axis=1) > 0
    # Donors: spare replicas (or empty slots) whose loss hurts least.
    spare = ((counts >= 2) | (np.arange(width) == empty)) & (counts >= 1)
    after = np.where(spare, load / np.maximum(counts - 1, 1), np.inf)
    after[after > cap[:, None]] = np.inf  # a donor must stay within the cap
    ny_ = min(DONORS, width)
    y = np.argpartition(after, ny_ - 1, axis=1)[:, :ny_]  # [n, D]
    ok_y = np.isfinite(np.take_along_axis(after, y, axis=1))
    lx = np.take_along_axis(load, x, axis=1)
    cx = np.take_along_axis(cnt, x, axis=1)
    ly = np.take_along_axis(load, y, axis=1)
    cy = np.take_along_axis(cnt, y, axis=1)
    wy_after = np.where(y == empty, 0.0, ly / np.maximum(cy - 1.0, 1.0))
    nx = _count_on_ranks(ids3, x)  # [n, X, R]
    ny = _count_on_ranks(ids3, y)  # [n, D, R]
    # Excess after the move, as sum over ranks of max(0, load - tau): [n, X, D, R]
    # for x, donor y and the rank r whose y slot becomes x. float32: this is
    # the largest array of the search, and choosing needs no more precision.
    f32 = np.float32
    over_x = ((rank_load - tau[:, None])[:, None, :]
              - nx * (lx / cx - lx / (cx + 1.0))[..., None]).astype(f32)  # [n, X, R]
    grow_y = (ny * (wy_after - ly / cy)[..., None]).astype(f32)  # [n, D, R]
    base = over_x[:, :, None, :] + grow_y[:, None, :, :]
    # The overwritten slot's rank trades one y (at its new load) for one x.
    swap_in = ((lx / (cx + 1.0))[:, :, None] - wy_after[:, None, :]).astype(f32)
    total = base + swap_in[..., None]
    np.maximum(total, 0.0, out=total)
    np.maximum(base, 0.0, out=base)
    total -= base
    total += base.sum(axis=3, keepdims=True)
    # Impossible moves: no y slot on the rank, no such x or y, or x == y.
    total += np.where((ny == 0) | ~ok_y[..., None], np.inf, 0.0).astype(f32)[:, None]
    total += np.where(~ok_x[:, :, None] | (x[:, :, None] == y[:, None, :]), np.inf,
                      0.0).astype(f32)[..., None]
    flat = total.reshape(n, -1)
    best = flat.argmin(axis=1)
    # Gains within float32 rounding of the sums are noise, not moves.
    now = np.maximum(rank_load - tau[:, None], 0.0).astype(f32).sum(axis=1)
    gain = (now - flat[ar, best]).astype(np.float64)
    gain[gain <= 1e-5 * tau] = 0.0
    xi, rest = np.divmod(best, ny_ * num_ranks)
    di, r = np.divmod(rest, num_ranks)
    donor = y[ar, di]
    slot = r * per_rank + (ids3[ar, r] == donor[:, None]).argmax(axis=1)
    return slot, x[ar, xi], gain


@dataclass
class Trace:
    """What the search did. State ``k`` of layer ``l`` is the old placement
    plus every write of layer ``l`` with ``step <= k``; ``cost``/``value``
    [L, K] are its slots changed and balancedness (rows padded with their
    last state)."""

    cost: F64
    value: F64
    write_layer: I64
    write_step: I64
    write_slot: I64
    write_expert: I64


def incremental_search(
    load: F64, old: I64, num_ranks: int, aim: F64, cap: F64, rounds: int
) -> Trace:
    """Step 1 of the module doc. `old` holds ids in ``[0, E]`` (``E`` = empty
    slot), `load` is [L, E + 1]; layer ``l`` stops once its balancedness
    reaches ``aim[l]``, when no move helps, or after `rounds` rounds. No
    expert keeps a per-replica load above ``cap[l]`` (replicas come first)."""
    num_layers, num_physical = old.shape
    per_rank = num_physical // num_ranks
    ids = old.copy()
    sw, counts = slot_weights(load, ids)
    bal = layer_balancedness(load, ids, num_ranks)
    tau_all = load.sum(axis=1) / num_ranks / np.maximum(aim, 1e-12)
    steps = np.zeros(num_layers, dtype=np.int64)
    changed = np.zeros(num_layers, dtype=np.int64)
    rec: list[tuple[I64, I64, F64, F64]] = [  # (layer, step, cost, value)
        (np.arange(num_layers), steps.copy(), changed.astype(np.float64), bal.copy())]
    writes: list[tuple[I64, I64, I64, I64]] = []
    active = np.flatnonzero((bal < aim) & (num_ranks > 1))
    heavy_count = min(HEAVY, num_ranks // 2)
    light_count = min(LIGHT, num_ranks - heavy_count)
    for _ in range(rounds):
        if active.size == 0:
            break
        n = active.size
        ids3 = ids[active].reshape(n, num_ranks, per_rank)
        sw3 = sw[active].reshape(n, num_ranks, per_rank)
        rank_load = sw3.sum(axis=2)
        tau = tau_all[active]
        mean = rank_load.mean(axis=1)
        split, sslot, sx = _split(load[active], ids3, counts[active], rank_load, cap[active])
        heavy, a, b, pgain, new_h, new_l = _pair_swaps(
            sw3, rank_load, tau, heavy_count, light_count)
        rslot, rexpert, rgain = _replication(load[active], ids3, counts[active], rank_load, tau,
                                             cap[active])
        best_pair = pgain.max(axis=1)
        use_rep = split | ((rgain > 0) & (rgain >= best_pair / 2.0))
        use_swap = ~use_rep & (best_pair > 0)
        rslot, rexpert = np.where(split, sslot, rslot), np.where(split, sx, rexpert)

        # Replication rounds: one write, one state.
        lr = active[use_rep]
        if lr.size:
            old_ok = ids[lr, rslot[use_rep]] == old[lr, rslot[use_rep]]
            new_ok = rexpert[use_rep] == old[lr, rslot[use_rep]]
            changed[lr] += old_ok.astype(np.int64) - new_ok.astype(np.int64)
            ids[lr, rslot[use_rep]] = rexpert[use_rep]
            steps[lr] += 1
            writes.append((lr, steps[lr].copy(), rslot[use_rep], rexpert[use_rep]))
            rec.append((lr, steps[lr].copy(), changed[lr].astype(np.float64),
                        layer_balancedness(load[lr], ids[lr], num_ranks)))

        # Swap rounds: the pairs' swaps one state each, most excess removed first,
        # so a prefix of them is a valid state with an exact balancedness.
        if use_swap.any():
            sel = np.flatnonzero(use_swap)
            g = pgain[sel]
            order = np.argsort(-g, axis=1, kind="stable")
            rows = np.arange(sel.size)[:, None]
            g, a_s, b_s = g[rows, order], a[sel][rows, order], b[sel][rows, order]
            nh, nl = new_h[sel][rows, order], new_l[sel][rows, order]
            ok = g > 0
            layer = active[sel]
            lrow = layer[:, None]
            ea, eb = ids[lrow, a_s], ids[lrow, b_s]
            oa, ob = old[lrow, a_s], old[lrow, b_s]
            delta = ((ea == oa).astype(np.int64) - (eb == oa) + (eb == ob) - (ea == ob)) * ok
            # Max rank load after the first j swaps: swapped pairs at their new
            # loads, the rest (and ranks in no pair) as before.
            rl = rank_load[sel]
            hr = heavy[sel][rows, order]
            lo_r = np.where(ok, b_s // per_rank, hr)  # a heavy rank left alone pairs itself
            untouched = rl.copy()
            untouched[rows, hr] = -np.inf
            untouched[rows, lo_r] = -np.inf
            pair_old = np.maximum(rl[rows, hr], rl[rows, lo_r])
            pair_new = np.maximum(nh, nl)
            done_max = np.maximum.accumulate(np.where(ok, pair_new, pair_old), axis=1)
            rest_max = np.maximum.accumulate(pair_old[:, ::-1], axis=1)[:, ::-1]
            rest_max = np.concatenate([rest_max[:, 1:], np.full((sel.size, 1), -np.inf)], 1)
            peak = np.maximum(np.maximum(done_max, rest_max), untouched.max(axis=1)[:, None])
            value = mean[sel][:, None] / peak
            step = steps[layer][:, None] + np.cumsum(ok, axis=1)
            cost = changed[layer][:, None] + np.cumsum(delta, axis=1)
            li, ki = np.nonzero(ok)
            rec.append((layer[li], step[li, ki], cost[li, ki].astype(np.float64),
                        value[li, ki]))
            writes.append((layer[li], step[li, ki], a_s[li, ki], eb[li, ki]))
            writes.append((layer[li], step[li, ki], b_s[li, ki], ea[li, ki]))
            ids[layer[li], a_s[li, ki]] = eb[li, ki]
            ids[layer[li], b_s[li, ki]] = ea[li, ki]
            steps[layer] += ok.sum(axis=1)
            changed[layer] = cost[:, -1]

        # A layer without a useful move is done: nothing changed, so the next
        # round would find the same nothing.
        moved = active[use_rep | use_swap]
        if moved.size:
            sw[moved], counts[moved] = slot_weights(load[moved], ids[moved])
            bal[moved] = layer_balancedness(load[moved], ids[moved], num_ranks)
        active = moved[bal[moved] < aim[moved]]

    return _trace(rec, writes, num_layers)


def _trace(rec: list[tuple[I64, I64, F64, F64]], writes: list[tuple[I64, I64, I64, I64]],
           num_layers: int) -> Trace:
    layer = np.concatenate([r[0] for r in rec])
    step = np.concatenate([r[1] for r in rec])
    width = int(step.max()) + 1
    cost = np.full((num_layers, width), np.nan)
    value = np.full((num_layers, width), np.nan)
    cost[layer, step] = np.concatenate([r[2] for r in rec])
    value[layer, step] = np.concatenate([r[3] for r in rec])
    # Pad each row with its last state (a layer that stopped early stays put).
    for arr in (cost, value):
        idx = np.where(np.isnan(arr), 0, np.arange(width))
        np.maximum.accumulate(idx, axis=1, out=idx)
        arr[:] = np.take_along_axis(arr, idx, axis=1)
    empty = np.zeros(0, dtype=np.int64)
    cat = (lambda k: np.concatenate([w[k] for w in writes]) if writes else empty)  # noqa: E731
    return Trace(cost, value, cat(0), cat(1), cat(2), cat(3))


def replay(old: I64, trace: Trace, chosen: I64) -> I64:
    """The placement of state ``chosen[l]`` for each layer (module doc of `Trace`)."""
    out = old.copy()
    keep = trace.write_step <= chosen[trace.write_layer]
    # Writes are in time order; for a slot written twice the later one wins
    # (numpy's fancy assignment does not promise that, so drop earlier ones).
    layer, slot = trace.write_layer[keep], trace.write_slot[keep]
    expert = trace.write_expert[keep]
    flat = layer * old.shape[1] + slot
    _, last = np.unique(flat[::-1], return_index=True)
    last = flat.size - 1 - last
    out.reshape(-1)[flat[last]] = expert[last]
    return out


def choose_states(cost: F64, value: F64, need: float) -> I64:
    """Step 2 of the module doc: one state per layer, raising the summed
    `value` by at least `need` over state 0, at a low summed `cost`.

    `cost` and `value` are [L, K] with state 0 at cost 0. Returns [L] state
    indices (all 0 when `need` <= 0).
    """
    num_layers, num_states = cost.shape
    chosen = np.zeros(num_layers, dtype=np.int64)
    if need <= 0:
        return chosen
    # Upper concave hull of each layer's points from state 0 by gift wrapping,
    # all layers at once: each step goes to the steepest point ahead.
    segs: list[tuple[F64, I64, I64, F64, I64]] = []  # slope, layer, state, gain, step
    rows = np.arange(num_layers)
    current = np.zeros(num_layers, dtype=np.int64)
    live = np.ones(num_layers, dtype=bool)
    for step in range(num_states):
        dc = cost - cost[rows, current][:, None]
        dv = value - value[rows, current][:, None]
        slope = np.where((dc > 0) & (dv > 0), dv / np.where(dc > 0, dc, 1.0), -np.inf)
        steep = slope.max(axis=1)
        live &= np.isfinite(steep)
        if not live.any():
            break
        # On equal slopes go to the farthest point: one segment, not two, so
        # slopes fall strictly along a hull.
        ties = (slope == steep[:, None]) & live[:, None]
        nxt = np.where(ties, dc, -np.inf).argmax(axis=1)
        segs.append((steep[live], rows[live], nxt[live], dv[rows, nxt][live],
                     np.full(int(live.sum()), step)))
        current = np.where(live, nxt, current)
    if not segs:
        return chosen
    slope, layer, state, gain, step_of = (np.concatenate([s[k] for s in segs]) for k in range(5))
    # Steepest first; a stable sort keeps each layer's hull order, so what is
    # taken of a layer is always a prefix of its hull.
    order = np.argsort(-slope, kind="stable")
    reached = np.cumsum(gain[order])
    take = order[: int(np.searchsorted(reached, need, side="left")) + 1]
    last = take[np.lexsort((step_of[take], layer[take]))]
    final = np.r_[layer[last][1:] != layer[last][:-1], True]
    chosen[layer[last][final]] = state[last][final]
    return chosen
