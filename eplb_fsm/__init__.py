"""eplb_fsm: expert-parallel load balancing with an explicit rebalance lifecycle.

The public API lives here and in the modules ``eplb_fsm.transfer`` (moving
weights), ``eplb_fsm.testing`` (fake cluster, faults, launcher),
``eplb_fsm.reference`` (reference model, traces), ``eplb_fsm.metrics``
(Prometheus) and ``eplb_fsm.vllm`` (vLLM-shaped adapter). Everything else is in
``_``-prefixed packages (``_core``, ``_adapters``, ``_runtime``, ``_reference``,
``_sim``, ``_cli``, ``_integrations``) so that internals can move without breaking users.

Names are loaded on first use (PEP 562): ``import eplb_fsm`` costs nothing,
and ``eplb_fsm.EplbRuntime`` imports torch only then. The command line
relies on it: it must answer Ctrl-C from its first moment, and importing
torch takes seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._adapters.elastic_groups import ElasticGroups
    from ._adapters.interfaces import (
        AllReduce,
        FaultHook,
        MoEModel,
        ReadinessRound,
        StagedTransfer,
        WeightMover,
    )
    from ._core.balance import (
        balancedness,
        balancedness_per_layer,
        rank_load_from_logical,
        rank_load_from_physical,
    )
    from ._core.elastic import (
        ElasticPlan,
        UnionLayout,
        check_rank_mapping,
        default_union_layout,
        lost_experts,
        maps_in_union,
        plan_elastic,
    )
    from ._core.lifecycle import STATES, TransitionRecord, mermaid_diagram
    from ._core.placement import Placement, PlacementTensors
    from ._core.planning import (
        OptionsChecker,
        PlanRequest,
        Policy,
        available_policies,
        plan,
        register_policy,
        run_policy,
    )
    from ._integrations.vllm import select_replicas
    from ._runtime.config import EplbConfig
    from ._runtime.elastic import ExpertsLost, Reconfigured
    from ._runtime.hooks import LifecycleEvent
    from ._runtime.job import RebalanceFailed
    from ._runtime.runtime import EplbRuntime

__version__ = "0.1.0"

__all__ = [
    "STATES",
    "AllReduce",
    "ElasticGroups",
    "ElasticPlan",
    "EplbConfig",
    "EplbRuntime",
    "ExpertsLost",
    "FaultHook",
    "LifecycleEvent",
    "MoEModel",
    "OptionsChecker",
    "Placement",
    "PlacementTensors",
    "PlanRequest",
    "Policy",
    "ReadinessRound",
    "RebalanceFailed",
    "Reconfigured",
    "StagedTransfer",
    "TransitionRecord",
    "UnionLayout",
    "WeightMover",
    "__version__",
    "available_policies",
    "balancedness",
    "balancedness_per_layer",
    "check_rank_mapping",
    "default_union_layout",
    "lost_experts",
    "maps_in_union",
    "mermaid_diagram",
    "plan",
    "plan_elastic",
    "rank_load_from_logical",
    "rank_load_from_physical",
    "register_policy",
    "run_policy",
    "select_replicas",
]

#: Where each public name lives (the private module, relative to this package).
_WHERE: dict[str, tuple[str, ...]] = {
    "._adapters.elastic_groups": ("ElasticGroups",),
    "._adapters.interfaces": ("AllReduce", "FaultHook", "MoEModel", "ReadinessRound",
                              "StagedTransfer", "WeightMover"),
    "._core.balance": ("balancedness", "balancedness_per_layer", "rank_load_from_logical",
                       "rank_load_from_physical"),
    "._core.elastic": ("ElasticPlan", "UnionLayout", "check_rank_mapping",
                       "default_union_layout", "lost_experts", "maps_in_union",
                       "plan_elastic"),
    "._core.lifecycle": ("STATES", "TransitionRecord", "mermaid_diagram"),
    "._core.placement": ("Placement", "PlacementTensors"),
    "._core.planning": ("OptionsChecker", "PlanRequest", "Policy", "available_policies",
                        "plan", "register_policy", "run_policy"),
    "._integrations.vllm": ("select_replicas",),
    "._runtime.config": ("EplbConfig",),
    "._runtime.elastic": ("ExpertsLost", "Reconfigured"),
    "._runtime.hooks": ("LifecycleEvent",),
    "._runtime.job": ("RebalanceFailed",),
    "._runtime.runtime": ("EplbRuntime",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'eplb_fsm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
