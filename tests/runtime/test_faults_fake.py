"""Injected faults on the fake cluster: errors in planning, staging and commit; slow
planners; triggers that come faster than rebalances finish."""

from __future__ import annotations

import numpy as np
import pytest
from _cluster import make_cluster, skewed_load

from eplb_fsm import RebalanceFailed
from eplb_fsm.testing import FakeCluster

L, E = 4, 12
INITIAL = np.arange(E + 4) % E


def load(seed: int = 0) -> np.ndarray:
    return skewed_load(L, E, seed)


def make(**overrides: object) -> FakeCluster:
    return make_cluster(layers=L, experts=E, **overrides)


async def run_until_failure(cluster: FakeCluster, steps: int = 100) -> list:
    for _ in range(steps):
        for rank in range(cluster.num_ranks):
            cluster.feed("main", rank, load())
        errors = await cluster.step()
        if any(errors):
            return errors
    raise AssertionError("no failure")


def assert_consistent(cluster: FakeCluster) -> None:
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)
    placements = [rt.placement() for rt in cluster.runtimes]
    assert all(p == placements[0] for p in placements)
    assert cluster.wrong_slots() == {}
    for rt, model in zip(cluster.runtimes, cluster.models["main"], strict=True):
        assert np.array_equal(model.logical_to_physical_map.numpy(),
                              rt.placement().logical_to_physical)


@pytest.mark.asyncio
async def test_error_in_planning_on_one_rank_fails_everyone_with_the_cause() -> None:
    cluster = make()
    cluster.raise_in(2, "plan", RuntimeError("planner exploded"))
    errors = await run_until_failure(cluster)
    assert all(isinstance(e, RebalanceFailed) for e in errors)
    assert "planning failed: rank(s) [2] reported an error" in str(errors[0])
    assert "RuntimeError: planner exploded" in str(errors[2])  # the cause, where it happened
    assert errors[2].__cause__ is not None
    assert cluster.phases() == ["failed"] * 4
    assert all((rt.placement().physical_to_logical == INITIAL).all() for rt in cluster.runtimes)
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_error_launching_a_later_layer_keeps_committed_layers_committed() -> None:
    cluster = make()
    # Fail the third batch's launch on rank 1: layers 0 and 1 are committed by then.
    calls = {"n": 0}

    def third_launch(model: str, step: int, layers: tuple[int, ...]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("NIC gone")

    cluster._faults[1].actions["stage"] = third_launch
    errors = await run_until_failure(cluster)
    assert all(isinstance(e, RebalanceFailed) for e in errors)
    assert "rank(s) [1] reported an error" in str(errors[0])
    assert "OSError: NIC gone" in str(errors[1])
    assert errors[0].layers == errors[1].layers and len(errors[0].layers) == 1
    failed_layer = errors[0].layers[0]
    for rt in cluster.runtimes:
        p2l = rt.placement().physical_to_logical
        committed = [layer for layer in range(L) if not (p2l[layer] == INITIAL).all()]
        assert len(committed) == 2 and failed_layer not in committed
    assert_consistent(cluster)
    # The next interval rebalances again from the mixed placement.
    for _ in range(60):
        for rank in range(4):
            cluster.feed("main", rank, load())
        errors = await cluster.step()
        assert not any(e for e in errors if not isinstance(e, RebalanceFailed))
    assert cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["done"] >= 1
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_failed_commit_on_one_rank_stays_in_lockstep_then_fails_everyone() -> None:
    cluster = make()
    cluster.raise_in(3, "commit", RuntimeError("copy failed"))
    first = await run_until_failure(cluster)  # the commit step: only rank 3 raises
    assert first[:3] == [None] * 3 and isinstance(first[3], RebalanceFailed)
    assert "failed on rank 3 after every rank agreed" in str(first[3])
    assert "copy failed" in str(first[3]) and first[3].layers == (0,)
    # Rank 3 kept its old maps for layer 0; its peers committed it.
    assert (cluster.runtimes[3].placement().physical_to_logical[0] == INITIAL).all()
    assert not (cluster.runtimes[0].placement().physical_to_logical[0] == INITIAL).all()
    # At the next round rank 3 reports the error and every rank leaves together.
    second = await run_until_failure(cluster)
    assert all(isinstance(e, RebalanceFailed) for e in second)
    assert "rank(s) [3] reported an error" in str(second[0])
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)
    assert cluster.phases() == ["failed"] * 4
    # Its maps still differ from its peers': the next rebalance fails on every
    # rank at the same step, naming rank 3, before anything is planned.
    third = await run_until_failure(cluster)
    assert all(isinstance(e, RebalanceFailed) for e in third)
    assert all("planning failed: rank(s) [3] hold other maps than rank 0" in str(e)
               for e in third)
    assert all(e.ranks == (3,) for e in third)  # type: ignore[union-attr]
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)


@pytest.mark.asyncio
async def test_slow_planner_delays_everyone_equally() -> None:
    cluster = make()
    cluster.delay_readiness(0, 7, phase="planning")
    for _ in range(60):
        for rank in range(4):
            cluster.feed("main", rank, load())
        assert await cluster.step() == [None] * 4
    agreed = next(r for r in cluster.histories()[0] if r.trigger == "plan_agreed")
    assert agreed.step >= 20 + 4 + 7  # at least the delay after planning began
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_triggers_faster_than_rebalances_never_overlap() -> None:
    # A rebalance of 4 layers takes ~24 steps; a trigger comes every 6.
    cluster = make(step_interval=6, window_size=6)
    drivers = [rt._drivers["main"] for rt in cluster.runtimes]
    for step in range(300):
        for rank in range(4):
            cluster.feed("main", rank, load(seed=step // 60))  # the hot set moves
        assert await cluster.step() == [None] * 4
        # One job at a time: its staged buffers belong to the layers in flight.
        for driver in drivers:
            job = driver._job
            if job is not None and job.staged is not None:
                assert set(job.staged.layers) == set(job.layers)
    stats = cluster.runtimes[0].stats()["models"]["main"]
    assert stats["rebalances"]["skipped_triggers"] > 10
    assert stats["rebalances"]["done"] >= 5
    history = cluster.histories()[0]
    starts = [r.step for r in history if r.trigger == "interval_reached"]
    ends = [r.step for r in history if r.dest == "collecting"]
    assert all(s >= e for s, e in zip(starts[1:], ends, strict=False))  # never two at once
    assert_consistent(cluster)
