"""The reference EP MoE model: outputs never depend on placement, load is counted right.

The spawned gloo runs (2 and 3 ranks) do several placements per run: each
rank builds its slots for placement A, runs its tokens, then "rebalances"
(rebuilds its slots for B and updates the three runtime-owned map tensors in
place) and runs the same tokens again. Outputs must be bit-identical across
placements and equal to a dense single-process evaluation of all ranks'
tokens in one batch; the load view must add up to the dense routing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_fsm._adapters.interfaces import MoEModel
from eplb_fsm._core.placement import Placement
from eplb_fsm._reference.moe import (
    DenseMoE,
    MoEConfig,
    ReferenceMoE,
    expert_weights_for,
    sample_tokens,
)
from eplb_fsm._reference.traces import SyntheticTrace
from eplb_fsm.testing import run_ranks

CONFIG = MoEConfig(num_layers=3, num_logical_experts=8, hidden_size=32,
                   intermediate_size=64, top_k=2, seed=7)
# At these sizes a per-expert BLAS matmul (x_e @ W_e) gives row results that depend on
# the batch: an implementation doing that fails the invariance tests below (checked).
NUM_PHYSICAL = 12  # divisible by 1, 2 and 3 ranks; 4 redundant slots per layer
TOKENS_PER_RANK = (37, 0, 53)  # a rank with no tokens must still join the collectives


def _tokens(rank: int, count: int, config: MoEConfig = CONFIG) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(count, config.hidden_size, generator=gen).to(config.dtype)


def _skewed_ids(rank: int, count: int, config: MoEConfig = CONFIG) -> torch.Tensor:
    """[L, count, top_k] distinct ids per token, most of them on experts 0 and 1."""
    gen = torch.Generator().manual_seed(2000 + rank)
    bias = torch.zeros(config.num_logical_experts)
    bias[:2] = 3.0
    keys = torch.rand(config.num_layers, count, config.num_logical_experts, generator=gen) + bias
    keys = keys * torch.rand(config.num_layers, count, config.num_logical_experts, generator=gen)
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :config.top_k]


def _placements(seed: int, num_physical: int = NUM_PHYSICAL) -> list[Placement]:
    """The initial layout, random ones with replicas (one expert with many), one with
    an empty slot."""
    rng = np.random.default_rng(seed)
    num_layers, num_logical = CONFIG.num_layers, CONFIG.num_logical_experts
    result = [Placement.initial(num_layers, num_logical, num_physical)]
    for trial in range(3):
        rows = []
        for _ in range(num_layers):
            extra = num_physical - num_logical
            if trial == 0:
                spare = np.full(extra, rng.integers(num_logical))  # one expert, 5 replicas
            elif trial == 1:
                spare = np.concatenate([[-1], rng.integers(0, num_logical, extra - 1)])
            else:
                spare = rng.integers(0, num_logical, extra)
            rows.append(rng.permutation(np.concatenate([np.arange(num_logical), spare])))
        result.append(Placement(np.array(rows), num_logical))
    return result


def _check_rank(rank: int, world_size: int, seed: int) -> list[torch.Tensor]:
    """Several placements x (learned, forced) routing; asserts here, returns outputs."""
    torch.set_num_threads(1)
    counts = TOKENS_PER_RANK[:world_size]
    all_tokens = torch.cat([_tokens(r, c) for r, c in enumerate(counts)])
    all_forced = torch.cat([_skewed_ids(r, c) for r, c in enumerate(counts)], dim=1)
    mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
    dense = DenseMoE(CONFIG)
    expected = [dense.forward_with_routing(all_tokens),
                dense.forward_with_routing(all_tokens, all_forced)]
    placements = _placements(seed)[::-1]  # start from a random placement, end at initial
    # The runtime's tensors: the model must keep reading these, updated in place.
    load = torch.zeros(CONFIG.num_layers, NUM_PHYSICAL, dtype=torch.int64)
    _, l2p, replicas = placements[0].to_torch()
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL, placement=placements[0])
    model.set_eplb_state(load, l2p, replicas)
    assert model.num_local_physical_experts == NUM_PHYSICAL // world_size
    assert list(model.local_slots) == list(range(rank * NUM_PHYSICAL // world_size,
                                                 (rank + 1) * NUM_PHYSICAL // world_size))
    outputs: list[torch.Tensor] = []
    totals: list[torch.Tensor] = []
    for index, placement in enumerate(placements):
        if index:
            model.load_placement_weights(placement)
            maps = placement.to_torch()
            l2p.copy_(maps.logical_to_physical)
            replicas.copy_(maps.replica_count)
        for local, slot in enumerate(model.local_slots):  # this rank holds its slots' experts
            expert = int(placement.physical_to_logical[2, slot])
            if expert >= 0:
                assert torch.equal(model.expert_weights[2][1][local],
                                   expert_weights_for(CONFIG, 2, expert)[1])
        for routing, (dense_out, dense_ids) in zip((None, all_forced[:, mine]), expected,
                                                   strict=True):
            load.zero_()
            out = model(all_tokens[mine], expert_ids=routing)
            assert torch.equal(out, dense_out[mine]), f"placement {index}: output differs"
            outputs.append(out)
            totals.append(_check_load(load, placement, dense_ids, rank, counts[rank],
                                      all_tokens.shape[0]))
    # Not vacuous: the placements really moved the traffic between slots.
    assert all(not torch.equal(totals[0], other) for other in totals[2::2])
    return outputs


def _check_load(load: torch.Tensor, placement: Placement, dense_ids: list[torch.Tensor],
                rank: int, my_tokens: int, total_tokens: int) -> torch.Tensor:
    """Check this rank's and the group's load view; returns the group's [L, P] load."""
    k = CONFIG.top_k
    assert load.sum(dim=1).tolist() == [my_tokens * k] * CONFIG.num_layers
    p2l = torch.tensor(placement.physical_to_logical)
    assert int(load[p2l < 0].sum()) == 0, "load counted on an empty slot"
    # Replicas of an expert share this rank's assignments evenly.
    for layer in range(CONFIG.num_layers):
        for expert in range(CONFIG.num_logical_experts):
            per_replica = load[layer][p2l[layer] == expert]
            assert int(per_replica.max() - per_replica.min()) <= 1, (layer, expert, per_replica)
    total = load.clone()
    dist.all_reduce(total)
    assert total.sum(dim=1).tolist() == [total_tokens * k] * CONFIG.num_layers
    for layer in range(CONFIG.num_layers):
        logical = torch.zeros(CONFIG.num_logical_experts, dtype=torch.int64)
        filled = p2l[layer] >= 0
        logical.index_add_(0, p2l[layer][filled], total[layer][filled])
        histogram = torch.bincount(dense_ids[layer].reshape(-1),
                                   minlength=CONFIG.num_logical_experts)
        assert torch.equal(logical, histogram), (rank, layer, logical, histogram)
    return total


