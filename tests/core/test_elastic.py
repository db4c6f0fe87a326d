"""The pure elastic core: rank mappings, plans for a new rank count, union maps, lost experts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_fsm import (
    Placement,
    UnionLayout,
    check_rank_mapping,
    default_union_layout,
    lost_experts,
    maps_in_union,
    plan_elastic,
)
from eplb_fsm._core.elastic import salvage_maps
from eplb_fsm._core.transfer_plan import plan_layers


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Placement, list[int], int, np.ndarray]:
    """An old placement on R ranks, a valid rank mapping to R' ranks, and a load."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 8))
    old_ranks = draw(st.integers(1, 5))
    local = draw(st.integers(-(-experts // old_ranks), -(-experts // old_ranks) + 2))
    new_ranks = draw(st.integers(1, 6))  # too few for the experts: planning must refuse
    stays = draw(st.integers(1, min(old_ranks, new_ranks)))
    leavers = draw(st.permutations(range(old_ranks)))[stays:]
    targets = draw(st.permutations(range(new_ranks)))[:stays]
    mapping = [-1] * old_ranks
    kept = [r for r in range(old_ranks) if r not in leavers]
    for old, new in zip(kept, targets, strict=True):
        mapping[old] = new
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rows = [rng.permutation(np.arange(old_ranks * local) % experts) for _ in range(layers)]
    load = rng.integers(0, 100, size=(layers, experts))
    return Placement(np.stack(rows), experts), mapping, new_ranks, load


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_plan_gives_every_expert_a_replica_and_union_maps_are_a_valid_transfer(
        case: tuple[Placement, list[int], int, np.ndarray]) -> None:
    old, mapping, new_ranks, load = case
    local = old.num_physical // len(mapping)
    if new_ranks * local < old.num_logical:
        with pytest.raises(ValueError, match="cannot shrink that far"):
            plan_elastic(load, old, mapping, new_ranks)
        return
    planned = plan_elastic(load, old, mapping, new_ranks)
    new = planned.placement
    assert new.num_physical == new_ranks * local
    assert (new.replica_count >= 1).all()
    layout = default_union_layout(mapping, new_ranks)
    old_u, new_u = maps_in_union(old.physical_to_logical, new.physical_to_logical, layout)
    blocks_old = old_u.reshape(old.num_layers, layout.num_union, local)
    blocks_new = new_u.reshape(old.num_layers, layout.num_union, local)
    assert (blocks_old[:, list(layout.joining)] == -1).all()  # joining: empty in the old map
    assert (blocks_new[:, list(layout.leaving)] == -1).all()  # leaving: empty in the new map
    for rank, union in enumerate(layout.new_to_union):
        assert (blocks_new[:, union] == new.physical_to_logical.reshape(
            old.num_layers, new_ranks, local)[:, rank]).all()
    # The transfer plan accepts the union maps as they are: every placed expert has a sender.
    plan_layers(old_u, new_u, layout.num_union)


def test_survivors_keep_their_experts_when_the_plan_allows() -> None:
    old = Placement(np.tile(np.arange(12) % 6, (2, 1)), 6)  # 4 ranks x 3 slots
    load = np.arange(1, 13).reshape(2, 6)
    before = old.physical_to_logical[:, :6]  # ranks 0 and 1 stay as new ranks 0 and 1
    kept = plan_elastic(load, old, [0, 1, -1, -1], 2).placement.physical_to_logical
    fresh = plan_elastic(load, old, [0, 1, -1, -1], 2,
                         minimize_moves=False).placement.physical_to_logical
    assert np.sort(kept, axis=1).tolist() == np.sort(fresh, axis=1).tolist()
    assert (kept == before).sum() >= (fresh == before).sum()
    assert (kept == before).sum() > 0


def test_nodes_follow_ranks_or_fall_back_to_global_with_a_note() -> None:
    old = Placement(np.tile(np.arange(16) % 8, (1, 1)), 8)  # 4 ranks x 4 slots, 2 nodes
    load = np.arange(1, 9)[None]
    kept = plan_elastic(load, old, [0, 1, 2, 3], 6, num_nodes=2, num_groups=2)
    assert kept.num_nodes == 3 and kept.policy == "default" and kept.note is None
    odd = plan_elastic(load, old, [0, 1, 2, -1], 3, num_nodes=2, num_groups=2)
    assert odd.num_nodes == 1 and odd.policy == "global"
    assert odd.note is not None and "global policy" in odd.note


@pytest.mark.parametrize(("mapping", "new", "match"), [
    ([0, 0], 2, "same new rank 0"),
    ([0, 2], 2, r"new ranks must be in \[0, 2\)"),
    ([-1, -1], 2, "at least one must stay"),
    ([0, -2], 2, "ids must be >= -1"),
    ([[0, 1]], 2, "rank_mapping must be 1-D"),
    ([0.0, 1.0], 2, "integer"),
    ([0, 1], 0, "num_new_ranks must be an int >= 1"),
])
def test_bad_rank_mappings_are_named(mapping: list, new: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_rank_mapping(mapping, new)


def test_union_layout_rejects_duplicates_and_gaps() -> None:
    with pytest.raises(ValueError, match="may appear once"):
        UnionLayout((0, 0), (0,), 2)
    with pytest.raises(ValueError, match="every new rank"):
        UnionLayout((0, 1), (0, -1), 2)
    with pytest.raises(ValueError, match="slots per rank must stay constant"):
        maps_in_union([[0, 1, 0, 1]], [[0, 1, 0]], UnionLayout((0, 1), (0,), 2))


def test_lost_experts_only_when_every_replica_died() -> None:
    p2l = [[0, 1, 2, 3, 0, 1, 4, 5, 2, 3, 0, 1]]  # experts 4, 5 only on rank 2
    assert lost_experts(p2l, [2], 4) == {0: (4, 5)}
    assert lost_experts(p2l, [], 4) == {}
    assert lost_experts([[0, 1, 2, 3, 4, 5, 4, 5, 0, 1, 2, 3]], [2], 4) == {}
    with pytest.raises(ValueError, match="dead_ranks"):
        lost_experts(p2l, [4], 4)


def test_salvage_moves_surviving_copies_and_empties_lost_slots() -> None:
    current = np.array([[0, 1, 2, 3, 0, 1, 4, 5, 2, 3, 0, 1]])
    layout = UnionLayout((0, 1, 2, 3), (0, 1, 3), 4)  # old rank 2 leaves and is gone
    new = np.array([[4, 0, 1, 5, 2, 3, 0, 1, 2]])
    held, target, lost = salvage_maps(current, new, layout)
    assert lost == {0: (4, 5)}
    assert held.tolist() == [[0, 1, 2, 3, 0, 1, 3, 0, 1]]
    assert target.tolist() == [[-1, 0, 1, -1, 2, 3, 0, 1, 2]]
    plan_layers(held, target, 3)  # a valid transfer among the new ranks alone
