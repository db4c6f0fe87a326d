"""DeepSeek's EPLB algorithm written the slow, obvious way: an oracle.

One Python loop per layer and per item, torch float32 arithmetic, as in the
algorithm DeepSeek published and vLLM/SGLang ship. `eplb_fsm.plan` must agree
with it on every tie-free load; tests and `benchmarks/plan_bench.py` compare
the two. Written for clarity, not speed: 0.4-2 s for DeepSeek-V3's shape.
"""

from __future__ import annotations

import torch

__all__ = ["reference_rebalance"]


def _greedy_pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, num_items = weight.shape
    capacity = num_items // num_packs
    pack_of = torch.empty(num_rows, num_items, dtype=torch.int64)
    place_in_pack = torch.empty(num_rows, num_items, dtype=torch.int64)
    if capacity == 1:
        pack_of[:] = torch.arange(num_items)
        place_in_pack.zero_()
        return pack_of, place_in_pack
    for row in range(num_rows):
        totals = [torch.tensor(0.0, dtype=torch.float32)] * num_packs
        sizes = [0] * num_packs
        for item in weight[row].sort(descending=True, stable=True).indices.tolist():
            candidates = [p for p in range(num_packs) if sizes[p] < capacity]
            best = min(candidates, key=lambda p: float(totals[p]))
            pack_of[row, item] = best
            place_in_pack[row, item] = sizes[best]
            totals[best] = totals[best] + weight[row, item]
            sizes[best] += 1
    return pack_of, place_in_pack


def _add_replicas(
    weight: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, num_experts = weight.shape
    slot_expert = torch.arange(num_slots, dtype=torch.int64).repeat(num_rows, 1)
    slot_replica = torch.zeros(num_rows, num_slots, dtype=torch.int64)
    copies = torch.ones(num_rows, num_experts, dtype=torch.int64)
    for row in range(num_rows):
        for slot in range(num_experts, num_slots):
            hottest = int((weight[row] / copies[row].float()).argmax())
            slot_expert[row, slot] = hottest
            slot_replica[row, slot] = copies[row, hottest]
            copies[row, hottest] += 1
    return slot_expert, slot_replica, copies


def _invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1)).expand(perm.shape).contiguous())
    return inv


def reference_rebalance(
    load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int
) -> torch.Tensor:
    """[L, E] load -> [L, P] physical_to_logical, by the published algorithm."""
    weight = load.float().cpu()
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_rank = num_physical // num_ranks

    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)
    node_of_group, place_of_group = _greedy_pack(group_load, num_nodes)
    first = (node_of_group * (num_groups // num_nodes) + place_of_group) * group_size
    log_to_mlog = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog_to_log = _invert(log_to_mlog)

    node_load = weight.gather(-1, mlog_to_log).view(-1, experts_per_node)
    phy_to_mlog, _, mlog_copies = _add_replicas(node_load, num_physical // num_nodes)

    phy_load = (node_load / mlog_copies.float()).gather(-1, phy_to_mlog)
    rank_of, place_in_rank = _greedy_pack(phy_load, num_ranks // num_nodes)
    slot_to_phy = _invert(rank_of * slots_per_rank + place_in_rank)
    slot_to_mlog = phy_to_mlog.gather(-1, slot_to_phy).view(num_layers, num_nodes, -1)
    slot_to_mlog = (slot_to_mlog + torch.arange(num_nodes).view(1, -1, 1) * experts_per_node)
    return mlog_to_log.gather(-1, slot_to_mlog.flatten(-2))
