"""A commit's write order, property-tested by running the steps on integer slots:
every changed slot ends up holding its new expert, no step reads a slot after
the commit overwrote it (a read sees the *old* expert or the run fails), each
slot is written once, unchanged slots are never touched, and the one temp
row is never overwritten while a restore still needs it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from hypothesis import given, settings
from test_transfer_plan import placement_pairs

from eplb_fsm._core.commit_order import CommitStep, commit_steps, needs_temp
from eplb_fsm._core.transfer_plan import plan_layer, plan_layers


def run_steps(live: list[int], steps: Sequence[CommitStep],
              staged: Mapping[int, int]) -> list[int]:
    """Execute `steps` on `live` (slot -> content), with `staged` (expert ->
    content) as the staging rows; returns the slots after the commit."""
    live = list(live)
    temp: int | None = None
    for step in steps:
        if step.kind == "save":
            temp = live[step.slot]
        elif step.kind == "move":
            live[step.slot] = live[step.src]
        elif step.kind == "restore":
            assert temp is not None, "restore before any save"
            live[step.slot] = temp
        else:
            assert step.kind == "fill", step
            live[step.slot] = staged[step.expert]
    return live


@settings(max_examples=300, deadline=None)
@given(placement_pairs())
def test_steps_commit_the_new_placement_reading_only_old_slots(
        case: tuple[np.ndarray, np.ndarray, int, int | None]) -> None:
    old, new, num_ranks, _ = case
    num_local = old.shape[1] // num_ranks
    plan = plan_layers(old, new, num_ranks, list(range(old.shape[0])))
    for rank in range(num_ranks):
        for rp in plan.rank_plans(rank):
            window = slice(rank * num_local, (rank + 1) * num_local)
            before = [int(e) for e in old[rp.layer, window]]
            after = [int(e) for e in new[rp.layer, window]]
            steps = commit_steps(rp)
            # Each expert's content is its id: a move that read an overwritten slot
            # would carry the wrong id to its destination.
            got = run_steps(before, steps, {e: e for e in after})
            for slot in range(num_local):
                if after[slot] >= 0:
                    assert got[slot] == after[slot], (rank, rp.layer, slot, steps)
            written = [s.slot for s in steps if s.kind != "save"]
            assert sorted(written) == list(rp.written_slots), "each changed slot once"
            assert not set(written) & set(rp.unchanged)
            fills = [s for s in steps if s.kind == "fill"]
            assert steps[len(steps) - len(fills):] == tuple(fills), "fills go last"
            assert needs_temp(steps) == any(s.kind == "restore" for s in steps)


def test_a_swap_saves_one_slot_and_restores_it() -> None:
    rp = plan_layer([0, 1, 2], [1, 0, 2], num_ranks=1, layer=0).ranks[0]
    steps = commit_steps(rp)
    assert [s.kind for s in steps] == ["save", "move", "restore"]
    assert run_steps([0, 1, 2], steps, {}) == [1, 0, 2]


def test_a_chain_runs_from_its_last_reader_without_a_temp() -> None:
    # Slot 2 takes slot 1's expert, slot 1 takes slot 0's: 2 must be written first.
    rp = plan_layer([0, 1, 5, 3], [0, 0, 1, 3], num_ranks=1, layer=0).ranks[0]
    steps = commit_steps(rp)
    assert not needs_temp(steps)
    assert [(s.kind, s.slot, s.src) for s in steps] == [("move", 2, 1), ("move", 1, 0)]


def test_a_ring_with_a_replica_hanging_off_it() -> None:
    # Slots 0 -> 1 -> 2 -> 0 rotate; slot 3 also wants slot 0's old expert.
    old, new = [10, 11, 12, 13], [12, 10, 11, 10]
    rp = plan_layer(old, new, num_ranks=1, layer=0).ranks[0]
    steps = commit_steps(rp)
    assert sum(s.kind == "save" for s in steps) == 1
    assert run_steps(old, steps, {}) == new


def test_two_swaps_share_the_temp_row_one_after_the_other() -> None:
    old, new = [0, 1, 2, 3], [1, 0, 3, 2]
    steps = commit_steps(plan_layer(old, new, num_ranks=1, layer=0).ranks[0])
    assert [s.kind for s in steps] == ["save", "move", "restore"] * 2
    assert run_steps(old, steps, {}) == new
