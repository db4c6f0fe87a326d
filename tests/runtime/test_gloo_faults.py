"""Faults on real gloo processes: a rank that dies mid-staging or mid-commit, an error in
one rank's planner, a rank slow to stage. Survivors never hang, errors name the model,
the layer and the rank, and no survivor's weights or maps change for a layer that was
not committed everywhere."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np
import pytest

from eplb_fsm import EplbConfig, EplbRuntime, RebalanceFailed
from eplb_fsm.testing import Faults, TaggedMoEModel, inject_faults, run_ranks

L, E, REDUNDANT, WORLD = 4, 12, 3, 3
INITIAL = np.arange(E + REDUNDANT) % E
TIMEOUT_S = 5.0


def _feed(model: TaggedMoEModel) -> None:
    rng = np.random.default_rng(0)
    logical = np.stack([rng.permutation(np.arange(1, E + 1) ** 2) for _ in range(L)])
    model.feed(logical)


def _die_on(nth: int) -> Any:
    calls = {"n": 0}

    def action(model: str, step: int, layers: tuple[int, ...]) -> None:
        calls["n"] += 1
        if calls["n"] == nth:
            os._exit(17)

    return action


def _scenario(rank: int, world: int, scenario: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        cfg = EplbConfig(window_size=10, step_interval=30, num_redundant_experts=REDUNDANT,
                         readiness_lag=2, peer_timeout_s=TIMEOUT_S)
        rt = EplbRuntime(cfg)
        model = TaggedMoEModel(rank, world, L, E, REDUNDANT)
        rt.add_model(model, "main")
        faults = Faults()
        inject_faults(rt, faults)
        if scenario in ("die_staging", "die_then_serve") and rank == 2:
            faults.actions["stage"] = _die_on(2)  # launching layer 1, after layer 0 committed
        elif scenario == "die_commit" and rank == 2:
            faults.actions["commit"] = _die_on(2)  # inside the second commit
        elif scenario == "plan_error" and rank == 1:
            faults.fail_at["plan"] = RuntimeError("planner exploded")
        elif scenario == "slow" and rank == 1:
            faults.delay["staging"] = 6
        error: RebalanceFailed | None = None
        later: list[tuple[int, str]] = []  # failures after the first (die_then_serve)
        longest_step = 0.0
        for _ in range(120 if scenario != "die_then_serve" else 160):
            _feed(model)
            time.sleep(0.002)  # the forward pass
            start = time.perf_counter()
            try:
                await rt.step()
            except RebalanceFailed as exc:
                if error is not None:
                    later.append((rt.step_count, str(exc)))
                    continue
                error = exc
                if scenario != "die_then_serve":
                    break
            finally:
                if error is None or scenario != "die_then_serve":
                    longest_step = max(longest_step, time.perf_counter() - start)
        p2l = rt.placement().physical_to_logical
        result = {
            "error": str(error) if error else None,
            "layers": error.layers if error else None,
            "ranks": error.ranks if error else None,
            "longest_step_s": longest_step,
            "wrong_slots": model.wrong_slots(p2l),
            "maps_agree": bool(np.array_equal(model.logical_to_physical_map.numpy(),
                                              rt.placement().logical_to_physical)),
            "committed": [layer for layer in range(L) if not (p2l[layer] == INITIAL).all()],
            "history": [tuple(r) for r in rt.history()],
            "done": rt.stats()["models"]["main"]["rebalances"]["done"],
            "later": later, "steps": rt.step_count,
        }
        if scenario.startswith("die"):
            _stay_until_every_survivor_is_done()
        rt.close()
        return result

    return asyncio.run(main())


def _stay_until_every_survivor_is_done(timeout_s: float = 60.0) -> None:
    """Once the group broke, survivors step on their own. One that returned and
    exited would stop its heartbeat, and its peer, still looking into a failure,
    would rightly name it among the ranks that stopped answering (seen under
    load: "rank(s) [1, 2]"). A serving engine's survivors go on running."""
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()  # hosted by rank 0, a survivor
    store.add("survivors_done", 1)
    deadline = time.monotonic() + timeout_s
    while int(store.add("survivors_done", 0)) < WORLD - 1:
        assert time.monotonic() < deadline, "the other survivor never finished"
        time.sleep(0.01)


def _survivors(scenario: str) -> list[dict[str, Any]]:
    start = time.monotonic()
    results = run_ranks(_scenario, WORLD, scenario, timeout=90, may_die=(2,))
    assert results[2] is None, "rank 2 was to die"
    assert time.monotonic() - start < 60, "survivors took too long to leave"
    return results[:2]


@pytest.mark.parametrize("scenario", ["die_staging", "die_commit"])
def test_survivors_of_a_dead_rank_leave_in_time_and_name_it(scenario: str) -> None:
    survivors = _survivors(scenario)
    for result in survivors:
        error = result["error"]
        assert error is not None, "a survivor kept going as if nothing happened"
        assert "'main'" in error and "rank(s) [2] stopped answering" in error, error
        assert result["ranks"] == (2,)
        assert result["layers"] and f"layer(s) {list(result['layers'])}" in error
        assert result["longest_step_s"] < TIMEOUT_S + 5  # left within the timeout
        # Layers committed everywhere stay committed; the rest keep the old placement.
        assert result["wrong_slots"] == [] and result["maps_agree"]
        assert not set(result["layers"]) & set(result["committed"])
    assert survivors[0]["committed"] == survivors[1]["committed"]
    expected = 1 if scenario == "die_staging" else 2  # a dying commit still commits on peers
    assert len(survivors[0]["committed"]) == expected


def test_planner_error_on_one_rank_fails_all_together_with_the_cause() -> None:
    results = run_ranks(_scenario, WORLD, "plan_error", timeout=90)
    assert all(r["error"] and "planning failed: rank(s) [1] reported an error" in r["error"]
               for r in results)
    assert "RuntimeError: planner exploded" in results[1]["error"]
    assert all(r["committed"] == [] and r["wrong_slots"] == [] for r in results)
    assert all(r["history"] == results[0]["history"] for r in results)


def test_slow_rank_delays_commits_equally_without_blocking_steps() -> None:
    results = run_ranks(_scenario, WORLD, "slow", timeout=90)
    assert all(r["error"] is None and r["done"] >= 1 for r in results)
    assert all(r["history"] == results[0]["history"] for r in results)
    assert all(r["longest_step_s"] < 1.0 for r in results)
    retries = [h for h in results[0]["history"]
               if h[1] == "awaiting_all_ranks" and h[2] == "staging"]
    assert retries  # the slow rank cost whole extra rounds, on every rank alike
    assert all(r["wrong_slots"] == [] and r["maps_agree"] for r in results)


def test_survivors_of_a_dead_rank_keep_serving_and_each_later_rebalance_fails_fast() -> None:
    survivors = _survivors("die_then_serve")
    for result in survivors:
        assert result["steps"] == 160  # every pass served after the death
        assert result["error"] is not None and "rank(s) [2] stopped answering" in result["error"]
        # Rebalances starting at steps 60, 90, 120, 150 fail when their load round is
        # read (2 lags later) on the broken group: named, never a hang, never a
        # crash, the weights untouched.
        assert [step for step, _ in result["later"]] == [64, 94, 124, 154], result["later"]
        assert all("rank(s) [2] stopped answering" in m for _, m in result["later"])
        assert result["wrong_slots"] == [] and result["maps_agree"]
    assert survivors[0]["history"] == survivors[1]["history"]