@pytest.mark.parametrize("world_size", [2, 3])
def test_outputs_identical_across_placements_and_to_dense(world_size: int) -> None:
    results = run_ranks(_check_rank, world_size, 11 * world_size, timeout=60)
    counts = TOKENS_PER_RANK[:world_size]
    all_tokens = torch.cat([_tokens(r, c) for r, c in enumerate(counts)])
    dense_out = DenseMoE(CONFIG)(all_tokens)
    num_runs = 2 * len(_placements(0))
    for rank, outputs in enumerate(results):
        assert len(outputs) == num_runs
        mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        for out in outputs[::2]:  # learned routing
            assert torch.equal(out, dense_out[mine])
    # The model computes something: outputs are not the inputs.
    assert not torch.equal(dense_out, all_tokens)


# -- single process (no process group: rank 0 of 1) ---------------------------------------


def test_single_process_model_matches_dense_under_every_placement() -> None:
    tokens = _tokens(0, 41)
    forced = _skewed_ids(0, 41)
    dense = DenseMoE(CONFIG)
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL)
    for placement in _placements(3):
        model.apply_placement(placement)
        assert torch.equal(model(tokens), dense(tokens))
        assert torch.equal(model(tokens, expert_ids=forced), dense(tokens, forced))
        assert torch.equal(model(tokens, expert_ids=list(forced)), dense(tokens, forced))


