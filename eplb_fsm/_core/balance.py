"""Balancedness: how evenly a placement spreads token load over ranks.

Definition used everywhere in eplb_fsm (reports say "per layer, then averaged"):

    balancedness[l] = mean_r(rank_load[l, r]) / max_r(rank_load[l, r])
    balancedness    = mean_l(balancedness[l])

It is 1.0 when every rank carries the same load and 1/R when one rank carries
all of it. A layer with no load at all counts as perfectly balanced (1.0):
nothing waits on anyone. vLLM's logged figure takes the mean over layers and
ranks but the max over ranks of the layer sum, mixing dimensions; we don't.

Predicted load assumes a logical expert's tokens split evenly over its
replicas, which is what replica selection in the router aims for.

Sums do not depend on the order of slots within a rank, nor of ranks within
a layer: each is taken over sorted values. Two placements that give every
rank the same experts must score exactly the same, bit for bit, or a policy
that keeps the old placement when it is "as good" (tolerance 0) would move
weights for one ulp; keeping slots in place reorders them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .placement import Placement

__all__ = [
    "balancedness",
    "balancedness_per_layer",
    "rank_load_from_logical",
    "rank_load_from_physical",
    "slot_load_from_logical",
]

FloatArray = npt.NDArray[np.float64]


def _check_ranks(num_physical: int, num_ranks: int) -> None:
    if not isinstance(num_ranks, (int, np.integer)) or num_ranks < 1:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    if num_physical % num_ranks:
        raise ValueError(
            f"num_physical_experts={num_physical} must be divisible by num_ranks={num_ranks}"
        )


def rank_load_from_physical(physical_load: npt.ArrayLike, num_ranks: int) -> FloatArray:
    """[L, P] load per slot -> [L, R] load per rank (slots are rank-contiguous)."""
    load = np.asarray(physical_load, dtype=np.float64)
    if load.ndim != 2:
        raise ValueError(f"physical_load must be 2-D [layers, slots], got shape {load.shape}")
    _check_ranks(load.shape[1], num_ranks)
    return np.sort(load.reshape(load.shape[0], num_ranks, -1), axis=2).sum(axis=2)


def slot_load_from_logical(logical_load: npt.ArrayLike, placement: Placement) -> FloatArray:
    """[L, E] load per logical expert -> [L, P] predicted load per slot (an
    expert's load split evenly over its replicas; 0 for an empty slot)."""
    load = np.asarray(logical_load, dtype=np.float64)
    expected = (placement.num_layers, placement.num_logical)
    if load.shape != expected:
        raise ValueError(f"logical_load has shape {load.shape}, expected {expected}")
    p2l = placement.physical_to_logical
    per_replica = load / np.maximum(placement.replica_count, 1)
    return np.where(p2l >= 0, np.take_along_axis(per_replica, np.maximum(p2l, 0), 1), 0.0)


def rank_load_from_logical(
    logical_load: npt.ArrayLike, placement: Placement, num_ranks: int
) -> FloatArray:
    """[L, E] load per logical expert -> [L, R] predicted load per rank."""
    return rank_load_from_physical(slot_load_from_logical(logical_load, placement), num_ranks)


def balancedness_per_layer(rank_load: npt.ArrayLike) -> FloatArray:
    """[L, R] rank load -> [L] mean/max per layer (1.0 for an idle layer)."""
    load = np.asarray(rank_load, dtype=np.float64)
    if load.ndim != 2:
        raise ValueError(f"rank_load must be 2-D [layers, ranks], got shape {load.shape}")
    peak = load.max(axis=1)
    mean = np.sort(load, axis=1).mean(axis=1)
    out = np.ones(load.shape[0])
    busy = peak > 0
    out[busy] = mean[busy] / peak[busy]
    return out


def balancedness(rank_load: npt.ArrayLike) -> float:
    """Mean over layers of `balancedness_per_layer`."""
    return float(balancedness_per_layer(rank_load).mean())
