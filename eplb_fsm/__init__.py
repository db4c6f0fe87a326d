"""eplb_fsm: expert-parallel load balancing with an explicit rebalance lifecycle.

The public API lives here; everything else is in private modules (``_core``
for the pure numpy core) so that internals can move without breaking users.
"""

from ._core import policies as _policies  # noqa: F401  (registers the extra policies)
from ._core.balance import (
    balancedness,
    balancedness_per_layer,
    rank_load_from_logical,
    rank_load_from_physical,
)
from ._core.placement import Placement, PlacementTensors
from ._core.planning import PlanRequest, Policy, available_policies, plan, register_policy

__version__ = "0.1.0"

__all__ = [
    "Placement",
    "PlacementTensors",
    "PlanRequest",
    "Policy",
    "__version__",
    "available_policies",
    "balancedness",
    "balancedness_per_layer",
    "plan",
    "rank_load_from_logical",
    "rank_load_from_physical",
    "register_policy",
]