def test_trace_routing_drives_the_model_and_its_load_view() -> None:
    trace = SyntheticTrace(CONFIG.num_layers, CONFIG.num_logical_experts, exponent=1.5, seed=4)
    ids = trace.routing(step=3, rank=0, num_tokens=50, top_k=CONFIG.top_k)
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL)
    placement = _placements(2)[1]
    model.apply_placement(placement)
    out = model(_tokens(0, 50), expert_ids=ids)
    assert torch.equal(out, DenseMoE(CONFIG)(_tokens(0, 50), torch.from_numpy(ids)))
    p2l = placement.physical_to_logical
    for layer in range(CONFIG.num_layers):
        logical = np.bincount(p2l[layer], weights=model.expert_load_view[layer].numpy(),
                              minlength=CONFIG.num_logical_experts)
        assert np.array_equal(logical, np.bincount(ids[layer].ravel(),
                                                   minlength=CONFIG.num_logical_experts))


def test_outputs_do_not_depend_on_batch_size_or_position() -> None:
    tokens = _tokens(1, 97)
    dense = DenseMoE(CONFIG)
    full = dense(tokens)
    for start in range(0, 97, 9):
        for stop in (start + 1, start + 2, start + 7, start + 33, 97):
            if stop <= 97:
                assert torch.equal(dense(tokens[start:stop]), full[start:stop]), (start, stop)
    reversed_out = dense(tokens.flip(0))
    assert torch.equal(reversed_out.flip(0), full)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_placement_invariant(dtype: torch.dtype) -> None:
    config = MoEConfig(num_layers=3, num_logical_experts=8, dtype=dtype)
    tokens = _tokens(0, 29, config)
    model = ReferenceMoE(config, NUM_PHYSICAL)
    first = model(tokens)
    assert first.dtype == dtype
    model.apply_placement(_placements(5)[2])
    assert torch.equal(model(tokens), first)
    assert torch.equal(DenseMoE(config)(tokens), first)


def test_a_wrong_slot_weight_changes_the_output() -> None:
    """The invariance check can fail: a slot holding the wrong expert is visible."""
    tokens = _tokens(0, 64)
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL)
    before = model(tokens)
    model.expert_weights[1][0][3].copy_(expert_weights_for(CONFIG, 1, 5)[0])
    assert not torch.equal(model(tokens), before)


def test_stale_maps_are_not_cached() -> None:
    """The model reads the map tensors on every pass: an in-place update reroutes."""
    tokens = _tokens(0, 64)
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL)
    placement = _placements(9)[3]
    model.apply_placement(placement)
    model.expert_load_view.zero_()
    model(tokens)
    p2l = torch.tensor(placement.physical_to_logical)
    assert int(model.expert_load_view[p2l < 0].sum()) == 0
    assert model.expert_load_view.sum().item() == 64 * CONFIG.top_k * CONFIG.num_layers


def test_protocol_attributes() -> None:
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL)
    assert isinstance(model, MoEModel)
    assert (model.num_moe_layers, model.num_logical_experts, model.num_physical_experts,
            model.num_local_physical_experts, model.num_redundant_experts,
            model.num_expert_groups) == (3, 8, 12, 12, 4, 1)
    assert len(model.expert_weights) == 3
    gate_up, down = model.expert_weights[0]
    assert gate_up.shape == (12, 32, 128) and down.shape == (12, 64, 32)
    # Slot 9 holds expert 1 in the initial layout (slot % E).
    assert torch.equal(gate_up[9], expert_weights_for(CONFIG, 0, 1)[0])


