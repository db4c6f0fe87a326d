"""`plan()`: checked input in, a `Placement` out, through a registry of policies.

A policy is a pure function from a `PlanRequest` (load and shape, already
validated) to a `physical_to_logical` array [L, P]. `plan()` owns all input
checking, so a policy never sees bad input and never has to repeat a check;
and it wraps the policy's answer in a `Placement`, whose constructor checks
the invariants, so a buggy policy cannot hand out an inconsistent map.

Policy options. A policy that takes settings registers an options checker
with it (``register_policy(name, fn, check_options=...)``); callers pass
``plan(..., policy_options={...})``. The checker runs inside `plan()`'s
input checking, fills in defaults and raises `ValueError` naming the option,
so the policy reads ``request.options`` already checked. Options are a
mapping rather than extra `plan()` keywords so that one signature (and one
``--option KEY=VALUE`` CLI flag) serves every policy, present and future.

Using the old placement. With ``plan(..., old_placement=old)`` the plan's
slots are reordered within each rank so that an expert a rank keeps stays in
the slot it has (`keep_rank_slots`, what vLLM does when handed the old map):
same ranks, same loads, fewer copies. ``keep_slots=False`` returns the
policy's plan as is (``default`` is then DeepSeek's planner bit for bit).
``minimize_moves=True`` goes further: it also permutes ranks (and nodes) to
keep as many experts of `old` in place as possible (see `relabel`); any
policy works with it, and load figures are unchanged.

Groups. ``default`` plans hierarchically (groups packed onto nodes) only when
``num_groups % num_nodes == 0``, and globally otherwise, as DeepSeek's
reference and vLLM do; so ``num_logical_experts % num_groups`` must be 0 only
for a policy that plans with groups for the request (``uses_groups``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from .arrays import as_real_array
from .deepseek import rebalance_hierarchical
from .keep_slots import keep_rank_slots
from .placement import Placement
from .relabel import relabel

__all__ = [
    "OptionsChecker",
    "PlanRequest",
    "Policy",
    "available_policies",
    "check_policy_options",
    "plan",
    "policy_keeps_nodes",
    "policy_needs_old_placement",
    "policy_uses_groups",
    "register_policy",
    "run_policy",
]

_NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class PlanRequest:
    """What every policy receives. `load` is float64 [L, E], finite and >= 0."""

    load: npt.NDArray[np.float64]
    num_physical_experts: int
    num_groups: int
    num_nodes: int
    num_ranks: int
    old_placement: Placement | None = None
    #: The policy's options after its checker ran (defaults filled in); read-only.
    options: Mapping[str, Any] = field(default_factory=lambda: _NO_OPTIONS)

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_logical_experts(self) -> int:
        return int(self.load.shape[1])


Policy = Callable[[PlanRequest], Any]
#: Validates a policy's raw options; returns them complete (defaults filled in).
OptionsChecker = Callable[[Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class _Entry:
    policy: Policy
    check_options: OptionsChecker | None
    keeps_nodes: bool | Callable[[PlanRequest], bool]
    needs_old_placement: bool
    uses_groups: bool | Callable[[PlanRequest], bool] = True


_POLICIES: dict[str, _Entry] = {}
_BUILT_INS_LOADED = False


def _registry() -> dict[str, _Entry]:
    """Every registered policy, the built-ins beyond ``default`` and ``global`` included.

    Those ("refined", "incremental", "time") live in `policies` and
    `time_policy`, which need scipy. They register on the first lookup rather
    than at import, so importing eplb_fsm stays cheap (the CLI answers Ctrl-C
    from its first moment) and every way in (the facade, the runtime, the
    CLI, a submodule) sees the same policies.
    """
    global _BUILT_INS_LOADED
    if not _BUILT_INS_LOADED:
        # The flag is set only once the import is done: a second thread that
        # looks up meanwhile waits on the import's lock instead of seeing a
        # half-filled registry. The import's own registrations come back here
        # and get the module being imported, so they do not recurse.
        from . import policies  # noqa: F401  (registers its policies and time_policy's)
        _BUILT_INS_LOADED = True
    return _POLICIES


def register_policy(
    name: str,
    policy: Policy,
    *,
    replace: bool = False,
    check_options: OptionsChecker | None = None,
    keeps_nodes: bool | Callable[[PlanRequest], bool] = True,
    needs_old_placement: bool = False,
    uses_groups: bool | Callable[[PlanRequest], bool] = True,
) -> None:
    """Make `policy` available to `plan(policy=name)` and ``eplb-fsm plan --policy``.

    `policy` is called as ``policy(request)`` with a `PlanRequest`: ``request.load``
    (float64 [L, E], already checked: finite, >= 0), the shape
    (``num_physical_experts``, ``num_groups``, ``num_nodes``, ``num_ranks``),
    ``old_placement`` (a `Placement` or None) and ``options`` (checked by
    `check_options`). It returns the new ``physical_to_logical``: an integer
    array (numpy, torch, or nested lists) of shape [L, num_physical_experts] whose
    entries are logical expert ids in [0, E), every expert at least once per
    layer, slots ``r * P/R .. (r + 1) * P/R - 1`` on rank ``r``. `plan()` checks
    the shape (a `ValueError` naming the policy, the expected shape and what it
    returned) and then every invariant, through `Placement`. It must be a pure
    function of the request (the runtime calls it on every rank and requires
    the same answer). For example::

        def round_robin(request):
            experts = request.num_logical_experts
            slots = np.arange(request.num_physical_experts) % experts
            return np.tile(slots, (request.num_layers, 1))

        eplb_fsm.register_policy("round_robin", round_robin, keeps_nodes=False)

    - `check_options`: validates ``plan(policy_options=...)`` for this policy
      (raise `ValueError` naming the option) and returns them with defaults
      filled in; without one, the policy accepts no options.
    - `keeps_nodes`: whether the policy's plans keep node structure (each node's
      ranks hold whole expert groups), as a bool or a function of the request.
      Placement-aware relabeling then maps nodes only to whole nodes; a policy
      that ignores nodes lets it map any rank anywhere, which keeps more
      experts in place. True, the safe answer, unless said otherwise.
    - `needs_old_placement`: `plan()` rejects a call without `old_placement`.
    - `uses_groups`: whether the policy plans with expert groups for a request
      (a bool or a function of it); `plan()` then requires
      ``num_logical_experts % num_groups == 0``. True, the safe answer.
    """
    _registry()  # a built-in's name is taken even before its first lookup
    _add(name, policy, replace, check_options, keeps_nodes, needs_old_placement, uses_groups)


def _add(
    name: str,
    policy: Policy,
    replace: bool,
    check_options: OptionsChecker | None,
    keeps_nodes: bool | Callable[[PlanRequest], bool],
    needs_old_placement: bool,
    uses_groups: bool | Callable[[PlanRequest], bool],
) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty str, got {name!r}")
    if not callable(policy):
        raise ValueError(f"policy {name!r} must be callable")
    if check_options is not None and not callable(check_options):
        raise ValueError(f"check_options of policy {name!r} must be callable or None")
    for what, value in (("keeps_nodes", keeps_nodes), ("uses_groups", uses_groups)):
        if not isinstance(value, (bool, np.bool_)) and not callable(value):
            raise ValueError(f"{what} of policy {name!r} must be a bool or callable")
    if name in _POLICIES and not replace:
        raise ValueError(f"policy {name!r} is already registered (pass replace=True)")
    _POLICIES[name] = _Entry(policy, check_options, keeps_nodes, bool(needs_old_placement),
                             uses_groups)


def available_policies() -> tuple[str, ...]:
    return tuple(sorted(_registry()))


def run_policy(
    name: str, request: PlanRequest, options: Mapping[str, Any] | None = None
) -> npt.NDArray[Any]:
    """Run registered policy `name` on a checked `request`, as `plan()` does.

    With `options` given (policies that build on another pass the other's
    options, or ``{}`` for its defaults), they are checked for that policy
    and replace the request's own.
    """
    entry = _registry()[name]
    if options is not None:
        request = dataclasses.replace(request, options=_check_options(name, entry, options))
    return np.asarray(entry.policy(request))


def check_policy_options(name: str, options: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Check `options` for registered policy `name` without planning (config time)."""
    if not isinstance(name, str) or name not in _registry():
        raise ValueError(
            f"policy {name!r} is unknown; known policies: {', '.join(available_policies())}"
        )
    return _check_options(name, _POLICIES[name], {} if options is None else options)


