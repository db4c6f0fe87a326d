"""Placement invariants, property-tested over random maps (with -1 and replicas)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_fsm import Placement


@st.composite
def placements(draw: st.DrawFn, allow_empty: bool = True) -> tuple[np.ndarray, int]:
    """A random physical_to_logical where every expert keeps >= 1 replica."""
    num_layers = draw(st.integers(1, 4))
    num_logical = draw(st.integers(1, 12))
    extra = draw(st.integers(0, 8))
    num_physical = num_logical + extra
    rows = []
    for _ in range(num_layers):
        fill = draw(st.lists(st.integers(-1 if allow_empty else 0, num_logical - 1),
                             min_size=extra, max_size=extra))
        row = np.array(list(range(num_logical)) + fill, dtype=np.int64)
        perm = draw(st.permutations(range(num_physical)))
        rows.append(row[list(perm)])
    return np.stack(rows), num_logical


@given(placements())
@settings(max_examples=200, deadline=None)
def test_derived_maps_agree_with_physical_to_logical(case: tuple[np.ndarray, int]) -> None:
    p2l, num_logical = case
    p = Placement(p2l, num_logical)
    p.validate()
    num_layers, num_physical = p2l.shape
    assert p.logical_to_physical.shape == (num_layers, num_logical, num_physical - num_logical + 1)
    for layer in range(num_layers):
        for expert in range(num_logical):
            slots = np.flatnonzero(p2l[layer] == expert)
            assert p.replica_count[layer, expert] == len(slots) >= 1
            row = p.logical_to_physical[layer, expert]
            assert row[: len(slots)].tolist() == slots.tolist()  # ascending, canonical
            assert np.all(row[len(slots):] == -1)
    assert p.replica_count.sum() == (p2l >= 0).sum()


@given(placements())
@settings(max_examples=50, deadline=None)
def test_from_maps_round_trips_and_torch_matches(case: tuple[np.ndarray, int]) -> None:
    p2l, num_logical = case
    p = Placement(p2l, num_logical)
    t = p.to_torch("cpu")
    q = Placement.from_maps(t.physical_to_logical, t.logical_to_physical, t.replica_count)
    assert q == p and hash(q) == hash(p)
    assert t.logical_to_physical.numpy().tolist() == p.logical_to_physical.tolist()


def test_initial_is_vllm_layout() -> None:
    p = Placement.initial(2, 4, 6)
    assert p.physical_to_logical.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert p.replica_count.tolist() == [[2, 2, 1, 1]] * 2
    assert p.logical_to_physical[0].tolist() == [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]]


def test_maps_are_read_only() -> None:
    p = Placement.initial(1, 2, 3)
    with pytest.raises(ValueError):
        p.physical_to_logical[0, 0] = 1


def test_equality_distinguishes_maps() -> None:
    assert Placement([[0, 1, 0]], 2) != Placement([[0, 1, 1]], 2)
    assert Placement([[0, 1, 0]], 2) == Placement(np.array([[0, 1, 0]]), 2)
    assert Placement([[0, 1, 0]], 2).slots_changed(Placement([[1, 0, 0]], 2)) == 2


@pytest.mark.parametrize(
    ("p2l", "num_logical", "match"),
    [
        ([[0, 1, 5]], 3, "out of range"),
        ([[0, 1, -2]], 3, ">= -1"),
        ([[0, 0, 0]], 2, "expert 1 of layer 0 has no replica"),
        ([0, 1, 2], 3, "2-D"),
        ([[0, 1]], 3, "P >= E"),
        ([[0.5, 1.0]], 2, "integer"),
    ],
)
def test_bad_maps_are_rejected(p2l: list, num_logical: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Placement(p2l, num_logical)


def test_missing_experts_allowed_when_asked() -> None:
    p = Placement([[0, 0, 0, -1]], 3, allow_missing=True)
    assert p.replica_count.tolist() == [[3, 0, 0]]
    p.validate(allow_missing=True)
    with pytest.raises(ValueError, match="no replica"):
        p.validate()


def test_from_maps_rejects_disagreeing_maps() -> None:
    t = Placement([[0, 1, 0]], 2).to_torch()
    bad_rc = t.replica_count.clone()
    bad_rc[0, 0] = 1
    with pytest.raises(ValueError, match="replica_count disagrees"):
        Placement.from_maps(t.physical_to_logical, t.logical_to_physical, bad_rc)
    bad_l2p = t.logical_to_physical.clone()
    bad_l2p[0, 0] = bad_l2p[0, 0].flip(0)
    with pytest.raises(ValueError, match="logical_to_physical disagrees"):
        Placement.from_maps(t.physical_to_logical, bad_l2p, t.replica_count)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_with_layers_is_the_checked_placement_of_the_mixed_rows(data: st.DataObject) -> None:
    # A commit mixes committed rows into the old placement without re-checking:
    # the result must be exactly what the checked constructor builds.
    p2l, num_logical = data.draw(placements())
    other = np.stack([np.random.default_rng(layer).permutation(row) for layer, row in
                      enumerate(p2l)])
    layers = data.draw(st.lists(st.integers(0, p2l.shape[0] - 1), unique=True))
    old, new = Placement(p2l, num_logical), Placement(other, num_logical)
    mixed = p2l.copy()
    mixed[layers] = other[layers]
    want = Placement(mixed, num_logical)
    got = old.with_layers(layers, new)
    assert got == want
    np.testing.assert_array_equal(got.replica_count, want.replica_count)
    np.testing.assert_array_equal(got.logical_to_physical, want.logical_to_physical)
    assert old == Placement(p2l, num_logical)  # the old placement is untouched
    with pytest.raises(ValueError, match="layers must be ints"):
        old.with_layers([p2l.shape[0]], new)
    with pytest.raises(ValueError, match="other has shape"):
        old.with_layers(layers, Placement(np.zeros((p2l.shape[0], p2l.shape[1] + 1),
                                                   dtype=np.int64), None))
