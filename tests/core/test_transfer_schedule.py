"""The per-rank transfer schedule, property-tested by executing it on byte arrays.

Every rank packs its send buffer from its 'weights' (each expert's bytes carry
its (layer, expert) code), every message is copied span by span from the
sender's buffer into the receiver's staging buffer, piece by piece; local
moves happen at commit. The receiver must then find each staged expert at
the offset its own layout names, with sender and receiver spans of equal
length, and running the commit steps must yield the new placement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_commit_order import run_steps
from test_transfer_plan import placement_pairs

from eplb_fsm._core.commit_order import needs_temp
from eplb_fsm._core.transfer_plan import plan_layers
from eplb_fsm._core.transfer_schedule import (
    ALIGN,
    aligned,
    auto_pieces,
    expert_stride,
    schedule,
)

UNIT = ALIGN  # one array element stands for one aligned run of bytes


def _code(layer: int, expert: int) -> int:
    return layer * 100_000 + expert + 1


@settings(max_examples=150, deadline=None)
@given(placement_pairs(), st.integers(1, 3), st.data())
def test_messages_match_and_commit_yields_new_placement(
        case: tuple[np.ndarray, np.ndarray, int, int | None], pieces: int,
        data: st.DataObject) -> None:
    old, new, num_ranks, node_size = case
    layers = list(range(old.shape[0]))
    # Layers of different sizes: a stride mix-up between layers would show.
    strides = {layer: UNIT * data.draw(st.integers(1, 3)) for layer in layers}
    plan = plan_layers(old, new, num_ranks, layers, node_size=node_size)
    scheds = [schedule(plan, rank) for rank in range(num_ranks)]
    layouts = [s.layout(strides, pieces) for s in scheds]
    num_local = old.shape[1] // num_ranks

    def weights(rank: int, layer: int, slot: int) -> int:
        return _code(layer, int(old[layer, rank * num_local + slot]))

    sends, stagings = [], []
    for rank, layout in enumerate(layouts):
        buf = np.zeros(layout.send_bytes // UNIT, dtype=np.int64)
        for offset, layer, slot in layout.packed:
            buf[offset // UNIT:(offset + strides[layer]) // UNIT] = weights(rank, layer, slot)
        sends.append(buf)
        stagings.append(np.zeros(layout.staging_bytes // UNIT, dtype=np.int64))
    for piece in range(pieces):
        for src, layout in enumerate(layouts):
            for dst, begin, end in layout.send_spans[piece]:
                match = [s for s in layouts[dst].recv_spans[piece] if s[0] == src]
                assert len(match) == 1, "every message has exactly one matching receive"
                _, rbegin, rend = match[0]
                assert rend - rbegin == end - begin
                stagings[dst][rbegin // UNIT:rend // UNIT] = sends[src][begin // UNIT:end // UNIT]
        # And no receive waits for a message that is never sent.
        for dst, layout in enumerate(layouts):
            for src, _, _ in layout.recv_spans[piece]:
                assert any(d == dst for d, _, _ in layouts[src].send_spans[piece])

    for rank, (sched, layout) in enumerate(zip(scheds, layouts, strict=True)):
        rows = sorted((off, off + strides[layer]) for (layer, _), off in layout.staging.items())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(rows)), "staged rows overlap"
        assert all(off % ALIGN == 0 for off in layout.staging.values())
        for (layer, expert), off in layout.staging.items():
            row = stagings[rank][off // UNIT:(off + strides[layer]) // UNIT]
            assert (row == _code(layer, expert)).all()
        want = new[:, rank * num_local:(rank + 1) * num_local]
        for layer in layers:
            live = [weights(rank, layer, slot) for slot in range(num_local)]
            staged = {expert: int(stagings[rank][off // UNIT])
                      for (lay, expert), off in layout.staging.items() if lay == layer}
            live = run_steps(live, sched.steps_of(layer), staged)
            for slot in range(num_local):
                if want[layer, slot] >= 0:  # vacated slots keep whatever they held
                    assert live[slot] == _code(layer, int(want[layer, slot]))
        for layer in layers:  # what bytes_received counts: one staged row per item
            assert sched.received_counts[layer] == sum(1 for lay, _ in layout.staging
                                                       if lay == layer)
        # The temp row follows the staged rows, as wide as the widest layer using it.
        rows_end = max((off + strides[lay] for (lay, _), off in layout.staging.items()),
                       default=0)
        cyclic = [strides[layer] for layer in layers if needs_temp(sched.steps_of(layer))]
        assert layout.temp == (rows_end if cyclic else -1)
        assert layout.staging_bytes == rows_end + max(cyclic, default=0)


def test_pieces_split_every_message_into_ordered_runs() -> None:
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[4, 5, 6, 7, 0, 1, 2, 3]])  # rank 0 and rank 1 trade all four
    plan = plan_layers(old, new, 2, [0])
    layout = schedule(plan, 0).layout({0: 512}, pieces=2)
    assert [len(p) for p in layout.send_spans] == [1, 1]
    assert layout.packed_per_piece == (2, 4)
    assert layout.send_bytes == layout.staging_bytes == 4 * 512
    assert [s[1:] for s in layout.recv_spans[0] + layout.recv_spans[1]] == [(0, 1024),
                                                                           (1024, 2048)]


def test_schedule_rejects_bad_arguments() -> None:
    plan = plan_layers(np.array([[0, 1]]), np.array([[1, 0]]), 2, [0])
    with pytest.raises(ValueError, match="pieces must be a positive int"):
        schedule(plan, 0).layout({0: 256}, pieces=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        schedule(plan, 2)
    assert aligned(1) == ALIGN and aligned(ALIGN) == ALIGN and aligned(0) == 0
    assert expert_stride([1, ALIGN, ALIGN + 1]) == 4 * ALIGN and expert_stride([]) == 0


def test_auto_pieces_follows_the_mean_bytes_per_rank() -> None:
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[4, 5, 6, 7, 0, 1, 2, 3]])
    plan = plan_layers(old, new, 2, [0])  # 8 transfers over 2 ranks: 4 strides per rank
    assert auto_pieces(plan, {0: 1000}, threshold=4000) == 1
    assert auto_pieces(plan, {0: 1001}, threshold=4000) == 2
    identical = plan_layers(old, old, 2, [0])
    assert auto_pieces(identical, {0: 10**12}) == 1
