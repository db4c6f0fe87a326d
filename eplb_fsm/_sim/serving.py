"""One rank's serving state and records, shared by the loop and the scale events.

`Serving` is what a rank serves with during one span between scale events;
`Records` is what it saw over all of them; `serve_pass` is one forward pass
with its checks, records and ``await rt.step()``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .._core.balance import balancedness_per_layer, rank_load_from_physical
from .._core.placement import Placement
from .._reference.moe import (
    FAST_ATOL,
    FAST_RTOL,
    DenseMoE,
    ReferenceMoE,
    route_to_slots,
    sample_tokens,
)
from .._reference.traces import LoadTrace
from .._runtime.runtime import EplbRuntime
from .moe_time import cost_model_for, pass_moe_us
from .options import SimulateOptions

__all__ = ["Records", "Serving", "runtime_stats", "serve_pass"]


def _pass_slot_load(load_view: torch.Tensor, initial: torch.Tensor,
                    group: Any) -> tuple[np.ndarray, np.ndarray]:
    """[L, P] tokens each slot received this pass, and would have received under the
    initial layout, from every rank of the EP group (one all-reduce)."""
    total = torch.stack([load_view.detach(), initial])
    dist.all_reduce(total, group=group)
    serving, baseline = total.cpu().numpy()
    return serving, baseline


@functools.lru_cache(maxsize=8)
def _initial_maps(layers: int, experts: int, physical: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    maps = Placement.initial(layers, experts, physical).to_torch(device)
    return maps.logical_to_physical, maps.replica_count


def _initial_slot_load(model: ReferenceMoE, routing: Any, device: torch.device) -> torch.Tensor:
    """[L, P] this rank's assignments per slot had the initial layout (what ``--mode off``
    serves) routed this pass: the model's own replica rule, on the same routing."""
    l2p, counts = _initial_maps(model.num_moe_layers, model.num_logical_experts,
                                model.num_physical_experts, device)
    return torch.stack([
        torch.bincount(route_to_slots(torch.as_tensor(routing[layer], device=device).long(),
                                      l2p[layer], counts[layer], model.rank, layer),
                       minlength=model.num_physical_experts)
        for layer in range(model.num_moe_layers)])


