"""Placement maps: which logical expert lives in which physical slot.

Rules of this module (the invariants `Placement.validate` checks):

1. `physical_to_logical` [L, P] is the source of truth. Every other map is
   derived from it, so a `Placement` can never hold two maps that disagree.
2. A slot holds one logical expert id in ``[0, E)`` or ``-1`` (empty).
3. `replica_count[l, e]` is the number of slots of layer ``l`` holding ``e``.
4. `logical_to_physical[l, e, :replica_count[l, e]]` lists those slots in
   ascending slot order; the rest of the row is ``-1``. Ascending order makes
   the map canonical: two equal `physical_to_logical` give bit-equal maps,
   whatever planner produced them.
5. `max_replicas` is ``P - E + 1`` — the most replicas an expert can have when
   every other expert keeps one — so all placements of one model share one
   shape and a serving engine can update its tensors in place. (Only a
   placement built with ``allow_missing`` can need more; it gets more.)
6. Unless ``allow_missing`` is set, every logical expert has at least one
   replica (a token routed to an expert with none would be dropped).

The arrays are read-only: a placement is a value, compared with ``==`` and
shared between threads (the planner runs off the event loop) without copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .arrays import as_id_array, check_count

if TYPE_CHECKING:
    import torch

__all__ = ["Placement", "PlacementTensors"]

IntArray = npt.NDArray[np.int64]


class PlacementTensors(NamedTuple):
    """The three maps as torch tensors, in the names a vLLM model expects."""

    physical_to_logical: torch.Tensor
    logical_to_physical: torch.Tensor
    replica_count: torch.Tensor


class Placement:
    """Expert placement of one model: `physical_to_logical` and its derived maps.

    Build one from `physical_to_logical` alone (``-1`` marks an empty slot)::

        p = Placement([[0, 1, 2, 0]], num_logical_experts=3)
        p.replica_count        # [[2, 1, 1]]
        p.logical_to_physical  # [[[0, 3], [1, -1], [2, -1]]]

    `num_logical_experts` defaults to the largest id + 1; pass it whenever an
    expert may be absent (with ``allow_missing=True``), or the count is wrong.
    """

    __slots__ = ("_l2p", "_num_logical", "_p2l", "_rc")
    _l2p: IntArray | None

    def __init__(
        self,
        physical_to_logical: Any,
        num_logical_experts: int | None = None,
        *,
        allow_missing: bool = False,
    ) -> None:
        p2l = as_id_array("physical_to_logical", physical_to_logical, 2)
        num_layers, num_physical = p2l.shape
        if num_layers < 1 or num_physical < 1:
            raise ValueError(
                f"physical_to_logical must have at least one layer and one slot, got {p2l.shape}"
            )
        if np.any(p2l < -1):
            raise ValueError("physical_to_logical entries must be >= -1 (-1 marks an empty slot)")
        if num_logical_experts is None:
            num_logical_experts = int(p2l.max()) + 1
        num_logical = check_count("num_logical_experts", num_logical_experts)
        if num_physical < num_logical:
            raise ValueError(
                f"physical_to_logical has {num_physical} slots per layer, fewer than "
                f"num_logical_experts={num_logical}; P >= E is required"
            )
        if p2l.max() >= num_logical:
            raise ValueError(
                f"physical_to_logical holds expert id {int(p2l.max())}, "
                f"out of range for num_logical_experts={num_logical}"
            )
        self._p2l = p2l
        self._num_logical = num_logical
        self._rc = _replica_count(p2l, num_logical)
        # logical_to_physical is [L, E, P - E + 1]: for DeepSeek-V3's shape it is
        # 60x larger than physical_to_logical, so it is built on first use only.
        self._l2p = None
        for arr in (self._p2l, self._rc):
            arr.setflags(write=False)
        # The other invariants hold by construction (property-tested); this one
        # depends on the caller's intent.
        if not allow_missing and np.any(self._rc < 1):
            _raise_missing(self._rc)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def initial(cls, num_layers: int, num_logical: int, num_physical: int) -> Placement:
        """vLLM's start layout: slot ``i`` holds expert ``i % E`` on every layer."""
        for name, v in (
            ("num_layers", num_layers),
            ("num_logical", num_logical),
            ("num_physical", num_physical),
        ):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_physical < num_logical:
            raise ValueError(
                f"num_physical={num_physical} must be >= num_logical={num_logical}"
            )
        row = np.arange(num_physical, dtype=np.int64) % num_logical
        return cls(np.tile(row, (num_layers, 1)), num_logical)

    @classmethod
    def from_maps(
        cls,
        physical_to_logical: Any,
        logical_to_physical: Any,
        replica_count: Any,
        *,
        allow_missing: bool = False,
    ) -> Placement:
        """Adopt three maps held elsewhere (say, a model's tensors), checking they agree."""
        l2p = np.asarray(
            logical_to_physical.detach().cpu().numpy()
            if hasattr(logical_to_physical, "detach")
            else logical_to_physical
        )
        if l2p.ndim != 3:
            raise ValueError(
                f"logical_to_physical must be 3-D [layers, logical, max_replicas], got {l2p.shape}"
            )
        placement = cls(physical_to_logical, l2p.shape[1], allow_missing=True)
        rc = as_id_array("replica_count", replica_count, 2)
        if rc.shape != placement.replica_count.shape or not np.array_equal(
            rc, placement.replica_count
        ):
            raise ValueError("replica_count disagrees with physical_to_logical")
        if l2p.shape != placement.logical_to_physical.shape or not np.array_equal(
            l2p, placement.logical_to_physical
        ):
            raise ValueError(
                "logical_to_physical disagrees with physical_to_logical (expected "
                f"shape {placement.logical_to_physical.shape}, slots ascending, -1 padded)"
            )
        placement.validate(allow_missing=allow_missing)
        return placement

    # -- the maps -----------------------------------------------------------------------

    @property
    def physical_to_logical(self) -> IntArray:
        return self._p2l

    @property
    def logical_to_physical(self) -> IntArray:
        if self._l2p is None:
            l2p = _logical_to_physical(self._p2l, self._rc)
            l2p.setflags(write=False)
            self._l2p = l2p
        return self._l2p

    @property
    def replica_count(self) -> IntArray:
        return self._rc

    @property
    def num_layers(self) -> int:
        return int(self._p2l.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self._p2l.shape[1])

    @property
    def num_logical(self) -> int:
        return self._num_logical

    @property
    def max_replicas(self) -> int:
        return _max_replicas(self.num_physical, self._num_logical, self._rc)

    # -- checks -------------------------------------------------------------------------

    def validate(self, *, allow_missing: bool = False) -> None:
        """Raise `ValueError` naming the first invariant (module docstring) that fails."""
        p2l, l2p, rc = self._p2l, self.logical_to_physical, self._rc
        num_layers, num_physical = p2l.shape
        num_logical = self._num_logical
        expected_l2p = (num_layers, num_logical, _max_replicas(num_physical, num_logical, rc))
        if l2p.shape != expected_l2p:
            raise ValueError(
                f"logical_to_physical has shape {l2p.shape}, expected {expected_l2p}"
            )
        if rc.shape != (num_layers, num_logical):
            raise ValueError(f"replica_count has shape {rc.shape}, expected "
                             f"{(num_layers, num_logical)}")
        if np.any((p2l < -1) | (p2l >= num_logical)):
            raise ValueError("physical_to_logical holds an id outside [-1, num_logical)")
        if np.any((l2p < -1) | (l2p >= num_physical)):
            raise ValueError("logical_to_physical holds a slot outside [-1, num_physical)")
        if not allow_missing and np.any(rc < 1):
            _raise_missing(rc)
        filled = l2p >= 0
        if not np.array_equal(filled.sum(axis=2), rc):
            raise ValueError("replica_count disagrees with logical_to_physical")
        if int(rc.sum()) != int((p2l >= 0).sum()):
            raise ValueError("replica_count does not sum to the number of filled slots")
        layer, expert, _ = np.nonzero(filled)
        if not np.array_equal(p2l[layer, l2p[filled]], expert):
            raise ValueError("logical_to_physical names a slot holding another expert")
        later = l2p[..., 1:]
        if np.any((later >= 0) & ((l2p[..., :-1] < 0) | (later <= l2p[..., :-1]))):
            raise ValueError("logical_to_physical rows must list slots ascending, then -1")

    # -- conversions and comparisons ----------------------------------------------------

    def to_torch(self, device: Any = "cpu") -> PlacementTensors:
        """The three maps as int64 tensors on `device` (fresh tensors, writable)."""
        import torch  # deferred: the core stays importable without torch

        return PlacementTensors(
            torch.tensor(self._p2l, dtype=torch.int64, device=device),
            torch.tensor(self.logical_to_physical, dtype=torch.int64, device=device),
            torch.tensor(self._rc, dtype=torch.int64, device=device),
        )

    def slots_changed(self, other: Placement) -> int:
        """How many (layer, slot) pairs hold a different expert in `other`."""
        self._check_same_shape(other, "other")
        return int(np.count_nonzero(self._p2l != other._p2l))

    def with_layers(self, layers: Sequence[int], other: Placement) -> Placement:
        """This placement with the rows of `layers` taken from `other` (same shape).

        Every invariant holds row by row, so rows of two valid placements make
        a valid one: nothing is checked again. A commit builds one per layer
        batch on the serving thread, where the checks of `__init__` would be
        most of its host time.
        """
        self._check_same_shape(other, "other")
        rows = list(layers)
        for layer in rows:
            if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
                raise ValueError(f"layers must be ints in [0, {self.num_layers}), got {layer!r}")
        out = object.__new__(Placement)
        out._num_logical = self._num_logical
        out._p2l = self._p2l.copy()
        out._p2l[rows] = other._p2l[rows]
        out._rc = self._rc.copy()
        out._rc[rows] = other._rc[rows]
        out._l2p = None
        for arr in (out._p2l, out._rc):
            arr.setflags(write=False)
        return out

    def _check_same_shape(self, other: Placement, name: str) -> None:
        if not isinstance(other, Placement):
            raise ValueError(f"{name} must be a Placement, got {type(other).__name__}")
        if other._p2l.shape != self._p2l.shape or other.num_logical != self.num_logical:
            raise ValueError(
                f"{name} has shape [L={other.num_layers}, P={other.num_physical}, "
                f"E={other.num_logical}], expected [L={self.num_layers}, "
                f"P={self.num_physical}, E={self.num_logical}]"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self._num_logical == other._num_logical and np.array_equal(self._p2l, other._p2l)

    def __hash__(self) -> int:
        return hash((self._num_logical, self._p2l.shape, self._p2l.tobytes()))

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, physical={self.num_physical}, "
            f"logical={self.num_logical})"
        )


