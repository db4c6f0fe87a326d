"""Balancedness is mean/max over ranks per layer, then averaged over layers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_fsm import (
    Placement,
    balancedness,
    balancedness_per_layer,
    rank_load_from_logical,
    rank_load_from_physical,
)


def test_per_layer_then_averaged_not_mixed_across_layers() -> None:
    # Layer 0 perfectly balanced, layer 1 all on rank 0.
    rank_load = np.array([[10.0, 10.0], [4.0, 0.0]])
    np.testing.assert_allclose(balancedness_per_layer(rank_load), [1.0, 0.5])
    assert balancedness(rank_load) == pytest.approx(0.75)
    # The mixed figure (mean over layers and ranks / max over ranks of the
    # per-rank sums over layers) is 6 / 14; ours is not that.
    mixed = rank_load.mean() / rank_load.sum(axis=0).max()
    assert balancedness(rank_load) != pytest.approx(mixed)


def test_idle_layers_count_as_balanced() -> None:
    np.testing.assert_allclose(balancedness_per_layer(np.zeros((2, 4))), [1.0, 1.0])


def test_logical_load_splits_evenly_over_replicas() -> None:
    p = Placement([[0, 1, 0, 2]], 3)  # ranks: {0, 1} and {0, 2}; expert 0 twice
    rank_load = rank_load_from_logical([[8, 2, 4]], p, 2)
    np.testing.assert_allclose(rank_load, [[4 + 2, 4 + 4]])
    np.testing.assert_allclose(rank_load_from_physical([[1, 2, 3, 4]], 2), [[3, 7]])


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible by num_ranks=3"):
        rank_load_from_physical(np.ones((1, 4)), 3)
    with pytest.raises(ValueError, match="logical_load has shape"):
        rank_load_from_logical(np.ones((2, 3)), Placement([[0, 1, 2]], 3), 1)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ranks=st.integers(1, 8), per_rank=st.integers(1, 9))
def test_the_order_of_slots_and_ranks_changes_no_bit(seed: int, ranks: int,
                                                      per_rank: int) -> None:
    # A policy keeps the old placement when it is exactly as good as a fresh one;
    # a placement that only reorders slots (or ranks) must score the same bits,
    # or it would look 1 ulp better and move weights for nothing.
    rng = np.random.default_rng(seed)
    slot_load = rng.exponential(size=(3, ranks * per_rank)) * 10.0 ** rng.integers(-3, 6)
    shuffled = slot_load.reshape(3, ranks, per_rank)[:, rng.permutation(ranks)]
    shuffled = np.stack([[rank[rng.permutation(per_rank)] for rank in layer]
                         for layer in shuffled]).reshape(3, -1)
    a = balancedness_per_layer(rank_load_from_physical(slot_load, ranks))
    b = balancedness_per_layer(rank_load_from_physical(shuffled, ranks))
    assert a.tolist() == b.tolist()
