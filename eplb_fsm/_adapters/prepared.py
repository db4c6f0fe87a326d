"""What `TransferEngine.prepare` computes ahead of the agreed staging step.

Split from the engine (`transfer.py`) because it is the engine's plan, not
its mechanics: `prepare()` runs it in the runtime's planning thread, and the
agreed step only checks that it still holds and launches. On the H200 hosts
every microsecond of Python before a stage's first copy delays the whole
transfer (`benchmarks/diagnostics/stage_timeline.py`, docs/transfers.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .._core.transfer_plan import TransferPlan
from .._core.transfer_schedule import Layout, RankSchedule, aligned, expert_stride
from .pull import SharedWeights
from .staged import SlotBytes

__all__ = ["Launch", "PreparedTransfer", "make_launch"]


@dataclass(frozen=True)
class Launch:
    """What `stage()` needs beyond the schedule, for one set of per-layer slot
    bytes and one sharing record: the byte layout, each pull as (peer tensor,
    slot, staging offset), and the bytes this rank receives. `prepare()` makes
    it whenever it already knows the weights' sizes (from `share_weights` or
    an earlier stage); `stage()` uses it while those and the sharing record
    still hold."""

    nbytes: Mapping[int, tuple[int, ...]]  # layer -> one slot's bytes, per tensor
    shared: SharedWeights | None
    layout: Layout
    pulls: tuple[tuple[SlotBytes, int, int], ...]
    received: int

    @property
    def network(self) -> bool:
        """Whether this rank sends or receives any message (else it only pulls)."""
        return bool(self.layout.send_bytes) or any(self.layout.recv_spans)


@dataclass(frozen=True)
class PreparedTransfer:
    """What `TransferEngine.prepare` returns: the plan, this rank's schedule, the
    maps' shape, and the `Launch` when prepare() could make it."""

    plan: TransferPlan
    schedule: RankSchedule
    maps_shape: tuple[int, int] = (0, 0)
    launch: Launch | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return self.plan.layers


def make_launch(sched: RankSchedule, nbytes: Mapping[int, tuple[int, ...]],
                shared: SharedWeights | None, pieces: int | Literal["auto"]) -> Launch:
    """The `Launch` of `sched` for per-layer slot bytes `nbytes` (one entry per
    tensor), routed by `shared`'s channels (all send/recv without), each
    peer's message in `pieces` launches (``"auto"``: `RankSchedule.auto_pieces`)."""
    strides = {layer: expert_stride(sizes) for layer, sizes in nbytes.items()}
    channels = shared.channels if shared is not None else None
    count = sched.auto_pieces(strides, channels) if pieces == "auto" else pieces
    layout = sched.layout(strides, count, channels)
    pulls = []
    for offset, src, layer, slot in layout.pulls:
        assert shared is not None  # the layout routes pulls only by shared channels
        for tensor in shared.peer_slots[src][layer]:
            pulls.append((tensor, slot, offset))
            offset += aligned(tensor.nbytes)
    received = sum(sched.received_counts[layer] * sum(sizes) for layer, sizes in nbytes.items())
    return Launch(nbytes, shared, layout, tuple(pulls), received)
