"""Balancedness is mean/max over ranks per layer, then averaged over layers."""

from __future__ import annotations

import numpy as np
import pytest

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
