"""A reference expert-parallel MoE model whose outputs never depend on placement.

`ReferenceMoE` implements the runtime's `MoEModel` protocol with real expert
MLPs, a top-k router and token dispatch over torch.distributed, so that the
balancer can be run end to end and checked: rebalancing must never change what
the model computes. `DenseMoE` evaluates the same weights in one process,
without expert parallelism, as the oracle.

The arithmetic (products, norms, softmax) is batch-invariant in exact mode,
so that a row's result never depends on which rows share its batch:
`exact_ops` says why and how.

Tolerance: on CPU, outputs are bit-identical across placements, replica
choices, world sizes and the dense evaluation (the tests assert
``torch.equal``). On GPU the same ops are exactly rounded too, so we expect
bit-identity there as well; what we promise on GPU, until it is measured, is
``rtol=1e-5, atol=1e-6`` in float32 compute (which bf16/fp16 weights also
use), covering a compiler that fuses a multiply and an add into an FMA
(e.g. under ``torch.compile``).

Fast mode (``MoEConfig(exact=False)``): plain matmuls grouped by expert,
``torch.softmax`` and a fused RMS norm. A row's result then depends on which
rows share its matmul, so outputs match the dense evaluation only within a
tolerance (``FAST_RTOL``/``FAST_ATOL`` in float32 compute); this is the mode
for model sizes a GPU benchmark needs (hidden 4096), where the exact
products would need [rows, in, out] temporaries.

Communication per layer: one ``all_to_all_single`` of row counts, one of the
rows (the local slot index rides along as an extra column) and one of the
results back. With forced routing every layer's routing is known up front, so
the counts of all layers travel in a single collective before the first layer.

Replica choice: the i-th (token, k) assignment of this rank to logical
expert e in a layer goes to replica ``(i + rank) % replica_count[e]`` — an even
spread within a rank (counts differ by at most one) that does not pile every
rank's first token onto replica 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import nn

from .._core.placement import Placement
from .exact_ops import RMS_EPS, expert_rows, rms_norm, row_matmul, softmax_rows

__all__ = [
    "DenseMoE",
    "MoEConfig",
    "ReferenceMoE",
    "expert_weights_for",
    "route_to_slots",
    "router_weight_for",
    "sample_tokens",
]

FAST_RTOL, FAST_ATOL = 1e-4, 1e-4  # exact=False against the dense evaluation (float32)
_TAG_EXPERT = 0
_TAG_ROUTER = 1
_TAG_TOKENS = 2

# Forced routing: [L, tokens, top_k] (a tensor, or a numpy array as traces give it) or
# one [tokens, top_k] tensor per layer.
ExpertIds = torch.Tensor | npt.NDArray[np.integer[Any]] | Sequence[torch.Tensor] | None


@dataclass(frozen=True)
class MoEConfig:
    """What determines the weights (and so the outputs) of the reference model.

    Deployment choices — number of slots, ranks, placement, device — are not
    here: they must not change the outputs.
    """

    num_layers: int
    num_logical_experts: int
    hidden_size: int = 32
    intermediate_size: int = 64
    top_k: int = 2
    seed: int = 0
    dtype: torch.dtype = torch.float32
    num_expert_groups: int = 1
    exact: bool = True

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_logical_experts", "hidden_size", "intermediate_size",
                     "top_k", "num_expert_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.top_k > self.num_logical_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_logical_experts="
                             f"{self.num_logical_experts}")
        if self.num_logical_experts % self.num_expert_groups:
            raise ValueError(f"num_expert_groups={self.num_expert_groups} must divide "
                             f"num_logical_experts={self.num_logical_experts}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact must be a bool, got {self.exact!r}")
        if self.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, float64, bfloat16 or float16, "
                             f"got {self.dtype}")

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for float64 weights, else float32 (low-precision weights are upcast)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32


def expert_weights_for(
    config: MoEConfig, layer: int, expert: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of one logical expert, from the seed alone (any rank can build any).

    Returns ``(w_gate_up [H, 2I], w_down [I, H])`` in ``config.dtype`` on `device`;
    layout is [in, out], the layout the tree products contract over. In fast
    mode on CUDA they are drawn on the device (a GPU-sized model would take
    minutes on the host); the same seed gives the same weights on every GPU
    of one kind, which is all the model and its dense oracle need.
    """
    if not 0 <= layer < config.num_layers or not 0 <= expert < config.num_logical_experts:
        raise ValueError(f"(layer, expert)=({layer}, {expert}) out of range for "
                         f"{config.num_layers} layers x {config.num_logical_experts} experts")
    h, i = config.hidden_size, config.intermediate_size
    device = torch.device(device)
    if not config.exact and device.type == "cuda":
        gen = torch.Generator(device=device)
        gen.manual_seed((config.seed * 1_000_003 + layer) * 1_000_003 + expert)
        gate_up = torch.randn(h, 2 * i, generator=gen, device=device) / math.sqrt(h)
        down = torch.randn(i, h, generator=gen, device=device) / math.sqrt(i)
        return gate_up.to(config.dtype), down.to(config.dtype)
    rng = np.random.default_rng([config.seed, _TAG_EXPERT, layer, expert])
    gate_up = rng.standard_normal((h, 2 * i), dtype=np.float32) / np.float32(math.sqrt(h))
    down = rng.standard_normal((i, h), dtype=np.float32) / np.float32(math.sqrt(i))
    return (torch.from_numpy(gate_up).to(device=device, dtype=config.dtype),
            torch.from_numpy(down).to(device=device, dtype=config.dtype))


