"""The transfer plan, property-tested over random placements (replicas, -1 slots,
identical pairs): sends pair with receives in order, no slot is written twice,
unchanged slots are untouched, applying the plan yields the new placement, and
the bytes moved are the minimum, counted by an independent oracle."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_fsm._core.transfer_plan import (
    LayerPlan,
    Transfer,
    plan_layer,
    plan_layers,
    required_transfers,
)


@st.composite
def placement_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int | None]:
    """(old [L, P], new [L, P], num_ranks, node_size) with replicas and empty slots.

    `old` holds every expert at least once (so any `new` is reachable); `new`
    is fresh, a few swaps away from `old`, or identical to it.
    """
    num_ranks = draw(st.integers(1, 6))
    num_local = draw(st.integers(1, 5))
    num_physical = num_ranks * num_local
    num_logical = draw(st.integers(1, num_physical))
    num_layers = draw(st.integers(1, 3))
    node_size = draw(st.one_of(st.none(), st.integers(1, num_ranks)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def fresh(empty: float) -> np.ndarray:
        extra = rng.integers(0, num_logical, num_physical - num_logical)
        extra[rng.random(extra.size) < empty] = -1
        return rng.permutation(np.concatenate([np.arange(num_logical), extra]))

    old = np.stack([fresh(draw(st.sampled_from([0.0, 0.3]))) for _ in range(num_layers)])
    kind = draw(st.sampled_from(["fresh", "swaps", "identical", "with_empty"]))
    if kind == "identical":
        new = old.copy()
    elif kind == "swaps":
        new = old.copy()
        for layer in range(num_layers):
            for _ in range(draw(st.integers(1, 3))):
                i, j = rng.integers(0, num_physical, 2)
                new[layer, [i, j]] = new[layer, [j, i]]
    else:
        new = np.stack([fresh(0.5 if kind == "with_empty" else 0.0)
                        for _ in range(num_layers)])
    return old.astype(np.int64), new.astype(np.int64), num_ranks, node_size


def _oracle_receives(old: np.ndarray, new: np.ndarray, num_ranks: int) -> list[int]:
    """Per rank: distinct experts its new slots need that its old slots lack."""
    num_local = old.size // num_ranks
    counts = []
    for rank in range(num_ranks):
        window = slice(rank * num_local, (rank + 1) * num_local)
        want = {int(e) for e in new[window] if e >= 0}
        have = {int(e) for e in old[window]}
        counts.append(len(want - have))
    return counts


def _apply(plan: LayerPlan, old: np.ndarray) -> np.ndarray:
    """Run the plan on 'weights' that are the expert ids themselves.

    Every read sees the old weights (as the staging buffer does), duplicates
    read the received slot, and each slot may be written at most once.
    """
    num_local = plan.num_local_slots
    before = old.reshape(plan.num_ranks, num_local)
    after = before.copy()
    written: set[tuple[int, int]] = set()

    def write(rank: int, slot: int, value: int) -> None:
        assert (rank, slot) not in written, f"slot {slot} of rank {rank} written twice"
        written.add((rank, slot))
        after[rank, slot] = value

    for rp in plan.ranks:
        for c in rp.local_copies:
            write(rp.rank, c.dst_slot, int(before[rp.rank, c.src_slot]))
        received = {}
        for t in rp.receives:
            value = int(before[t.src_rank, t.src_slot])  # the sender's old weights
            write(rp.rank, t.dst_slot, value)
            received[t.dst_slot] = value
        for d in rp.duplicates:
            write(rp.rank, d.dst_slot, received[d.from_slot])
    return after.reshape(-1)


def _check_layer(plan: LayerPlan, old: np.ndarray, new: np.ndarray) -> None:
    num_ranks, num_local = plan.num_ranks, plan.num_local_slots
    old2, new2 = old.reshape(num_ranks, num_local), new.reshape(num_ranks, num_local)

    # Every slot is classified exactly once, and the class fits the maps.
    for rp in plan.ranks:
        written = rp.written_slots
        classes = list(rp.unchanged) + list(rp.vacated) + list(written)
        assert sorted(classes) == list(range(num_local)), "a slot is missed or written twice"
        assert all(new2[rp.rank, s] == old2[rp.rank, s] for s in rp.unchanged)
        assert all(new2[rp.rank, s] == -1 != old2[rp.rank, s] for s in rp.vacated)
        assert all(new2[rp.rank, s] != old2[rp.rank, s] for s in written)
        for c in rp.local_copies:
            assert old2[rp.rank, c.src_slot] == c.expert == new2[rp.rank, c.dst_slot]
        receivers = {t.dst_slot: t.expert for t in rp.receives}
        for d in rp.duplicates:
            assert receivers[d.from_slot] == d.expert == new2[rp.rank, d.dst_slot]
            assert d.from_slot < d.dst_slot  # filled from the *first* received copy
        assert len(set(receivers.values())) == len(receivers)  # one transfer per expert

    # Every send has its receive, in the same order on both sides of each pair.
    for t in plan.transfers:
        assert t.src_rank != t.dst_rank and t.layer == plan.layer
        assert old2[t.src_rank, t.src_slot] == t.expert == new2[t.dst_rank, t.dst_slot]
        assert t.expert not in old2[t.dst_rank]  # a local copy would have done
    for a in range(num_ranks):
        for b in range(num_ranks):
            sent = [t for t in plan.ranks[a].sends if t.dst_rank == b]
            got = [t for t in plan.ranks[b].receives if t.src_rank == a]
            assert sent == got
    all_sends = Counter(t for rp in plan.ranks for t in rp.sends)
    all_receives = Counter(t for rp in plan.ranks for t in rp.receives)
    assert all_sends == all_receives == Counter(plan.transfers)
    keys = [(t.layer, t.src_rank, t.dst_rank, t.dst_slot) for t in plan.transfers]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)

    # Applying the plan yields the new placement (vacated slots keep old weights).
    expected = np.where(new >= 0, new, old)
    assert _apply(plan, old).tolist() == expected.tolist()

    # The minimum bytes, per rank and in total.
    oracle = _oracle_receives(old, new, num_ranks)
    assert [plan.received_count(r) for r in range(num_ranks)] == oracle
    assert [plan.bytes_received(r, 7) for r in range(num_ranks)] == [7 * n for n in oracle]
    assert plan.bytes_moved(7) == 7 * sum(oracle) == 7 * required_transfers(old, new, num_ranks)


@given(placement_pairs())
@settings(max_examples=300, deadline=None)
def test_plan_is_consistent_complete_and_minimal(
        case: tuple[np.ndarray, np.ndarray, int, int | None]) -> None:
    old, new, num_ranks, node_size = case
    for layer in range(old.shape[0]):
        plan = plan_layer(old[layer], new[layer], num_ranks, node_size=node_size, layer=layer)
        _check_layer(plan, old[layer], new[layer])


@given(placement_pairs())
@settings(max_examples=100, deadline=None)
def test_identical_placements_move_nothing(
        case: tuple[np.ndarray, np.ndarray, int, int | None]) -> None:
    old, _, num_ranks, node_size = case
    plan = plan_layers(old, old, num_ranks, node_size=node_size)
    assert plan.transfers == () and plan.bytes_moved(1000) == 0
    for rp in (rp for p in plan.layer_plans for rp in p.ranks):
        assert rp.local_copies == rp.receives == rp.duplicates == rp.sends == ()
        assert rp.vacated == () and len(rp.unchanged) == old.shape[1] // num_ranks


@given(placement_pairs())
@settings(max_examples=200, deadline=None)
def test_senders_share_the_work_and_prefer_their_node(
        case: tuple[np.ndarray, np.ndarray, int, int | None]) -> None:
    old, new, num_ranks, node_size = case
    num_local = old.shape[1] // num_ranks
    for layer in range(old.shape[0]):
        plan = plan_layer(old[layer], new[layer], num_ranks, node_size=node_size, layer=layer)
        holders = {e: {s // num_local for s in np.flatnonzero(old[layer] == e)}
                   for e in {t.expert for t in plan.transfers}}
        if node_size is None:
            # A replicated expert's fan-out is spread over its holder ranks.
            for expert, ranks in holders.items():
                sent = Counter(t.src_rank for t in plan.transfers if t.expert == expert)
                loads = [sent.get(r, 0) for r in ranks]
                assert max(loads) - min(loads) <= 1, (expert, sent, ranks)
        else:
            for t in plan.transfers:
                same_node = {r for r in holders[t.expert]
                             if r // node_size == t.dst_rank // node_size}
                if same_node:
                    assert t.src_rank in same_node


def test_replicated_expert_fan_out_uses_every_replica() -> None:
    # Expert 0 on ranks 0 and 1; ranks 2..5 each need it: two sends from each.
    old = [0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    new = [0, 1, 0, 2, 0, 4, 0, 6, 0, 8, 0, 10]
    plan = plan_layer(old, new, 6)
    assert Counter(t.src_rank for t in plan.transfers) == {0: 2, 1: 2}
    # With nodes of 2 ranks both holders sit on node 0 and no receiver does:
    # no same-node source exists, so the split stays even.
    assert Counter(t.src_rank for t in plan_layer(old, new, 6, node_size=2).transfers) \
        == {0: 2, 1: 2}


def test_same_node_holder_is_preferred() -> None:
    # Expert 5 lives on rank 0 (node 0) and rank 2 (node 1); rank 3 (node 1) needs it.
    old = [5, 0, 1, 2, 5, 3, 4, 6]
    new = [5, 0, 1, 2, 5, 3, 5, 6]
    near = plan_layer(old, new, 4, node_size=2).transfers
    assert near == (Transfer(0, 2, 0, 3, 0, 5),)


def test_duplicates_and_local_copies_cost_no_transfer() -> None:
    # Rank 1 wants expert 0 twice (one transfer + one duplicate) and expert 3,
    # which it already holds in its slot 0 (a local copy into slot 2).
    old = [0, 1, 2, 4, 3, 9, 9, 9]
    new = [0, 1, 2, 4, 0, 0, 3, 9]
    plan = plan_layer(old, new, 2)
    rank1 = plan.ranks[1]
    assert rank1.receives == (Transfer(0, 0, 0, 1, 0, 0),)
    assert [tuple(d) for d in rank1.duplicates] == [(1, 0, 0)]
    assert [tuple(c) for c in rank1.local_copies] == [(2, 0, 3)]
    assert rank1.unchanged == (3,) and plan.ranks[0].unchanged == (0, 1, 2, 3)
    assert plan.ranks[0].sends == rank1.receives and plan.bytes_moved(10) == 10


def test_multi_layer_plan_is_the_per_layer_plans_in_order() -> None:
    rng = np.random.default_rng(0)
    old = np.stack([rng.permutation(np.arange(12) % 10) for _ in range(4)])
    new = np.stack([rng.permutation(np.arange(12) % 10) for _ in range(4)])
    plan = plan_layers(old, new, 3, layers=[2, 0], node_size=1)
    singles = [plan_layer(old[layer], new[layer], 3, node_size=1, layer=layer)
               for layer in (2, 0)]
    assert plan.layers == (2, 0) and list(plan.layer_plans) == singles
    assert plan.transfers == singles[0].transfers + singles[1].transfers
    assert plan[0] == singles[1]
    for rank in range(3):
        assert plan.sends(rank) == tuple(t for p in singles for t in p.ranks[rank].sends)
        assert plan.receives(rank) == tuple(t for p in singles for t in p.ranks[rank].receives)
    assert plan.bytes_received(1, {0: 10, 2: 100}) == (
        singles[0].received_count(1) * 100 + singles[1].received_count(1) * 10)
    # Deterministic, and torch input plans the same as numpy input.
    assert plan_layers(torch.tensor(old), torch.tensor(new), 3, [2, 0], node_size=1) == plan
    with pytest.raises(KeyError):
        plan[1]


@pytest.mark.parametrize(
    ("old", "new", "ranks", "kwargs", "match"),
    [
        ([[0, 1]], [[0, 1, 1]], 1, {}, r"shape \(1, 2\) but new_physical_to_logical"),
        ([[0, 1, 2]], [[0, 1, 2]], 2, {}, r"3 slots per layer.*num_ranks=2.*different number"),
        ([[0, 1]], [[0, -2]], 1, {}, r"new_physical_to_logical holds id -2"),
        ([[0, 1]], [[0, 2]], 2, {}, r"places expert 2 in layer 0.*no replica"),
        ([0, 1], [0, 1], 1, {}, r"old_physical_to_logical must be 2-D"),
        ([[0.5, 1]], [[0, 1]], 1, {}, r"integer expert ids"),
        ([[0, 1]], [[0, 1]], 0, {}, r"num_ranks must be a positive int"),
        ([[0, 1]], [[0, 1]], 1, {"layers": [1]}, r"layers holds 1"),
        ([[0, 1]], [[0, 1]], 1, {"layers": [0, 0]}, r"names a layer twice"),
        ([[0, 1]], [[0, 1]], 1, {"node_size": 0}, r"node_size must be a positive int"),
    ],
)
def test_bad_input_is_rejected_with_the_rule(old: list, new: list, ranks: int, kwargs: dict,
                                             match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_layers(old, new, ranks, **kwargs)


@given(placement_pairs(), st.data())
@settings(max_examples=100, deadline=None)
def test_an_expert_nobody_holds_is_named(
        case: tuple[np.ndarray, np.ndarray, int, int | None], data: st.DataObject) -> None:
    old, new, num_ranks, _ = case
    placed = np.argwhere(new >= 0)
    if not placed.size:
        return
    layer, slot = (int(i) for i in placed[data.draw(st.integers(0, len(placed) - 1))])
    expert = int(new[layer, slot])
    old = old.copy()
    old[layer][old[layer] == expert] = -1  # no rank holds it any more
    with pytest.raises(ValueError, match=rf"places expert {expert} in layer {layer},"):
        plan_layers(old, new, num_ranks)
