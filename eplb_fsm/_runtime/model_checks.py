"""What `EplbRuntime.add_model` checks before a model is balanced, and what the ranks
must agree on: one concept, the model's contract, kept apart from the runtime's
dispatching so either reads on its own."""

from __future__ import annotations

from typing import Any

import torch

from .config import EplbConfig

__all__ = ["agree_on_weights", "check_model", "check_weights"]

_INT_FIELDS = ("num_moe_layers", "num_logical_experts", "num_physical_experts",
               "num_local_physical_experts", "num_redundant_experts", "num_expert_groups")


def check_model(model: Any, config: EplbConfig, world_size: int) -> int:
    """Raise ValueError naming the field where `model` and `config` disagree; return groups."""
    for name in (*_INT_FIELDS, "expert_weights", "set_eplb_state"):
        if not hasattr(model, name):
            raise ValueError(f"model lacks {name!r} (see eplb_fsm.MoEModel)")
    for name in _INT_FIELDS:
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"model.{name} must be an int >= 0, got {value!r}")
    num_layers = model.num_moe_layers
    num_logical, num_physical = model.num_logical_experts, model.num_physical_experts
    if num_layers < 1 or num_logical < 1:
        raise ValueError("model.num_moe_layers and model.num_logical_experts must be >= 1")
    if num_physical != num_logical + model.num_redundant_experts:
        raise ValueError(f"model.num_physical_experts={num_physical} must equal "
                         f"num_logical_experts + num_redundant_experts = "
                         f"{num_logical} + {model.num_redundant_experts}")
    if model.num_redundant_experts != config.num_redundant_experts:
        raise ValueError(f"EplbConfig.num_redundant_experts={config.num_redundant_experts} "
                         f"disagrees with model.num_redundant_experts="
                         f"{model.num_redundant_experts}")
    if model.num_local_physical_experts * world_size != num_physical:
        raise ValueError(f"model.num_local_physical_experts={model.num_local_physical_experts}"
                         f" x {world_size} ranks must equal num_physical_experts={num_physical}")
    groups = config.num_groups if config.num_groups is not None else model.num_expert_groups
    groups = max(int(groups), 1)
    if num_logical % groups:
        raise ValueError(f"model.num_logical_experts={num_logical} must be divisible by "
                         f"num_groups={groups}")
    if world_size % config.num_nodes:
        raise ValueError(f"EplbConfig.num_nodes={config.num_nodes} must divide the "
                         f"{world_size} ranks")
    return groups


def check_weights(model: Any) -> None:
    """expert_weights: one list of [local slots, ...] tensors per MoE layer."""
    num_layers = model.num_moe_layers
    weights = model.expert_weights
    if len(weights) != num_layers:
        raise ValueError(f"model.expert_weights has {len(weights)} layers, expected "
                         f"num_moe_layers={num_layers}")
    for layer, tensors in enumerate(weights):
        if len(tensors) < 1:
            raise ValueError(f"model.expert_weights[{layer}] holds no tensor")
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1 or \
                    tensor.shape[0] != model.num_local_physical_experts:
                raise ValueError(
                    f"model.expert_weights[{layer}][{i}] must be a tensor whose first dim is "
                    f"num_local_physical_experts={model.num_local_physical_experts}")


def _describe(model: Any, config: EplbConfig) -> tuple[Any, ...]:
    """What every rank must agree on before any byte moves: the settings that shape
    rounds and plans, and each weight tensor's shape and dtype by layer."""
    settings = tuple(getattr(config, f) for f in (
        "window_size", "step_interval", "readiness_lag", "layers_per_transfer", "policy",
        "num_nodes", "use_async", "transfer_path", "log_balancedness"))
    tensors = tuple(tuple((tuple(t.shape), str(t.dtype)) for t in layer)
                    for layer in model.expert_weights)
    return settings, tensors


def agree_on_weights(model: Any, name: str, config: EplbConfig, cpu_group: Any) -> None:
    """Raise ValueError, on every rank alike, where ranks disagree on `_describe`.

    The engine moves raw bytes: a rank whose experts are another dtype or
    width than its peers' would receive bytes it reads as garbage, and every
    rebalance would report success. Every rank sees every rank's description,
    so all raise the same error, before anything changes.
    """
    import torch.distributed as dist

    mine = _describe(model, config)
    every: list[Any] = [None] * dist.get_world_size(cpu_group)
    dist.all_gather_object(every, mine, group=cpu_group)
    first = every[0]
    for rank, theirs in enumerate(every):
        if theirs == first:
            continue
        if theirs[0] != first[0]:
            raise ValueError(f"model {name!r}: rank {rank}'s EplbConfig differs from rank 0's "
                             f"(window_size, step_interval, readiness_lag, "
                             f"layers_per_transfer, policy, num_nodes, use_async, "
                             f"transfer_path, log_balancedness: {theirs[0]} vs {first[0]}); "
                             "every rank must use the same settings")
        layers, ref = theirs[1], first[1]
        if len(layers) != len(ref):
            raise ValueError(f"model {name!r}: rank {rank} has {len(layers)} MoE layers of "
                             f"expert weights, rank 0 has {len(ref)}")
        for layer, (got, want) in enumerate(zip(layers, ref, strict=True)):
            if len(got) != len(want):
                raise ValueError(f"model {name!r}: rank {rank}'s expert_weights[{layer}] "
                                 f"holds {len(got)} tensors, rank 0's {len(want)}")
            for index, (g, w) in enumerate(zip(got, want, strict=True)):
                if g != w:
                    raise ValueError(
                        f"model {name!r}: rank {rank}'s expert_weights[{layer}][{index}] is "
                        f"{g[1]} of shape {list(g[0])}, rank 0's is {w[1]} of shape "
                        f"{list(w[0])}; every rank must hold the same shapes and dtypes "
                        "(the engine moves raw bytes)")
