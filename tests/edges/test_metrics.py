"""Prometheus metrics, scraped from a real `CollectorRegistry` while a FakeCluster rebalances."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from eplb_fsm import STATES, EplbConfig, LifecycleEvent
from eplb_fsm.metrics import EplbMetrics
from eplb_fsm.testing import FakeCluster

L, E = 3, 12


def skewed(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(1, E + 1) ** 2) for _ in range(L)])


def make(**overrides: object) -> FakeCluster:
    cfg: dict[str, object] = dict(window_size=10, step_interval=20, num_redundant_experts=4,
                                  readiness_lag=2, peer_timeout_s=30.0)
    cfg.update(overrides)
    cluster = FakeCluster(4, EplbConfig(**cfg))  # type: ignore[arg-type]
    cluster.add_model("main", num_layers=L, num_logical=E)
    return cluster


def feed(rank: int, step: int) -> dict[str, npt.ArrayLike]:
    return {"main": skewed()}


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Hooks run on the runtime's hook thread: wait for them, boundedly."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "hook-fed metrics never caught up"
        time.sleep(0.005)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def state_gauges(registry: CollectorRegistry) -> dict[str, float | None]:
    return {s: value(registry, "eplb_lifecycle_state", model="main", state=s) for s in STATES}


@pytest.mark.asyncio
async def test_a_rebalance_shows_up_in_every_metric() -> None:
    cluster = make()
    rt = cluster.runtimes[0]
    registry = CollectorRegistry()
    EplbMetrics(rt, registry)

    assert state_gauges(registry) == {s: float(s == "collecting") for s in STATES}
    assert value(registry, "eplb_rebalances_total", model="main", outcome="done") == 0
    assert value(registry, "eplb_balancedness_ratio", model="main", aggregate="avg",
                 placement="after_plan") is None  # no plan yet

    # Mid-rebalance: the gauge follows the runtime's phase, whatever it is.
    await cluster.run(21, feed)
    phase = rt.phase()
    assert phase != "collecting"
    assert state_gauges(registry) == {s: float(s == phase) for s in STATES}

    await cluster.run(29, feed)  # 50 steps: done, and the next interval (60) not yet
    stats = rt.stats()["models"]["main"]
    assert rt.phase() == "collecting" and stats["rebalances"]["done"] == 1
    assert value(registry, "eplb_rebalances_total", model="main", outcome="done") == 1
    assert value(registry, "eplb_rebalances_total", model="main", outcome="failed") == 0
    assert value(registry, "eplb_rebalances_started_total", model="main") == 1
    assert stats["bytes_moved"] > 0
    assert value(registry, "eplb_moved_bytes_total", model="main") == stats["bytes_moved"]
    assert value(registry, "eplb_layers_committed_total", model="main") == L
    assert value(registry, "eplb_steps_total") == 50

    after = stats["balancedness"]["after_last_plan"]
    before = stats["balancedness"]["before_last_plan"]
    got = {(agg, where): value(registry, "eplb_balancedness_ratio", model="main",
                               aggregate=agg, placement=where)
           for agg in ("avg", "min") for where in ("before_plan", "after_plan")}
    assert got == {("avg", "after_plan"): pytest.approx(after["mean"]),
                   ("min", "after_plan"): pytest.approx(after["min"]),
                   ("avg", "before_plan"): pytest.approx(before["mean"]),
                   ("min", "before_plan"): pytest.approx(before["min"])}
    assert after["mean"] > before["mean"] + 0.2  # the skew was fixed

    # One histogram observation per transition, filed under the state it left.
    history = rt.history()
    left = {s: sum(1 for r in history if r.source == s) for s in STATES}

    def observed() -> dict[str, float | None]:
        return {s: value(registry, "eplb_state_duration_seconds_count", model="main", state=s)
                for s in STATES if left[s]}

    eventually(lambda: observed() == {s: float(n) for s, n in left.items() if n})
    total = value(registry, "eplb_state_duration_seconds_sum", model="main", state="collecting")
    assert total is not None and total > 0
    eventually(lambda: value(registry, "eplb_rebalance_duration_seconds_count", model="main",
                             outcome="done") == 1)
    # The cumulative counters agree with stats(), state by state.
    for state in STATES:
        assert value(registry, "eplb_state_steps_total", model="main", state=state) == \
            stats["steps_in_state"][state]


@pytest.mark.asyncio
async def test_failed_and_dropped_rebalances_are_counted() -> None:
    # No plan can gain 0.9: every rebalance that gets past planning is dropped.
    cluster = make(peer_timeout_s=0.05, on_failure="absorb", min_balancedness_gain=0.9)
    rt = cluster.runtimes[0]
    registry = CollectorRegistry()
    EplbMetrics(rt, registry)
    cluster.never_ready(2)
    for _ in range(400):
        for rank in range(4):
            cluster.feed("main", rank, skewed())
        assert await cluster.step() == [None] * 4
        if rt.stats()["models"]["main"]["rebalances"]["failed"]:
            break
        time.sleep(0.001)
    assert value(registry, "eplb_rebalances_total", model="main", outcome="failed") == 1
    assert value(registry, "eplb_rebalances_total", model="main", outcome="done") == 0
    eventually(lambda: value(registry, "eplb_rebalance_duration_seconds_count", model="main",
                             outcome="failed") == 1)

    cluster.heal(2)
    await cluster.run(40, feed)
    dropped = rt.stats()["models"]["main"]["rebalances"]["dropped"]
    assert dropped >= 1
    assert value(registry, "eplb_rebalances_total", model="main", outcome="dropped") == dropped
    eventually(lambda: value(registry, "eplb_rebalance_duration_seconds_count", model="main",
                             outcome="dropped") == dropped)


@pytest.mark.asyncio
async def test_names_follow_prometheus_conventions() -> None:
    cluster = make()
    registry = CollectorRegistry()
    EplbMetrics(cluster.runtimes[0], registry, const_labels={"rank": "0"})
    await cluster.run(61, feed)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert {f.name for f in families} >= {
        "eplb_lifecycle_state", "eplb_balancedness_ratio", "eplb_rebalances",
        "eplb_moved_bytes", "eplb_state_duration_seconds", "eplb_rebalance_duration_seconds"}
    for family in families:
        if family.name.endswith("_created"):  # prometheus-client's own creation stamps
            continue
        assert family.name.startswith("eplb_"), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            assert sample.labels.get("rank") == "0", sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
        if "seconds" in family.name or "bytes" in family.name:
            assert family.name.endswith(("_seconds", "_bytes")), family.name


def test_namespace_and_label_checks_and_close() -> None:
    cluster = make()
    registry = CollectorRegistry()
    with pytest.raises(ValueError, match="namespace"):
        EplbMetrics(cluster.runtimes[0], registry, namespace="bad name")
    with pytest.raises(ValueError, match="model"):
        EplbMetrics(cluster.runtimes[0], registry, const_labels={"model": "x"})
    metrics = EplbMetrics(cluster.runtimes[0], registry, namespace="moe")
    assert value(registry, "moe_lifecycle_state", model="main", state="collecting") == 1
    with pytest.raises(ValueError):  # one EplbMetrics per registry: names would clash
        EplbMetrics(cluster.runtimes[1], registry, namespace="moe")
    metrics.close()
    assert value(registry, "moe_lifecycle_state", model="main", state="collecting") is None
    EplbMetrics(cluster.runtimes[1], registry, namespace="moe")  # the names are free again


@dataclass(frozen=True)
class _TimedEvent(LifecycleEvent):
    seconds_in_source: float | None = None


def test_a_duration_reported_by_the_runtime_is_used_as_is() -> None:
    cluster = make()
    registry = CollectorRegistry()
    metrics = EplbMetrics(cluster.runtimes[0], registry)
    metrics._on_transition(_TimedEvent("transition", "main", 20, "collecting", "planning",
                                       "interval_reached", seconds_in_source=12.5))
    assert value(registry, "eplb_state_duration_seconds_sum", model="main",
                 state="collecting") == 12.5


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    for name in ("eplb_fsm.metrics", "eplb_fsm._integrations.metrics"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r"eplb-fsm\[metrics\]"):
        importlib.import_module("eplb_fsm.metrics")
