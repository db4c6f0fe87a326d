"""The transfer plan: which slot gets which expert from where, for a new placement.

Every rank computes the same *global* plan from the same two
`physical_to_logical` rows, so sends and receives pair up without any
negotiation, and a rank can list its peers' work as well as its own (which
is what makes the plan testable as a whole). For each local physical slot of
each rank the plan says one of:

- **unchanged** — the new placement keeps the same expert there; never touched;
- **vacated** — the new placement empties the slot (``-1``); nothing to do,
  the old weights stay (nobody routes to an empty slot);
- **local copy** — the expert already sits in another old slot of this rank:
  copy it from there (no network);
- **receive** — the first of this rank's slots that needs an expert the rank
  does not hold; exactly one network transfer per (rank, expert);
- **duplicate** — a later slot needing the same incoming expert: filled from
  the first received copy, no second transfer.

So the bytes that cross the network are the minimum for the pair of
placements: for each rank, one expert's weights per distinct logical expert
it must hold and did not hold anywhere before.

Sender choice: a receive is served by a rank that held the expert in the old
placement. When node size is given, a same-node holder is preferred (NVLink
instead of the network). Among the remaining candidates the one that has sent
this expert least often so far wins, then the one with fewest sends overall,
then a rotation keyed on the receiver — so the replicas of a hot expert share
its fan-out instead of the lowest rank sending every copy.

Ordering: the global transfer list is sorted by (layer, src rank, dst rank,
dst slot). A rank's sends and receives are that list filtered by src and dst,
so between any two ranks the messages appear in the same order on both sides
(what ``batch_isend_irecv`` needs to match them).

Pure numpy and stdlib: no torch, so it runs in the planner thread and in
property tests at full speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .arrays import as_id_array, check_count

__all__ = [
    "Duplicate",
    "LayerPlan",
    "LocalCopy",
    "RankPlan",
    "Transfer",
    "TransferPlan",
    "check_layers",
    "check_maps",
    "plan_layer",
    "plan_layers",
    "required_transfers",
]

IntArray = npt.NDArray[np.int64]


class Transfer(NamedTuple):
    """One expert's weights crossing the network from one rank to another.

    Slots are *local* slot indices (0 .. P/ranks - 1) on their rank.
    """

    layer: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int
    expert: int


class LocalCopy(NamedTuple):
    """Fill `dst_slot` from `src_slot` of the same rank's *old* weights."""

    dst_slot: int
    src_slot: int
    expert: int


class Duplicate(NamedTuple):
    """Fill `dst_slot` from the copy received into `from_slot` (no second transfer)."""

    dst_slot: int
    from_slot: int
    expert: int


class RankPlan(NamedTuple):
    """What one rank does for one layer. Every tuple is in ascending slot order,
    except `sends` and `receives`, which follow the global transfer order."""

    layer: int
    rank: int
    unchanged: tuple[int, ...]
    vacated: tuple[int, ...]
    local_copies: tuple[LocalCopy, ...]
    receives: tuple[Transfer, ...]
    duplicates: tuple[Duplicate, ...]
    sends: tuple[Transfer, ...]

    @property
    def written_slots(self) -> tuple[int, ...]:
        """Local slots whose weights change at commit, ascending."""
        return tuple(sorted([c.dst_slot for c in self.local_copies]
                            + [t.dst_slot for t in self.receives]
                            + [d.dst_slot for d in self.duplicates]))


@dataclass(frozen=True)
class LayerPlan:
    """The global plan of one layer: every rank's `RankPlan` and all transfers."""

    layer: int
    num_ranks: int
    num_local_slots: int
    node_size: int | None
    ranks: tuple[RankPlan, ...]
    transfers: tuple[Transfer, ...]

    def received_count(self, rank: int) -> int:
        return len(self.ranks[rank].receives)

    def bytes_received(self, rank: int, slot_bytes: int) -> int:
        """Network bytes `rank` receives, given the bytes of one slot's weights."""
        return self.received_count(rank) * int(slot_bytes)

    def bytes_moved(self, slot_bytes: int) -> int:
        """Network bytes over all ranks (each transfer counted once)."""
        return len(self.transfers) * int(slot_bytes)