def _same(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> bool:
    """Bit-identical in exact mode; within the stated tolerance in fast mode."""
    if exact:
        return bool(torch.equal(out, ref))
    return bool(torch.allclose(out.float(), ref.float(), rtol=FAST_RTOL, atol=FAST_ATOL))


def runtime_stats(runtime: EplbRuntime) -> dict[str, Any]:
    return dict(runtime.stats()["models"]["main"])


def _stats_delta(now: dict[str, Any], start: dict[str, Any] | None) -> dict[str, Any]:
    """The counters a span of serving added: a staying rank's runtime outlives a scale
    event, so each span between events reports only its own rebalances and times."""
    def minus(key: str) -> dict[str, Any]:
        base = start[key] if start is not None else {}
        return {k: v - base.get(k, 0) for k, v in now[key].items()}

    return {"rebalances": minus("rebalances"),
            "bytes_moved": now["bytes_moved"] - (start["bytes_moved"] if start else 0),
            "steps_in_state": minus("steps_in_state"),
            "seconds_in_state": minus("seconds_in_state")}


@dataclass
class Serving:
    """What a rank serves with while it is in the EP group (one span between scale events).

    `group` is the EP group of the model and the load all-reduce (None: the
    world, the run without scale events); `since` is the step the span began
    after (0 at the start), and `stats_at_start` the runtime's counters then.
    """

    model: ReferenceMoE
    runtime: EplbRuntime
    dense: DenseMoE | None
    group: Any
    ranks: tuple[int, ...]
    since: int = 0
    stats_at_start: dict[str, Any] | None = None
    committed_before: int = 0
    check_next: bool = False

    @classmethod
    def start(cls, opts: SimulateOptions, device: torch.device, ranks: tuple[int, ...],
              group: Any = None, cpu_group: Any = None) -> Serving:
        """The initial span: weights from the seed, a fresh runtime."""
        model = ReferenceMoE(opts.moe_config(), opts.physical, group=group, device=device)
        runtime = EplbRuntime(opts.eplb_config(), group=group, cpu_group=cpu_group,
                              device=device)
        runtime.add_model(model, "main")
        return cls(model, runtime, model.dense_reference() if opts.check_every else None,
                   group, ranks)

    def next_span(self, since: int, ranks: tuple[int, ...], group: Any,
                  stats_at_start: dict[str, Any] | None) -> None:
        """After a scale event: serve over `group` and check the very next pass."""
        self.since, self.ranks, self.group = since, ranks, group
        self.stats_at_start = stats_at_start
        self.committed_before = _committed(self.runtime)
        self.check_next = True


def _committed(runtime: EplbRuntime) -> int:
    return sum(1 for r in runtime.history() if r.dest == "committing")


@dataclass
class Records:
    """What one process saw, over every span it served (merged by `report.build_report`)."""

    balancedness: dict[int, float] = field(default_factory=dict)
    # step -> modelled MoE time, us: (the placement serving, the initial layout)
    moe_us: dict[int, tuple[float, float]] = field(default_factory=dict)
    overhead_us: list[float] = field(default_factory=list)
    forward_us: list[float] = field(default_factory=list)
    phases: dict[int, str] = field(default_factory=dict)
    check_steps: list[int] = field(default_factory=list)
    failed_checks: list[int] = field(default_factory=list)
    first_load: np.ndarray | None = None
    last_load: np.ndarray | None = None
    last_since: int = -1
    segments: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    missed: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None

    def close_span(self, serving: Serving, until: int) -> dict[str, Any]:
        """Record the span's counters; returns the runtime's counters now."""
        now = runtime_stats(serving.runtime)
        self.segments.append({"since": serving.since, "until": until,
                              "ranks": list(serving.ranks),
                              "stats": _stats_delta(now, serving.stats_at_start)})
        return now


async def serve_pass(opts: SimulateOptions, serving: Serving, rec: Records, rank: int,
                      step: int, trace: LoadTrace, device: torch.device) -> None:
    """One forward pass, its checks and records, then ``await rt.step()``."""
    config = serving.model.config
    hidden = sample_tokens(config, opts.tokens, step=step, rank=rank).to(device)
    routing = trace.routing(step, rank, opts.tokens, opts.top_k)
    start = time.perf_counter()
    out = serving.model(hidden, routing)
    rec.forward_us.append((time.perf_counter() - start) * 1e6)
    committed = _committed(serving.runtime)
    if serving.dense is not None and (step % opts.check_every == 0 or serving.check_next
                                      or committed != serving.committed_before):
        rec.check_steps.append(step)
        if not _same(out, serving.dense(hidden, routing), opts.exact):
            rec.failed_checks.append(step)
        serving.committed_before, serving.check_next = committed, False
    num_ranks = len(serving.ranks)
    slot_load, initial_load = _pass_slot_load(
        serving.model.expert_load_view, _initial_slot_load(serving.model, routing, device),
        serving.group)
    rank_load = rank_load_from_physical(slot_load, num_ranks)
    rec.balancedness[step] = float(balancedness_per_layer(rank_load).mean())
    cost = cost_model_for(opts.cost_model)
    rec.moe_us[step] = (pass_moe_us(cost, slot_load, num_ranks),
                        pass_moe_us(cost, initial_load, num_ranks))
    window = min(opts.window_size, opts.steps)
    if step <= window and serving.since == 0:  # the first window, under the initial rank set
        rec.first_load = rank_load if rec.first_load is None else rec.first_load + rank_load
    if step > opts.steps - window:  # the last window, since the last scale event in it
        if rec.last_since != serving.since or rec.last_load is None:
            rec.last_load, rec.last_since = np.zeros_like(rank_load), serving.since
        rec.last_load = rec.last_load + rank_load
    start = time.perf_counter()
    await serving.runtime.step()
    rec.overhead_us.append((time.perf_counter() - start) * 1e6)
    rec.phases[step] = serving.runtime.phase()
