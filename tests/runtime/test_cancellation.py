"""Cancelling the task that awaits `step()`, in every state that can wait.

A step that has started finishes its agreed work, then the cancellation is
raised; every rank's history stays identical and the next step works.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
from _cluster import make_cluster, skewed_load

from eplb_fsm.testing import FakeCluster

L, E = 3, 12
LOAD = skewed_load(L, E)


def make(**overrides: object) -> FakeCluster:
    return make_cluster(layers=L, experts=E, **overrides)


def feed(cluster: FakeCluster) -> None:
    for rank in range(cluster.num_ranks):
        cluster.feed("main", rank, LOAD)


async def advance_to_a_read(cluster: FakeCluster, phase: str, job_phase: str) -> None:
    """Step until the next step reads a round while in `phase`."""
    driver = cluster.runtimes[0]._drivers["main"]
    for _ in range(200):
        job = driver._job
        if (driver.state == phase and job is not None and job.phase == job_phase
                and job.due == cluster.runtimes[0].step_count + 1
                and (job.load_round if job_phase == "plan" else job.round) is not None):
            return
        feed(cluster)
        assert await cluster.step() == [None] * 4
    raise AssertionError(f"never reached a read in {phase}/{job_phase}")


@pytest.mark.asyncio
@pytest.mark.parametrize(("phase", "job_phase"), [
    ("planning", "plan"),             # reads the load all-reduce
    ("planning", "plan_round"),       # reads a readiness round
    ("awaiting_all_ranks", "transfer_round"),
])
@pytest.mark.parametrize("style", ["asyncio", "anyio"])
async def test_cancelled_step_finishes_its_agreed_work(phase: str, job_phase: str,
                                                       style: str) -> None:
    cluster = make()
    await advance_to_a_read(cluster, phase, job_phase)
    feed(cluster)
    cluster.pause_rounds()
    rt0 = cluster.runtimes[0]
    if style == "asyncio":
        victim = asyncio.ensure_future(rt0.step())
    else:
        async def scoped() -> None:
            with anyio.move_on_after(0.01):
                await rt0.step()
        victim = asyncio.ensure_future(scoped())
    others = [asyncio.ensure_future(rt.step()) for rt in cluster.runtimes[1:]]
    await asyncio.sleep(0.02)  # everyone waits on the held round
    if style == "asyncio":
        victim.cancel()
    await asyncio.sleep(0.02)
    assert not victim.done(), "the step must finish its agreed work before cancelling"
    cluster.resume_rounds()
    results = await asyncio.gather(victim, *others, return_exceptions=True)
    if style == "asyncio":
        assert isinstance(results[0], asyncio.CancelledError)
    else:
        assert results[0] is None  # move_on_after absorbed it, after the step
    assert results[1:] == [None] * 3
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)
    # The next steps work, and the rebalance completes consistently.
    for _ in range(40):
        feed(cluster)
        assert await cluster.step() == [None] * 4
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)
    assert rt0.stats()["models"]["main"]["rebalances"]["done"] >= 1
    assert cluster.wrong_slots() == {}


@pytest.mark.asyncio
@pytest.mark.parametrize("phase", ["collecting", "staging"])
async def test_cancelling_before_a_step_starts_skips_it_everywhere(phase: str) -> None:
    # A step cancelled before it runs never starts on that rank; when the
    # serving loop cancels all ranks' steps alike, they stay in step.
    cluster = make()
    driver = cluster.runtimes[0]._drivers["main"]
    for _ in range(200):
        if driver.state == phase and cluster.runtimes[0].step_count > 5:
            break
        feed(cluster)
        await cluster.step()
    tasks = [asyncio.ensure_future(rt.step()) for rt in cluster.runtimes]
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert len({rt.step_count for rt in cluster.runtimes}) == 1
    for _ in range(40):
        feed(cluster)
        assert await cluster.step() == [None] * 4
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)
    assert cluster.wrong_slots() == {}


@pytest.mark.asyncio
async def test_cancelled_synchronous_rearrangement_completes_first() -> None:
    cluster = make(use_async=False)
    for _ in range(19):
        feed(cluster)
        await cluster.step()
    feed(cluster)
    cluster.pause_rounds()
    victim = asyncio.ensure_future(cluster.runtimes[0].step())
    others = [asyncio.ensure_future(rt.step()) for rt in cluster.runtimes[1:]]
    await asyncio.sleep(0.02)
    victim.cancel()
    await asyncio.sleep(0.02)
    cluster.resume_rounds()
    results = await asyncio.gather(victim, *others, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert cluster.runtimes[0].stats()["models"]["main"]["rebalances"]["done"] == 1
    histories = cluster.histories()
    assert all(h == histories[0] for h in histories)
    assert cluster.wrong_slots() == {}


def test_deferral_sets_and_resets_the_holder_even_when_the_block_raises() -> None:
    """`pause` finds the holder inside the block, and nothing outside it."""
    from eplb_fsm._runtime.rounds import _deferred, deferred_cancellation

    assert _deferred.get() is None
    with deferred_cancellation() as outer:
        assert _deferred.get() is outer
        with pytest.raises(KeyError), deferred_cancellation() as inner:
            assert _deferred.get() is inner and inner is not outer
            raise KeyError("x")
        assert _deferred.get() is outer
    assert _deferred.get() is None and outer == []

