"""`eplb_fsm.vllm.rebalance_experts` and `rearrange_expert_weights_inplace` keep vLLM's
contract: vLLM's published examples give vLLM's answers, in vLLM's tensor layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from eplb_fsm.testing import run_ranks
from eplb_fsm.vllm import rearrange_expert_weights_inplace, rebalance_experts

# The load of DeepSeek's README example, which vLLM's algorithm test also uses.
WEIGHT = torch.tensor([
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
])


def _check_layout(p2l: torch.Tensor, l2p: torch.Tensor, count: torch.Tensor,
                  layers: int, slots: int, experts: int) -> None:
    assert p2l.dtype == l2p.dtype == count.dtype == torch.int64
    assert p2l.shape == (layers, slots) and count.shape == (layers, experts)
    assert l2p.shape == (layers, experts, slots - experts + 1)  # vLLM's width
    for layer in range(layers):
        for expert in range(experts):
            n = int(count[layer, expert])
            replicas = l2p[layer, expert]
            assert (replicas[n:] == -1).all() and (replicas[:n] >= 0).all()
            assert (p2l[layer, replicas[:n]] == expert).all()
    assert (count.sum(dim=1) == slots).all()


def test_deepseek_example_gives_vllms_expected_maps() -> None:
    p2l, l2p, count = rebalance_experts(WEIGHT, 16, num_groups=4, num_nodes=2, num_ranks=8)
    # The physical -> logical maps and replica counts vLLM's test expects, slot by slot.
    assert p2l.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert count.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                              [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    _check_layout(p2l, l2p, count, 2, 16, 12)
    assert l2p[0, 1].tolist() == [13, 15, -1, -1, -1]  # expert 1: slots 13 and 15


@pytest.mark.parametrize(("weight", "slots", "groups", "nodes", "ranks"), [
    ([[10, 20, 30, 40]], 4, 1, 1, 1),                          # one GPU
    ([[50] * 8], 8, 2, 2, 4),                                  # no redundancy
    ([[1000, 1, 1, 1, 1, 1, 1, 1]], 12, 2, 2, 4),              # one hot expert
    ([[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10],
      [25] * 6], 8, 2, 2, 4),                                  # several layers
    ([[10, 20, 30, 40]], 8, 3, 2, 4),                          # groups do not divide nodes
    ([[100, 50, 200, 75, 150, 25, 300, 80]], 12, 4, 2, 4),     # small hierarchical
    ([[200, 150, 100, 50, 25, 12], [12, 25, 50, 100, 150, 200]], 10, 3, 1, 2),
])
def test_vllms_other_examples_keep_its_contract(weight: list[list[int]], slots: int,
                                                groups: int, nodes: int, ranks: int) -> None:
    load = torch.tensor(weight)
    p2l, l2p, count = rebalance_experts(load, slots, groups, nodes, ranks)
    _check_layout(p2l, l2p, count, load.shape[0], slots, load.shape[1])
    assert (count >= 1).all()
    hot = load.argmax(dim=1)
    if slots > load.shape[1] and load.shape[1] > 1:  # redundancy goes to the hottest first
        for layer in range(load.shape[0]):
            if (load[layer] == load[layer, hot[layer]]).sum() == 1:
                assert count[layer, hot[layer]] >= 2
    if slots == load.shape[1]:
        assert (count == 1).all()


def test_bad_input_is_a_value_error_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="num_physical_experts=7 must be divisible by "
                                         "num_ranks=4"):
        rebalance_experts(torch.tensor([[10, 20, 30, 40]]), 7, 2, 2, 4)
    with pytest.raises(ValueError, match="old_global_expert_indices must be an integer"):
        rebalance_experts(WEIGHT, 16, 4, 2, 8, old_global_expert_indices=torch.zeros(16))


def test_old_map_keeps_slots_on_their_gpu() -> None:
    fresh, _, _ = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    # Handing back the plan in service changes nothing.
    again, _, _ = rebalance_experts(WEIGHT, 16, 4, 2, 8, old_global_expert_indices=fresh)
    assert torch.equal(again, fresh)
    # An old map that holds the same experts per GPU in another slot order: kept as is.
    swapped = fresh.view(2, 8, 2).flip(-1).reshape(2, 16)
    kept, l2p, count = rebalance_experts(WEIGHT, 16, 4, 2, 8, old_global_expert_indices=swapped)
    assert torch.equal(kept, swapped)
    _check_layout(kept, l2p, count, 2, 16, 12)


def test_numpy_input_and_tensor_device() -> None:
    p2l, l2p, count = rebalance_experts(WEIGHT.numpy(), 16, 4, 2, 8)
    assert p2l.device.type == l2p.device.type == count.device.type == "cpu"
    assert torch.equal(p2l, rebalance_experts(WEIGHT.float(), 16, 4, 2, 8)[0])


# -- rearrange_expert_weights_inplace on two gloo ranks ---------------------------------

SLOTS = 3  # per rank


def _weights(p2l: np.ndarray, rank: int, slots: int = SLOTS) -> list[list[torch.Tensor]]:
    """Each slot's rows hold its expert's id (and id * 10 in a second tensor)."""
    local = torch.tensor(p2l[:, rank * slots:(rank + 1) * slots], dtype=torch.float32)
    return [[local[layer].reshape(-1, 1).repeat(1, 4).clone(),
             (local[layer] * 10).reshape(-1, 1).repeat(1, 2).clone()]
            for layer in range(p2l.shape[0])]


def _held(weights: list[list[torch.Tensor]]) -> list[list[int]]:
    return [[int(v) for v in layer[0][:, 0].tolist()] for layer in weights]


def _rank_program(rank: int, world: int) -> dict[str, Any]:
    old = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    new = np.array([[3, 4, 5, 0, 1, 1], [5, 5, 3, 2, 1, 0]])
    weights = _weights(old, rank)
    rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(new), weights,
                                     None, is_profile=True)
    profiled = _held(weights)  # a profile pass moves nothing
    rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(new), weights, None)
    after = _held(weights)
    seconds_consistent = all(torch.equal(layer[1][:, 0], layer[0][:, 0] * 10)
                             for layer in weights)
    # Scale down from 2 ranks to 1: rank 0 stays (new rank 0), rank 1 leaves.
    smaller = np.array([[1, 1, 4], [0, 3, 5]])
    rearrange_expert_weights_inplace(torch.from_numpy(new), torch.from_numpy(smaller), weights,
                                     None, rank_mapping={0: 0, 1: -1})
    return {"profiled": profiled, "after": after, "seconds": seconds_consistent,
            "scaled": _held(weights)}


def test_rearrange_wrapper_moves_weights_like_vllm() -> None:
    results = run_ranks(_rank_program, 2, timeout=120)
    new = [[3, 4, 5, 0, 1, 1], [5, 5, 3, 2, 1, 0]]
    old_local = [[[0, 1, 2], [5, 4, 3]], [[3, 4, 5], [2, 1, 0]]]
    for rank, result in enumerate(results):
        assert result["profiled"] == old_local[rank]
        assert result["after"] == [row[rank * SLOTS:(rank + 1) * SLOTS] for row in new]
        assert result["seconds"]
    assert results[0]["scaled"] == [[1, 1, 4], [0, 3, 5]]  # the one rank left serves all


def test_rank_mapping_errors_name_the_argument() -> None:
    from eplb_fsm._integrations.vllm_api import _on_group

    old = np.zeros((1, 6), dtype=np.int64)
    with pytest.raises(ValueError, match=r"rank_mapping must have the keys 0\.\.1"):
        _on_group(old, old, {0: 0, 2: 1}, 2)
    with pytest.raises(ValueError, match="outside"):
        _on_group(old, np.zeros((1, 3), dtype=np.int64), {0: 5, 1: -1}, 2)
    # Scale up 1 -> 2: the old rank's slots land on its new rank, the joiner's are empty.
    mapped, _ = _on_group(np.array([[7, 8, 9]]), np.zeros((1, 6), dtype=np.int64), {0: 1}, 2)
    assert mapped.tolist() == [[-1, -1, -1, 7, 8, 9]]
