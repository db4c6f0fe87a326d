"""What the ranks of an elastic reconfiguration exchange outside its collectives.

The handover's payload (state, planning settings, weight shapes), the arrival
of every union rank, and the salvage plan go through the torch.distributed
store or one broadcast: they must be the same on every rank, and some ranks
(a joiner still building its model, a leaving rank that died) cannot take
part in a collective yet or any more.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._adapters.liveness import PREFIX as HEARTBEAT_PREFIX
from .._core.elastic import salvage_in_union
from .job import RebalanceFailed
from .rounds import pause

__all__ = ["HANDED_SETTINGS", "TAG_BASE", "Handed", "arrive", "digest", "publish_salvage",
           "read_salvage", "shown", "stopped_ranks", "store_prefix", "tensors_of"]


@dataclass
class Handed:
    step: int
    models: list[tuple[str, list[list[int]], int, list[tuple[int, str, str, str]], int]]
    # What the new set must plan and move alike: the planning settings, and each
    # model's weight tensors (shape without the slot dimension, dtype) by layer.
    settings: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, list[list[tuple[tuple[int, ...], str]]]] = field(default_factory=dict)


# The settings a joining rank adopts from the deployment: plans and transfers
# must be identical on every rank of the union (a joiner given the launch
# configuration planned for nodes the deployment no longer had, and gloo
# aborted on the first transfer whose sizes differed).
HANDED_SETTINGS = ("num_nodes", "policy", "policy_options", "minimize_moves",
                   "layers_per_transfer", "readiness_lag", "peer_timeout_s",
                   "handover_timeout_s", "ranks_per_node", "transfer_path")

# A reconfiguration's own transfers are tagged from here up, apart from the
# serving transfers' tags (1 .. 2**30) on the same groups.
TAG_BASE = 2 ** 30


def tensors_of(model: Any) -> list[list[tuple[tuple[int, ...], str]]]:
    return [[(tuple(int(d) for d in t.shape[1:]), str(t.dtype)) for t in layer]
            for layer in model.expert_weights]


def digest(maps: Mapping[str, npt.NDArray[np.int64]]) -> int:
    """A 56-bit digest of every model's new maps: equal plans, equal digests."""
    h = hashlib.blake2b(digest_size=7)
    for name, p2l in maps.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(p2l, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def shown(tensor: tuple[tuple[int, ...], str] | None) -> str:
    return "missing" if tensor is None else f"{tensor[1]} of shape {list(tensor[0])}"


def stopped_ranks(store: Any, global_ranks: list[int]) -> list[int]:
    """Of `global_ranks`, those whose heartbeat exists, is stale and does not move
    for a moment more (the process died; see `Heartbeat.silent_ranks` on why the
    second look); a rank that never beat (a joiner still building its model) is
    not."""
    def stamps() -> dict[int, float]:
        out = {}
        for g in global_ranks:
            key = f"{HEARTBEAT_PREFIX}{g}"
            try:
                if store.check([key]):
                    out[g] = float(store.get(key))
            except Exception:
                continue
        return out

    now = time.time()
    stale = {g: t for g, t in stamps().items() if now - t > 1.0}
    if not stale:
        return []
    time.sleep(2.0)  # the second look (Heartbeat.silent_ranks says why)
    again = stamps()
    return [g for g, t in stale.items() if again.get(g) == t]


def store_prefix(union_group: Any) -> str:
    """This reconfiguration's keys: the union group's name is the same on every rank."""
    return f"eplb_fsm/elastic/{getattr(union_group, 'group_name', '')}/"


async def arrive(store: Any, prefix: str, union_ranks: Sequence[int], me: int,
                 timeout_s: float, step: int, model: str) -> None:
    """Wait until every rank of the union has called reconfigure/join (a joiner may
    first build its model), so that the phases' timeouts count from when peers
    could answer. Bounded by `timeout_s`; ranks whose heartbeat stopped are not
    waited for (the handoff then salvages without them)."""
    keys = [f"{prefix}arrived/{g}" for g in union_ranks]
    store.set(keys[list(union_ranks).index(me)], "1")
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        missing = [g for g, k in zip(union_ranks, keys, strict=True) if not store.check([k])]
        if missing and set(missing) <= set(stopped_ranks(store, missing)):
            return
        if time.monotonic() > deadline:
            raise RebalanceFailed(
                f"reconfiguration at step {step}: global rank(s) {missing} did not call "
                f"reconfigure/join within handover_timeout_s={timeout_s:g} s", model=model,
                ranks=tuple(missing))
        await pause(0.005)


def publish_salvage(store: Any, prefix: str, union_ranks: Sequence[int],
                    old_ranks: Sequence[int], names: Sequence[str],
                    union_now: Mapping[str, npt.NDArray[np.int64]],
                    new_union: Mapping[str, npt.NDArray[np.int64]]) -> None:
    """New rank 0's part: name the ranks whose heartbeat stopped and publish the
    salvage (per model: live holdings, target, lost experts) for every live rank."""
    union = list(union_ranks)
    deadline = time.monotonic() + 1.5  # a death shows within 5 heartbeats (1 s)
    dead = stopped_ranks(store, union)
    while not dead and time.monotonic() < deadline:
        time.sleep(0.1)
        dead = stopped_ranks(store, union)
    dead_union = [union.index(g) for g in dead]
    maps = {name: salvage_in_union(union_now[name], new_union[name], dead_union, len(union))
            for name in names}
    payload = {"dead": dead_union, "maps": maps,
               "dead_old": [list(old_ranks).index(g) for g in dead if g in old_ranks]}
    store.set(f"{prefix}salvage", pickle.dumps(payload))


async def read_salvage(store: Any, prefix: str, timeout_s: float, step: int,
                       model: str) -> dict[str, Any]:
    """The salvage new rank 0 published (waiting for it, bounded)."""
    key = f"{prefix}salvage"
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise RebalanceFailed(f"reconfiguration at step {step}: no salvage plan from new "
                                  f"rank 0 within {timeout_s:g} s", model=model)
        await pause(0.005)
    salvage: dict[str, Any] = pickle.loads(store.get(key))
    return salvage
