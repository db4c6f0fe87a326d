"""SlotBytes, the byte-row views every transfer copy goes through, and
`current_slots`, which decides whether views cached at `share_weights` may
still be written through.

A wrong view is silent corruption (a commit writing where the model no
longer reads), so: every way of copying gives the same bytes whether or not
per-slot views are cached, and a cached view of a replaced or reallocated
tensor is never handed out.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_fsm._adapters.staged import CopyBatches, SlotBytes, current_slots
from eplb_fsm._core.transfer_schedule import aligned


def _weights() -> list[torch.Tensor]:
    # Slot-major, three shapes and dtypes as an MoE layer has; the last one
    # non-contiguous (a transposed view), which keeps the typed fallback.
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 5, generator=gen, dtype=torch.float32).to(torch.bfloat16),
            torch.randint(-100, 100, (4, 7), generator=gen, dtype=torch.int32),
            torch.randn(6, 4, generator=gen).t()]


@pytest.mark.parametrize("per_slot", [False, True])
def test_copies_move_the_slot_bytes(per_slot: bool) -> None:
    weights = _weights()
    expected = [w.clone() for w in weights]
    views = [SlotBytes(w, per_slot=per_slot) for w in weights]
    assert views[2].rows is None  # the non-contiguous tensor takes the typed path
    stride = sum(aligned(v.nbytes) for v in views)
    buffer = torch.zeros(2 * stride, dtype=torch.uint8)
    at = stride  # second row of the buffer
    for v in views:
        v.to_buffer(buffer, at, 1)
        at += aligned(v.nbytes)
    for v in views:
        v.move(0, 3)  # slot 3 into slot 0
    at = stride
    for v in views:
        v.from_buffer(buffer, at, 2)  # the staged copy of slot 1 into slot 2
        at += aligned(v.nbytes)
    for w, old in zip(weights, expected, strict=True):
        assert torch.equal(w[0], old[3])
        assert torch.equal(w[2], old[1])
        assert torch.equal(w[1], old[1]) and torch.equal(w[3], old[3])


def test_current_slots_hands_out_cached_views_only_while_they_hold() -> None:
    weights = _weights()
    cached = [SlotBytes(w, per_slot=True) for w in weights]
    assert current_slots([weights], 0, [cached]) is cached
    assert current_slots([weights], 0, None) is not cached
    assert current_slots([weights, weights], 1, [cached]) is not cached  # no entry for layer 1

    replaced = list(weights)
    replaced[1] = weights[1].clone()  # another tensor at that place
    fresh = current_slots([replaced], 0, [cached])
    assert fresh is not cached and fresh[1].weight is replaced[1]

    moved = _weights()
    cached = [SlotBytes(w, per_slot=True) for w in moved]
    moved[0].set_(moved[0].clone())  # the same tensor object, reallocated in place
    fresh = current_slots([moved], 0, [cached])
    assert fresh is not cached and fresh[0].data_ptr == moved[0].data_ptr()

    three = [SlotBytes(w) for w in weights]
    fewer = current_slots([weights[:2]], 0, [three])  # a layer that lost a tensor
    assert fewer is not three and len(fewer) == 2


_SLOTS, _STAGED = 6, 3
_op = st.one_of(
    st.tuples(st.just("move"), st.integers(0, _SLOTS - 1), st.integers(0, _SLOTS - 1)),
    st.tuples(st.just("save"), st.integers(0, _SLOTS - 1), st.just(-1)),
    st.tuples(st.just("restore"), st.integers(0, _SLOTS - 1), st.just(-1)),
    st.tuples(st.just("fill"), st.integers(0, _SLOTS - 1), st.integers(0, _STAGED - 1)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=14))
def test_batched_copies_end_as_copies_run_one_by_one(ops: list[tuple[str, int, int]]) -> None:
    # A commit's copies launched in foreach batches must leave exactly what the
    # same copies leave run in order. On a GPU a batch's copies run in any
    # order and at once; torch's CPU fallback runs them in order, which would
    # hide a race. So here a batch runs last copy first, which turns every
    # conflict inside it (a read of a slot the batch writes, a write of a slot
    # it reads or writes) into a different result.
    def unordered(dsts: list[torch.Tensor], srcs: list[torch.Tensor],
                  non_blocking: bool = False) -> None:
        for dst, src in reversed(list(zip(dsts, srcs, strict=True))):
            dst.copy_(src)

    def run(batched: bool) -> torch.Tensor:
        live = torch.arange(_SLOTS * 4, dtype=torch.float32).view(_SLOTS, 4)
        rows = torch.arange(100, 100 + (_STAGED + 1) * 4, dtype=torch.float32).view(-1, 4)
        temp = rows[_STAGED]  # the temp row sits in the staging buffer, after the rows
        batches = CopyBatches()
        for kind, slot, other in ops:
            if kind == "move":
                dst, src, writes, reads = live[slot], live[other], slot, other
            elif kind == "save":
                dst, src, writes, reads = temp, live[slot], "temp", slot
            elif kind == "restore":
                dst, src, writes, reads = live[slot], temp, slot, "temp"
            else:
                dst, src, writes, reads = live[slot], rows[other], slot, None
            if batched:
                batches.add(writes, reads, [(dst, src)])
            else:
                dst.copy_(src)
        batches.flush()
        return live

    with mock.patch.object(torch, "_foreach_copy_", unordered):
        batched = run(batched=True)
    assert torch.equal(batched, run(batched=False))
