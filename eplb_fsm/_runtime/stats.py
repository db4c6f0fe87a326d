"""Counters and timings of one model's rebalances, for `EplbRuntime.stats()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core.lifecycle import STATES

__all__ = ["ModelStats"]


@dataclass
class ModelStats:
    started: int = 0
    done: int = 0
    dropped: int = 0
    failed: int = 0
    skipped: int = 0
    bytes_moved: int = 0
    layers_committed: int = 0
    last_error: str | None = None
    steps_in_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    seconds_in_state: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(STATES, 0.0))
    balancedness_before: npt.NDArray[np.float64] | None = None
    balancedness_after: npt.NDArray[np.float64] | None = None
    measured_balancedness: npt.NDArray[np.float64] | None = None  # log_balancedness rounds

    def add_time(self, state: str, steps: int, seconds: float) -> None:
        self.steps_in_state[state] += steps
        self.seconds_in_state[state] += seconds

    def record_plan(self, before: npt.NDArray[np.float64], after: npt.NDArray[np.float64]) -> None:
        self.balancedness_before = before
        self.balancedness_after = after

    def as_dict(self) -> dict[str, Any]:
        def summary(values: npt.NDArray[np.float64] | None) -> dict[str, Any] | None:
            if values is None:
                return None
            return {"per_layer": [float(v) for v in values], "mean": float(values.mean()),
                    "min": float(values.min())}

        return {
            "rebalances": {"started": self.started, "done": self.done, "dropped": self.dropped,
                           "failed": self.failed, "skipped_triggers": self.skipped},
            "bytes_moved": self.bytes_moved,
            "layers_committed": self.layers_committed,
            "last_error": self.last_error,
            "steps_in_state": dict(self.steps_in_state),
            "seconds_in_state": dict(self.seconds_in_state),
            # Predicted from the last all-reduced window: mean/max per-rank load per
            # layer, then averaged over layers.
            "balancedness": {"definition": "mean/max per-rank load, per layer; "
                             "mean and min over layers",
                             "before_last_plan": summary(self.balancedness_before),
                             "after_last_plan": summary(self.balancedness_after),
                             "measured_last_logged": summary(self.measured_balancedness)},
        }