def test_sample_tokens_are_a_function_of_seed_step_rank() -> None:
    a = sample_tokens(CONFIG, 6, step=2, rank=1)
    assert a.shape == (6, 32) and torch.equal(a, sample_tokens(CONFIG, 6, step=2, rank=1))
    assert not torch.equal(a, sample_tokens(CONFIG, 6, step=2, rank=0))
    assert not torch.equal(a, sample_tokens(CONFIG, 6, step=3, rank=1))
    with pytest.raises(ValueError, match="rank"):
        sample_tokens(CONFIG, 6, rank=-1)


def test_weights_are_a_function_of_seed_layer_expert() -> None:
    a = expert_weights_for(CONFIG, 2, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, expert_weights_for(CONFIG, 2, 3),
                                                  strict=True))
    assert not torch.equal(a[0], expert_weights_for(CONFIG, 2, 4)[0])
    assert not torch.equal(a[0], expert_weights_for(CONFIG, 1, 3)[0])
    other_seed = MoEConfig(num_layers=3, num_logical_experts=8, hidden_size=32,
                           intermediate_size=64, seed=8)
    assert not torch.equal(a[0], expert_weights_for(other_seed, 2, 3)[0])


def test_bad_arguments_raise_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_layers=1, num_logical_experts=4, top_k=5)
    with pytest.raises(ValueError, match="hidden_size"):
        MoEConfig(num_layers=1, num_logical_experts=4, hidden_size=0)
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_layers=1, num_logical_experts=4, num_expert_groups=3)
    with pytest.raises(ValueError, match="num_physical_experts"):
        ReferenceMoE(CONFIG, 7)
    with pytest.raises(ValueError, match="placement"):
        ReferenceMoE(CONFIG, NUM_PHYSICAL, placement=Placement.initial(3, 8, 16))
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL)
    tokens = _tokens(0, 5)
    with pytest.raises(ValueError, match="hidden"):
        model(tokens[:, :3])
    with pytest.raises(ValueError, match=r"expert_ids\[0\] has shape"):
        model(tokens, expert_ids=torch.zeros(3, 4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        model(tokens, expert_ids=torch.full((3, 5, 2), 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="one \\[tokens, top_k\\] tensor per layer"):
        model(tokens, expert_ids=torch.zeros(2, 5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="expert_load_view must be int64"):
        model.set_eplb_state(torch.zeros(3, 12), model.logical_to_physical_map,
                             model.logical_replica_count)
    with pytest.raises(ValueError, match="logical_replica_count has shape"):
        model.set_eplb_state(model.expert_load_view, model.logical_to_physical_map,
                             torch.zeros(3, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="cannot be moved"):
        model.to(torch.float64)


def test_an_expert_without_replica_is_an_error_not_a_silent_drop() -> None:
    model = ReferenceMoE(CONFIG, NUM_PHYSICAL)
    model.logical_replica_count[1, 2] = 0
    ids = torch.full((3, 4, 2), 0, dtype=torch.int64)
    ids[1, :, 1] = 2
    with pytest.raises(RuntimeError, match="layer 1: logical expert 2 has no replica"):
        model(_tokens(0, 4), expert_ids=ids)


def test_fast_mode_matches_dense_within_its_tolerance_across_placements() -> None:
    from eplb_fsm._reference.moe import FAST_ATOL, FAST_RTOL

    cfg = MoEConfig(num_layers=3, num_logical_experts=8, hidden_size=64,
                    intermediate_size=96, exact=False)
    tokens = sample_tokens(cfg, 40, step=1)
    dense = DenseMoE(cfg)(tokens)
    rng = np.random.default_rng(5)
    for _ in range(3):
        p2l = np.stack([rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 4)])
                        for _ in range(3)])
        model = ReferenceMoE(cfg, 12, placement=Placement(p2l, 8))
        torch.testing.assert_close(model(tokens), dense, rtol=FAST_RTOL, atol=FAST_ATOL)
