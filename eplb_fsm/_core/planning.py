"""`plan()`: checked input in, a `Placement` out, through a registry of policies.

A policy is a pure function from a `PlanRequest` (load and shape, already
validated) to a `physical_to_logical` array [L, P]. `plan()` owns all input
checking, so a policy never sees bad input and never has to repeat a check;
and it wraps the policy's answer in a `Placement`, whose constructor checks
the invariants, so a buggy policy cannot hand out an inconsistent map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .deepseek import rebalance_hierarchical
from .placement import Placement

__all__ = ["PlanRequest", "Policy", "available_policies", "plan", "register_policy"]


@dataclass(frozen=True)
class PlanRequest:
    """What every policy receives. `load` is float64 [L, E], finite and >= 0."""

    load: npt.NDArray[np.float64]
    num_physical_experts: int
    num_groups: int
    num_nodes: int
    num_ranks: int
    old_placement: Placement | None = None

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_logical_experts(self) -> int:
        return int(self.load.shape[1])


Policy = Callable[[PlanRequest], Any]

_POLICIES: dict[str, Policy] = {}


def register_policy(name: str, policy: Policy, *, replace: bool = False) -> None:
    """Make `policy` available to `plan(policy=name)` and ``eplb-fsm plan --policy``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty str, got {name!r}")
    if not callable(policy):
        raise ValueError(f"policy {name!r} must be callable")
    if name in _POLICIES and not replace:
        raise ValueError(f"policy {name!r} is already registered (pass replace=True)")
    _POLICIES[name] = policy


def available_policies() -> tuple[str, ...]:
    return tuple(sorted(_POLICIES))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_load(load: Any) -> npt.NDArray[np.float64]:
    if hasattr(load, "detach"):  # torch tensor, without importing torch
        load = load.detach().cpu().double().numpy()
    arr = np.asarray(load)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise ValueError(f"load must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"load must be 2-D [num_layers, num_logical_experts], got shape "
                         f"{arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"load must have at least one layer and one expert, got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("load must be finite (found NaN or inf)")
    if np.any(arr < 0):
        raise ValueError("load must be non-negative")
    # The reference planner works in float32; a load whose layer sum overflows
    # float32 would turn comparisons into inf == inf ties.
    if np.any(arr.sum(axis=1) >= np.finfo(np.float32).max / 4):
        raise ValueError("load is too large: a layer's total must stay within float32 range")
    return arr


def check_plan_args(
    load: Any,
    num_physical_experts: Any,
    num_groups: Any,
    num_nodes: Any,
    num_ranks: Any,
    policy: Any,
    old_placement: Any,
) -> PlanRequest:
    """Every rule of `plan`'s input, in one place; raises `ValueError` naming the argument."""
    arr = _as_load(load)
    num_layers, num_logical = arr.shape
    p = _positive_int("num_physical_experts", num_physical_experts)
    g = _positive_int("num_groups", num_groups)
    n = _positive_int("num_nodes", num_nodes)
    r = _positive_int("num_ranks", num_ranks)
    if p < num_logical:
        raise ValueError(
            f"num_physical_experts={p} must be >= the number of logical experts {num_logical}"
        )
    if p % r:
        raise ValueError(f"num_physical_experts={p} must be divisible by num_ranks={r}")
    if num_logical % g:
        raise ValueError(f"number of logical experts {num_logical} must be divisible by "
                         f"num_groups={g}")
    if r % n:
        raise ValueError(f"num_ranks={r} must be divisible by num_nodes={n}")
    if policy not in _POLICIES:
        raise ValueError(
            f"policy {policy!r} is unknown; known policies: {', '.join(available_policies())}"
        )
    if old_placement is not None:
        if not isinstance(old_placement, Placement):
            raise ValueError(
                f"old_placement must be a Placement or None, got {type(old_placement).__name__}"
            )
        got = (old_placement.num_layers, old_placement.num_physical, old_placement.num_logical)
        if got != (num_layers, p, num_logical):
            raise ValueError(
                f"old_placement has shape [L={got[0]}, P={got[1]}, E={got[2]}], expected "
                f"[L={num_layers}, P={p}, E={num_logical}] from load and num_physical_experts"
            )
    return PlanRequest(arr, p, g, n, r, old_placement)


def plan(
    load: Any,
    num_physical_experts: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_ranks: int = 1,
    policy: str = "default",
    old_placement: Placement | None = None,
) -> Placement:
    """Plan a placement of `load` ([L, E], numpy or torch, any real dtype).

    Raises `ValueError` naming the argument and the rule before any planning.
    """
    request = check_plan_args(
        load, num_physical_experts, num_groups, num_nodes, num_ranks, policy, old_placement
    )
    p2l = _POLICIES[policy](request)
    return Placement(p2l, request.num_logical_experts)


def _default_policy(req: PlanRequest) -> npt.NDArray[np.int64]:
    """DeepSeek's algorithm: hierarchical when groups split evenly over nodes."""
    weight = req.load.astype(np.float32)
    if req.num_groups % req.num_nodes == 0:
        return rebalance_hierarchical(
            weight, req.num_physical_experts, req.num_groups, req.num_nodes, req.num_ranks
        )
    return rebalance_hierarchical(weight, req.num_physical_experts, 1, 1, req.num_ranks)


def _global_policy(req: PlanRequest) -> npt.NDArray[np.int64]:
    """DeepSeek's global policy: ignore groups and nodes, pack replicas onto all ranks."""
    weight = req.load.astype(np.float32)
    return rebalance_hierarchical(weight, req.num_physical_experts, 1, 1, req.num_ranks)


register_policy("default", _default_policy)
register_policy("global", _global_policy)
