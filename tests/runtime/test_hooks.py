"""Lifecycle hooks see every event, and slow or failing ones cannot stall the lifecycle."""

from __future__ import annotations

import asyncio
import time

import pytest
from _cluster import make_cluster, skewed_load

from eplb_fsm import LifecycleEvent
from eplb_fsm.testing import FakeCluster

L, E = 3, 12
LOAD = skewed_load(L, E)


def make(**overrides: object) -> FakeCluster:
    return make_cluster(2, layers=L, experts=E, **overrides)


@pytest.mark.asyncio
async def test_sync_and_async_callbacks_see_transitions_commits_and_the_end() -> None:
    cluster = make()
    rt = cluster.runtimes[0]
    seen: list[LifecycleEvent] = []
    async_seen: list[LifecycleEvent] = []

    async def on_commit(event: LifecycleEvent) -> None:
        async_seen.append(event)

    rt.on("transition", seen.append)
    rt.on("rebalance", seen.append)
    rt.on("commit", on_commit)
    await cluster.run(50, lambda rank, step: {"main": LOAD})
    await asyncio.sleep(0.01)
    rt._hooks.drain()
    transitions = [e for e in seen if e.kind == "transition"]
    assert [(e.step, e.source, e.dest, e.trigger) for e in transitions] == \
        [tuple(r) for r in rt.history()]
    assert [e.trigger for e in seen if e.kind == "rebalance"] == ["done"]
    assert sorted(layer for e in async_seen for layer in e.layers) == list(range(L))
    assert rt.stats()["hooks"]["errors"] == 0


@pytest.mark.asyncio
async def test_slow_and_failing_callbacks_do_not_stall_or_break_steps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = make()
    rt = cluster.runtimes[0]

    def slow(event: LifecycleEvent) -> None:
        time.sleep(0.2)

    def broken(event: LifecycleEvent) -> None:
        raise RuntimeError("hook bug")

    async def broken_async(event: LifecycleEvent) -> None:
        raise RuntimeError("async hook bug")

    rt.on("transition", slow)
    rt.on("transition", broken)
    rt.on("commit", broken_async)
    start = time.perf_counter()
    with caplog.at_level("ERROR", logger="eplb_fsm"):
        await cluster.run(50, lambda rank, step: {"main": LOAD})
        await asyncio.sleep(0.01)
    assert time.perf_counter() - start < 1.0  # 11 transitions x 0.2 s did not run inline
    assert rt.stats()["models"]["main"]["rebalances"]["done"] == 1
    assert cluster.wrong_slots() == {}
    rt._hooks.drain(timeout=10)
    assert rt.stats()["hooks"]["errors"] >= len(rt.history()) + L
    assert "hook bug" in caplog.text


@pytest.mark.asyncio
async def test_failure_events_carry_the_error() -> None:
    cluster = make(peer_timeout_s=0.05, on_failure="absorb")
    cluster.never_ready(1)
    failures: list[LifecycleEvent] = []
    cluster.runtimes[0].on("failure", failures.append)
    for _ in range(300):
        await cluster.run(1, lambda rank, step: {"main": LOAD})
        if failures:
            break
        time.sleep(0.001)
    cluster.runtimes[0]._hooks.drain()
    assert failures and "rank(s) [1]" in (failures[0].error or "")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown hook kind 'start'"):
        make().runtimes[0].on("start", print)
