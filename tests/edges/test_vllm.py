"""A model shaped like vLLM's MixtureOfExperts plugs in unchanged; its router uses
`select_replicas`. The fake mirrors vLLM's contract: ``expert_weights`` is empty until
``set_eplb_state``, which appends one list of flattened per-slot views per MoE layer and
hands each layer its slice of the three state tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_fsm import EplbConfig, MoEModel, Placement
from eplb_fsm.testing import FakeCluster
from eplb_fsm.vllm import VllmMoEAdapter, check_mixture_of_experts, select_replicas

L, E, REDUNDANT, TOP_K, TOKENS = 3, 12, 4, 2, 48


def tag(layer: int, expert: int, tensor: int) -> float:
    return float(layer * 1000 + expert * 10 + tensor)


class FakeFusedMoE:
    """One MoE layer with EPLB on, as vLLM's FusedMoE: 3-D parameters, flat views."""

    def __init__(self, layer: int, rank: int, local: int, num_logical: int) -> None:
        experts = [(rank * local + i) % num_logical for i in range(local)]
        self.local = local
        self.w13_weight = torch.stack([torch.full((6, 4), tag(layer, e, 0)) for e in experts])
        self.w2_weight = torch.stack([torch.full((4, 3), tag(layer, e, 1)) for e in experts])

    def get_expert_weights(self) -> list[torch.Tensor]:
        return [w.view(self.local, -1) for w in (self.w13_weight, self.w2_weight)]

    def set_eplb_state(self, moe_layer_idx: int, expert_load_view: torch.Tensor,
                       logical_to_physical_map: torch.Tensor,
                       logical_replica_count: torch.Tensor) -> None:
        self.expert_load_view = expert_load_view[moe_layer_idx]
        self.logical_to_physical_map = logical_to_physical_map[moe_layer_idx]
        self.logical_replica_count = logical_replica_count[moe_layer_idx]

    def route(self, topk_ids: torch.Tensor, offset: int) -> torch.Tensor:
        """The router's EPLB step: logical top-k ids -> physical slots, load recorded."""
        return select_replicas(topk_ids, self.logical_to_physical_map,
                               self.logical_replica_count, offset=offset,
                               expert_load_view=self.expert_load_view)


class FakeVllmMoEModel:
    """The MixtureOfExperts part of a vLLM model class, attribute for attribute."""

    def __init__(self, rank: int, world: int, num_layers: int = L, num_logical: int = E,
                 num_redundant: int = REDUNDANT) -> None:
        self.rank = rank
        self.expert_weights: list[list[torch.Tensor]] = []
        self.num_moe_layers = num_layers
        self.num_expert_groups = 1
        self.num_logical_experts = num_logical
        self.num_physical_experts = num_logical + num_redundant
        self.num_local_physical_experts = self.num_physical_experts // world
        self.num_routed_experts = num_logical
        self.num_shared_experts = 0
        self.num_redundant_experts = num_redundant
        self.moe_layers = [FakeFusedMoE(layer, rank, self.num_local_physical_experts,
                                        num_logical) for layer in range(num_layers)]

    def set_eplb_state(self, expert_load_view: torch.Tensor,
                       logical_to_physical_map: torch.Tensor,
                       logical_replica_count: torch.Tensor) -> None:
        for layer_idx, layer in enumerate(self.moe_layers):
            self.expert_weights.append(layer.get_expert_weights())
            layer.set_eplb_state(moe_layer_idx=layer_idx, expert_load_view=expert_load_view,
                                 logical_to_physical_map=logical_to_physical_map,
                                 logical_replica_count=logical_replica_count)

    def update_physical_experts_metadata(self, num_physical_experts: int,
                                         num_local_physical_experts: int) -> None:
        raise NotImplementedError("elastic EP is not exercised here")

    def wrong_slots(self, physical_to_logical: np.ndarray) -> list[tuple[int, int]]:
        wrong = []
        n = self.num_local_physical_experts
        for layer, moe in enumerate(self.moe_layers):
            for slot in range(n):
                expert = int(physical_to_logical[layer, self.rank * n + slot])
                if not (bool((moe.w13_weight[slot] == tag(layer, expert, 0)).all())
                        and bool((moe.w2_weight[slot] == tag(layer, expert, 1)).all())):
                    wrong.append((layer, slot))
        return wrong


def skewed_topk(step: int, rank: int) -> torch.Tensor:
    """[L, tokens, top_k] distinct logical ids per token, Zipf-skewed by layer."""
    rng = np.random.default_rng([step, rank])
    out = np.empty((L, TOKENS, TOP_K), dtype=np.int64)
    for layer in range(L):
        popularity = 1.0 / np.arange(1, E + 1) ** 1.5
        popularity = np.roll(popularity, 5 * layer) / popularity.sum()
        for t in range(TOKENS):
            out[layer, t] = rng.choice(E, size=TOP_K, replace=False, p=popularity)
    return torch.from_numpy(out)


def test_the_fake_implements_the_interface_and_the_checker_names_what_is_missing() -> None:
    model = FakeVllmMoEModel(0, 4)
    assert check_mixture_of_experts(model) == []
    del model.num_expert_groups
    model.num_redundant_experts = -1
    problems = check_mixture_of_experts(model)
    assert any("num_expert_groups" in p for p in problems)
    assert any("num_redundant_experts" in p for p in problems)
    with pytest.raises(ValueError, match="MixtureOfExperts"):
        VllmMoEAdapter(model)