def _raise_missing(rc: IntArray) -> None:
    layer, expert = (int(i) for i in np.argwhere(rc < 1)[0])
    raise ValueError(
        f"logical expert {expert} of layer {layer} has no replica "
        "(pass allow_missing=True if that is intended)"
    )


def _replica_count(p2l: IntArray, num_logical: int) -> IntArray:
    num_layers = p2l.shape[0]
    # Empty slots (-1) count into a spare column E, dropped below.
    key = np.where(p2l >= 0, p2l, num_logical) + (num_logical + 1) * np.arange(num_layers)[:, None]
    counts = np.bincount(key.ravel(), minlength=num_layers * (num_logical + 1))
    return counts.reshape(num_layers, num_logical + 1)[:, :num_logical].astype(np.int64)


def _logical_to_physical(p2l: IntArray, rc: IntArray) -> IntArray:
    num_layers, num_physical = p2l.shape
    num_logical = rc.shape[1]
    # A stable sort of each row by expert keeps slots ascending per expert; a
    # slot's replica index is its position minus where its expert's run starts.
    key = np.where(p2l >= 0, p2l, num_logical)
    order = np.argsort(key, axis=1, kind="stable")
    sorted_key = np.take_along_axis(key, order, axis=1)
    run_start = np.cumsum(rc, axis=1) - rc
    filled = sorted_key < num_logical
    layer = np.broadcast_to(np.arange(num_layers)[:, None], p2l.shape)[filled]
    expert = sorted_key[filled]
    position = np.broadcast_to(np.arange(num_physical), p2l.shape)[filled]
    replica = position - run_start[layer, expert]
    max_replicas = _max_replicas(num_physical, num_logical, rc)
    l2p = np.full((num_layers, num_logical, max_replicas), -1, dtype=np.int64)
    l2p[layer, expert, replica] = order[filled]
    return l2p


def _max_replicas(num_physical: int, num_logical: int, rc: IntArray) -> int:
    return max(num_physical - num_logical + 1, int(rc.max(initial=0)))
