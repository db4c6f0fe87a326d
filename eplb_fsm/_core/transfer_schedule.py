"""One rank's schedule for executing a `TransferPlan`: what goes in which message.

The transfer plan says *what* moves; this module says *how it is packed*, the
part both ends of every message must agree on byte for byte. Rules:

1. **One message per peer and piece.** Everything a rank sends to one peer
   travels as one contiguous message (NCCL pays a fixed cost per operation:
   84 per-tensor messages took 5.5 ms where one message per pair took 3.5 ms,
   measured on H200s). The sender packs its experts into a send buffer; the
   receiver receives straight into its staging buffer.
2. **Both ends derive the same layout.** Items between a pair are the plan's
   transfers filtered by (src, dst), in the plan's global order, so the
   sender's packing order is the receiver's unpacking order; an item occupies
   its layer's *stride* (the aligned bytes of one expert's tensors), known to
   both ends because every rank's weights have the same shapes.
3. **Pieces pipeline packing with sending.** With ``pieces > 1`` each pair's
   items are split into that many consecutive runs (the same split on both
   ends, by item count), and piece *k* of every pair is launched as one group
   once it is packed, so packing piece *k + 1* overlaps sending piece *k*.
   Every rank launches the pieces in the same order, so per communicator the
   operations match in order (no deadlock). Each launch has a fixed cost
   (NCCL's ramp-up), so pieces pay off only for large stages: `auto_pieces`
   picks 2 when the mean bytes a rank sends exceed `PIECES_THRESHOLD`, a
   figure every rank computes alike from the global plan. On 4 H200s
   (docs/benchmarks.md, transfer_bench) 2 pieces reach 89.4% of the bound at
   660 MB per rank against 76.0% for 1; below the threshold a second launch
   costs more than the overlap gains.
4. **Local moves are not staged.** A rank's own moves (an expert it
   already holds, into another slot) need no network and no staging row:
   the commit copies them slot to slot, in the order `_core.commit_order`
   gives, which reserves one *temp* row in the staging buffer for layers
   whose moves form a cycle.
5. **Pulled pairs leave the messages.** For a pair the `ChannelMap` routes
   to a pull (`_core.transfer_channels`), the sender packs and sends nothing
   and the receiver posts no receive; instead its layout lists, per item, the
   sender's slot to copy from and the staging offset to copy to
   (``Layout.pulls``). Staging offsets are the same as without pulls, so a
   row's place never depends on its channel.

Pure Python and numpy: computed in the planning thread (`prepare`), so the
agreed staging step only allocates, packs and launches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .commit_order import CommitStep, commit_steps, needs_temp
from .transfer_channels import ChannelMap
from .transfer_plan import Transfer, TransferPlan

__all__ = ["ALIGN", "PIECES_THRESHOLD", "Layout", "RankSchedule", "aligned", "auto_pieces",
           "expert_stride", "schedule"]

ALIGN = 256  # bytes; every item starts aligned, so typed views and DMA stay fast
PIECES_THRESHOLD = 512 * 2**20  # mean bytes sent per rank above which 2 pieces pay off


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


def expert_stride(slot_bytes: Iterable[int]) -> int:
    """Bytes one expert occupies in a buffer (a layer's *stride*): the slot bytes
    of each of its tensors, each run aligned."""
    return sum(aligned(n) for n in slot_bytes)


@dataclass(frozen=True)
class Layout:
    """Byte offsets of one rank's buffers, for given per-layer strides.

    - ``staging``: (layer, expert) -> offset of that expert's row in the
      staging buffer, for every item received or pulled (grouped by source
      rank, ascending).
    - ``temp``: offset of the row a commit saves one slot of a cycle of local
      moves in (after the received rows), or -1 when no layer needs it.
    - ``packed``: one (offset, layer, src_slot) per packed item, in the order
      of the send buffer (grouped by destination rank, ascending).
    - ``recv_spans`` / ``send_spans``: per piece, (peer, begin, end) byte spans
      of the staging / send buffer, one per peer with bytes in that piece.
    - ``pulls``: one (offset, src rank, layer, src slot) per item this rank
      copies from a peer's live weights into its staging row at offset.
    """

    staging_bytes: int
    send_bytes: int
    staging: Mapping[tuple[int, int], int]
    packed: tuple[tuple[int, int, int], ...]
    recv_spans: tuple[tuple[tuple[int, int, int], ...], ...]
    send_spans: tuple[tuple[tuple[int, int, int], ...], ...]
    packed_per_piece: tuple[int, ...]  # items of `packed` packed before piece k's launch
    pulls: tuple[tuple[int, int, int, int], ...] = ()  # (offset, src rank, layer, src_slot)
    temp: int = -1

    @property
    def pieces(self) -> int:
        return len(self.send_spans)


@dataclass(frozen=True, eq=False)
class RankSchedule:
    """What `rank` receives and sends for the plan, in message order, and the
    steps of each layer's commit."""

    plan: TransferPlan
    rank: int
    receives: Mapping[int, tuple[Transfer, ...]]  # by source rank, ascending
    sends: Mapping[int, tuple[Transfer, ...]]  # by destination rank, ascending
    commits: Mapping[int, tuple[CommitStep, ...]] = field(repr=False)  # by layer
    _layouts: dict[tuple[tuple[int, ...], int, tuple[int, ...], tuple[int, ...]], Layout] = \
        field(default_factory=dict, repr=False)
    _pieces: dict[tuple[tuple[int, ...], frozenset[tuple[int, int]]], int] = \
        field(default_factory=dict, repr=False)
    received_counts: Mapping[int, int] = field(default_factory=dict, repr=False)  # by layer

    def auto_pieces(self, strides: Mapping[int, int], channels: ChannelMap | None = None) -> int:
        """`auto_pieces` of this plan, remembered per strides and channels: it walks
        the global plan, and the agreed staging step should only launch."""
        pulls = channels.pulls if channels is not None else frozenset()
        key = (tuple(int(strides[layer]) for layer in self.layers), pulls)
        if key not in self._pieces:
            self._pieces[key] = auto_pieces(self.plan, strides, channels=channels)
        return self._pieces[key]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.plan.layers

    def layout(self, strides: Mapping[int, int], pieces: int = 1,
               channels: ChannelMap | None = None) -> Layout:
        """Offsets for per-layer `strides` (bytes one expert occupies, aligned),
        each peer's message split into `pieces` launches; pairs `channels`
        routes to a pull carry no message (default: none)."""
        _check_pieces(pieces)
        if channels is not None and channels.num_ranks != self.plan.num_ranks:
            raise ValueError(f"channels is for {channels.num_ranks} ranks, the plan for "
                             f"{self.plan.num_ranks}")
        pulled_from = channels.pulled_from(self.rank) if channels else frozenset()
        pulled_by = channels.pulled_by(self.rank) if channels else frozenset()
        key = (tuple(int(strides[layer]) for layer in self.layers), pieces,
               tuple(sorted(pulled_from)), tuple(sorted(pulled_by)))
        if key not in self._layouts:  # the same model stages with the same strides
            self._layouts[key] = _layout(self, key[0], pieces, pulled_from, pulled_by)
        return self._layouts[key]

    def steps_of(self, layer: int) -> tuple[CommitStep, ...]:
        """The writes of `layer`'s commit, in order (`_core.commit_order`)."""
        return self.commits[layer]


def _split(count: int, pieces: int) -> list[tuple[int, int]]:
    """Consecutive [begin, end) item runs, as equal as possible; both ends agree."""
    return [(count * k // pieces, count * (k + 1) // pieces) for k in range(pieces)]


def _check_pieces(pieces: int) -> None:
    if not isinstance(pieces, int) or isinstance(pieces, bool) or pieces < 1:
        raise ValueError(f"pieces must be a positive int, got {pieces!r}")


def auto_pieces(plan: TransferPlan, strides: Mapping[int, int],
                threshold: int = PIECES_THRESHOLD, channels: ChannelMap | None = None) -> int:
    """2 if the mean bytes a rank sends in `plan` exceed `threshold`, else 1.

    Computed from the global plan (and the agreed `channels`: pulled items
    are no message), so every rank picks the same number (both ends of a
    message must split it alike)."""
    pulls = channels.pulls if channels is not None else frozenset()
    total = sum(int(strides[t.layer]) for t in plan.transfers
                if (t.src_rank, t.dst_rank) not in pulls)
    return 2 if total > threshold * plan.num_ranks else 1


def _layout(sched: RankSchedule, key: tuple[int, ...], pieces: int,
            pulled_from: frozenset[int], pulled_by: frozenset[int]) -> Layout:
    stride = dict(zip(sched.layers, key, strict=True))
    staging: dict[tuple[int, int], int] = {}
    recv_spans: list[list[tuple[int, int, int]]] = [[] for _ in range(pieces)]
    pulls: list[tuple[int, int, int, int]] = []
    cursor = 0
    for src, items in sched.receives.items():
        if src in pulled_from:  # one copy per item from the sender's live slot
            for t in items:
                staging[(t.layer, t.expert)] = cursor
                pulls.append((cursor, src, t.layer, t.src_slot))
                cursor += stride[t.layer]
            continue
        for k, (begin, end) in enumerate(_split(len(items), pieces)):
            start = cursor
            for t in items[begin:end]:
                staging[(t.layer, t.expert)] = cursor
                cursor += stride[t.layer]
            if cursor > start:
                recv_spans[k].append((src, start, cursor))
    cyclic = [stride[layer] for layer in sched.layers if needs_temp(sched.commits[layer])]
    temp = cursor if cyclic else -1
    staging_bytes = cursor + max(cyclic, default=0)

    # The send buffer, piece-major so that each piece's packing is one run.
    send_spans: list[list[tuple[int, int, int]]] = [[] for _ in range(pieces)]
    packed: list[tuple[int, int, int]] = []
    per_piece: list[int] = []
    cursor = 0
    sends = {dst: items for dst, items in sched.sends.items() if dst not in pulled_by}
    splits = {dst: _split(len(items), pieces) for dst, items in sends.items()}
    for k in range(pieces):
        for dst, items in sends.items():
            begin, end = splits[dst][k]
            start = cursor
            for t in items[begin:end]:
                packed.append((cursor, t.layer, t.src_slot))
                cursor += stride[t.layer]
            if cursor > start:
                send_spans[k].append((dst, start, cursor))
        per_piece.append(len(packed))
    return Layout(staging_bytes, cursor, staging, tuple(packed),
                  tuple(map(tuple, recv_spans)), tuple(map(tuple, send_spans)),
                  tuple(per_piece), tuple(pulls), temp)


def schedule(plan: TransferPlan, rank: int) -> RankSchedule:
    """`rank`'s part of `plan`, grouped by peer in the order both ends use."""
    if not 0 <= rank < plan.num_ranks:
        raise ValueError(f"rank must be in [0, {plan.num_ranks}), got {rank!r}")
    receives: dict[int, list[Transfer]] = {}
    sends: dict[int, list[Transfer]] = {}
    for t in plan.transfers:  # global order: both ends see a pair's items alike
        if t.dst_rank == rank:
            receives.setdefault(t.src_rank, []).append(t)
        elif t.src_rank == rank:
            sends.setdefault(t.dst_rank, []).append(t)
    return RankSchedule(
        plan, rank,
        {src: tuple(items) for src, items in sorted(receives.items())},
        {dst: tuple(items) for dst, items in sorted(sends.items())},
        {rp.layer: commit_steps(rp) for rp in plan.rank_plans(rank)},
        received_counts={rp.layer: len(rp.receives) for rp in plan.rank_plans(rank)})
