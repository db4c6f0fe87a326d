"""The ``time`` policy: balance modelled layer time, not tokens.

Why: a layer ends with its slowest rank, and a rank's time is the sum of its
slots' times, where a slot's time is a function of its rows that is far from
proportional (see `cost_model`): flat while the expert's GEMMs are
memory-bound (decode), linear once they are compute-bound (prefill). A plan
balanced perfectly in tokens can leave a rank whose rows sit on few, busy
slots 5% slower than the mean. Because rank time is a *sum over slots* of
the slot's modelled time, balancing time is the same packing problem as
balancing tokens with each slot weighed by its time instead of its rows:
DeepSeek's greedy packing and the `refine` swaps apply unchanged.

How many replicas: DeepSeek's rule (each redundant slot to the expert with
the most rows per replica). For any slot time that grows with rows it also
gives the smallest possible slowest slot, which bounds the layer from below.
Replica counts chosen to lower ``max(slowest slot, total slot time /
ranks)`` instead were tried and never won by more than 0.1% of modelled
time on Zipf loads (roofline and tile-quantised models, EP 32 and 64,
64-4096 tokens per rank), so they are not searched.

Which experts share a rank: per layer, two candidates; the one with the
smaller modelled layer time (slowest rank) wins, ties going to the first:

1. ``default``'s plan for the request, as it is (DeepSeek-exact), so the
   result is never modelled slower than ``default`` on any layer;
2. those replica counts, slots packed onto ranks by modelled time (the
   heaviest slot to the least loaded rank with room), then swaps that lower
   the slowest rank's time (`refine_swaps` on times).

The result is global (groups and nodes ignored), as ``refined``'s is.

Options: ``cost_model`` (a `CostModel`, a path to a file written by
``eplb-fsm calibrate``, or its JSON object; default: the H100 roofline,
`CostModel.roofline`); ``passes`` (number > 0, default 1): how many forward
passes `load` sums, so that ``load / passes`` is rows per slot per pass (the
runtime's load window sums ``window_size`` passes); ``rounds`` (int >= 0,
default 48): cap on swap rounds, as for ``refined``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .cost_model import CostModel
from .deepseek import balanced_packing, replicate_experts
from .planning import PlanRequest, register_policy, run_policy
from .refine import refine_swaps

__all__ = ["TIME_DEFAULTS", "check_time_options", "layer_seconds_of_ids", "pack_by_time"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

TIME_DEFAULTS: dict[str, Any] = {"cost_model": None, "passes": 1.0, "rounds": 48}


def _as_cost_model(value: Any) -> CostModel:
    if value is None:
        return CostModel.roofline()
    if isinstance(value, CostModel):
        return value
    if isinstance(value, (str, Path)):
        return CostModel.load(value)
    if isinstance(value, Mapping):
        return CostModel.from_dict(value)
    raise ValueError(f"policy_options['cost_model'] must be a CostModel, a path to a cost "
                     f"model file, its JSON object or None, got {type(value).__name__}")


def check_time_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Fill in defaults and check; a path is read here, once per check."""
    extra = sorted(set(raw) - set(TIME_DEFAULTS))
    if extra:
        raise ValueError(f"policy_options[{extra[0]!r}] is not an option of policy 'time' "
                         f"(known: {', '.join(sorted(TIME_DEFAULTS))})")
    out = {**TIME_DEFAULTS, **raw}
    out["cost_model"] = _as_cost_model(out["cost_model"])
    passes = out["passes"]
    if (isinstance(passes, bool) or not isinstance(passes, (int, float, np.integer, np.floating))
            or not math.isfinite(passes) or passes <= 0):
        raise ValueError(f"policy_options['passes'] must be a finite number > 0, got {passes!r}")
    out["passes"] = float(passes)
    rounds = out["rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"policy_options['rounds'] must be an int >= 0, got {rounds!r}")
    out["rounds"] = int(rounds)
    return out


def pack_by_time(model: CostModel, rows: F64, counts: I64, num_ranks: int, rounds: int) -> I64:
    """Slots of the given replica counts onto ranks, weighed by modelled time.

    DeepSeek's greedy packing (heaviest slot to the lightest rank with room)
    on slot times, then `refine_swaps` on the same times. Returns [L, P].
    """
    num_layers, num_logical = rows.shape
    num_physical = int(counts[0].sum())
    per_rank = num_physical // num_ranks
    flat = np.repeat(np.tile(np.arange(num_logical), num_layers), counts.ravel())
    phy2log = flat.reshape(num_layers, num_physical)
    # An expert's time summed over its replicas; /counts is one slot's time.
    expert_time = counts * model.slot_seconds(rows / counts)
    slot_time = np.take_along_axis(expert_time / counts, phy2log, axis=1)
    pack, rank_in = balanced_packing(slot_time.astype(np.float32), num_ranks)
    ids = np.empty_like(phy2log)
    np.put_along_axis(ids, pack * per_rank + rank_in, phy2log, axis=1)
    load = np.concatenate([expert_time, np.zeros((num_layers, 1))], axis=1)
    return refine_swaps(load, ids, num_ranks, rounds)


def layer_seconds_of_ids(model: CostModel, rows: F64, ids: I64, num_ranks: int) -> F64:
    """[L, E] rows per pass, [L, P] expert ids (-1: empty) -> [L] modelled time of
    each layer's slowest rank."""
    num_layers, num_logical = rows.shape
    key = np.where(ids < 0, num_logical, ids) + (num_logical + 1) * np.arange(num_layers)[:, None]
    counts = np.bincount(key.ravel(), minlength=num_layers * (num_logical + 1))
    counts = counts.reshape(num_layers, num_logical + 1)[:, :num_logical]
    per_replica = rows / np.maximum(counts, 1)
    slot_rows = np.where(ids >= 0, np.take_along_axis(per_replica, np.maximum(ids, 0), 1), 0.0)
    return model.rank_seconds(slot_rows, num_ranks).max(axis=1)


def _time_policy(req: PlanRequest) -> I64:
    model: CostModel = req.options["cost_model"]
    rows = req.load / float(req.options["passes"])
    num_ranks, num_physical = req.num_ranks, req.num_physical_experts
    rounds = int(req.options["rounds"])
    base = np.asarray(run_policy("default", req, {}), dtype=np.int64)
    _, _, ds_counts = replicate_experts(rows.astype(np.float32), num_physical)
    packed = pack_by_time(model, rows, ds_counts, num_ranks, rounds)
    better = (layer_seconds_of_ids(model, rows, packed, num_ranks)
              < layer_seconds_of_ids(model, rows, base, num_ranks))
    return np.where(better[:, None], packed, base)


register_policy("time", _time_policy, check_options=check_time_options, keeps_nodes=False)
