"""Load traces: deterministic, skew follows the exponent, drift is slow, shifts are sudden,
recordings replay exactly, and bad parameters are named."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from eplb_fsm._cli.files import read_load
from eplb_fsm._reference.traces import RecordedTrace, SyntheticTrace, save_loads


def _tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total-variation distance per layer: the popularity mass that moved."""
    return 0.5 * np.abs(a - b).sum(axis=-1)


def _top_half(p: np.ndarray) -> set[int]:
    return set(np.argsort(-p, kind="stable")[: p.size // 2].tolist())


def test_same_seed_same_trace_and_routing_per_rank_and_step() -> None:
    def make(seed: int) -> SyntheticTrace:
        return SyntheticTrace(3, 32, exponent=1.1, drift=0.05, shift_steps=[7], seed=seed)

    a, b = make(4), make(4)
    for step in (0, 3, 7, 12, 3):  # any order, revisits included
        assert np.array_equal(a.popularity(step), b.popularity(step))
        assert np.array_equal(a.routing(step, 1, 50, 2), b.routing(step, 1, 50, 2))
    base = a.routing(5, 0, 50, 2)
    assert not np.array_equal(base, a.routing(5, 1, 50, 2))  # another rank
    assert not np.array_equal(base, a.routing(6, 0, 50, 2))  # another step
    assert not np.array_equal(base, make(5).routing(5, 0, 50, 2))  # another seed
    assert not np.array_equal(a.popularity(0), make(5).popularity(0))
    # One rank's routing is what expert_ids gives layer by layer from rng(step, rank).
    rng = a.rng(5, 0)
    layer0, layer1 = a.expert_ids(5, 0, 50, 2, rng), a.expert_ids(5, 1, 50, 2, rng)
    assert np.array_equal(base[0], layer0) and np.array_equal(base[1], layer1)


def test_routing_shape_distinct_experts_and_in_range() -> None:
    trace = SyntheticTrace(4, 16, exponent=2.0, seed=1)
    ids = trace.routing(0, 0, 300, 4)
    assert ids.shape == (4, 300, 4) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 16
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4).tolist())
    assert trace.routing(0, 0, 0, 3).shape == (4, 0, 3)
    everything = trace.expert_ids(0, 0, 5, 16, trace.rng(0, 0))
    assert np.array_equal(np.sort(everything, axis=1), np.tile(np.arange(16), (5, 1)))


def test_first_choice_follows_popularity() -> None:
    trace = SyntheticTrace(1, 12, exponent=1.0, seed=3)
    ids = trace.expert_ids(0, 0, 40_000, 1, trace.rng(0, 0))
    freq = np.bincount(ids.ravel(), minlength=12) / ids.size
    assert np.abs(freq - trace.popularity(0)[0]).max() < 0.01


def test_skew_increases_with_exponent() -> None:
    shares = []
    for exponent in (0.0, 0.5, 1.0, 1.5, 2.5):
        trace = SyntheticTrace(2, 64, exponent=exponent, seed=2)
        ids = trace.routing(0, 0, 2000, 2)
        counts = np.sort(np.bincount(ids[0].ravel(), minlength=64))[::-1]
        shares.append(counts[:6].sum() / counts.sum())  # traffic on the hottest ~10%
    assert all(b > a + 0.05 for a, b in itertools.pairwise(shares)), shares
    assert shares[0] < 0.13  # exponent 0 is uniform: 6/64 ~ 0.094
    uniform = SyntheticTrace(2, 64, exponent=0.0).popularity(0)
    assert np.allclose(uniform, 1 / 64)


def test_each_layer_has_its_own_hot_experts() -> None:
    p = SyntheticTrace(8, 64, exponent=1.0, seed=0).popularity(0)
    assert len({int(row.argmax()) for row in p}) >= 5
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(np.sort(p, axis=1), np.sort(p[0]))  # same Zipf weights, permuted


def test_drift_moves_popularity_slowly_but_really() -> None:
    drift = 0.02
    trace = SyntheticTrace(3, 64, exponent=1.2, drift=drift, seed=6)
    pops = np.stack([trace.popularity(s) for s in range(201)])
    steps = _tv(pops[1:], pops[:-1])
    assert steps.max() <= drift + 1e-12
    assert steps.min() > 0  # it never stands still
    assert _tv(pops[0], pops[200]).min() > 0.3  # over 200 steps the mass really moved
    still = SyntheticTrace(3, 64, exponent=1.2, drift=0.0, seed=6)
    assert np.array_equal(still.popularity(0), still.popularity(500))