@dataclass(frozen=True)
class TransferPlan:
    """Several layers planned together, so their transfers can go in one batch.

    `transfers` is every layer's list, concatenated in `layers` order; with
    `layers` ascending this is the (layer, src, dst, dst slot) order.
    """

    layers: tuple[int, ...]
    num_ranks: int
    layer_plans: tuple[LayerPlan, ...]
    transfers: tuple[Transfer, ...] = field(repr=False)

    def __getitem__(self, layer: int) -> LayerPlan:
        try:
            return self.layer_plans[self.layers.index(layer)]
        except ValueError:
            raise KeyError(f"layer {layer} is not in this plan (layers {self.layers})") from None

    def rank_plans(self, rank: int) -> tuple[RankPlan, ...]:
        return tuple(p.ranks[rank] for p in self.layer_plans)

    def sends(self, rank: int) -> tuple[Transfer, ...]:
        return tuple(t for t in self.transfers if t.src_rank == rank)

    def receives(self, rank: int) -> tuple[Transfer, ...]:
        return tuple(t for t in self.transfers if t.dst_rank == rank)

    def bytes_received(self, rank: int, slot_bytes: int | Mapping[int, int]) -> int:
        """Network bytes `rank` receives; `slot_bytes` is one slot's bytes, or per layer."""
        return sum(p.bytes_received(rank, _slot_bytes(slot_bytes, p.layer))
                   for p in self.layer_plans)

    def bytes_moved(self, slot_bytes: int | Mapping[int, int]) -> int:
        return sum(p.bytes_moved(_slot_bytes(slot_bytes, p.layer)) for p in self.layer_plans)


def _slot_bytes(slot_bytes: int | Mapping[int, int], layer: int) -> int:
    return int(slot_bytes[layer] if isinstance(slot_bytes, Mapping) else slot_bytes)


# -- validation -------------------------------------------------------------------------


def _check_num_ranks(num_ranks: int, num_slots: int, name: str) -> None:
    if not isinstance(num_ranks, (int, np.integer)) or isinstance(num_ranks, bool) \
            or num_ranks < 1:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    if num_slots < 1 or num_slots % num_ranks:
        raise ValueError(
            f"{name} has {num_slots} slots per layer, not a positive multiple of "
            f"num_ranks={num_ranks}: the maps come from a different number of ranks"
        )


def _check_node_size(node_size: int | None) -> None:
    if node_size is not None and (
        not isinstance(node_size, (int, np.integer)) or isinstance(node_size, bool)
        or node_size < 1
    ):
        raise ValueError(f"node_size must be a positive int or None, got {node_size!r}")


def check_maps(old_physical_to_logical: Any, new_physical_to_logical: Any,
               num_ranks: int) -> tuple[IntArray, IntArray]:
    """Validate a pair of [L, P] maps for `num_ranks` ranks; return them as int64.

    Rules, each with its own message: both 2-D of equal shape; P a multiple of
    `num_ranks`; ids >= -1; every expert the new map places is held somewhere
    in the old map of the same layer (otherwise nobody can send it).
    """
    old = as_id_array("old_physical_to_logical", old_physical_to_logical, 2)
    new = as_id_array("new_physical_to_logical", new_physical_to_logical, 2)
    if old.shape != new.shape:
        raise ValueError(f"old_physical_to_logical has shape {old.shape} but "
                         f"new_physical_to_logical has shape {new.shape}; they must match")
    _check_num_ranks(num_ranks, old.shape[1], "old_physical_to_logical")
    if new.size and int(new.max()) >= 0:
        # One sorted membership test over (layer, id) keys: stage() checks the whole
        # map on the serving thread, where a per-layer Python loop costs milliseconds.
        span = int(max(new.max(), old.max())) + 2
        layer_base = np.arange(old.shape[0], dtype=np.int64)[:, None] * span
        new_keys = (layer_base + new + 1)[new >= 0]
        missing = ~np.isin(new_keys, (layer_base + old + 1).ravel())
        if missing.any():
            layer, expert = divmod(int(new_keys[np.argmax(missing)]), span)
            raise ValueError(
                f"new_physical_to_logical places expert {expert - 1} in layer {layer}, "
                "but old_physical_to_logical holds no replica of it, so no rank can send it"
            )
    return old, new


# -- planning ---------------------------------------------------------------------------


def plan_layer(
    old_row: Any,
    new_row: Any,
    num_ranks: int,
    *,
    node_size: int | None = None,
    layer: int = 0,
) -> LayerPlan:
    """Plan one layer: `old_row` and `new_row` are its [P] `physical_to_logical` rows."""
    old = as_id_array("old_physical_to_logical", old_row, 1)
    new = as_id_array("new_physical_to_logical", new_row, 1)
    check_maps(old[None], new[None], num_ranks)
    _check_node_size(node_size)
    check_count("layer", layer, 0)
    return _plan_row(old, new, int(num_ranks), node_size, int(layer))


def plan_layers(
    old_physical_to_logical: Any,
    new_physical_to_logical: Any,
    num_ranks: int,
    layers: Iterable[int] | None = None,
    *,
    node_size: int | None = None,
) -> TransferPlan:
    """Plan several layers of two [L, P] maps at once (all layers when `layers` is None)."""
    old, new = check_maps(old_physical_to_logical, new_physical_to_logical, num_ranks)
    _check_node_size(node_size)
    chosen = check_layers(layers, old.shape[0])
    plans = tuple(_plan_row(old[layer], new[layer], int(num_ranks), node_size, layer)
                  for layer in chosen)
    transfers = tuple(t for p in plans for t in p.transfers)
    return TransferPlan(chosen, int(num_ranks), plans, transfers)


