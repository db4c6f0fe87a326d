"""`salvage_in_union`: after a failed handoff, every live copy counts, on new ranks and
leaving ranks alike; only experts whose every copy sat on dead ranks are lost."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_fsm._core.elastic import salvage_in_union

# Union of 4 ranks x 2 slots; ranks 2 and 3 leave, rank 2 is dead.
CURRENT = np.array([[0, 1, 2, 3, 4, 5, 4, 6]])  # expert 4 on ranks 2 and 3, 5 on 2 only
NEW = np.array([[0, 4, 5, 6, -1, -1, -1, -1]])  # the new ranks 0 and 1; leavers empty


def test_a_copy_on_a_live_leaving_rank_is_not_lost() -> None:
    held, target, lost = salvage_in_union(CURRENT, NEW, dead_ranks=[2], num_union=4)
    assert held.tolist() == [[0, 1, 2, 3, -1, -1, 4, 6]]  # the dead rank's slots emptied
    assert lost == {0: (5,)}  # 4 survives on rank 3, 6 on rank 3; 5 lived on rank 2 only
    assert target.tolist() == [[0, 4, -1, 6, -1, -1, -1, -1]]  # nothing sent for 5


def test_nothing_dead_means_nothing_lost() -> None:
    held, target, lost = salvage_in_union(CURRENT, NEW, dead_ranks=[], num_union=4)
    assert lost == {} and np.array_equal(held, CURRENT) and np.array_equal(target, NEW)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dead_ranks": [4], "num_union": 4}, "dead_ranks"),
    ({"dead_ranks": [], "num_union": 3}, "num_union|ranks"),
])
def test_bad_input_is_named(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        salvage_in_union(CURRENT, NEW, **kwargs)  # type: ignore[arg-type]


def test_maps_of_other_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="new_physical_to_logical has shape"):
        salvage_in_union(CURRENT, NEW[:, :4], dead_ranks=[2], num_union=4)
