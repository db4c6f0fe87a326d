"""Plug in engines shaped like vLLM: the model side and the router side.

- `VllmMoEAdapter`: ``rt.add_model(VllmMoEAdapter(model))`` for a model that
  implements vLLM's ``MixtureOfExperts`` interface and, like vLLM's models,
  registers its ``expert_weights`` inside ``set_eplb_state``.
- `check_mixture_of_experts`: what keeps a model from plugging in, as text.
- `select_replicas`: the router's logical -> physical step, spreading each
  expert's tokens evenly over its replicas and recording the load.
- `rebalance_experts`, `rearrange_expert_weights_inplace`: vLLM's EPLB entry
  points with vLLM's signatures and return values, over eplb_fsm's planner and
  weight mover, for a switch with one import.

See docs/integration.md for a walk-through.
"""

from ._integrations.vllm import (
    VLLM_MOE_ATTRIBUTES,
    VllmMoEAdapter,
    check_mixture_of_experts,
    select_replicas,
)
from ._integrations.vllm_api import rearrange_expert_weights_inplace, rebalance_experts

__all__ = ["VLLM_MOE_ATTRIBUTES", "VllmMoEAdapter", "check_mixture_of_experts",
           "rearrange_expert_weights_inplace", "rebalance_experts", "select_replicas"]