def check_layers(layers: Iterable[int] | None, num_layers: int) -> tuple[int, ...]:
    """`layers` as a tuple of distinct ints in [0, num_layers); all layers when None."""
    if layers is None:
        return tuple(range(num_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or \
            getattr(layers, "ndim", 1) == 0:
        raise ValueError(f"layers must be a sequence of layer indices, got {layers!r}")
    chosen = tuple(layers)
    for layer in chosen:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) \
                or not 0 <= layer < num_layers:
            raise ValueError(f"layers holds {layer!r}; each must be an int in [0, {num_layers})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {chosen} names a layer twice")
    return tuple(int(layer) for layer in chosen)


def _plan_row(old: IntArray, new: IntArray, num_ranks: int, node_size: int | None,
              layer: int) -> LayerPlan:
    num_local = old.shape[0] // num_ranks
    old_list, new_list = old.tolist(), new.tolist()

    # Where each expert lived: holder ranks (ascending) and each holder's lowest slot.
    first_slot: dict[tuple[int, int], int] = {}
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old_list):
        if expert < 0:
            continue
        rank, local = divmod(slot, num_local)
        if (rank, expert) not in first_slot:
            first_slot[(rank, expert)] = local
            holders.setdefault(expert, []).append(rank)

    unchanged: list[list[int]] = [[] for _ in range(num_ranks)]
    vacated: list[list[int]] = [[] for _ in range(num_ranks)]
    copies: list[list[LocalCopy]] = [[] for _ in range(num_ranks)]
    duplicates: list[list[Duplicate]] = [[] for _ in range(num_ranks)]
    needs: list[tuple[int, int, int]] = []  # (expert, dst rank, dst slot), one per (rank, expert)
    for rank in range(num_ranks):
        first_receiver: dict[int, int] = {}
        base = rank * num_local
        for local in range(num_local):
            expert, before = new_list[base + local], old_list[base + local]
            if expert == before:
                unchanged[rank].append(local)
            elif expert < 0:
                vacated[rank].append(local)
            elif (rank, expert) in first_slot:
                copies[rank].append(LocalCopy(local, first_slot[(rank, expert)], expert))
            elif expert in first_receiver:
                duplicates[rank].append(Duplicate(local, first_receiver[expert], expert))
            else:
                first_receiver[expert] = local
                needs.append((expert, rank, local))

    # Sender choice (module docstring). `needs` is in (expert, dst rank) order after
    # this sort, so the per-expert counters see one expert's fan-out together.
    needs.sort()
    sent_of_expert: dict[tuple[int, int], int] = {}
    sent_total = [0] * num_ranks
    transfers: list[Transfer] = []
    for expert, dst, dst_slot in needs:
        candidates = holders[expert]
        if node_size is not None:
            near = [c for c in candidates if c // node_size == dst // node_size]
            candidates = near or candidates
        src = min(candidates, key=lambda c: (sent_of_expert.get((expert, c), 0),
                                             sent_total[c], (c - dst) % num_ranks))
        sent_of_expert[(expert, src)] = sent_of_expert.get((expert, src), 0) + 1
        sent_total[src] += 1
        transfers.append(Transfer(layer, src, first_slot[(src, expert)], dst, dst_slot, expert))
    transfers.sort(key=lambda t: (t.src_rank, t.dst_rank, t.dst_slot))

    sends: list[list[Transfer]] = [[] for _ in range(num_ranks)]
    receives: list[list[Transfer]] = [[] for _ in range(num_ranks)]
    for t in transfers:
        sends[t.src_rank].append(t)
        receives[t.dst_rank].append(t)
    ranks = tuple(
        RankPlan(layer, r, tuple(unchanged[r]), tuple(vacated[r]), tuple(copies[r]),
                 tuple(receives[r]), tuple(duplicates[r]), tuple(sends[r]))
        for r in range(num_ranks)
    )
    return LayerPlan(layer, num_ranks, num_local, node_size, ranks, tuple(transfers))


def required_transfers(old_row: Sequence[int], new_row: Sequence[int], num_ranks: int) -> int:
    """The fewest expert transfers any plan needs for one layer (what the plan achieves):
    per rank, the distinct experts of its new slots it held nowhere in its old slots."""
    old = as_id_array("old_physical_to_logical", old_row, 1)
    new = as_id_array("new_physical_to_logical", new_row, 1)
    if old.shape != new.shape:
        raise ValueError(f"old_physical_to_logical has {old.shape[0]} slots but "
                         f"new_physical_to_logical has {new.shape[0]}; they must match")
    _check_num_ranks(num_ranks, old.shape[0], "old_physical_to_logical")
    num_local = old.shape[0] // num_ranks
    total = 0
    for rank in range(num_ranks):
        window = slice(rank * num_local, (rank + 1) * num_local)
        wanted = set(new[window].tolist()) - {-1}
        total += len(wanted - set(old[window].tolist()))
    return total