def test_the_adapter_registers_weights_once_and_reads_attributes_through() -> None:
    model = FakeVllmMoEModel(1, 4)
    adapter = VllmMoEAdapter(model)
    assert isinstance(adapter, MoEModel)
    assert len(adapter.expert_weights) == L
    assert adapter.expert_weights[0][0].shape[0] == model.num_local_physical_experts
    # The weights are views of the model's parameters, not copies.
    adapter.expert_weights[0][0][0].fill_(-1.0)
    assert bool((model.moe_layers[0].w13_weight[0] == -1.0).all())
    # Until the runtime's tensors arrive, the layers route with vLLM's initial layout.
    initial = Placement.initial(L, E, E + REDUNDANT)
    assert np.array_equal(model.moe_layers[2].logical_to_physical_map.numpy(),
                          initial.logical_to_physical[2])
    for name in ("num_moe_layers", "num_logical_experts", "num_physical_experts",
                 "num_local_physical_experts", "num_redundant_experts", "num_expert_groups"):
        assert getattr(adapter, name) == getattr(model, name)


@pytest.mark.asyncio
async def test_a_vllm_shaped_model_rebalances_on_a_fake_cluster() -> None:
    config = EplbConfig(window_size=10, step_interval=20, num_redundant_experts=REDUNDANT)
    cluster = FakeCluster(4, config)
    adapters = cluster.add_model(
        "main", factory=lambda rank, world: VllmMoEAdapter(FakeVllmMoEModel(rank, world)))
    models = [a.model for a in adapters]
    for step in range(1, 51):
        for rank, model in enumerate(models):
            ids = skewed_topk(step, rank)
            for layer, moe in enumerate(model.moe_layers):
                slots = moe.route(ids[layer], offset=rank + step)
                p2l = cluster.runtimes[rank].placement().physical_to_logical[layer]
                assert np.array_equal(p2l[slots.numpy()], ids[layer].numpy())
        assert await cluster.step() == [None] * 4
    rt = cluster.runtimes[0]
    stats = rt.stats()["models"]["main"]
    assert stats["rebalances"]["done"] == 1 and stats["bytes_moved"] > 0
    assert stats["balancedness"]["after_last_plan"]["mean"] > \
        stats["balancedness"]["before_last_plan"]["mean"] + 0.05
    placement = rt.placement()
    assert placement != Placement.initial(L, E, E + REDUNDANT)
    for rank, (adapter, model) in enumerate(zip(adapters, models, strict=True)):
        # Every slot holds the weights of the expert the new map names ...
        assert model.wrong_slots(cluster.runtimes[rank].placement().physical_to_logical) == []
        # ... and every layer's own slices of the maps saw the commits in place.
        for layer, moe in enumerate(model.moe_layers):
            assert np.array_equal(moe.logical_to_physical_map.numpy(),
                                  placement.logical_to_physical[layer])
            assert np.array_equal(moe.logical_replica_count.numpy(),
                                  placement.replica_count[layer])
        assert len(adapter.expert_weights) == L  # the model's list grew; the live L are kept


def maps(p2l: list[list[int]], num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    placement = Placement(np.array(p2l), num_logical)
    tensors = placement.to_torch("cpu")
    return tensors.logical_to_physical, tensors.replica_count


def test_select_replicas_spreads_each_expert_evenly_whatever_the_topk_pattern() -> None:
    # Expert 0 has replicas in slots 0 and 4; it is every token's first choice, so
    # `position % replicas` would send all of them to one replica.
    l2p, count = maps([[0, 1, 2, 3, 0, 1]], 4)
    ids = torch.tensor([[0, 1 + t % 3] for t in range(9)])
    slots = select_replicas(ids, l2p, count, layer=0)
    p2l = np.array([0, 1, 2, 3, 0, 1])
    assert np.array_equal(p2l[slots.numpy()], ids.numpy())
    per_slot = torch.bincount(slots.reshape(-1), minlength=6).tolist()
    assert abs(per_slot[0] - per_slot[4]) <= 1 and per_slot[0] + per_slot[4] == 9
    assert abs(per_slot[1] - per_slot[5]) <= 1
    # Deterministic; the offset rotates the remainders, so passes even out exactly.
    assert torch.equal(select_replicas(ids, l2p, count, layer=0), slots)
    total = sum((torch.bincount(select_replicas(ids, l2p, count, layer=0, offset=k)
                                .reshape(-1), minlength=6) for k in range(2)),
                torch.zeros(6, dtype=torch.int64))
    assert total[0] == total[4] == 9


def test_select_replicas_records_load_keeps_dtype_and_validates() -> None:
    l2p, count = maps([[0, 1, 2, 0], [1, 2, 0, 0]], 3)
    ids = torch.tensor([[0, 2], [0, 1], [0, 2]], dtype=torch.int32)
    load = torch.zeros(2, 4, dtype=torch.int64)
    slots = select_replicas(ids, l2p, count, layer=1, expert_load_view=load)
    assert slots.dtype == torch.int32 and slots.shape == ids.shape
    assert load[0].tolist() == [0, 0, 0, 0]
    assert load[1].tolist() == torch.bincount(slots.reshape(-1).long(), minlength=4).tolist()
    assert int(load[1].sum()) == ids.numel()
    assert torch.equal(select_replicas(ids, l2p[1], count[1]), slots)  # 2-D maps, same answer
    with pytest.raises(ValueError, match="outside"):
        select_replicas(torch.tensor([[3]]), l2p, count, layer=0, validate=True)
    empty = count.clone()
    empty[0, 2] = 0
    with pytest.raises(ValueError, match="no replica"):
        select_replicas(torch.tensor([[2]]), l2p, empty, layer=0, validate=True)
    with pytest.raises(ValueError, match="integer"):
        select_replicas(torch.tensor([[0.0]]), l2p, count, layer=0)
    with pytest.raises(ValueError, match="replica_count"):
        select_replicas(ids, l2p, count)  # 3-D maps need layer=
