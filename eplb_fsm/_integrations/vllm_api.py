"""vLLM's EPLB entry points, with vLLM's signatures, over eplb_fsm's planner and mover.

A vLLM user switches with one import::

    from eplb_fsm.vllm import rearrange_expert_weights_inplace, rebalance_experts

- `rebalance_experts` plans with the ``default`` policy (DeepSeek's algorithm:
  hierarchical when ``num_groups % num_nodes == 0``, else global) and returns
  vLLM's three tensors: ``physical_to_logical`` [L, P], ``logical_to_physical``
  [L, E, P - E + 1] padded with -1, ``logical_count`` [L, E], all int64 on the
  device of `weight`. Given the map in service (``old_global_expert_indices``),
  experts that stay on a rank keep their slots, as vLLM does.
  ``logical_to_physical`` lists each expert's slots in ascending slot order;
  vLLM lists them in the order the planner created the replicas. Routers pick
  a replica by index below ``logical_count``, so both serve the same slots.
- `rearrange_expert_weights_inplace` moves the weights with `TransferEngine`
  (one packed message per peer per layer, or same-node pulls), blocking until
  this rank's weights are in place. ``is_profile=True`` allocates and frees the
  staging memory a real call needs and moves nothing. ``rank_mapping`` (old
  rank -> new rank, -1: leaving) handles elastic scale events the way vLLM
  does: `ep_group` is the larger of the two rank sets, and the smaller map is
  laid out on it with empty slots (-1) for the ranks it lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .._adapters.transfer import TransferEngine
from .._core.placement import Placement
from .._core.planning import plan

__all__ = ["rearrange_expert_weights_inplace", "rebalance_experts"]


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``rebalance_experts``: (physical_to_logical, logical_to_physical,
    logical_count) for the load `weight` [L, E] on `num_replicas` slots.

    `weight`: a tensor or array of token counts; `num_ranks`: GPUs in the EP
    group (vLLM's ``num_gpus``); `old_global_expert_indices`: the [L, P] map in
    service, or None. Bad input raises `ValueError` naming the argument (vLLM
    asserts).
    """
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    load = weight.detach().float().cpu() if isinstance(weight, torch.Tensor) else weight
    old = None
    if old_global_expert_indices is not None and np.ndim(load) == 2:  # else plan() says why
        old_ids = _ids(old_global_expert_indices, "old_global_expert_indices")
        num_logical = int(np.shape(load)[1])
        try:
            old = Placement(old_ids, num_logical, allow_missing=True)
        except ValueError as exc:
            raise ValueError(f"old_global_expert_indices: {exc}") from None
    placement = plan(load, num_replicas, num_groups, num_nodes, num_ranks,
                     old_placement=old)
    maps = (placement.physical_to_logical, placement.logical_to_physical,
            placement.replica_count)
    p2l, l2p, count = (torch.from_numpy(np.array(m, dtype=np.int64)).to(device) for m in maps)
    return p2l, l2p, count


def rearrange_expert_weights_inplace(
    old_global_expert_indices: Any,
    new_global_expert_indices: Any,
    expert_weights: Sequence[Iterable[torch.Tensor]],
    ep_group: dist.ProcessGroup | None,
    is_profile: bool = False,
    rank_mapping: Mapping[int, int] | None = None,
) -> None:
    """vLLM's ``rearrange_expert_weights_inplace``: every rank of `ep_group` calls it
    together; it returns once this rank's slots hold the new map's experts.

    `expert_weights[layer]`: this rank's tensors of that layer, first dimension
    the local slot. Shapes, ids and the group size are checked on every rank
    before anything moves (`ValueError` naming the argument).
    """
    weights = [list(layer) for layer in expert_weights]
    engine = TransferEngine(ep_group)
    if is_profile:
        if not weights:
            raise ValueError("expert_weights is empty: nothing to profile")
        engine.profile(weights)
        return
    old = _ids(old_global_expert_indices, "old_global_expert_indices")
    new = _ids(new_global_expert_indices, "new_global_expert_indices")
    if rank_mapping is not None:
        old, new = _on_group(old, new, rank_mapping, engine.world_size)
    engine.rearrange(old, new, weights)


def _ids(maps: Any, name: str) -> np.ndarray:
    arr = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer [num_moe_layers, num_physical_experts] "
                         f"map, got shape {list(arr.shape)} and dtype {arr.dtype}")
    return arr.astype(np.int64)


def _on_group(old: np.ndarray, new: np.ndarray, rank_mapping: Mapping[int, int],
              group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Both maps on the ranks of the group, the missing ranks' slots empty (-1).

    Scale-down: the group is the old rank set (``len(rank_mapping)`` ranks) and
    the new map's rank ``rank_mapping[r]`` lands on old rank ``r``. Scale-up:
    the group is the new rank set and old rank ``r`` lands on
    ``rank_mapping[r]``. Slots per rank are the same in both maps.
    """
    if any(not isinstance(k, int) or not isinstance(v, int) for k, v in rank_mapping.items()):
        raise ValueError("rank_mapping must map int old ranks to int new ranks (-1: leaving)")
    old_ranks = len(rank_mapping)
    if sorted(rank_mapping) != list(range(old_ranks)):
        raise ValueError(f"rank_mapping must have the keys 0..{old_ranks - 1} (every old "
                         f"rank), got {sorted(rank_mapping)}")
    staying = {old_rank: new_rank for old_rank, new_rank in rank_mapping.items()
               if new_rank >= 0}
    if old_ranks == group_size:  # scale down: lay the new map on the old ranks
        new_ranks = len(staying)
        return old, _relaid(new, new_ranks, old_ranks,
                            {new_rank: old_rank for old_rank, new_rank in staying.items()},
                            "new_global_expert_indices")
    # scale up: lay the old map on the new ranks
    return _relaid(old, old_ranks, group_size, staying, "old_global_expert_indices"), new


def _relaid(maps: np.ndarray, from_ranks: int, to_ranks: int, where: Mapping[int, int],
            name: str) -> np.ndarray:
    """`maps` of `from_ranks` ranks, with rank r's slots moved to rank ``where[r]`` of
    `to_ranks` ranks; slots of ranks nobody lands on are empty (-1)."""
    layers, slots = maps.shape
    if from_ranks < 1 or slots % from_ranks:
        raise ValueError(f"{name} has {slots} slots, which do not split over {from_ranks} "
                         "ranks (as rank_mapping implies)")
    per_rank = slots // from_ranks
    out = np.full((layers, per_rank * to_ranks), -1, dtype=np.int64)
    for source, target in where.items():
        if not 0 <= source < from_ranks or not 0 <= target < to_ranks:
            raise ValueError(f"rank_mapping places rank {source} at {target}, outside the "
                             f"{from_ranks} -> {to_ranks} ranks of the maps and the group")
        out[:, target * per_rank:(target + 1) * per_rank] = \
            maps[:, source * per_rank:(source + 1) * per_rank]
    return out
