"""Engines shaped like vLLM: the model side (`VllmMoEAdapter`) and the router side
(`select_replicas`).

Model side. `eplb_fsm.MoEModel` uses the names of vLLM's ``MixtureOfExperts``
interface (``expert_weights``, ``num_moe_layers``, ``num_logical_experts``,
``num_physical_experts``, ``num_local_physical_experts``,
``num_redundant_experts``, ``num_expert_groups``, ``set_eplb_state``), so a
model that fills ``expert_weights`` when it is built passes to
``rt.add_model(model)`` unchanged. vLLM's own models, though, fill
``expert_weights`` *inside* ``set_eplb_state`` (its docstring asks them to,
because weights may be post-processed after loading), by appending one list
per MoE layer. The runtime checks ``expert_weights`` before it calls
``set_eplb_state``, and a second call would append a second copy.
`VllmMoEAdapter` bridges both without touching the model: it registers once
with placeholder maps (vLLM's initial layout) so the weights exist, then
forwards the runtime's tensors and keeps exactly the last ``num_moe_layers``
weight lists. Everything else is the model's own attribute, read through.

Router side. The runtime rewrites ``logical_to_physical_map`` and
``logical_replica_count`` in place at agreed steps; the router turns the
top-k *logical* ids of each token into *physical* slots with
`select_replicas`, which spreads each expert's assignments evenly over its
replicas (the balancer's predictions assume an even split) and records the
per-slot load the runtime reads (vLLM's ``expert_load_view``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._core.placement import Placement

__all__ = ["VLLM_MOE_ATTRIBUTES", "VllmMoEAdapter", "check_mixture_of_experts",
           "select_replicas"]

#: The integer attributes of vLLM's ``MixtureOfExperts`` that the runtime reads.
VLLM_MOE_ATTRIBUTES = ("num_moe_layers", "num_expert_groups", "num_logical_experts",
                       "num_physical_experts", "num_local_physical_experts",
                       "num_redundant_experts")


def check_mixture_of_experts(model: Any) -> list[str]:
    """What keeps `model` (a vLLM ``MixtureOfExperts``) from plugging in; [] if nothing.

    Checks names and types only (the runtime checks shapes against its config
    in ``add_model``). An empty ``expert_weights`` is fine here: that is how
    vLLM models look before ``set_eplb_state``; wrap them in `VllmMoEAdapter`.
    """
    problems = []
    for name in VLLM_MOE_ATTRIBUTES:
        if not hasattr(model, name):
            problems.append(f"missing attribute {name!r}")
            continue
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{name} must be an int >= 0, got {value!r}")
    if not callable(getattr(model, "set_eplb_state", None)):
        problems.append("missing method 'set_eplb_state'")
    weights = getattr(model, "expert_weights", None)
    if weights is None:
        problems.append("missing attribute 'expert_weights'")
    elif not isinstance(weights, Sequence):
        problems.append(f"expert_weights must be a sequence (one entry per MoE layer), got "
                        f"{type(weights).__name__}")
    if not problems and model.num_physical_experts != (model.num_logical_experts
                                                       + model.num_redundant_experts):
        problems.append("num_physical_experts must equal num_logical_experts + "
                        "num_redundant_experts")
    return problems


class VllmMoEAdapter:
    """Presents a vLLM ``MixtureOfExperts`` model to `EplbRuntime.add_model`, unchanged.

    ``rt.add_model(VllmMoEAdapter(model))``. Use it for any model whose
    ``set_eplb_state`` registers its expert weights (all of vLLM's do); it is
    harmless for one that registers them earlier. `device` is where the
    placeholder maps live until the runtime's replace them (default: the
    model's first parameter's device, else CPU). The wrapped model stays
    reachable as ``adapter.model``.
    """

    def __init__(self, model: Any, device: torch.device | str | None = None) -> None:
        problems = check_mixture_of_experts(model)
        if problems:
            raise ValueError(f"{type(model).__name__} does not implement vLLM's "
                             f"MixtureOfExperts: {'; '.join(problems)}")
        self.model = model
        self._weights: list[Any] = []
        if len(model.expert_weights) >= model.num_moe_layers:
            self._keep_last_layers()
            return
        if device is None:
            params = getattr(model, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if isinstance(first, torch.Tensor) else "cpu"
        # Register once so the weights exist before the runtime checks them. The maps
        # are vLLM's initial layout (slot i holds expert i % E), so even a pass run
        # before add_model would route correctly.
        initial = Placement.initial(model.num_moe_layers, model.num_logical_experts,
                                    model.num_physical_experts).to_torch(device)
        load = torch.zeros(model.num_moe_layers, model.num_physical_experts,
                           dtype=torch.int64, device=device)
        self.set_eplb_state(load, initial.logical_to_physical, initial.replica_count)

    def _keep_last_layers(self) -> None:
        weights = self.model.expert_weights
        layers = self.model.num_moe_layers
        # vLLM models append on every set_eplb_state call: the newest lists are the
        # live ones (earlier calls registered views of the same parameters).
        self._weights = [list(w) for w in list(weights)[len(weights) - layers:]]

    @property
    def expert_weights(self) -> list[Any]:
        """``expert_weights[layer][i]``: this rank's tensors, first dim the local slot."""
        return self._weights

    def set_eplb_state(self, expert_load_view: torch.Tensor,
                       logical_to_physical_map: torch.Tensor,
                       logical_replica_count: torch.Tensor) -> None:
        self.model.set_eplb_state(expert_load_view, logical_to_physical_map,
                                  logical_replica_count)
        if len(self.model.expert_weights) < self.model.num_moe_layers:
            raise ValueError(f"{type(self.model).__name__}.set_eplb_state registered "
                             f"{len(self.model.expert_weights)} expert weight lists, expected "
                             f"num_moe_layers={self.model.num_moe_layers}")
        self._keep_last_layers()

    # The integer attributes are read through, so a model that updates them
    # (vLLM's update_physical_experts_metadata) is seen as it is.
    @property
    def num_moe_layers(self) -> int:
        return int(self.model.num_moe_layers)

    @property
    def num_expert_groups(self) -> int:
        return int(self.model.num_expert_groups)

    @property
    def num_logical_experts(self) -> int:
        return int(self.model.num_logical_experts)

    @property
    def num_physical_experts(self) -> int:
        return int(self.model.num_physical_experts)

    @property
    def num_local_physical_experts(self) -> int:
        return int(self.model.num_local_physical_experts)

    @property
    def num_redundant_experts(self) -> int:
        return int(self.model.num_redundant_experts)


