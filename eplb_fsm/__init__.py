"""eplb_fsm: expert-parallel load balancing with an explicit rebalance lifecycle.

The public API lives here and in the modules ``eplb_fsm.transfer`` (moving
weights), ``eplb_fsm.testing`` (fake cluster, faults, launcher),
``eplb_fsm.reference`` (reference model, traces), ``eplb_fsm.metrics``
(Prometheus) and ``eplb_fsm.vllm`` (vLLM-shaped adapter). Everything else is in
``_``-prefixed packages (``_core``, ``_adapters``, ``_runtime``, ``_reference``,
``_sim``, ``_cli``, ``_integrations``) so that internals can move without breaking users.
"""

from ._adapters.elastic_groups import ElasticGroups
from ._adapters.interfaces import (
    AllReduce,
    FaultHook,
    MoEModel,
    ReadinessRound,
    StagedTransfer,
    WeightMover,
)
from ._core import policies as _policies  # noqa: F401  (registers the extra policies)
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
