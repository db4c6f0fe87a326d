"""The engine's slot copier: the precomputed row views (alike layers) must write
exactly the bytes the generic sliced views write, and layers of different
shapes must fall back to the generic path (single process, no group needed)."""

from __future__ import annotations

import torch

from eplb_fsm._adapters.staged import Rows, slot_nbytes, typed_view
from eplb_fsm._adapters.transfer import _Copier
from eplb_fsm._core.transfer_schedule import aligned


def _layer(seed: int, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype],
           slots: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(shapes, dtypes, strict=True):
        out.append((torch.rand(slots, *shape, generator=gen) * 100).to(dtype))
    # A non-contiguous tensor too (a transposed buffer), as real weights can be.
    out.append(torch.rand(5, slots, generator=gen).t())
    return out


def _stride(layer: list[torch.Tensor]) -> int:
    return sum(aligned(slot_nbytes(w)) for w in layer)


def _generic(buffer: torch.Tensor, offset: int, layer: list[torch.Tensor], slot: int) -> None:
    for weight in layer:
        n = slot_nbytes(weight)
        typed_view(buffer, offset, n, weight).copy_(weight[slot])
        offset += aligned(n)


def test_row_views_write_what_the_generic_views_write() -> None:
    shapes, dtypes = [(4, 6), (6,), (3, 2, 2)], [torch.bfloat16, torch.float32, torch.int64]
    weights = [_layer(layer, shapes, dtypes) for layer in range(2)]
    assert Rows.uniform(weights)
    stride = _stride(weights[0])
    nbytes = {layer: [slot_nbytes(w) for w in weights[layer]] for layer in range(2)}
    copier = _Copier(weights, [0, 1], nbytes, {0: stride, 1: stride})
    fast = torch.zeros(4 * stride, dtype=torch.uint8)
    slow = torch.zeros_like(fast)
    rows = copier.rows(fast)
    assert rows is not None
    for row, (layer, slot) in enumerate([(0, 2), (1, 0), (1, 2), (0, 1)]):
        copier.copy(fast, rows, row * stride, weights[layer], layer, slot)
        _generic(slow, row * stride, weights[layer], slot)
    assert torch.equal(fast, slow)
    # Reading a row back gives the slot's tensors.
    for got, want in zip(rows.row(2 * stride), weights[1], strict=True):
        assert torch.equal(got, want[2])


def test_layers_of_different_shapes_use_the_generic_path() -> None:
    a = _layer(0, [(4, 6)], [torch.float32])
    b = _layer(1, [(2, 6)], [torch.float32])
    assert not Rows.uniform([a, b])
    nbytes = {0: [slot_nbytes(w) for w in a], 1: [slot_nbytes(w) for w in b]}
    strides = {0: _stride(a), 1: _stride(b)}
    copier = _Copier([a, b], [0, 1], nbytes, strides)
    buffer = torch.zeros(strides[0] + strides[1], dtype=torch.uint8)
    assert copier.rows(buffer) is None
    copier.copy(buffer, None, 0, a, 0, 1)
    copier.copy(buffer, None, strides[0], b, 1, 2)
    want = torch.zeros_like(buffer)
    _generic(want, 0, a, 1)
    _generic(want, strides[0], b, 2)
    assert torch.equal(buffer, want) and bool(buffer.any())