def _occurrence(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each entry of flat `ids`, how many earlier entries hold the same id.

    A stable sort groups equal ids in their original order; subtracting each
    group's start gives the rank within the group. Static shapes and no host
    synchronisation (scatter_add_, not bincount), so it suits compiled graphs.
    """
    order = torch.sort(ids, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    starts = torch.cumsum(counts, 0) - counts
    occurrence = torch.empty_like(ids)
    occurrence[order] = torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]
    return occurrence


def select_replicas(topk_ids: torch.Tensor, logical_to_physical: torch.Tensor,
                    replica_count: torch.Tensor, *, layer: int | None = None,
                    offset: int | torch.Tensor = 0,
                    expert_load_view: torch.Tensor | None = None,
                    validate: bool = False) -> torch.Tensor:
    """Physical slot ids for logical expert ids, spread evenly over each expert's replicas.

    - `topk_ids`: integer tensor of logical ids, any shape (typically
      [tokens, top_k]); the result has its shape and dtype.
    - `logical_to_physical` [E, max_replicas] and `replica_count` [E] for one
      layer, or [L, E, max_replicas] and [L, E] with `layer` (the tensors the
      runtime hands to ``set_eplb_state``).
    - The i-th assignment to expert e (in flat order) goes to replica
      ``(i + offset) % replica_count[e]``: within one call an expert's replicas
      get counts that differ by at most one, whatever the top-k pattern (vLLM's
      ``position % replica_count`` sends every assignment to replica 0 when a
      hot expert is always, say, the first of two choices). `offset` rotates
      which replicas get the remainders: pass one that differs across ranks and
      passes (``rank + pass_index``) so that over time every replica gets the
      same share. Deterministic: the same inputs give the same slots on any device.
    - `expert_load_view` [P] (or [L, P] with `layer`): if given, one is added per
      assignment to the chosen slot, which is the load the runtime balances on.
    - `validate`: check ids and replica counts (costs a device synchronisation;
      for tests and debugging, not the serving path).
    """
    if layer is not None:
        logical_to_physical, replica_count = logical_to_physical[layer], replica_count[layer]
        if expert_load_view is not None and expert_load_view.dim() == 2:
            expert_load_view = expert_load_view[layer]
    if logical_to_physical.dim() != 2 or replica_count.dim() != 1 or \
            replica_count.shape[0] != logical_to_physical.shape[0]:
        raise ValueError(f"expected logical_to_physical [E, max_replicas] and replica_count "
                         f"[E] (or [L, ...] with layer=), got {tuple(logical_to_physical.shape)}"
                         f" and {tuple(replica_count.shape)}")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must hold integer expert ids, got {topk_ids.dtype}")
    num_experts = logical_to_physical.shape[0]
    ids = topk_ids.reshape(-1).long()
    if validate and ids.numel():
        if int(ids.min()) < 0 or int(ids.max()) >= num_experts:
            raise ValueError(f"topk_ids holds an id outside [0, {num_experts})")
        if int(replica_count.index_select(0, ids).min()) < 1:
            raise ValueError("a selected logical expert has no replica (replica_count 0)")
    # clamp: a wrong map must not divide by zero (validate=True names the problem)
    count = replica_count.index_select(0, ids).long().clamp_min(1)
    replica = torch.remainder(_occurrence(ids, num_experts) + offset, count)
    slots = logical_to_physical[ids, replica]
    if expert_load_view is not None:
        expert_load_view.scatter_add_(0, slots, torch.ones_like(slots,
                                                                dtype=expert_load_view.dtype))
    return slots.reshape(topk_ids.shape).to(topk_ids.dtype)
