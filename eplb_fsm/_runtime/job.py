"""What one rebalance carries while it is in flight, and how it can end badly.

Kept apart from the driver so that the driver reads as the sequence of
agreed steps, and these records as plain data.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._adapters.interfaces import ReadinessRound, StagedTransfer
from .._core.placement import Placement
from .load_window import HostLoad

__all__ = ["Job", "Planned", "RebalanceFailed"]


class RebalanceFailed(RuntimeError):
    """A rebalance ended in the ``failed`` state; layers not committed kept their
    old placement on every rank. The message names the model, the phase or
    layers, and the ranks that were late or broken."""

    def __init__(self, message: str, *, model: str, layers: tuple[int, ...] = (),
                 ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.model = model
        self.layers = layers
        self.ranks = ranks


@dataclass(frozen=True)
class Planned:
    """What the planning thread hands back: the placement and the staging work."""

    placement: Placement
    batches: tuple[tuple[int, ...], ...]  # changed layers, `layers_per_transfer` at a time
    prepared: tuple[Any, ...]  # the mover's precomputation for each batch
    # Predicted balancedness per layer under the old and the new placement,
    # worked out here so the serving thread does not pay for it.
    before: npt.NDArray[np.float64]
    after: npt.NDArray[np.float64]


@dataclass
class Job:
    """A rebalance in flight."""

    started_step: int
    deadline: float
    phase: str
    due: int
    started_at: float = field(default_factory=time.monotonic)
    bytes_at_start: int = 0
    host_load: HostLoad | None = None
    load_round: ReadinessRound | None = None
    reduced_load: npt.NDArray[np.int64] | None = None
    plan_future: Future[Planned] | None = None
    planner: Executor | None = None  # where plan_future runs
    plan: Placement | None = None
    round: ReadinessRound | None = None
    batches: list[tuple[tuple[int, ...], Any]] = field(default_factory=list)
    layers: tuple[int, ...] = ()
    staged: StagedTransfer | None = None
    weights: tuple[tuple[int, int], ...] | None = None  # the staged layers' tensors, as staged
    local_error: BaseException | None = None
    fatal_error: BaseException | None = None  # survives batches: reported every round
