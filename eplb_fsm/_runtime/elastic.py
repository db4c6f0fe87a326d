"""Elastic expert parallelism: one reconfiguration from R ranks to R' ranks.

Every process of the old and the new rank set calls it together, at the same
step, between two forward passes (`EplbRuntime.reconfigure` on old ranks,
`EplbRuntime.join` on joining ones). Why a call every rank makes, and not a
request that `step()` carries out over later steps: a change of rank set
changes the engine's own communicators, which the engine rebuilds between
passes anyway; and a joining rank has no serving loop to step until it
holds weights. The call still goes through the lifecycle's states, records
them at the current step on every rank, and takes every decision on an
all-reduced fact, so the histories of all remaining ranks agree.

The protocol (``U`` = union of old and new ranks, see `_core.elastic`):

0. Arrival (union): every rank waits until all have called in (bounded by
   ``handover_timeout_s``), so later timeouts count from when peers could
   answer.
1. Handover (new ranks, blocking broadcast on the new gloo group): the
   surviving rank with the lowest new rank sends the step counter, every
   model's placement, transition history and window size in passes, the
   planning settings and every weight tensor's shape and dtype. Joining
   ranks adopt them, or refuse (through the load round, so that every rank
   of the union fails before a byte moves).
2. Load round (union, non-blocking all-reduce, bounded by
   ``peer_timeout_s``): every old rank's window, in logical experts.
3. Agreement (new ranks): did the load round complete everywhere? If so,
   every rank plans the same placement for R' ranks, and the weights move
   over the union group, one batch of ``layers_per_transfer`` layers at a
   time: stage, a union readiness round, an agreement round among the new
   ranks, commit. Leaving ranks only send; after the last union round
   they are ``released``.
4. Salvage, if a union round failed (a leaving rank died): new rank 0 names
   the ranks whose heartbeat stopped and publishes, in the store, the move
   of every expert that still has a live copy (on a new rank or on a live
   leaving rank, which sends and is then released); the rest are *lost* and
   reported by name (layer, expert) with the slots the engine must reload.
5. Resize (new ranks, same step): the model gets its new EP rank
   (``resize_ep``) and new map tensors (``set_eplb_state``), the window
   restarts under the new map seeded with the agreed load (on new rank 0
   only, so the next plan's all-reduce counts it once), and the runtime
   serves over the new groups.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import numpy.typing as npt
import torch

from .._adapters.elastic_groups import ElasticGroups
from .._adapters.interfaces import AllReduce, FaultHook, WeightMover
from .._adapters.liveness import Heartbeat
from .._core import lifecycle as lc
from .._core.elastic import (
    ElasticPlan,
    UnionLayout,
    check_rank_mapping,
    maps_in_union,
    plan_elastic,
)
from .._core.placement import Placement
from .config import EplbConfig
from .driver import ModelDriver
from .handover import (
    HANDED_SETTINGS,
    TAG_BASE,
    Handed,
    arrive,
    digest,
    publish_salvage,
    read_salvage,
    shown,
    store_prefix,
    tensors_of,
)
from .job import RebalanceFailed
from .rounds import POLL_S, RoundOutcome, encode_flags, pause, wait_round

if TYPE_CHECKING:
    from .._adapters.collectives import TorchAllReduce
    from .._adapters.transfer import TransferEngine

__all__ = ["ExpertsLost", "Reconfiguration", "Reconfigured"]

log = logging.getLogger("eplb_fsm")

Lost = Mapping[str, Mapping[int, tuple[int, ...]]]


@dataclass(frozen=True)
class Reconfigured:
    """What one reconfiguration did, as this rank saw it (the same on every new rank).

    `unavailable_ranks` are old ranks whose slots could not be handed off (the
    handoff failed and their heartbeat had stopped; the live ranks of the union,
    leaving ones included, salvaged every live copy). `lost` names,
    per model and layer, the logical experts no copy of which survived;
    `reload_slots` the new global slots that hold them and must be reloaded.
    """

    step: int
    role: str  # "stays", "leaves" or "joins"
    num_old_ranks: int
    num_new_ranks: int
    rank_mapping: tuple[int, ...]
    salvaged: bool = False
    unavailable_ranks: tuple[int, ...] = ()
    lost: Lost = field(default_factory=dict)
    reload_slots: Lost = field(default_factory=dict)
    bytes_received: int = 0
    notes: tuple[str, ...] = ()


class ExpertsLost(RebalanceFailed):
    """A reconfiguration completed on the new ranks, but some experts had no copy left.

    ``lost[model][layer]`` lists the logical experts; ``report.reload_slots``
    the slots of the new placement that hold them (routing already points
    there): reload their weights before serving them.
    """

    def __init__(self, message: str, *, report: Reconfigured) -> None:
        model = next(iter(report.lost))
        super().__init__(message, model=model, layers=tuple(report.lost[model]),
                         ranks=report.unavailable_ranks)
        self.lost = report.lost
        self.report = report


def make_transports(group: Any, cpu_group: Any, device: torch.device, config: EplbConfig,
                    path: str | None = None) -> tuple[TorchAllReduce, TransferEngine]:
    """The runtime's transports over a pair of groups: readiness and load rounds on
    `cpu_group`, weights over `group` (`EplbRuntime.__init__` and every
    reconfiguration build them here).

    `path` overrides ``config.transfer_path``: the union's handoff uses send/recv
    ("nccl"), since no rank's weights were shared over the union group.
    """
    from .._adapters.collectives import TorchAllReduce
    from .._adapters.transfer import TransferEngine

    return (TorchAllReduce(cpu_group),
            TransferEngine(group, device=device, node_size=config.ranks_per_node,
                           path=path or config.transfer_path, cpu_group=cpu_group))


def share_weights(mover: WeightMover, drivers: Mapping[str, ModelDriver],
                  config: EplbConfig) -> None:
    """Share every model's weights over `mover`'s group, as `EplbRuntime.add_model` does.

    Collective over the new ranks, one call per model in order, after the
    resize: every new rank shares on the transports it serves with, so all
    agree on each pair's channel (a joining rank's `join` adds its models
    without sharing, so this is the only share of the reconfiguration).
    """
    share = getattr(mover, "share_weights", None)
    if share is None or config.transfer_path == "nccl":
        return
    for driver in drivers.values():
        share(driver.model.expert_weights)


def heartbeat_for(group: Any) -> Heartbeat | None:
    import torch.distributed as dist

    return Heartbeat.for_default_group(dist.get_rank(group), dist.get_world_size(group),
                                       dist.get_process_group_ranks(group))


class Reconfiguration:
    """One process's part in one reconfiguration (module docstring)."""

    def __init__(self, config: EplbConfig, drivers: Mapping[str, ModelDriver],
                 groups: ElasticGroups, step: int, device: torch.device,
                 faults: FaultHook | None, rank_mapping: Any = None) -> None:
        import torch.distributed as dist

        if not isinstance(groups, ElasticGroups):
            raise ValueError(f"groups must be an ElasticGroups, got {type(groups).__name__}")
        self.mapping = check_rank_mapping(groups.rank_mapping, len(groups.new_ranks))
        if rank_mapping is not None:
            given = check_rank_mapping(rank_mapping, len(groups.new_ranks))
            if given.tolist() != self.mapping.tolist():
                raise ValueError(f"rank_mapping {given.tolist()} disagrees with the groups' "
                                 f"old_ranks {list(groups.old_ranks)} -> new_ranks "
                                 f"{list(groups.new_ranks)}, which imply "
                                 f"{self.mapping.tolist()}")
        self.global_rank = dist.get_rank()
        self.role = groups.role(self.global_rank)
        if self.role == "idle":
            raise ValueError(f"global rank {dist.get_rank()} is in neither groups.old_ranks "
                             "nor groups.new_ranks; it has no part in this reconfiguration")
        # Right after a failed rebalance a model is in `failed` (it recovers at its
        # next step); `busy` is False then, so a reconfiguration is accepted.
        busy = [name for name, d in drivers.items()
                if d.busy or d.state not in (lc.COLLECTING, lc.FAILED)]
        if busy:
            raise ValueError(f"reconfigure while model(s) {busy} are rebalancing would break "
                             "the agreed step order; call it between rebalances "
                             "(when EplbRuntime.busy is False)")
        for name, driver in drivers.items():
            local = int(driver.model.num_local_physical_experts)
            if local * len(groups.new_ranks) < driver.placement.num_logical:
                raise ValueError(
                    f"model {name!r}: {len(groups.new_ranks)} new rank(s) x {local} slots per "
                    f"rank = {local * len(groups.new_ranks)} slots cannot hold its "
                    f"{driver.placement.num_logical} logical experts; choose more new ranks")
        if self.role == "stays":
            for name, driver in drivers.items():
                if not callable(getattr(driver.model, "resize_ep", None)):
                    raise ValueError(f"model {name!r} lacks resize_ep(group, rank, world_size),"
                                     " which an elastic model needs to learn its new EP rank")
        self.config, self.drivers, self.groups = config, drivers, groups
        self.step, self.device, self.faults = step, device, faults
        self.layout = UnionLayout(groups.old_to_union, groups.new_to_union,
                                  len(groups.union_ranks))
        self.num_new = len(groups.new_ranks)
        self.union_reduce, self.union_mover = make_transports(
            groups.union_group, groups.union_cpu_group, device, config, path="nccl")
        self.new: tuple[AllReduce, WeightMover] | None = None
        if self.role != "leaves":
            self.new = make_transports(groups.new_group, groups.new_cpu_group, device, config)
        self.bytes = 0
        self.refusal: tuple[int, int, int, str] | None = None
        self.moves = 0
        self.unavailable: tuple[int, ...] = ()  # old ranks that could not hand off
        self.liveness: Heartbeat | None = None
        self.new_config = config  # with the new rank count's nodes and redundant slots

    # -- the whole call -------------------------------------------------------------------

    async def run(self) -> Reconfigured:
        passes = 0
        for driver in self.drivers.values():
            if driver.state == lc.FAILED:  # before the handover: joiners adopt it too
                driver.transition("recover", self.step)
        await self._arrive()
        if self.role != "leaves":
            passes = self._handover()
        for driver in self.drivers.values():
            driver.transition("reconfigure", self.step)
        old = {name: d.placement for name, d in self.drivers.items()}
        load = await self._union_load()
        if self.role == "leaves":
            return await self._leave(old, load)
        agreed = await self._agree(load is not None)
        if not agreed:
            load = await self._new_load()
        assert load is not None
        plans = await anyio.to_thread.run_sync(self._plan_all, load, old)
        current = {name: maps_in_union(old[name].physical_to_logical,
                                       plans[name].placement.physical_to_logical, self.layout)
                   for name in self.drivers}
        union_now = {name: maps[0].copy() for name, maps in current.items()}
        if agreed:
            agreed = await self._plans_agree(current)
        if agreed:
            agreed = await self._hand_off(current, union_now)
        for driver in self.drivers.values():
            driver.transition("handoff_resolved", self.step, lc.Facts(all_ready=agreed))
        lost: dict[str, dict[int, tuple[int, ...]]] = {}
        if not agreed:
            lost = await self._salvage(union_now, current)
            for driver in self.drivers.values():
                driver.transition("salvaged", self.step)
        first = next(iter(plans.values()))
        self.new_config = dataclasses.replace(
            self.config, num_nodes=first.num_nodes,
            num_redundant_experts=first.placement.num_physical - first.placement.num_logical)
        report = self._report(plans, lost, salvaged=not agreed)
        self._resize(plans, load, passes)
        for name, driver in self.drivers.items():
            driver.transition("resized", self.step, lc.Facts(nothing_lost=not lost.get(name)))
        return report

    # -- phases ---------------------------------------------------------------------------

    def _handover(self) -> int:
        """Step counter, placements, histories: from the first surviving new rank."""
        import torch.distributed as dist

        source = int(self.mapping[self.mapping >= 0].min())
        payload: list[Any] = [None]
        me = dist.get_rank()
        if me in self.groups.old_ranks and \
                int(self.mapping[self.groups.old_ranks.index(me)]) == source:
            payload[0] = Handed(self.step, [
                (name, d.placement.physical_to_logical.tolist(), d.placement.num_logical,
                 [(r.step, r.source, r.dest, r.trigger) for r in d.lifecycle.history],
                 d.window.passes)
                for name, d in self.drivers.items()],
                {k: getattr(self.config, k) for k in HANDED_SETTINGS},
                {name: tensors_of(d.model) for name, d in self.drivers.items()})
        dist.broadcast_object_list(payload, src=self.groups.new_ranks[source],
                                   group=self.groups.new_cpu_group)
        handed: Handed = payload[0]
        names = [m[0] for m in handed.models]
        if names != list(self.drivers):
            self._refuse(3, 0, 0, f"this rank's models {list(self.drivers)} differ from the "
                         f"deployment's {names}; add the same models in the same order")
            return 0
        if self.role == "joins":
            self.step = handed.step
            self.config = dataclasses.replace(self.config, **handed.settings)
            for (name, p2l, num_logical, history, _), driver in zip(
                    handed.models, self.drivers.values(), strict=True):
                placement = Placement(p2l, num_logical)
                local = placement.num_physical // len(self.mapping)
                if (placement.num_layers, placement.num_logical, local) != (
                        driver.placement.num_layers, driver.placement.num_logical,
                        driver.placement.num_physical // self.num_new):
                    self._refuse(1, 0, 0, f"model {name!r} on this joining rank has "
                                 f"{driver.placement.num_layers} layers, "
                                 f"{driver.placement.num_logical} logical experts and "
                                 f"{driver.placement.num_physical // self.num_new} slots per "
                                 f"rank; the deployment has {placement.num_layers}, "
                                 f"{placement.num_logical} and {local}")
                    return 0
                if not self._sametensors_of(name, driver, handed.tensors.get(name)):
                    return 0
                driver.placement = placement
                driver.lifecycle.history[:] = [lc.TransitionRecord(*r) for r in history]
        return int(handed.models[0][4]) if handed.models else 0

    def _sametensors_of(self, name: str, driver: ModelDriver,
                      theirs: list[list[tuple[tuple[int, ...], str]]] | None) -> bool:
        """Refuse (see `_refuse`) if this joiner's weights are not the deployment's shapes
        and dtypes: the engine moves raw bytes, which would be garbage here."""
        if theirs is None:
            return True
        mine = tensors_of(driver.model)
        for layer, (got, want) in enumerate(zip(mine, theirs, strict=False)):
            for index in range(max(len(got), len(want))):
                g = got[index] if index < len(got) else None
                w = want[index] if index < len(want) else None
                if g != w:
                    self._refuse(2, layer, index, (
                        f"model {name!r}: this joining rank's expert_weights[{layer}][{index}] "
                        f"is {shown(g)}, the deployment's is {shown(w)} (per slot); every "
                        "rank must hold the same shapes and dtypes (the engine moves raw "
                        "bytes)"))
                    return False
        return True

    def _refuse(self, code: int, layer: int, tensor: int, message: str) -> None:
        """Refuse this reconfiguration; every union rank learns it from the load round
        and raises before a byte moves (`_union_load`)."""
        self.refusal = (code, layer, tensor, message)

    async def _union_load(self) -> dict[str, npt.NDArray[np.int64]] | None:
        """Every old rank's window, summed over the union; None if the union broke.

        The round also carries every rank's refusal (a joiner whose models or
        weights disagree with the deployment's): then every union rank raises
        ValueError here, before a byte moves."""
        union = self.union_reduce
        refusals = np.zeros(3 * union.world_size, dtype=np.int64)
        if self.refusal is not None:
            refusals[3 * union.rank:3 * union.rank + 3] = self.refusal[:3]
        try:
            loads, refused = await self._reduce_load(union, self.role != "joins", refusals)
        except Exception as exc:  # a peer died or never answered
            if self.refusal is not None:
                raise ValueError(self.refusal[3]) from exc
            log.warning("eplb reconfigure: load round over the union failed on rank %d at "
                        "step %d: %s", union.rank, self.step, exc)
            return None
        refused = refused.reshape(-1, 3)
        who = [u for u in range(union.world_size) if refused[u, 0]]
        if who:
            if self.refusal is not None:
                raise ValueError(self.refusal[3])
            u = who[0]
            code, layer, tensor = (int(v) for v in refused[u])
            what = {1: "its models' layers, experts or slots per rank",
                    2: f"its expert_weights[{layer}][{tensor}] (shape or dtype)",
                    3: "its models (names or order)"}.get(code, "its models")
            raise ValueError(f"joining global rank {self.groups.union_ranks[u]} refused the "
                             f"reconfiguration: {what} differ from the deployment's; nothing "
                             "was moved")
        return loads

    async def _new_load(self) -> dict[str, npt.NDArray[np.int64]]:
        assert self.new is not None
        return (await self._reduce_load(self.new[0], self.role == "stays"))[0]

    async def _reduce_load(self, reduce: AllReduce, contributes: bool,
                           extra: npt.NDArray[np.int64] | None = None,
                           ) -> tuple[dict[str, npt.NDArray[np.int64]], npt.NDArray[np.int64]]:
        """Every contributing rank's window per model, summed; and `extra`, summed."""
        parts = []
        for driver in self.drivers.values():
            shape = (driver.placement.num_layers, driver.placement.num_logical)
            parts.append(driver.window.snapshot().logical() if contributes
                         else np.zeros(shape, dtype=np.int64))
        tail = extra if extra is not None else np.zeros(0, dtype=np.int64)
        flat = np.concatenate([p.ravel() for p in parts] + [tail])
        values = await wait_round(reduce.launch(flat), self.config.peer_timeout_s,
                                  f"union rank {reduce.rank}")
        out, start = {}, 0
        for name, part in zip(self.drivers, parts, strict=True):
            out[name] = values[start:start + part.size].reshape(part.shape)
            start += part.size
        return out, values[start:]

    async def _plans_agree(self, maps: Mapping[str, tuple[npt.NDArray[np.int64],
                                                         npt.NDArray[np.int64]]]) -> bool:
        """Did every union rank plan the same maps? False if the union broke; raises
        RebalanceFailed on every rank (before a byte moves) if plans differ: a
        transfer between different plans would pair messages of other sizes."""
        union = self.union_reduce
        digests = np.zeros(union.world_size, dtype=np.int64)
        digests[union.rank] = digest({name: new for name, (_, new) in maps.items()})
        try:
            values = await wait_round(union.launch(digests), self.config.peer_timeout_s,
                                      f"union rank {union.rank}")
        except Exception as exc:
            log.warning("eplb reconfigure: plan round over the union failed on rank %d at "
                        "step %d: %s", union.rank, self.step, exc)
            return False
        if len(set(values.tolist())) > 1:
            groups: dict[int, list[int]] = {}
            for u, d in enumerate(values.tolist()):
                groups.setdefault(int(d), []).append(self.groups.union_ranks[u])
            raise RebalanceFailed(
                f"reconfiguration at step {self.step}: the ranks of the union planned "
                f"different placements (global ranks by plan: {sorted(groups.values())}); "
                "their settings differ; nothing was moved", model=next(iter(self.drivers)))
        return True

    async def _arrive(self) -> None:
        await arrive(_store(), store_prefix(self.groups.union_group), self.groups.union_ranks,
                     self.global_rank, self.config.handover_timeout_s, self.step,
                     next(iter(self.drivers)))

    async def _agree(self, ok: bool) -> bool:
        """True iff every new rank says `ok` (an all-reduce among the new ranks).

        Peers may arrive late by a whole failed phase: up to ``peer_timeout_s``
        waiting for their staging and as long again for a union round that a
        dead rank never completes. So this wait allows three timeouts; only a
        new rank that died itself exhausts it.
        """
        assert self.new is not None
        reduce = self.new[0]
        flags = encode_flags(reduce.rank, reduce.world_size, ready=ok, errored=False,
                             timed_out=False)
        values = await wait_round(reduce.launch(flags), 3 * self.config.peer_timeout_s)
        return RoundOutcome.decode(values, reduce.world_size).all_ready

    def _plan_all(self, load: Mapping[str, npt.NDArray[np.int64]],
                  old: Mapping[str, Placement]) -> dict[str, ElasticPlan]:
        plans = {}
        for name, driver in self.drivers.items():
            plans[name] = plan_elastic(
                load[name], old[name], self.mapping, self.num_new,
                num_groups=driver.num_groups, num_nodes=self.config.num_nodes,
                policy=self.config.policy, minimize_moves=self.config.minimize_moves,
                policy_options=self.config.policy_options)
            if plans[name].note:
                log.warning("eplb reconfigure: model=%s: %s", name, plans[name].note)
        return plans

    async def _leave(self, old: Mapping[str, Placement],
                     load: Mapping[str, npt.NDArray[np.int64]] | None) -> Reconfigured:
        """A leaving rank: plan like everyone, send its slots, then release."""
        ok = load is not None
        if ok:
            assert load is not None
            plans = await anyio.to_thread.run_sync(self._plan_all, load, old)
            current = {name: maps_in_union(old[name].physical_to_logical,
                                           plans[name].placement.physical_to_logical,
                                           self.layout) for name in self.drivers}
            ok = await self._plans_agree(current) and await self._hand_off(current, None)
        if not ok and load is not None:
            ok = await self._salvage_as_leaver()
        if not ok:
            message = (f"rank {self.union_reduce.rank} of the union could not hand its "
                       "experts off: a rank of the union failed or did not answer within "
                       f"{self.config.peer_timeout_s:g} s")
            for driver in self.drivers.values():
                driver.transition("fail", self.step)
            raise RebalanceFailed(message, model=next(iter(self.drivers)))
        for driver in self.drivers.values():
            driver.transition("handed_off", self.step)
        return Reconfigured(self.step, self.role, len(self.mapping), self.num_new,
                            tuple(int(m) for m in self.mapping))

    async def _hand_off(self, maps: Mapping[str, tuple[npt.NDArray[np.int64],
                                                      npt.NDArray[np.int64]]],
                        union_now: dict[str, npt.NDArray[np.int64]] | None) -> bool:
        """The union transfer, batch by batch; False as soon as one batch failed anywhere."""
        for name, (old_u, new_u) in maps.items():
            for batch in self._batches(old_u, new_u):
                ok, staged = await self._move(self.union_mover, self.union_reduce, name,
                                              old_u, new_u, batch, "handoff")
                if union_now is not None:  # a new rank: commit only if every new rank can
                    ok = await self._agree(ok)
                if not ok:
                    if staged is not None:
                        staged.release()
                    return False
                assert staged is not None
                if union_now is not None:
                    staged.commit()
                    union_now[name][list(batch)] = new_u[list(batch)]
                    self.bytes += staged.bytes_received
                else:
                    staged.release()
        return True

    async def _salvage(self, union_now: Mapping[str, npt.NDArray[np.int64]],
                       current: Mapping[str, tuple[npt.NDArray[np.int64],
                                                   npt.NDArray[np.int64]]],
                       ) -> dict[str, dict[int, tuple[int, ...]]]:
        """Move what live copies exist, on new and leaving ranks alike, over the union;
        return what is lost. New rank 0 names the ranks that could not hand off
        (their heartbeat stopped) and publishes the salvage in the store, so every
        live rank of the union runs the same transfers (`_salvage_plan`)."""
        assert self.new is not None
        reduce = self.new[0]
        if reduce.rank == 0:
            publish_salvage(_store(), store_prefix(self.groups.union_group),
                            self.groups.union_ranks, self.groups.old_ranks, list(self.drivers),
                            union_now, {name: maps[1] for name, maps in current.items()})
        salvage = await self._salvage_plan()
        lost: dict[str, dict[int, tuple[int, ...]]] = {}
        for index, (name, batch, held, target) in enumerate(_salvage_batches(self, salvage)):
            ok, staged = await self._move(self.union_mover, reduce, name, held, target, batch,
                                          "salvage", tag=TAG_BASE + 2 ** 20 + index)
            if not ok or staged is None:
                if staged is not None:
                    staged.release()
                for driver in self.drivers.values():
                    driver.transition("fail", self.step)
                raise RebalanceFailed(
                    f"model {name!r}: salvaging layer(s) {list(batch)} failed: a new rank "
                    f"failed or did not answer within {self.config.peer_timeout_s:g} s",
                    model=name, layers=batch)
            staged.commit()
            self.bytes += staged.bytes_received
        for name, (_, _, gone) in salvage["maps"].items():
            if gone:
                lost[name] = gone
        self.unavailable = tuple(salvage["dead_old"])
        return lost

    async def _salvage_plan(self) -> dict[str, Any]:
        return await read_salvage(_store(), store_prefix(self.groups.union_group),
                                  3 * self.config.peer_timeout_s, self.step,
                                  next(iter(self.drivers)))

    async def _salvage_as_leaver(self) -> bool:
        """A live leaving rank after a failed handoff: send what the salvage asks of
        it (its copies may be the last live ones), then it may be released."""
        try:
            salvage = await self._salvage_plan()
        except RebalanceFailed:
            return False
        if self.union_reduce.rank in salvage["dead"]:
            return False
        for index, (name, batch, held, target) in enumerate(_salvage_batches(self, salvage)):
            deadline = time.monotonic() + self.config.peer_timeout_s
            try:
                staged = self.union_mover.stage(held, target, batch,
                                                self.drivers[name].model.expert_weights,
                                                tag=TAG_BASE + 2 ** 20 + index)
                while not staged.ready():
                    if time.monotonic() > deadline:
                        staged.release()
                        return False
                    await pause(POLL_S)
            except Exception as exc:
                log.warning("eplb reconfigure: salvage sends of model=%s layer(s) %s failed "
                            "on leaving union rank %d: %s", name, list(batch),
                            self.union_reduce.rank, exc)
                return False
            staged.release()
        return True

    def _batches(self, old: npt.NDArray[np.int64],
                 new: npt.NDArray[np.int64]) -> list[tuple[int, ...]]:
        changed = [int(x) for x in np.flatnonzero((old != new).any(axis=1))]
        size = self.config.layers_per_transfer
        return [tuple(changed[i:i + size]) for i in range(0, len(changed), size)]

    async def _move(self, mover: WeightMover, reduce: AllReduce, name: str,
                    old: npt.NDArray[np.int64], new: npt.NDArray[np.int64],
                    batch: tuple[int, ...], point: str,
                    tag: int | None = None) -> tuple[bool, Any]:
        """Stage `batch`, wait for it locally, then a readiness round: all ready?"""
        deadline = time.monotonic() + self.config.peer_timeout_s
        staged, error = None, None
        try:
            if self.faults is not None:
                self.faults.inject(name, point, self.step, batch)
            self.moves += 1  # every rank stages the same batches in the same order
            staged = mover.stage(old, new, batch, self.drivers[name].model.expert_weights,
                                 tag=TAG_BASE + self.moves if tag is None else tag)
            while not staged.ready() and time.monotonic() < deadline:
                await pause(POLL_S)
            ready = staged.ready()
        except Exception as exc:  # reported through the round, so every rank learns it
            error, ready = exc, False
        flags = encode_flags(reduce.rank, reduce.world_size, ready=ready,
                             errored=error is not None, timed_out=not ready)
        try:
            values = await wait_round(reduce.launch(flags), self.config.peer_timeout_s)
        except Exception as exc:
            log.warning("eplb reconfigure: model=%s %s round for layer(s) %s failed on rank "
                        "%d at step %d: %s", name, point, list(batch), reduce.rank, self.step,
                        exc)
            return False, staged
        return RoundOutcome.decode(values, reduce.world_size).all_ready, staged

    # -- the end --------------------------------------------------------------------------

    def _report(self, plans: Mapping[str, ElasticPlan],
                lost: Mapping[str, Mapping[int, tuple[int, ...]]],
                salvaged: bool) -> Reconfigured:
        reload: dict[str, dict[int, tuple[int, ...]]] = {}
        for name, per_layer in lost.items():
            p2l = plans[name].placement.physical_to_logical
            reload[name] = {layer: tuple(int(s) for s in np.flatnonzero(
                np.isin(p2l[layer], experts))) for layer, experts in per_layer.items()}
        unavailable = self.unavailable if salvaged else ()
        notes = tuple(p.note for p in plans.values() if p.note)
        return Reconfigured(self.step, self.role, len(self.mapping), self.num_new,
                            tuple(int(m) for m in self.mapping), salvaged, unavailable,
                            {k: dict(v) for k, v in lost.items()}, reload, self.bytes, notes)

    def _resize(self, plans: Mapping[str, ElasticPlan],
                load: Mapping[str, npt.NDArray[np.int64]], passes: int) -> None:
        assert self.new is not None and self.groups.new_group is not None
        reduce, mover = self.new
        liveness = self.liveness = heartbeat_for(self.groups.new_group)
        for name, driver in self.drivers.items():
            placement = plans[name].placement
            if self.role == "stays":
                driver.model.resize_ep(self.groups.new_group, reduce.rank,  # type: ignore[attr-defined]
                                       reduce.world_size)
            carried = None
            if reduce.rank == 0:
                carried = np.zeros(placement.physical_to_logical.shape, dtype=np.int64)
                first = placement.logical_to_physical[:, :, 0]
                layers = np.arange(placement.num_layers)[:, None]
                carried[layers, first] = load[name]
            driver.config = self.new_config
            driver.resize(placement, allreduce=reduce, mover=mover, liveness=liveness,
                          carried=carried, carried_passes=passes)
        share_weights(mover, self.drivers, self.config)


def _salvage_batches(work: Reconfiguration, salvage: Mapping[str, Any]) -> list[
        tuple[str, tuple[int, ...], npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """The salvage's batches, in the one order every live union rank stages them."""
    out = []
    for name, (held, target, _) in salvage["maps"].items():
        for batch in work._batches(held, target):
            out.append((name, batch, held, target))
    return out


def _store() -> Any:
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()