def test_shift_replaces_the_hot_set_at_the_given_step() -> None:
    trace = SyntheticTrace(4, 32, exponent=1.0, drift=0.01, shift_steps=[40, 90], seed=8)
    for shift in (40, 90):
        before, at = trace.popularity(shift - 1), trace.popularity(shift)
        earlier = trace.popularity(shift - 2)
        assert _tv(earlier, before).max() <= 0.01  # drift only, up to the shift
        assert _tv(before, at).min() > 0.5  # then a sudden change
        for layer in range(4):
            assert not _top_half(before[layer]) & _top_half(at[layer])
        assert _tv(at, trace.popularity(shift + 1)).max() <= 0.01  # drifting again


def test_replay_round_trips_a_file(tmp_path: Path) -> None:
    trace = SyntheticTrace(3, 10, exponent=1.3, drift=0.1, shift_steps=[4], seed=9,
                           load_per_step=1000)
    for suffix in (".npy", ".json", ".pt"):
        path = tmp_path / f"trace{suffix}"
        trace.save(path, num_steps=8)
        assert read_load(path, ndim=3).shape == (8, 3, 10)
        replay = RecordedTrace.from_file(path, seed=9)
        assert replay.num_steps == 8
        assert np.array_equal(replay.loads(), trace.loads(8))
        for step in range(8):
            assert np.allclose(replay.popularity(step), trace.popularity(step), rtol=1e-12)
        # Saving the replay gives the same file content back.
        again = tmp_path / f"again{suffix}"
        replay.save(again)
        assert np.array_equal(read_load(again, ndim=3), read_load(path, ndim=3))


def test_replay_normalises_counts_and_never_samples_unloaded_experts() -> None:
    loads = np.zeros((2, 1, 6))
    loads[0, 0, :3] = [10, 30, 60]  # three experts loaded, three never
    replay = RecordedTrace(loads, seed=1)
    assert np.allclose(replay.popularity(0)[0], [0.1, 0.3, 0.6, 0, 0, 0])
    assert np.allclose(replay.popularity(1), 1 / 6)  # a step with no load is uniform
    ids = replay.expert_ids(0, 0, 500, 2, replay.rng(0, 0))
    assert set(ids.ravel().tolist()) == {0, 1, 2}
    # Asked for more experts than are loaded, it fills with unloaded ones.
    ids = replay.expert_ids(0, 0, 50, 4, replay.rng(0, 1))
    assert all(set(row[:3]) == {0, 1, 2} for row in ids.tolist())
    with pytest.raises(ValueError, match="step=2 is past the end"):
        replay.popularity(2)
    wrapped = RecordedTrace(loads, wrap=True)
    assert wrapped.num_steps is None
    assert np.array_equal(wrapped.load(5), loads[1])


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num_layers": 0}, "num_layers"),
    ({"num_experts": 0}, "num_experts"),
    ({"exponent": -0.5}, "exponent"),
    ({"exponent": float("nan")}, "exponent"),
    ({"drift": 1.5}, "drift"),
    ({"drift": -0.1}, "drift"),
    ({"shift_steps": [5, 3]}, "shift_steps"),
    ({"shift_steps": [0]}, "shift_steps"),
    ({"shift_steps": [2, 2]}, "shift_steps"),
    ({"shift_steps": 5}, "shift_steps"),
    ({"seed": -1}, "seed"),
    ({"load_per_step": 0}, "load_per_step"),
])
def test_bad_trace_parameters_are_named(kwargs: dict, name: str) -> None:
    args = {"num_layers": 2, "num_experts": 8, **kwargs}
    with pytest.raises(ValueError, match=name):
        SyntheticTrace(args.pop("num_layers"), args.pop("num_experts"), **args)


def test_bad_sampling_arguments_are_named(tmp_path: Path) -> None:
    trace = SyntheticTrace(2, 8)
    rng = trace.rng(0, 0)
    for kwargs, name in (
        ({"step": -1}, "step"),
        ({"layer": 2}, "layer"),
        ({"num_tokens": -3}, "num_tokens"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 9}, "top_k"),
        ({"rng": 7}, "rng"),
    ):
        args = {"step": 0, "layer": 0, "num_tokens": 4, "top_k": 2, "rng": rng, **kwargs}
        with pytest.raises(ValueError, match=name):
            trace.expert_ids(**args)
    with pytest.raises(ValueError, match="rank"):
        trace.rng(0, -1)
    with pytest.raises(ValueError, match="num_steps is required"):
        trace.loads()
    with pytest.raises(ValueError, match="loads must be a non-empty"):
        RecordedTrace(np.ones((4, 8)))
    with pytest.raises(ValueError, match="non-negative"):
        RecordedTrace(-np.ones((1, 2, 8)))
    with pytest.raises(ValueError, match="unknown suffix"):
        save_loads(tmp_path / "x.csv", np.ones((1, 2, 8)))
