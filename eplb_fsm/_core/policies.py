"""Policies beyond DeepSeek's: importing this module registers them.

``refined`` (global): DeepSeek's plan improved by swaps (see `refine`). It
    starts, per layer, from the better of ``default``'s plan for the request
    and DeepSeek's global plan, and accepts only swaps that lower no layer's
    balancedness; a final per-layer check keeps the start wherever the swaps
    did not help, so it is never below ``default`` on any input, by
    construction. The result is global: groups and nodes are ignored (swaps
    cross nodes), as for ``global``.
    Options: ``rounds`` (int >= 0, default 48): cap on heaviest-rank swap
    rounds; 0 returns the start unchanged.

``incremental`` (global, needs `old_placement`): few moves from the old
    placement that bring the predicted balancedness within ``tolerance`` of
    a fresh plan's, chosen for balance gained per slot (byte) moved (see
    `incremental`); no move at all when the old placement is close enough.
    Options: ``tolerance`` (float >= 0, default 0.005): allowed shortfall in
    balancedness (mean over layers of mean/max per-rank load) from the fresh
    plan; ``reference`` (policy name, default ``"default"``): the policy whose
    fresh plan sets the bar (run with its default options) and which layers
    fall back to, relabeled onto the old placement; ``max_rounds`` (int >= 0,
    default 64): cap on search rounds (each makes one replica move or one
    batch of swaps per layer); 0 leaves only "old" or "fresh" per layer.

``time`` (global; opt-in): balances modelled layer time instead of tokens,
    from a `CostModel` of a slot's time as a function of its rows; never
    modelled slower than ``default``. Registered by `time_policy`, imported
    at the end of this module; its options are documented there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .incremental import choose_states, incremental_search, layer_balancedness, replay
from .planning import (
    PlanRequest,
    available_policies,
    policy_keeps_nodes,
    policy_needs_old_placement,
    policy_uses_groups,
    register_policy,
    run_policy,
)
from .refine import refine_swaps, slot_weights
from .relabel import relabel

__all__ = ["check_incremental_options", "check_refined_options"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

REFINED_DEFAULTS: dict[str, Any] = {"rounds": 48}
INCREMENTAL_DEFAULTS: dict[str, Any] = {
    "tolerance": 0.005, "reference": "default", "max_rounds": 64,
}
#: Selection aims this far above the bar so that float rounding in summing
#: layers can never leave the result a hair below it.
_MARGIN = 1e-9
#: Incremental layers aim this many tolerances (at least 0.001) above the bar.
AIM_ABOVE = 0.5
#: No expert's per-replica load may stay above the fresh plan's largest one by
#: more than this fraction (measured best of 0.0-1.5 on the benchmark).
CAP_SLACK = 0.5


def _unknown(policy: str, raw: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    extra = sorted(set(raw) - set(known))
    if extra:
        raise ValueError(f"policy_options[{extra[0]!r}] is not an option of policy "
                         f"{policy!r} (known: {', '.join(sorted(known))})")


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"policy_options[{name!r}] must be an int >= 0, got {value!r}")
    return int(value)


def check_refined_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    _unknown("refined", raw, REFINED_DEFAULTS)
    out = {**REFINED_DEFAULTS, **raw}
    out["rounds"] = _count("rounds", out["rounds"])
    return out


def check_incremental_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    _unknown("incremental", raw, INCREMENTAL_DEFAULTS)
    out = {**INCREMENTAL_DEFAULTS, **raw}
    tol = out["tolerance"]
    if (isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating))
            or not np.isfinite(tol) or tol < 0):
        raise ValueError(f"policy_options['tolerance'] must be a finite number >= 0, "
                         f"got {tol!r}")
    out["tolerance"] = float(tol)
    ref = out["reference"]
    if not isinstance(ref, str) or ref not in available_policies():
        raise ValueError(f"policy_options['reference'] must name a registered policy "
                         f"({', '.join(available_policies())}), got {ref!r}")
    if policy_needs_old_placement(ref):
        raise ValueError(f"policy_options['reference'] must be a policy that plans from "
                         f"scratch, got {ref!r} (it needs old_placement)")
    out["max_rounds"] = _count("max_rounds", out["max_rounds"])
    return out


def _extend(req: PlanRequest) -> tuple[F64, int]:
    """Load with a zero column for the empty-slot id ``E``, and ``E``."""
    num_logical = req.num_logical_experts
    return np.concatenate([req.load, np.zeros((req.num_layers, 1))], axis=1), num_logical


def _ids(p2l: npt.ArrayLike, empty: int) -> I64:
    arr = np.asarray(p2l, dtype=np.int64)
    return np.where(arr < 0, empty, arr)


def _refined_policy(req: PlanRequest) -> I64:
    load, empty = _extend(req)
    start = _ids(run_policy("default", req, {}), empty)
    start_bal = layer_balancedness(load, start, req.num_ranks)
    if req.num_nodes > 1 and policy_keeps_nodes("default", req):
        # default was hierarchical; DeepSeek's global plan is often better.
        glob = _ids(run_policy("global", req, {}), empty)
        glob_bal = layer_balancedness(load, glob, req.num_ranks)
        better = glob_bal > start_bal
        start = np.where(better[:, None], glob, start)
        start_bal = np.maximum(glob_bal, start_bal)
    out = refine_swaps(load, start, req.num_ranks, int(req.options["rounds"]))
    # The guarantee, checked: a layer keeps the swaps only if they did not
    # lower its balancedness (same arithmetic as `balance.py`).
    worse = layer_balancedness(load, out, req.num_ranks) < start_bal
    out[worse] = start[worse]
    return np.where(out == empty, -1, out)


def _incremental_policy(req: PlanRequest) -> I64:
    opts = req.options
    assert req.old_placement is not None  # plan() checks needs_old_placement
    load, empty = _extend(req)
    num_layers, num_ranks = req.num_layers, req.num_ranks
    tolerance = float(opts["tolerance"])
    old_p2l = req.old_placement.physical_to_logical
    old = _ids(old_p2l, empty)
    reference = str(opts["reference"])
    fresh_plan = _ids(run_policy(reference, req, {}), empty)
    fresh_bal = layer_balancedness(load, fresh_plan, num_ranks)
    bar = float(fresh_bal.mean()) - tolerance
    # A layer whose old placement lacks an expert (allow_missing) must be replanned.
    _, old_counts = slot_weights(load, old)
    missing = (old_counts[:, :-1] == 0).any(axis=1)
    if not missing.any() and float(layer_balancedness(load, old, num_ranks).mean()) >= bar:
        return np.asarray(old_p2l, dtype=np.int64).copy()  # good enough as it is
    # Layers aim a little above the bar, so that those that stall short of it
    # can be made up for by others rather than by the (costly) fresh plan.
    aim = np.full(num_layers, min(bar + AIM_ABOVE * max(tolerance, 1e-3), 1.0))
    # No expert may keep a per-replica load above the fresh plan's largest one.
    _, fresh_counts = slot_weights(load, fresh_plan)
    cap = (load / np.maximum(fresh_counts, 1))[:, :-1].max(axis=1) * (1.0 + CAP_SLACK)
    trace = incremental_search(load, old, num_ranks, aim, cap, int(opts["max_rounds"]))
    # The fresh plan's moves as planned bound its moves once relabeled (the
    # relabeling never adds any), which is all the choice needs; relabeling
    # costs ~10 ms, so only layers that take the fresh plan pay for it.
    fresh_moves = (fresh_plan != old).sum(axis=1).astype(np.float64)
    cost = np.concatenate([trace.cost, fresh_moves[:, None]], axis=1)
    value = np.concatenate([trace.value, fresh_bal[:, None]], axis=1)
    need = num_layers * (bar + _MARGIN) - float(trace.value[:, 0].sum())
    chosen = choose_states(cost, value, need)
    use_fresh = (chosen == cost.shape[1] - 1) | missing
    out = replay(old, trace, np.where(use_fresh, -1, chosen))
    nodes = req.num_nodes if policy_keeps_nodes(reference, req) else 1

    def fresh_rows(rows: npt.NDArray[np.bool_]) -> I64:
        ids = np.where(fresh_plan[rows] == empty, -1, fresh_plan[rows])
        return _ids(relabel(ids, old_p2l[rows], num_ranks, nodes), empty)

    if use_fresh.any():
        out[use_fresh] = fresh_rows(use_fresh)
    out_bal = layer_balancedness(load, out, num_ranks)
    if out_bal.mean() < bar:  # rounding only; cheap to rule out
        behind = out_bal < fresh_bal
        out[behind] = fresh_rows(behind)
        if layer_balancedness(load, out, num_ranks).mean() < bar:
            out[behind] = fresh_plan[behind]  # same arithmetic as the bar itself
    return np.where(out == empty, -1, out)


def _default_uses_groups(req: PlanRequest) -> bool:
    return policy_uses_groups("default", req)


def _reference_uses_groups(req: PlanRequest) -> bool:
    return policy_uses_groups(str(req.options["reference"]), req)


# refined builds on default (and global); incremental on its reference policy:
# they use groups exactly when those do.
register_policy("refined", _refined_policy, check_options=check_refined_options,
                keeps_nodes=False, uses_groups=_default_uses_groups)
register_policy("incremental", _incremental_policy, check_options=check_incremental_options,
                keeps_nodes=False, needs_old_placement=True, uses_groups=_reference_uses_groups)

from . import time_policy as _time_policy  # noqa: E402, F401  (registers "time")
