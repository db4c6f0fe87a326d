"""SlotBytes, the byte-row views every transfer copy goes through, and
`current_slots`, which decides whether views cached at `share_weights` may
still be written through.

A wrong view is silent corruption (a commit writing where the model no
longer reads), so: every way of copying gives the same bytes whether or not
per-slot views are cached, and a cached view of a replaced or reallocated
tensor is never handed out.
"""

from __future__ import annotations

import pytest
import torch

from eplb_fsm._adapters.staged import SlotBytes, current_slots
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
