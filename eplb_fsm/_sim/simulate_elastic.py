"""Scale events of ``eplb-fsm simulate --scale-at STEP:RANKS``: elastic EP on live ranks.

The run starts as many processes as its largest rank set needs; processes
outside the serving set idle. Why a *signal* every process receives: a scale
needs every process of the world at once (`ElasticGroups.create` is
world-collective, see its module docstring), but an idle process serves no
passes, so it cannot know when the serving ranks are ready. And they are not
always ready at the requested step: `reconfigure` refuses while a rebalance
is in flight. So from the requested step on, after each pass, the lowest
serving rank broadcasts one of three codes over a gloo group of the whole
world, and every process acts on the same code:

- ``GO``: no rebalance in flight (`EplbRuntime.busy` is the same on every
  serving rank at the same step): scale now. Every process creates the
  groups; old ranks `reconfigure`, joining ranks `join` with a model built
  without loading weights (the transfer fills them), leaving ranks stop
  serving and idle, in case a later event brings them back.
- ``WAIT``: a rebalance is in flight; ask again after the next pass.
- ``END``: the last pass is served; events not reached are reported as
  missed, and idle processes finish.

Every process tracks the serving set alike (it follows from the codes), so
all agree on the broadcast's source. After each event, every new rank
records what a test wants to assert: slots whose weights are not their
mapped expert's (against the seed), the fewest replicas of any expert, its
history and placement (to compare across ranks), and the bytes it received.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .._adapters.elastic_groups import ElasticGroups
from .._reference.moe import ReferenceMoE, expert_weights_for
from .._runtime.elastic import ExpertsLost, Reconfigured
from .._runtime.runtime import EplbRuntime
from .options import SimulateOptions
from .serving import Records, Serving

__all__ = ["Scaler", "wrong_slots"]

WAIT, GO, END = 0, 1, 2


def wrong_slots(model: ReferenceMoE, physical_to_logical: np.ndarray) -> int:
    """This rank's (layer, slot) pairs whose weights differ from their mapped expert's.

    The truth is regenerated from the seed here, for checking only: the model
    on a joining rank never loaded it (its slots started as NaN, which never
    compares equal).
    """
    wrong = 0
    for layer, (gate_up, down) in enumerate(model.expert_weights):
        for local, slot in enumerate(model.local_slots):
            expert = int(physical_to_logical[layer, slot])
            if expert < 0:
                continue
            w_gate_up, w_down = expert_weights_for(model.config, layer, expert, model.device)
            if not (torch.equal(gate_up[local], w_gate_up) and torch.equal(down[local], w_down)):
                wrong += 1
    return wrong


class Scaler:
    """One process's part in the run's scale events (every process of the world has one).

    Construct it on every process in the same order as every other group: it
    creates the initial EP groups and the signal group collectively.
    """

    def __init__(self, opts: SimulateOptions, rank: int, device: torch.device,
                 rec: Records) -> None:
        self.opts, self.rank, self.device, self.rec = opts, rank, device, rec
        self.active: tuple[int, ...] = tuple(range(opts.ranks))
        self.pending = 0
        # Every process creates every group, members or not (torch's rule for new_group).
        self.signal_group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
        self.initial_groups = (dist.new_group(list(self.active)),
                               dist.new_group(list(self.active), backend="gloo"))

    def start(self) -> Serving | None:
        """The initial span on the first ``ranks`` processes; None on a spare."""
        if self.rank not in self.active:
            return None
        group, cpu_group = self.initial_groups
        return Serving.start(self.opts, self.device, self.active, group, cpu_group)

    # -- the signal -----------------------------------------------------------------------

    def _signal(self, code: int, step: int) -> tuple[int, int]:
        """Broadcast (code, step) from the lowest serving rank to every process."""
        message = torch.tensor([code, step], dtype=torch.int64)
        dist.broadcast(message, src=min(self.active), group=self.signal_group)
        return int(message[0]), int(message[1])

    async def sync_point(self, serving: Serving | None,
                         step: int | None) -> tuple[Serving | None, int]:
        """Run every scale event due now; every process calls it, serving or idle.

        A serving process calls it after each pass with the step just served;
        an idle one with (None, None), and it returns once the process serves
        again. Returns (serving or None, step); None means this process is done
        (no event left that could bring it back).
        """
        now = step if step is not None else 0
        while self.pending < len(self.opts.scale_at):
            requested = self.opts.scale_at[self.pending][0]
            code = WAIT
            if serving is not None:
                last = now >= self.opts.steps
                if now < requested and not last:
                    return serving, now  # not due: no signal, nobody waits for one
                code = GO if now >= requested and not serving.runtime.busy else (
                    END if last else WAIT)
            code, now = self._signal(code, now)
            if code == WAIT:
                if serving is not None:
                    return serving, now
                continue
            if code == END:
                self.rec.missed = [{"requested_step": s, "ranks": list(r)}
                                   for s, r in self.opts.scale_at[self.pending:]]
                self.pending = len(self.opts.scale_at)
                break
            serving = await self._scale(serving, now)
        return serving, now

    # -- one event ------------------------------------------------------------------------

    async def _scale(self, serving: Serving | None, step: int) -> Serving | None:
        requested, new = self.opts.scale_at[self.pending]
        old = self.active
        groups = ElasticGroups.create(old, new)  # every process of the world
        role = groups.role(self.rank)
        self.active, self.pending = tuple(new), self.pending + 1
        if role == "idle":
            return None
        event: dict[str, Any] = {"requested_step": requested, "step": step,
                                 "old_ranks": list(old), "new_ranks": list(new), "role": role}
        began = time.perf_counter()
        if role == "joins":
            assert serving is None
            serving, report = await self._join(groups, step)
        else:
            assert serving is not None
            at_start = self.rec.close_span(serving, step)
            try:
                report = await serving.runtime.reconfigure(groups)
            except ExpertsLost as exc:  # recorded and reported; the summary shows it
                report = exc.report
            if role == "leaves":
                serving = None  # the runtime released (and closed) itself
            else:
                serving.next_span(step, tuple(new), groups.new_group, at_start)
        event.update(seconds=time.perf_counter() - began, **_outcome(report))
        if serving is not None:
            event.update(self._check(serving))
        self.rec.events.append(event)
        return serving

    async def _join(self, groups: ElasticGroups,
                    step: int) -> tuple[Serving, Reconfigured]:
        """A model with no weights loaded, filled by the transfer, and a joined runtime."""
        opts = self.opts
        physical = len(groups.new_ranks) * opts.slots_per_rank
        model = ReferenceMoE(opts.moe_config(), physical, group=groups.new_group,
                             device=self.device, load_weights=False)
        runtime = await EplbRuntime.join(opts.eplb_config(), groups, {"main": model},
                                         device=self.device)
        assert runtime.last_reconfiguration is not None
        serving = Serving(model, runtime, model.dense_reference() if opts.check_every else None,
                          groups.new_group, tuple(groups.new_ranks))
        serving.next_span(step, tuple(groups.new_ranks), groups.new_group, None)
        return serving, runtime.last_reconfiguration

    def _check(self, serving: Serving) -> dict[str, Any]:
        """What the event left on this new rank, for the report to compare across ranks."""
        placement = serving.runtime.placement()
        model = serving.model
        maps_agree = bool(
            np.array_equal(model.logical_to_physical_map.cpu().numpy(),
                           placement.logical_to_physical)
            and np.array_equal(model.logical_replica_count.cpu().numpy(),
                               placement.replica_count))
        return {"wrong_slots": wrong_slots(model, placement.physical_to_logical),
                "maps_agree": maps_agree,
                "min_replicas": int(placement.replica_count.min()),
                "history": [tuple(r) for r in serving.runtime.history()],
                "placement": placement.physical_to_logical.tolist(),
                "phase": serving.runtime.phase(),
                "step_count": serving.runtime.step_count}


def _outcome(report: Reconfigured) -> dict[str, Any]:
    lost = report.lost.get("main", {})
    return {"bytes_received": int(report.bytes_received), "salvaged": bool(report.salvaged),
            "lost": {int(layer): [int(e) for e in experts] for layer, experts in lost.items()},
            "notes": list(report.notes)}
