"""Fault injection for tests: late or missing readiness, and errors or deaths at chosen points.

A `Faults` object is a `FaultHook`: the runtime asks it what readiness to
report and calls `inject` at each injection point, where it may raise or
run an action (``os._exit`` to kill the rank). Use it with `FakeCluster`
(built in) or with a real runtime through `inject_faults`.

Injection points: ``"plan"`` (inside the planning thread), ``"stage"``
(before a batch's transfer is launched), ``"commit"`` (after every rank
agreed, before this rank writes its live weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Faults", "inject_faults"]

Action = Callable[[str, int, tuple[int, ...]], None]


@dataclass
class Faults:
    delay: dict[str, int] = field(default_factory=dict)  # phase ("*" = any) -> steps late
    never_ready: bool = False
    fail_at: dict[str, BaseException] = field(default_factory=dict)  # point -> raised there
    actions: dict[str, Action] = field(default_factory=dict)  # point -> action(model, step, layers)
    first_ready: dict[tuple[str, str, tuple[int, ...]], int] = field(default_factory=dict)

    def report_ready(self, model: str, phase: str, layers: tuple[int, ...], step: int,
                     ready: bool) -> bool:
        if self.never_ready:
            return False
        steps = self.delay.get(phase, self.delay.get("*", 0))
        if not ready or steps == 0:
            return ready
        key = (model, phase, layers)
        first = self.first_ready.setdefault(key, step)
        if step - first >= steps:
            del self.first_ready[key]
            return True
        return False

    def inject(self, model: str, point: str, step: int, layers: tuple[int, ...]) -> None:
        action = self.actions.get(point)
        if action is not None:
            action(model, step, layers)
        error = self.fail_at.get(point)
        if error is not None:
            raise error


def inject_faults(runtime: Any, faults: Faults | None) -> None:
    """Make `runtime` (an `EplbRuntime`) consult `faults`; None removes them."""
    runtime._faults = faults
    for driver in runtime._drivers.values():
        driver._faults = faults
