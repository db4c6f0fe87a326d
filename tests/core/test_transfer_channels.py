"""The per-pair channel decision, and the schedule's layout with pulled pairs.

The layout is checked by executing it on byte arrays, as in
test_transfer_schedule.py: messages for network pairs, copies out of the
sender's *old* weights for pulled pairs; the receivers must end with the new
placement, and no pulled pair may appear in any message span."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_transfer_plan import placement_pairs

from eplb_fsm._core.transfer_channels import ChannelMap, check_path, decide_channels
from eplb_fsm._core.transfer_plan import plan_layers
from eplb_fsm._core.transfer_schedule import ALIGN, auto_pieces, schedule

ALL = [[True] * 4 for _ in range(4)]


def test_modes() -> None:
    nodes = ["a", "a", "b", "b"]
    assert decide_channels("nccl", nodes, ALL).pulls == frozenset()
    auto = decide_channels("auto", nodes, ALL)
    assert auto.pulls == {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert {(s, d) for s, d, _ in auto.fallbacks} == {(s, d) for s in range(4) for d in range(4)
                                                       if s // 2 != d // 2}
    assert auto.pulled_from(0) == {1} and auto.pulled_by(3) == {2}
    with pytest.raises(ValueError, match=r"transfer_path='pull' but 8 pair\(s\) cannot pull"):
        decide_channels("pull", nodes, ALL)
    assert decide_channels("pull", ["a"] * 4, ALL).pulls == {(s, d) for s in range(4)
                                                            for d in range(4) if s != d}


def test_unpullable_pair_falls_back_on_both_ends() -> None:
    pullable = [[True] * 3 for _ in range(3)]
    pullable[2][0] = False  # rank 2 could not map rank 0's weights
    channels = decide_channels("auto", ["n"] * 3, pullable)
    assert (0, 2) not in channels.pulls and (2, 0) in channels.pulls
    assert channels.fallbacks == ((0, 2, "rank 2 could not map rank 0's weights"),)
    assert 2 not in channels.pulled_by(0) and 0 not in channels.pulled_from(2)
    with pytest.raises(ValueError, match="0->2: rank 2 could not map"):
        decide_channels("pull", ["n"] * 3, pullable)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="path must be one of 'auto', 'nccl', 'pull'"):
        check_path("nvlink")
    with pytest.raises(ValueError, match="mode must be one of"):
        decide_channels("fast", ["a"], [[True]])
    with pytest.raises(ValueError, match=r"pullable must be a 2x2 matrix"):
        decide_channels("auto", ["a", "a"], [[True, True]])
    with pytest.raises(ValueError, match="at least one rank"):
        decide_channels("auto", [], [])


@settings(max_examples=120, deadline=None)
@given(placement_pairs(), st.integers(1, 2), st.data())
def test_layout_with_pulls_yields_new_placement(
        case: tuple[np.ndarray, np.ndarray, int, int | None], pieces: int,
        data: st.DataObject) -> None:
    old, new, num_ranks, node_size = case
    layers = list(range(old.shape[0]))
    strides = {layer: ALIGN * data.draw(st.integers(1, 3)) for layer in layers}
    pullable = [[data.draw(st.booleans()) for _ in range(num_ranks)] for _ in range(num_ranks)]
    nodes = [r // (node_size or num_ranks) for r in range(num_ranks)]
    channels = decide_channels("auto", nodes, pullable)
    plan = plan_layers(old, new, num_ranks, layers, node_size=node_size)
    layouts = [schedule(plan, r).layout(strides, pieces, channels) for r in range(num_ranks)]
    num_local = old.shape[1] // num_ranks

    def code(rank: int, layer: int, slot: int) -> int:
        return layer * 100_000 + int(old[layer, rank * num_local + slot]) + 1

    stagings = [np.zeros(lay.staging_bytes // ALIGN, dtype=np.int64) for lay in layouts]
    sends = []
    for rank, lay in enumerate(layouts):
        buf = np.zeros(lay.send_bytes // ALIGN, dtype=np.int64)
        for offset, layer, slot in lay.packed:
            buf[offset // ALIGN:(offset + strides[layer]) // ALIGN] = code(rank, layer, slot)
        sends.append(buf)
        for dst, _, _ in (span for piece in lay.send_spans for span in piece):
            assert (rank, dst) not in channels.pulls
        for src, _, _ in (span for piece in lay.recv_spans for span in piece):
            assert (src, rank) not in channels.pulls
    for piece in range(pieces):
        for src, lay in enumerate(layouts):
            for dst, begin, end in lay.send_spans[piece]:
                (_, rbegin, rend), = [s for s in layouts[dst].recv_spans[piece] if s[0] == src]
                stagings[dst][rbegin // ALIGN:rend // ALIGN] = sends[src][begin // ALIGN:
                                                                          end // ALIGN]
    for rank, lay in enumerate(layouts):
        for offset, src, layer, slot in lay.pulls:
            assert (src, rank) in channels.pulls
            stagings[rank][offset // ALIGN:(offset + strides[layer]) // ALIGN] = \
                code(src, layer, slot)
    for rank, sched in enumerate(schedule(plan, r) for r in range(num_ranks)):
        for layer in layers:
            for step in sched.steps_of(layer):
                if step.kind != "fill":
                    continue  # local moves read live slots at commit, not staging
                at = layouts[rank].staging[(layer, step.expert)] // ALIGN
                row = stagings[rank][at:at + strides[layer] // ALIGN]
                assert (row == layer * 100_000 + step.expert + 1).all(), (rank, layer, step)
    # Pieces count only network bytes, alike on every rank.
    assert auto_pieces(plan, strides, channels=channels) in (1, 2)
    everything = ChannelMap(num_ranks, frozenset((s, d) for s in range(num_ranks)
                                                 for d in range(num_ranks) if s != d))
    assert auto_pieces(plan, strides, threshold=0, channels=everything) == 1
