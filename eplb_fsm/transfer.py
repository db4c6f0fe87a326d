"""Move expert weights between ranks for a new placement.

The synchronous entry point is `rearrange_weights`; the serving runtime uses
`TransferEngine` directly (stage while serving, commit at an agreed step).
The plan functions are pure and let you inspect, before anything moves,
what each rank will copy, receive and send::

    from eplb_fsm.transfer import plan_layers, rearrange_weights

    plan = plan_layers(old_p2l, new_p2l, num_ranks=8, node_size=8)
    plan.bytes_received(rank, slot_bytes)      # what rearranging will move to `rank`
    received = rearrange_weights(old_p2l, new_p2l, model.expert_weights, group)
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ._adapters.pull import shared_empty
from ._adapters.transfer import StagedLayers, TransferEngine, Weights
from ._core.transfer_channels import ChannelMap, decide_channels
from ._core.transfer_plan import (
    Duplicate,
    LayerPlan,
    LocalCopy,
    RankPlan,
    Transfer,
    TransferPlan,
    plan_layer,
    plan_layers,
    required_transfers,
)

__all__ = [
    "ChannelMap",
    "Duplicate",
    "LayerPlan",
    "LocalCopy",
    "RankPlan",
    "StagedLayers",
    "Transfer",
    "TransferEngine",
    "TransferPlan",
    "decide_channels",
    "plan_layer",
    "plan_layers",
    "rearrange_weights",
    "required_transfers",
    "shared_empty",
]


def rearrange_weights(
    old_physical_to_logical: Any,
    new_physical_to_logical: Any,
    expert_weights: Weights,
    group: dist.ProcessGroup | None = None,
    *,
    layers_at_once: int = 1,
    node_size: int | None = None,
) -> int:
    """Rearrange `expert_weights` in place from the old placement to the new one.

    - `old_physical_to_logical`, `new_physical_to_logical`: [L, P] numpy arrays
      or CPU tensors, the same on every rank (``-1`` marks an empty slot).
    - `expert_weights[layer][i]`: this rank's tensors, first dimension the
      local slot (``P / world_size`` long); CPU tensors with a gloo group, CUDA
      tensors with an NCCL one.
    - All ranks of `group` (default: the world) call it together; it blocks
      until this rank's weights are rearranged (on GPU, until the copies are
      done), moving `layers_at_once` layers per batch: more layers per batch
      means larger messages but more staging memory.

    Every input is checked (shapes, ``P % world_size``, one weight list per
    layer, first dimensions, ids) before anything changes; a violation raises
    `ValueError` naming the argument. Returns the bytes this rank received.
    """
    engine = TransferEngine(group, node_size=node_size)
    return engine.rearrange(old_physical_to_logical, new_physical_to_logical, expert_weights,
                            layers_at_once=layers_at_once)