def router_weight_for(config: MoEConfig, layer: int) -> torch.Tensor:
    """Router weight [H, E] of one layer, in ``config.dtype`` on CPU."""
    rng = np.random.default_rng([config.seed, _TAG_ROUTER, layer])
    w = rng.standard_normal((config.hidden_size, config.num_logical_experts), dtype=np.float32)
    # A little sharper than unit scale, so learned routing is visibly skewed.
    return torch.from_numpy(w * np.float32(2.0 / math.sqrt(config.hidden_size))).to(config.dtype)


def sample_tokens(config: MoEConfig, num_tokens: int, *, step: int = 0,
                  rank: int = 0) -> torch.Tensor:
    """Hidden states [num_tokens, H] for `rank` at `step`, a function of (seed, step, rank).

    Any process can rebuild any rank's tokens, so one rank can check the whole
    group's outputs against `DenseMoE` without gathering inputs.
    """
    for name, value in (("num_tokens", num_tokens), ("step", step), ("rank", rank)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    rng = np.random.default_rng([config.seed, _TAG_TOKENS, step, rank])
    tokens = rng.standard_normal((num_tokens, config.hidden_size), dtype=np.float32)
    return torch.from_numpy(tokens).to(config.dtype)


def _occurrence_index(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each entry, how many earlier entries hold the same id."""
    order = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    occurrence = torch.empty_like(ids)
    occurrence[order] = torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]
    return occurrence


def route_to_slots(ids: torch.Tensor, logical_to_physical: torch.Tensor,
                   replica_count: torch.Tensor, rank: int, layer: int = 0) -> torch.Tensor:
    """The physical slot of each (token, k) assignment of EP rank `rank` in one layer,
    by the replica rule above (module doc), under the given maps ([E, max_replicas]
    and [E]). What `ReferenceMoE` dispatches with; ``eplb-fsm simulate`` also asks
    it where the same routing would land under another placement."""
    ids = ids.reshape(-1)
    replicas = replica_count.index_select(0, ids)
    if replicas.numel() and int(replicas.min()) < 1:
        missing = int(ids[replicas < 1][0])
        raise RuntimeError(f"layer {layer}: logical expert {missing} has no replica")
    replica = (_occurrence_index(ids, replica_count.shape[0]) + rank) % replicas
    return logical_to_physical[ids, replica]


def _forced_ids(expert_ids: ExpertIds, layer: int, num_tokens: int, config: MoEConfig,
                device: torch.device) -> torch.Tensor | None:
    if expert_ids is None:
        return None
    return _checked_ids(expert_ids, layer, num_tokens, config, device)


def _checked_ids(
    expert_ids: torch.Tensor | npt.NDArray[np.integer[Any]] | Sequence[torch.Tensor],
    layer: int, num_tokens: int, config: MoEConfig, device: torch.device,
) -> torch.Tensor:
    """Layer `layer` of a forced routing as an int64 [tokens, top_k] tensor, validated."""
    ids = torch.as_tensor(expert_ids[layer], device=device)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"expert_ids[{layer}] must hold integer expert ids, got {ids.dtype}")
    ids = ids.long()
    if ids.shape != (num_tokens, config.top_k):
        raise ValueError(f"expert_ids[{layer}] has shape {tuple(ids.shape)}, expected "
                         f"{(num_tokens, config.top_k)} (tokens, top_k)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.num_logical_experts):
        raise ValueError(f"expert_ids[{layer}] holds an id outside "
                         f"[0, {config.num_logical_experts})")
    return ids


def _check_forward_args(hidden: torch.Tensor, expert_ids: ExpertIds, config: MoEConfig) -> None:
    if hidden.ndim != 2 or hidden.shape[1] != config.hidden_size:
        raise ValueError(f"hidden must be [tokens, {config.hidden_size}], "
                         f"got shape {tuple(hidden.shape)}")
    if expert_ids is not None and len(expert_ids) != config.num_layers:
        raise ValueError(f"expert_ids must give one [tokens, top_k] tensor per layer "
                         f"({config.num_layers}), got {len(expert_ids)}")


def _resolve(device: torch.device | str) -> torch.device:
    """The device tensors really land on ("cuda" -> "cuda:0"), for equality checks."""
    return torch.empty(0, device=device).device


RunExperts = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _moe_stack(
    config: MoEConfig,
    routers: Sequence[torch.Tensor],
    hidden: torch.Tensor,
    expert_ids: ExpertIds,
    run_experts: RunExperts,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The whole stack; `run_experts(layer, rows [n*k, H], logical ids [n*k])` computes
    the expert outputs (locally or over the EP group). Returns output and routing."""
    _check_forward_args(hidden, expert_ids, config)
    compute = config.compute_dtype
    h = hidden.to(compute)
    n, k = h.shape[0], config.top_k
    routing: list[torch.Tensor] = []
    for layer, router in enumerate(routers):
        if config.exact:
            x = rms_norm(h)
            logits = row_matmul(x, router.to(compute))
        else:
            x = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)
            logits = x @ router.to(compute)
        ids = _forced_ids(expert_ids, layer, n, config, h.device)
        if ids is None:
            ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
        picked = logits.gather(1, ids)
        gates = softmax_rows(picked) if config.exact else torch.softmax(picked, dim=-1)
        rows = x.repeat_interleave(k, dim=0)
        y = run_experts(layer, rows, ids.reshape(-1)).view(n, k, h.shape[1])
        mixed = gates[:, :1] * y[:, 0]
        for j in range(1, k):
            mixed = mixed + gates[:, j:j + 1] * y[:, j]
        h = h + mixed
        routing.append(ids)
    return h.to(config.dtype), routing


class DenseMoE:
    """Single-process evaluation of the same weights: every expert in one table.

    The oracle: `ReferenceMoE` must return exactly ``DenseMoE(config)(hidden)``
    for the same tokens, whatever the placement and the number of ranks.
    """

    def __init__(self, config: MoEConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = _resolve(device)
        self.routers = [router_weight_for(config, layer).to(self.device)
                        for layer in range(config.num_layers)]
        self.gate_up: list[torch.Tensor] = []
        self.down: list[torch.Tensor] = []
        for layer in range(config.num_layers):
            pairs = [expert_weights_for(config, layer, e, self.device)
                     for e in range(config.num_logical_experts)]
            self.gate_up.append(torch.stack([p[0] for p in pairs]).to(self.device))
            self.down.append(torch.stack([p[1] for p in pairs]).to(self.device))

    def _run_experts(self, layer: int, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return expert_rows(rows, self.gate_up[layer], self.down[layer], ids,
                            self.config.compute_dtype, self.config.exact)

    @torch.no_grad()
    def forward_with_routing(
        self, hidden: torch.Tensor, expert_ids: ExpertIds = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Output [tokens, H] and each layer's chosen logical experts [tokens, top_k]."""
        return _moe_stack(self.config, self.routers, hidden.to(self.device), expert_ids,
                          self._run_experts)

    def __call__(self, hidden: torch.Tensor, expert_ids: ExpertIds = None) -> torch.Tensor:
        return self.forward_with_routing(hidden, expert_ids)[0]


class ReferenceMoE(nn.Module):
    """The expert-parallel model: this rank's slots, a router per layer, dispatch over
    `group`. Implements `eplb_fsm._adapters.interfaces.MoEModel`.

    Every rank of `group` must call `forward` the same number of times (it runs
    collectives), each with its own tokens (any number, zero included). Without an
    initialised process group the model runs alone as rank 0 of 1.

    ``expert_weights[layer] == [w_gate_up [local, H, 2I], w_down [local, I, H]]``; the
    balancer rewrites them in place. The model reads the three tensors given to
    `set_eplb_state` on every pass; until then it uses its own, built from
    `placement`. The device and dtype are fixed at construction (``.to()`` raises:
    it would detach `expert_weights` from the tensors the runtime holds).

    Elastic EP (docs/elastic.md): a rank joining a running deployment builds the
    model with ``load_weights=False`` over the new EP group, so no expert weight
    is read or generated on it: its slots start as NaN and the reconfiguration's
    transfer fills them (a slot left unfilled shows in every output it touches).
    A staying rank learns its new EP rank through `resize_ep`.
    """

    expert_weights: list[list[torch.Tensor]]
    _planned: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    def __init__(
        self,
        config: MoEConfig,
        num_physical_experts: int,
        *,
        placement: Placement | None = None,
        group: Any = None,
        device: torch.device | str = "cpu",
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(group), dist.get_world_size(group)
        elif group is not None:
            raise ValueError("group given but torch.distributed is not initialised")
        else:
            rank, world = 0, 1
        num_logical = config.num_logical_experts
        if (not isinstance(num_physical_experts, int) or num_physical_experts < num_logical
                or num_physical_experts % world):
            raise ValueError(f"num_physical_experts must be an int >= num_logical_experts="
                             f"{num_logical} and divisible by the group size {world}, "
                             f"got {num_physical_experts!r}")
        if placement is None:
            placement = Placement.initial(config.num_layers, num_logical, num_physical_experts)
        if (placement.num_layers, placement.num_logical, placement.num_physical) != (
                config.num_layers, num_logical, num_physical_experts):
            raise ValueError(f"placement is {placement!r}, expected layers={config.num_layers}, "
                             f"physical={num_physical_experts}, logical={num_logical}")
        self.config = config
        self.group = group
        self.rank, self.world_size = rank, world
        self.device = _resolve(device)
        self.num_moe_layers = config.num_layers
        self.num_logical_experts = num_logical
        self.num_physical_experts = num_physical_experts
        self.num_local_physical_experts = num_physical_experts // world
        self.num_redundant_experts = num_physical_experts - num_logical
        self.num_expert_groups = config.num_expert_groups
        self.routers = [router_weight_for(config, layer).to(self.device)
                        for layer in range(config.num_layers)]
        local, h, i = self.num_local_physical_experts, config.hidden_size, config.intermediate_size
        self.expert_weights = [
            [torch.zeros(local, h, 2 * i, dtype=config.dtype, device=self.device),
             torch.zeros(local, i, h, dtype=config.dtype, device=self.device)]
            for _ in range(config.num_layers)
        ]
        self._planned = {}
        if load_weights:
            self.load_placement_weights(placement)
        else:  # NaN, not zeros: a slot the transfer never fills poisons every output it touches
            for tensors in self.expert_weights:
                for tensor in tensors:
                    tensor.fill_(float("nan"))
        maps = placement.to_torch(self.device)
        self.set_eplb_state(
            torch.zeros(config.num_layers, num_physical_experts, dtype=torch.int64,
                        device=self.device),
            maps.logical_to_physical, maps.replica_count)

    # -- the MoEModel protocol -----------------------------------------------------------

    def set_eplb_state(
        self,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        """Keep references to the runtime's tensors; they are read on every pass."""
        num_layers, num_logical = self.num_moe_layers, self.num_logical_experts
        checks = (
            ("expert_load_view", expert_load_view, (num_layers, self.num_physical_experts)),
            ("logical_to_physical_map", logical_to_physical_map, None),
            ("logical_replica_count", logical_replica_count, (num_layers, num_logical)),
        )
        for name, tensor, shape in checks:
            if tensor.dtype != torch.int64:
                raise ValueError(f"{name} must be int64, got {tensor.dtype}")
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device}, the model on {self.device}")
            if shape is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        l2p_shape = tuple(logical_to_physical_map.shape)
        if len(l2p_shape) != 3 or l2p_shape[:2] != (num_layers, num_logical) or l2p_shape[2] < 1:
            raise ValueError(f"logical_to_physical_map has shape {l2p_shape}, expected "
                             f"({num_layers}, {num_logical}, max_replicas)")
        self.expert_load_view = expert_load_view
        self.logical_to_physical_map = logical_to_physical_map
        self.logical_replica_count = logical_replica_count

    def resize_ep(self, group: Any, rank: int, world_size: int) -> None:
        """The EP group changed (elastic EP): same slots per rank, a new rank and rank count.

        The local expert tensors keep their shape (the runtime moved their
        contents); only the dispatch changes: the group, this rank's position
        and the number of physical slots. The runtime passes the resized maps
        with `set_eplb_state` right after.
        """
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not rank < world_size:
            raise ValueError(f"rank={rank} must be below world_size={world_size}")
        physical = world_size * self.num_local_physical_experts
        if physical < self.num_logical_experts:
            raise ValueError(f"{world_size} ranks x {self.num_local_physical_experts} slots = "
                             f"{physical} slots cannot hold {self.num_logical_experts} experts")
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.num_physical_experts = physical
        self.num_redundant_experts = physical - self.num_logical_experts

    # -- weights and placements ------------------------------------------------------------

    @property
    def local_slots(self) -> range:
        """The physical slots this rank holds (slots are rank-contiguous)."""
        local = self.num_local_physical_experts
        return range(self.rank * local, (self.rank + 1) * local)

    def load_placement_weights(self, placement: Placement) -> None:
        """Rebuild this rank's slots for `placement` from the seed, in place.

        What a completed rebalance leaves in `expert_weights`, without moving
        anything: for tests, and for runs that re-place experts without a mover.
        Empty slots (-1) get zeros. The routing maps are not touched.
        """
        self._check_placement(placement)
        for layer in range(self.num_moe_layers):
            gate_up, down = self.expert_weights[layer]
            for local, slot in enumerate(self.local_slots):
                expert = int(placement.physical_to_logical[layer, slot])
                if expert < 0:
                    gate_up[local].zero_()
                    down[local].zero_()
                    continue
                w_gate_up, w_down = expert_weights_for(self.config, layer, expert, self.device)
                gate_up[local].copy_(w_gate_up)
                down[local].copy_(w_down)

    def _check_placement(self, placement: Placement) -> None:
        if (placement.num_layers, placement.num_physical, placement.num_logical) != (
                self.num_moe_layers, self.num_physical_experts, self.num_logical_experts):
            raise ValueError(f"placement is {placement!r}, expected layers="
                             f"{self.num_moe_layers}, physical={self.num_physical_experts}, "
                             f"logical={self.num_logical_experts}")

    def apply_placement(self, placement: Placement) -> None:
        """`load_placement_weights`, then copy the maps into the state tensors in place
        (a synchronous rebalance with no runtime)."""
        self._check_placement(placement)
        maps = placement.to_torch(self.device)
        if maps.logical_to_physical.shape != self.logical_to_physical_map.shape:
            raise ValueError(f"placement's logical_to_physical has shape "
                             f"{tuple(maps.logical_to_physical.shape)}, the model's map "
                             f"{tuple(self.logical_to_physical_map.shape)}")
        self.load_placement_weights(placement)
        self.logical_to_physical_map.copy_(maps.logical_to_physical)
        self.logical_replica_count.copy_(maps.replica_count)

    def dense_reference(self) -> DenseMoE:
        """A single-process evaluation of the same weights on this model's device."""
        return DenseMoE(self.config, self.device)

    def _apply(self, fn: Any, recurse: bool = True) -> ReferenceMoE:
        raise TypeError("ReferenceMoE cannot be moved or cast; build it with the device and "
                        "dtype you need (the runtime holds its expert_weights tensors)")

    # -- forward -------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, expert_ids: ExpertIds = None) -> torch.Tensor:
        """Run this rank's tokens [tokens, H] through all layers; returns [tokens, H].

        `expert_ids`, if given, forces the routing: one [tokens, top_k] integer
        tensor per layer, or an [L, tokens, top_k] tensor or numpy array such as
        ``SyntheticTrace.routing(step, rank, tokens, top_k)`` returns;
        the combine weights still come from the router's logits at those ids.
        Adds this rank's (token, k) assignments per physical slot to
        ``expert_load_view``.
        """
        hidden = hidden.to(self.device)
        self._planned = {}
        if expert_ids is not None and self.world_size > 1:
            # Forced routing is known for every layer up front: exchange all layers'
            # send counts in one collective instead of one per layer.
            _check_forward_args(hidden, expert_ids, self.config)
            routes = [self._route(layer, _checked_ids(expert_ids, layer, hidden.shape[0],
                                                      self.config, self.device))
                      for layer in range(self.num_moe_layers)]
            send = torch.stack([route[2] for route in routes], dim=1)  # [R, L]
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send.contiguous(), group=self.group)
            for layer, (slots, dest, counts) in enumerate(routes):
                self._planned[layer] = (slots, dest, counts, recv[:, layer])
        try:
            return _moe_stack(self.config, self.routers, hidden, expert_ids,
                              self._run_experts)[0]
        finally:
            self._planned = {}

    def _route(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        """Pick a replica per assignment, count the load; returns slots, owner ranks and
        the number of rows for each rank."""
        slots = route_to_slots(ids, self.logical_to_physical_map[layer],
                               self.logical_replica_count[layer], self.rank, layer)
        self.expert_load_view[layer].add_(
            torch.bincount(slots, minlength=self.num_physical_experts))
        dest = torch.div(slots, self.num_local_physical_experts, rounding_mode="floor")
        return slots, dest, torch.bincount(dest, minlength=self.world_size)

    def _run_experts(self, layer: int, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.expert_weights[layer]
        compute = self.config.compute_dtype
        planned = self._planned.get(layer)
        if planned is not None:
            slots, dest, send_counts, recv_counts = planned
        else:
            slots, dest, send_counts = self._route(layer, ids)
            if self.world_size == 1:
                return expert_rows(rows, gate_up, down, slots, compute, self.config.exact)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        local = self.num_local_physical_experts
        order = torch.sort(dest, stable=True).indices
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        num_recv = sum(recv_split)
        # The local slot index travels as an extra column of the rows: one collective
        # fewer per layer (they dominate on CPU), exact since local < 2**24.
        hidden = rows.shape[1]
        send = torch.cat([rows, (slots - dest * local).to(rows.dtype).unsqueeze(1)], dim=1)
        received = rows.new_empty(num_recv, hidden + 1)
        dist.all_to_all_single(received, send[order], recv_split, send_split,
                               group=self.group)
        recv_index = received[:, hidden].long()
        computed = expert_rows(received[:, :hidden], gate_up, down, recv_index, compute,
                                self.config.exact)
        back = rows.new_empty(rows.shape)
        dist.all_to_all_single(back, computed, send_split, recv_split, group=self.group)
        out = torch.empty_like(back)
        out[order] = back
        return out