def policy_needs_old_placement(name: str) -> bool:
    """Whether policy `name` plans from an old placement (and needs one)."""
    return _registry()[name].needs_old_placement


def policy_keeps_nodes(name: str, request: PlanRequest) -> bool:
    """Whether policy `name`'s plan for `request` keeps node structure."""
    keeps = _registry()[name].keeps_nodes
    return bool(keeps(request) if callable(keeps) else keeps)


def policy_uses_groups(name: str, request: PlanRequest) -> bool:
    """Whether policy `name` plans with expert groups for `request`."""
    uses = _registry()[name].uses_groups
    return bool(uses(request) if callable(uses) else uses)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_load(load: Any) -> npt.NDArray[np.float64]:
    arr = as_real_array("load", load)
    if arr.ndim != 2:
        raise ValueError(f"load must be 2-D [num_layers, num_logical_experts], got shape "
                         f"{arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"load must have at least one layer and one expert, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("load must be finite (found NaN or inf)")
    negative = np.argwhere(arr < 0)
    if negative.size:
        layer, expert = (int(i) for i in negative[0])
        value = arr[layer, expert]
        shown = int(value) if value.is_integer() else float(value)
        # Far below any real count: what an int64 sum wraps to when it overflows.
        wrapped = (" (a load this far below zero is what an int64 sum wraps to when it "
                   "overflows: keep every load below 2**63)") if value <= -2**53 else ""
        raise ValueError(f"load must be non-negative, got load[{layer}, {expert}] = "
                         f"{shown}{wrapped}")
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
    minimize_moves: Any = False,
    policy_options: Any = None,
    keep_slots: Any = True,
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
    if r % n:
        raise ValueError(f"num_ranks={r} must be divisible by num_nodes={n}")
    if not isinstance(policy, str) or policy not in _registry():
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
    entry = _POLICIES[policy]
    if not isinstance(minimize_moves, (bool, np.bool_)):
        raise ValueError(f"minimize_moves must be a bool, got {minimize_moves!r}")
    if not isinstance(keep_slots, (bool, np.bool_)):
        raise ValueError(f"keep_slots must be a bool, got {keep_slots!r}")
    if minimize_moves and old_placement is None:
        raise ValueError("minimize_moves=True needs old_placement (the placement to keep)")
    if entry.needs_old_placement and old_placement is None:
        raise ValueError(f"policy {policy!r} needs old_placement (it plans moves from it)")
    options = _check_options(policy, entry, {} if policy_options is None else policy_options)
    request = PlanRequest(arr, p, g, n, r, old_placement, options)
    if num_logical % g and policy_uses_groups(policy, request):
        raise ValueError(
            f"number of logical experts {num_logical} must be divisible by num_groups={g}: "
            f"policy {policy!r} plans with groups here"
            + (" (num_groups % num_nodes == 0)" if policy == "default" else ""))
    return request


def _check_options(name: str, entry: _Entry, raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"policy_options must be a mapping or None, got {type(raw).__name__}")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise ValueError(f"policy_options keys must be str, got {bad[0]!r}")
    if entry.check_options is not None:
        return MappingProxyType(dict(entry.check_options(raw)))
    if raw:
        raise ValueError(f"policy {name!r} takes no policy_options, got "
                         f"{', '.join(repr(k) for k in raw)}")
    return _NO_OPTIONS


def plan(
    load: Any,
    num_physical_experts: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    num_ranks: int = 1,
    policy: str = "default",
    old_placement: Placement | None = None,
    *,
    minimize_moves: bool = False,
    policy_options: Mapping[str, Any] | None = None,
    keep_slots: bool = True,
) -> Placement:
    """Plan a placement of `load` ([L, E], numpy or torch, any real dtype).

    - `num_groups`, `num_nodes`: ``default`` packs groups onto nodes when
      ``num_groups % num_nodes == 0`` and plans globally otherwise (as vLLM and
      DeepSeek's reference do).
    - `old_placement`: the placement in service now. Policies that plan moves
      from it (``incremental``) need it. With it, and `keep_slots` (the
      default), an expert that stays on a rank keeps its old slot there (vLLM's
      behaviour when given the old map): ranks hold what the policy gave them,
      only the order of each rank's slots changes. ``keep_slots=False`` returns
      the policy's plan untouched.
    - `minimize_moves`: also permute ranks (and nodes) and their slots to keep
      as many experts of `old_placement` in place as possible (see `relabel`).
      Same loads, same balancedness, fewer moves; needs `old_placement`.
    - `policy_options`: settings for the policy (see `available_policies` and
      each policy's docs), checked before planning.

    Raises `ValueError` naming the argument and the rule before any planning,
    and naming the policy when its answer is not an [L, P] integer map.
    """
    request = check_plan_args(
        load, num_physical_experts, num_groups, num_nodes, num_ranks, policy, old_placement,
        minimize_moves, policy_options, keep_slots,
    )
    p2l = _checked_output(policy, request, _POLICIES[policy].policy(request))
    if minimize_moves:
        assert old_placement is not None  # checked above
        nodes = request.num_nodes if policy_keeps_nodes(policy, request) else 1
        p2l = relabel_to(p2l, old_placement, request.num_ranks, nodes)
    elif keep_slots and old_placement is not None:
        p2l = keep_rank_slots(p2l, old_placement.physical_to_logical, request.num_ranks)
    return Placement(p2l, request.num_logical_experts)


def _checked_output(name: str, request: PlanRequest, answer: Any) -> npt.NDArray[np.int64]:
    """A policy's answer as an int64 [L, P] array, or a ValueError naming the policy."""
    expected = (request.num_layers, request.num_physical_experts)
    try:
        arr = np.asarray(answer.detach().cpu().numpy() if hasattr(answer, "detach")
                         else answer)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"policy {name!r} must return an integer [L, P] = {list(expected)} "
                         f"array, got {type(answer).__name__} ({exc})") from None
    if arr.shape != expected:
        raise ValueError(f"policy {name!r} must return physical_to_logical of shape "
                         f"[L, P] = {list(expected)}, got shape {list(arr.shape)} "
                         f"({type(answer).__name__})")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"policy {name!r} must return integer expert ids, got dtype "
                         f"{arr.dtype}")
    return arr.astype(np.int64, copy=False)


def relabel_to(p2l: Any, old: Placement, num_ranks: int, num_nodes: int) -> Any:
    """`relabel` with a shape check: a policy's output is not trusted before
    `Placement` checks it, and relabeling must not hide a malformed map."""
    arr = np.asarray(p2l.detach().cpu().numpy() if hasattr(p2l, "detach") else p2l)
    if arr.shape != old.physical_to_logical.shape or not np.issubdtype(arr.dtype, np.integer):
        return arr  # let Placement() report what is wrong with it
    return relabel(arr, old.physical_to_logical, num_ranks, num_nodes)


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


def _default_keeps_nodes(req: PlanRequest) -> bool:
    return req.num_groups % req.num_nodes == 0


_add("default", _default_policy, False, None, _default_keeps_nodes, False,
     _default_keeps_nodes)
_add("global", _global_policy, False, None, False, False, False)
