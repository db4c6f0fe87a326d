"""Prometheus metrics of one `EplbRuntime` (the ``metrics`` extra: prometheus-client).

Two sources, each used for what it measures best:

- **Scrape-time reads of** ``runtime.stats()`` (a custom collector): counters
  the runtime already keeps (rebalances, bytes, layers, steps and seconds
  per state), the current lifecycle state and the last plan's predicted
  balancedness. Read when Prometheus scrapes, so they are never stale and
  cost nothing between scrapes; a counter mirrors the runtime's own count
  instead of being incremented beside it, so the two can never disagree.
- **Lifecycle hooks** (``runtime.on("transition" | "rebalance" | "failure")``):
  what only a per-event observation gives, the distribution of time spent in
  each state and of rebalance durations (histograms). Sync hooks run on the
  runtime's hook thread, never in ``step()``: observing costs the serving
  loop nothing, and a metrics bug cannot stall the lifecycle.

Metric names (with the default ``namespace="eplb"``; labels in braces):

- gauge ``eplb_lifecycle_state`` {model, state}: 1 for the current state, 0 for the others;
- gauge ``eplb_balancedness_ratio`` {model, aggregate=avg|min,
  placement=before_plan|after_plan}: the last agreed plan's *predicted* figures;
- counters ``eplb_rebalances_total`` {model, outcome=done|dropped|failed},
  ``eplb_rebalances_started_total`` {model},
  ``eplb_rebalance_triggers_skipped_total`` {model} (intervals reached mid-rebalance),
  ``eplb_moved_bytes_total`` {model} (expert-weight bytes received from peers),
  ``eplb_layers_committed_total`` {model},
  ``eplb_state_steps_total`` and ``eplb_state_seconds_total`` {model, state},
  ``eplb_steps_total`` (forward passes) and ``eplb_hook_errors_total``;
- histograms ``eplb_state_duration_seconds`` {model, state} (one observation per
  stay in a state) and ``eplb_rebalance_duration_seconds`` {model, outcome}
  (trigger to done, dropped or failed).

Every figure is this rank's (each rank serves its own ``/metrics``; Prometheus
adds the ``instance`` label, or pass ``const_labels={"rank": ...}``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeAlias

try:
    from prometheus_client import REGISTRY as _DEFAULT_REGISTRY
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # the extra is optional; say which one to install
    raise ImportError(
        "eplb_fsm.metrics needs prometheus-client, which the 'metrics' extra installs: "
        "pip install 'eplb-fsm[metrics]'  (or: pip install prometheus-client)") from exc

from .._core.lifecycle import STATES
from .._runtime.hooks import LifecycleEvent
from .._runtime.runtime import EplbRuntime

__all__ = ["DEFAULT_BUCKETS", "EplbMetrics"]

log = logging.getLogger("eplb_fsm")

#: Seconds. A state lasts from well under a millisecond (committing) to a
#: whole step interval (collecting: minutes at vLLM's default 3000 steps).
DEFAULT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                      5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_OUTCOMES = ("done", "dropped", "failed")

_BALANCEDNESS_HELP = (
    "Predicted balancedness of the last agreed plan: mean/max per-rank token load per layer, "
    "then aggregate=avg (mean over layers) or min (worst layer), computed from the "
    "all-reduced load window the plan was made from; placement=after_plan for the planned "
    "placement (in service once that rebalance is done), before_plan for the one it "
    "replaces. Absent until the first plan. A prediction, not a measurement: set "
    "EplbConfig.log_balancedness for the measured figure in the logs.")


_Family: TypeAlias = "GaugeMetricFamily | CounterMetricFamily"


class _StatsCollector(Collector):
    """Turns one ``runtime.stats()`` read into metric families at scrape time."""

    def __init__(self, runtime: EplbRuntime, namespace: str,
                 const_labels: Mapping[str, str]) -> None:
        self._runtime = runtime
        self._ns = namespace
        self._const = dict(const_labels)

    def _families(self) -> dict[str, _Family]:
        ns, const = self._ns, list(self._const)
        model = [*const, "model"]
        return {
            "state": GaugeMetricFamily(
                f"{ns}_lifecycle_state", "1 for the model's current lifecycle state, "
                "0 for the others", labels=[*model, "state"]),
            "balancedness": GaugeMetricFamily(
                f"{ns}_balancedness_ratio", _BALANCEDNESS_HELP,
                labels=[*model, "aggregate", "placement"]),
            "rebalances": CounterMetricFamily(
                f"{ns}_rebalances", "Rebalances that ended, by outcome: done (every changed "
                "layer committed), dropped (predicted gain below min_balancedness_gain, or "
                "nothing to move), failed (see the error log)", labels=[*model, "outcome"]),
            "started": CounterMetricFamily(
                f"{ns}_rebalances_started", "Rebalances started (step interval reached)",
                labels=model),
            "skipped": CounterMetricFamily(
                f"{ns}_rebalance_triggers_skipped", "Step intervals reached while a "
                "rebalance was still in flight (no new rebalance started)", labels=model),
            "bytes": CounterMetricFamily(
                f"{ns}_moved_bytes", "Expert-weight bytes this rank received from peers for "
                "committed layers (local copies excluded)", labels=model),
            "layers": CounterMetricFamily(
                f"{ns}_layers_committed", "Layers committed to a new placement",
                labels=model),
            "state_steps": CounterMetricFamily(
                f"{ns}_state_steps", "Steps spent in each lifecycle state (counted when the "
                "state is left)", labels=[*model, "state"]),
            "state_seconds": CounterMetricFamily(
                f"{ns}_state_seconds", "Seconds spent in each lifecycle state (counted when "
                "the state is left)", labels=[*model, "state"]),
            "steps": CounterMetricFamily(
                f"{ns}_steps", "Runtime steps (forward passes) taken", labels=const),
            "hook_errors": CounterMetricFamily(
                f"{ns}_hook_errors", "Lifecycle callbacks that raised (logged; the lifecycle "
                "never sees them)", labels=const),
        }

    def describe(self) -> Iterable[Metric]:
        # Names only: lets a registry check for clashes without reading stats().
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        stats = self._read_stats()
        const = list(self._const.values())
        families["steps"].add_metric(const, float(stats.get("step", 0)))
        families["hook_errors"].add_metric(const, float(stats.get("hooks", {}).get("errors", 0)))
        for name, model in stats.get("models", {}).items():
            self._add_model(families, [*const, name], model)
        yield from families.values()

    def _read_stats(self) -> dict[str, Any]:
        # A scrape runs on the exporter's thread while the serving loop mutates the
        # stats; copying a dict that grows (a model added) can raise. Retry, then
        # give up on this scrape rather than fail it.
        for _ in range(3):
            try:
                return self._runtime.stats()
            except RuntimeError:
                continue
        log.warning("eplb_fsm metrics: runtime.stats() kept changing during a scrape")
        return {}

    @staticmethod
    def _add_model(families: dict[str, _Family], labels: list[str],
                   model: Mapping[str, Any]) -> None:
        phase = model.get("phase")
        for state in STATES:
            families["state"].add_metric([*labels, state], 1.0 if state == phase else 0.0)
        rebalances = model.get("rebalances", {})
        for outcome in _OUTCOMES:
            families["rebalances"].add_metric([*labels, outcome],
                                              float(rebalances.get(outcome, 0)))
        families["started"].add_metric(labels, float(rebalances.get("started", 0)))
        families["skipped"].add_metric(labels, float(rebalances.get("skipped_triggers", 0)))
        families["bytes"].add_metric(labels, float(model.get("bytes_moved", 0)))
        families["layers"].add_metric(labels, float(model.get("layers_committed", 0)))
        for state, steps in model.get("steps_in_state", {}).items():
            families["state_steps"].add_metric([*labels, state], float(steps))
        for state, seconds in model.get("seconds_in_state", {}).items():
            families["state_seconds"].add_metric([*labels, state], float(seconds))
        balancedness = model.get("balancedness", {})
        for placement, key in (("before_plan", "before_last_plan"),
                               ("after_plan", "after_last_plan")):
            summary = balancedness.get(key)
            if summary is None:
                continue
            families["balancedness"].add_metric([*labels, "avg", placement],
                                                float(summary["mean"]))
            families["balancedness"].add_metric([*labels, "min", placement],
                                                float(summary["min"]))


class EplbMetrics:
    """Prometheus metrics of `runtime`, registered in `registry` (default: the global one).

    Create it once per runtime, after ``EplbRuntime(...)`` and before serving;
    serve the registry your usual way, e.g.
    ``prometheus_client.start_http_server(9400 + rank)``. A registry holds one
    `EplbMetrics` (a second would repeat the names; `ValueError`).

    - `namespace` prefixes every name (default ``eplb``);
    - `const_labels` are added to every sample (e.g. ``{"rank": "3"}``, or the
      deployment's name);
    - `buckets`: the histograms' upper bounds, in seconds.

    The state-duration histogram times each stay between consecutive
    transitions as the hook thread sees them (a few ms late at most); a
    model's first stay in ``collecting`` is timed from this object's creation,
    and not at all for a model added after it. `close()` removes the metrics
    from the registry; the runtime's hooks stay registered (it cannot remove
    one) but do nothing from then on.
    """

    def __init__(self, runtime: EplbRuntime, registry: CollectorRegistry | None = None,
                 namespace: str = "eplb", *, const_labels: Mapping[str, str] | None = None,
                 buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        if not isinstance(namespace, str) or not _NAME.match(namespace):
            raise ValueError(f"namespace must be a Prometheus metric name prefix, "
                             f"got {namespace!r}")
        labels = dict(const_labels or {})
        for key, value in labels.items():
            if not _NAME.match(key) or key.startswith("__") or not isinstance(value, str):
                raise ValueError(f"const_labels must map label names to str, got "
                                 f"{key!r}: {value!r}")
        reserved = {"model", "state", "outcome", "aggregate", "placement"} & set(labels)
        if reserved:
            raise ValueError(f"const_labels may not use the metrics' own label(s) "
                             f"{sorted(reserved)}")
        self.runtime = runtime
        self.registry = registry if registry is not None else _DEFAULT_REGISTRY
        self.namespace = namespace
        self._closed = False
        self._lock = threading.Lock()
        now = time.monotonic()
        # model -> when it entered its current state / when its rebalance started
        self._entered: dict[str, float] = dict.fromkeys(runtime.models, now)
        self._rebalance_started: dict[str, float] = {}
        self._collector = _StatsCollector(runtime, namespace, labels)
        names = [*labels, "model"]
        bounds = tuple(buckets)
        self.state_duration = Histogram(
            "state_duration_seconds", "Seconds spent in a lifecycle state, observed on each "
            "transition out of it (measured on the hook thread: within a few ms of the "
            "transition)", [*names, "state"], namespace=namespace, registry=None,
            buckets=bounds)
        self.rebalance_duration = Histogram(
            "rebalance_duration_seconds", "Seconds from a rebalance's trigger (step interval "
            "reached) to its end, by outcome (done, dropped, failed)", [*names, "outcome"],
            namespace=namespace, registry=None, buckets=bounds)
        self._const_values = list(labels.values())
        self.registry.register(self._collector)
        try:
            self.registry.register(self.state_duration)
            self.registry.register(self.rebalance_duration)
        except ValueError:
            self._unregister()
            raise
        runtime.on("transition", self._on_transition)
        runtime.on("rebalance", self._on_end)
        runtime.on("failure", self._on_end)

    # -- hooks (the runtime's hook thread) -------------------------------------------------

    def _on_transition(self, event: LifecycleEvent) -> None:
        if self._closed:
            return
        # A runtime that reports how long the source state lasted is exact; otherwise
        # time it here, between consecutive events of the same model.
        measured = getattr(event, "seconds_in_source", None)
        now = time.monotonic()
        with self._lock:
            entered = self._entered.get(event.model)
            self._entered[event.model] = now
            if event.source == "collecting" and event.dest == "planning":
                self._rebalance_started[event.model] = now
        seconds = measured if measured is not None else (
            now - entered if entered is not None else None)
        if seconds is not None:
            self.state_duration.labels(*self._const_values, event.model,
                                       event.source).observe(max(float(seconds), 0.0))

    def _on_end(self, event: LifecycleEvent) -> None:
        if self._closed:
            return
        outcome = "failed" if event.kind == "failure" else event.trigger
        if outcome not in _OUTCOMES:
            return
        with self._lock:
            started = self._rebalance_started.pop(event.model, None)
        if started is not None:
            self.rebalance_duration.labels(*self._const_values, event.model,
                                           outcome).observe(time.monotonic() - started)

    # -- lifetime ---------------------------------------------------------------------------

    def _unregister(self) -> None:
        for collector in (self._collector, self.state_duration, self.rebalance_duration):
            with contextlib.suppress(KeyError):  # never registered (a clash in __init__)
                self.registry.unregister(collector)

    def close(self) -> None:
        """Remove these metrics from the registry; later hook calls do nothing."""
        if not self._closed:
            self._closed = True
            self._unregister()
