"""State-transition tests on the in-process fake cluster (deterministic, no processes)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from _cluster import make_cluster, skewed_load

from eplb_fsm import RebalanceFailed
from eplb_fsm.testing import FakeCluster

L, E = 3, 12


def skewed(seed: int = 0, layers: int = L, experts: int = E) -> np.ndarray:
    return skewed_load(layers, experts, seed)


def make(num_ranks: int = 4, **overrides: object) -> FakeCluster:
    return make_cluster(num_ranks, layers=L, experts=E, **overrides)


def feed_main(load: np.ndarray):  # type: ignore[no-untyped-def]
    return lambda rank, step: {"main": load}


def assert_consistent(cluster: FakeCluster, name: str = "main") -> None:
    histories = cluster.histories(name)
    assert all(h == histories[0] for h in histories), "ranks' histories differ"
    placements = [rt.placement(name) for rt in cluster.runtimes]
    assert all(p == placements[0] for p in placements), "ranks' placements differ"
    for rt, model in zip(cluster.runtimes, cluster.models[name], strict=True):
        p = rt.placement(name)
        assert np.array_equal(model.logical_to_physical_map.numpy(), p.logical_to_physical)
        assert np.array_equal(model.logical_replica_count.numpy(), p.replica_count)
    assert cluster.wrong_slots(name) == {}


@pytest.mark.asyncio
async def test_full_lifecycle_in_order_identical_everywhere() -> None:
    cluster = make()
    await cluster.run(50, feed_main(skewed()))
    history = cluster.histories()[0]
    dests = [r.dest for r in history]
    assert dests[:2] == ["planning", "staging"]
    assert dests[-1] == "collecting" and history[-1].trigger == "layers_committed"
    # layer by layer: each layer staged, awaited and committed in turn
    assert dests.count("committing") == L
    assert history[0].step == 20  # the interval, on every rank
    stats = cluster.runtimes[0].stats()["models"]["main"]
    assert stats["rebalances"]["done"] == 1 and stats["layers_committed"] == L
    assert stats["balancedness"]["after_last_plan"]["mean"] > \
        stats["balancedness"]["before_last_plan"]["mean"] + 0.2
    assert sum(rt.stats()["models"]["main"]["bytes_moved"] for rt in cluster.runtimes) > 0
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_every_rank_plans_the_same_placement_from_different_local_loads() -> None:
    cluster = make()
    cluster = FakeCluster(4, cluster.config, threaded_planning=True)  # real worker threads
    cluster.add_model("main", num_layers=L, num_logical=E)
    # Each rank sees a different local load; only the all-reduced sum is shared.
    # The planning threads are real: a step takes no time, a plan some, so the
    # loop gives them wall time rather than a number of steps.
    deadline = time.monotonic() + 60
    while cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["done"] < 1:
        assert time.monotonic() < deadline, "no rebalance completed within 60 s"
        await cluster.run(1, lambda rank, step: {"main": skewed(seed=rank)})
        await asyncio.sleep(0.001)
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_multi_layer_staging_commits_batches_together() -> None:
    cluster = make(layers_per_transfer=2)
    await cluster.run(50, feed_main(skewed()))
    commits = [r for r in cluster.histories()[0] if r.dest == "committing"]
    assert len(commits) == 2  # layers {0, 1} then {2}
    assert cluster.runtimes[0].stats()["models"]["main"]["layers_committed"] == L
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_plan_below_min_gain_is_dropped_and_nothing_moves() -> None:
    cluster = make(min_balancedness_gain=0.99)
    await cluster.run(39, feed_main(skewed()))  # one interval (step 20), not two
    history = cluster.histories()[0]
    assert [(r.source, r.dest) for r in history] == [("collecting", "planning"),
                                                      ("planning", "collecting")]
    stats = cluster.runtimes[0].stats()["models"]["main"]
    assert stats["rebalances"]["dropped"] == 1 and stats["bytes_moved"] == 0
    initial = np.arange(E + 4) % E
    assert all((rt.placement().physical_to_logical == initial).all() for rt in cluster.runtimes)
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_two_models_share_the_step_counter() -> None:
    cluster = make()
    cluster.add_model("draft", num_layers=2, num_logical=8)
    draft_load = skewed(seed=5, layers=2, experts=8)
    await cluster.run(60, lambda rank, step: {"main": skewed(), "draft": draft_load})
    for name in ("main", "draft"):
        assert cluster.runtimes[0].stats()["models"][name]["rebalances"]["done"] == 1
        assert cluster.histories(name)[0][0].step == 20
        assert_consistent(cluster, name)


@pytest.mark.asyncio
async def test_slow_rank_delays_everyone_by_whole_rounds_without_blocking() -> None:
    fast = make()
    await fast.run(50, feed_main(skewed()))
    slow = make()
    slow.delay_readiness(2, 5, phase="staging")
    durations = []
    for _ in range(80):
        for rank in range(4):
            slow.feed("main", rank, skewed())
        start = time.perf_counter()
        assert await slow.step() == [None] * 4
        durations.append(time.perf_counter() - start)
    assert max(durations) < 0.5  # nobody waited on the slow rank inside a step
    assert_consistent(slow)
    fast_commits = [r.step for r in fast.histories()[0] if r.dest == "committing"]
    slow_commits = [r.step for r in slow.histories()[0] if r.dest == "committing"]
    assert len(slow_commits) == len(fast_commits) == L
    assert all(s > f for s, f in zip(slow_commits, fast_commits, strict=True))
    retries = [r for r in slow.histories()[0]
               if r.source == "awaiting_all_ranks" and r.dest == "staging"]
    assert retries, "the slow rank should have cost at least one extra round"


@pytest.mark.asyncio
async def test_rank_never_ready_fails_everywhere_at_the_same_step_and_names_it() -> None:
    cluster = make(peer_timeout_s=0.05, on_failure="raise")
    cluster.never_ready(1)
    errors: list[BaseException | None] = []
    for _ in range(400):
        for rank in range(4):
            cluster.feed("main", rank, skewed())
        outcome = await cluster.step()
        if any(outcome):
            errors = outcome
            break
        time.sleep(0.001)
    assert all(isinstance(e, RebalanceFailed) for e in errors), errors
    message = str(errors[0])
    assert "'main'" in message and "rank(s) [1]" in message and "timed out" in message
    assert cluster.phases() == ["failed"] * 4
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)
    # Nothing was committed: every rank keeps the initial layout, weights intact.
    initial = np.arange(E + 4) % E
    assert all((rt.placement().physical_to_logical == initial).all() for rt in cluster.runtimes)
    assert_consistent(cluster)
    # The next step recovers to collecting and serving goes on.
    cluster.heal(1)
    assert await cluster.step() == [None] * 4
    assert cluster.phases() == ["collecting"] * 4
    assert cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["failed"] == 1


@pytest.mark.asyncio
async def test_absorb_mode_logs_counts_and_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    cluster = make(peer_timeout_s=0.05, on_failure="absorb")
    cluster.delay_readiness(3, 10_000, phase="staging")  # stuck on the first layer
    with caplog.at_level("ERROR", logger="eplb_fsm"):
        for _ in range(300):
            for rank in range(4):
                cluster.feed("main", rank, skewed())
            assert await cluster.step() == [None] * 4
            if cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["failed"]:
                break
            time.sleep(0.001)
    assert "waiting for rank(s) [3]" in caplog.text
    assert any(r.dest == "failed" for r in cluster.histories()[0])
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_silent_rank_cannot_hang_its_peers() -> None:
    cluster = make(peer_timeout_s=0.2, on_failure="raise")
    await cluster.run(21, feed_main(skewed()))  # planning has begun everywhere
    cluster.silence(0)
    start = time.perf_counter()
    outcomes = await cluster.run(10, feed_main(skewed()), raise_errors=False)
    assert time.perf_counter() - start < 5
    failed = [e for errors in outcomes for e in errors if e is not None]
    assert failed and all(isinstance(e, RebalanceFailed) for e in failed)
    assert "no answer from every peer" in str(failed[0])


@pytest.mark.asyncio
async def test_sync_mode_rearranges_inside_the_triggering_step() -> None:
    cluster = make(use_async=False)
    await cluster.run(20, feed_main(skewed()))
    history = cluster.histories()[0]
    assert {r.step for r in history} == {20}
    assert history[-1].dest == "collecting"
    assert cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["done"] == 1
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_async_and_sync_reach_the_same_placement() -> None:
    results = []
    for use_async in (True, False):
        cluster = make(use_async=use_async)
        await cluster.run(50, feed_main(skewed()))
        results.append(cluster.runtimes[0].placement())
    assert results[0] == results[1]


@pytest.mark.asyncio
async def test_dummy_steps_count_but_record_nothing() -> None:
    cluster = make()
    for step in range(1, 21):
        for rank in range(4):
            cluster.feed("main", rank, skewed())
        await cluster.step(is_dummy=step < 20)  # only the last pass is real
    assert cluster.runtimes[0].step_count == 20
    assert cluster.histories()[0][0].step == 20  # the interval still came
    window = cluster.runtimes[0]._drivers["main"]._window
    assert window.passes == 1


@pytest.mark.asyncio
async def test_window_stays_true_across_a_rebalance() -> None:
    # The window (30 passes) spans the commits of the first rebalance (steps
    # 32-40), so it holds passes recorded under four different maps.
    cluster = make(window_size=30)
    load = skewed()
    await cluster.run(41, feed_main(load))
    driver = cluster.runtimes[0]._drivers["main"]
    first = driver.placement
    assert cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["done"] == 1
    logical = driver._window.snapshot().logical()
    np.testing.assert_array_equal(logical, 30 * load)  # every pass, mapped by its own map
    await cluster.run(30, feed_main(load))  # the second plan (interval at 60) reads it
    stats = cluster.runtimes[0].stats()["models"]["main"]
    from eplb_fsm import balancedness_per_layer, rank_load_from_logical

    expected = balancedness_per_layer(rank_load_from_logical(load, first, 4))
    np.testing.assert_allclose(stats["balancedness"]["before_last_plan"]["per_layer"], expected)


@pytest.mark.asyncio
async def test_recording_every_few_passes_keeps_the_window_true() -> None:
    # 3 passes per window entry: the window is flushed before every map change,
    # so passes under each placement are still mapped by their own map.
    cluster = make(window_size=40, load_record_interval=3)
    load = skewed()
    await cluster.run(41, feed_main(load))
    driver = cluster.runtimes[0]._drivers["main"]
    assert cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["done"] == 1
    from eplb_fsm._runtime.load_window import physical_to_logical_load

    window = driver._window
    unrecorded = physical_to_logical_load(driver._load_view.numpy(), driver._p2l, E)
    np.testing.assert_array_equal(window.snapshot().logical() + unrecorded,
                                  (window.passes + driver._pending) * load)
    assert_consistent(cluster)


@pytest.mark.asyncio
async def test_log_balancedness_logs_the_measured_figure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = make(log_balancedness=True, log_balancedness_interval=5, step_interval=1000)
    with caplog.at_level("INFO", logger="eplb_fsm"):
        await cluster.run(12, feed_main(skewed()))
    lines = [r.getMessage() for r in caplog.records if "eplb balancedness" in r.getMessage()]
    assert lines and "model=main" in lines[0]
    measured = cluster.runtimes[0].stats()["models"]["main"]["balancedness"]
    # The initial layout on this skewed load: the same figure the planner predicts.
    from eplb_fsm import Placement, balancedness_per_layer, rank_load_from_logical

    expected = balancedness_per_layer(rank_load_from_logical(
        4 * skewed(), Placement.initial(L, E, E + 4), 4))
    np.testing.assert_allclose(measured["measured_last_logged"]["per_layer"], expected,
                               rtol=0.05)


@pytest.mark.asyncio
async def test_profile_step_allocates_peak_buffers_once_and_is_not_a_step() -> None:
    cluster = make(layers_per_transfer=2)
    rt = cluster.runtimes[0]
    await rt.step(is_profile=True)
    assert rt.step_count == 0
    assert rt._mover.profiled == [2]  # type: ignore[attr-defined]
