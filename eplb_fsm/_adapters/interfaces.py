"""The small interfaces between the runtime and the outside world.

The runtime codes against these protocols only, so that the same lifecycle
drives real torch.distributed groups and the in-process fake cluster of
`eplb_fsm.testing`:

- `MoEModel`: what a serving engine's model exposes (vLLM's
  ``MixtureOfExperts`` names).
- `WeightMover` / `StagedTransfer`: move one or more layers' expert weights
  for a new placement: *stage* into a side buffer without touching live
  weights, poll readiness without blocking, then *commit* into the live
  weights at the agreed step (or *release* on abort, leaving them as they were).
- `ReadinessRound`: a non-blocking all-reduce that every rank launches at
  the same step and reads at the same later step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "AllReduce",
    "FaultHook",
    "MoEModel",
    "ReadinessRound",
    "StagedTransfer",
    "WeightMover",
]


@runtime_checkable
class MoEModel(Protocol):
    """A model the runtime can balance; the names follow vLLM's ``MixtureOfExperts``.

    `expert_weights[layer][i]` is a tensor whose first dimension is the local
    physical slot (``num_local_physical_experts`` long). The runtime owns the
    three tensors it passes to `set_eplb_state` and updates them in place, so
    layers holding views see every commit:

    - ``expert_load_view`` [L, P] int64: tokens this rank sent to each physical
      slot (all slots, not only local ones) during the current pass; the model
      adds to it, the runtime reads and clears it in ``step()``;
    - ``logical_to_physical_map`` [L, E, max_replicas], -1 padded;
    - ``logical_replica_count`` [L, E].
    """

    @property
    def expert_weights(self) -> Sequence[Sequence[torch.Tensor]]: ...

    num_moe_layers: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    num_redundant_experts: int
    num_expert_groups: int

    def set_eplb_state(
        self,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None: ...


class StagedTransfer(Protocol):
    """One or more layers' weights for a new placement, staged beside the live ones."""

    @property
    def layers(self) -> tuple[int, ...]: ...

    @property
    def bytes_received(self) -> int:
        """Bytes this rank receives from peers for these layers (local copies excluded)."""
        ...

    def ready(self) -> bool:
        """True once every send, receive and pull of this rank is complete.

        Sends count too: a peer may commit (overwrite its live weights) as soon
        as every rank reports ready, so a slot still being sent must hold this
        rank back. Never blocks.
        """
        ...

    def commit(self) -> None:
        """Copy the staged slots into the live weights. Only after every rank is ready."""
        ...

    def release(self) -> None:
        """Drop the staging buffers without touching the live weights (abort path)."""
        ...


class WeightMover(Protocol):
    def prepare(
        self,
        old_physical_to_logical: npt.NDArray[np.int64],
        new_physical_to_logical: npt.NDArray[np.int64],
        layers: Sequence[int],
    ) -> Any:
        """Pure, thread-safe precomputation for `stage` (the runtime calls it in its
        planning thread, off the serving path). May return None."""
        ...

    def stage(
        self,
        old_physical_to_logical: npt.NDArray[np.int64],
        new_physical_to_logical: npt.NDArray[np.int64],
        layers: Sequence[int],
        expert_weights: Sequence[Sequence[torch.Tensor]],
        prepared: Any = None,
        tag: int = 0,
    ) -> StagedTransfer:
        """Launch the transfers of `layers` (non-blocking). All ranks call it at the
        same agreed step with the same arguments but their own weights; `prepared`
        is what `prepare` returned for the same maps and layers. `tag` (the same on
        every rank, unique per transfer) keeps its messages from pairing with a
        failed transfer's leftovers; a mover whose transport has no tags may
        ignore it."""
        ...


class ReadinessRound(Protocol):
    """A launched all-reduce of a few int64 values over the EP group."""

    def done(self) -> bool:
        """Non-blocking: has the result arrived?"""
        ...

    def result(self, timeout: float | None = None) -> npt.NDArray[np.int64]:
        """The reduced values; waits (up to `timeout` s) only if not yet `done()`."""
        ...


class AllReduce(Protocol):
    """Launches non-blocking SUM all-reduces of int64 vectors over the EP group."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def launch(self, values: npt.NDArray[np.int64]) -> ReadinessRound:
        """Start the all-reduce; every rank launches the same sequence of rounds."""
        ...


class FaultHook(Protocol):
    """A seam for fault injection in tests (`eplb_fsm.testing`); None in production."""

    def report_ready(
        self, model: str, phase: str, layers: tuple[int, ...], step: int, ready: bool
    ) -> bool:
        """The readiness flag to report, given the true one."""
        ...

    def inject(self, model: str, point: str, step: int, layers: tuple[int, ...]) -> None:
        """Called at each injection point ("plan", "stage", "commit"); may raise."""
        ...
