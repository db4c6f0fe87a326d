"""The serving-like loop behind ``eplb-fsm simulate``, one call per rank.

Each rank runs the reference EP MoE model on its own tokens, routed by a
load trace, calls ``await rt.step()`` after every forward pass, and records
what a user wants to see: actual balancedness of every pass (the global
per-slot load, all-reduced), `step()` overhead, forward time, lifecycle
states, and whether the outputs still equal a dense single-process
evaluation of the same weights (checked every ``check_every`` steps and on
the first pass after every commit and every scale event).

`run_rank` is the whole per-rank program: spawned by `run_ranks` (the
default), or called directly under ``torchrun``. With ``scale_at`` the run
changes its rank set mid-way (elastic EP); `simulate_elastic` holds that part,
and this module's loop only asks it, after each pass, whether a scale is due.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from .._core.balance import balancedness_per_layer, rank_load_from_physical
from .._runtime.config import EplbConfig
from .._runtime.runtime import EplbRuntime
from .moe import FAST_ATOL, FAST_RTOL, DenseMoE, MoEConfig, ReferenceMoE, sample_tokens
from .traces import LoadTrace, RecordedTrace, SyntheticTrace

__all__ = ["Records", "Serving", "SimulateOptions", "run_rank"]

Mode = Literal["async", "sync", "off"]
# (step, global ranks that serve from the next pass on): one elastic scale event.
ScalePoint = tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class SimulateOptions:
    ranks: int = 4
    steps: int = 240
    mode: Mode = "async"
    layers: int = 8
    experts: int = 64
    redundant: int = 16
    top_k: int = 2
    tokens: int = 32
    hidden: int = 32
    intermediate: int = 64
    groups: int = 1
    nodes: int = 1
    policy: str = "default"
    window_size: int = 30
    step_interval: int = 60
    readiness_lag: int = 2
    exponent: float = 1.2
    drift: float = 0.002
    shift_steps: tuple[int, ...] = (130,)
    trace_file: str | None = None
    seed: int = 0
    check_every: int = 50
    backend: str = "gloo"
    device: str = "cpu"
    exact: bool = True
    dtype: str = "float32"
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    scale_at: tuple[ScalePoint, ...] = ()

    @property
    def physical(self) -> int:
        """Slots of the initial rank set (``ranks`` ranks)."""
        return self.experts + self.redundant

    @property
    def slots_per_rank(self) -> int:
        """Constant through scale events: the slot count follows the rank count."""
        return self.physical // self.ranks

    @property
    def world(self) -> int:
        """Processes to start: enough for every global rank any rank set names."""
        return max([self.ranks, *(max(ranks) + 1 for _, ranks in self.scale_at)])

    def eplb_config(self) -> EplbConfig:
        # "off" keeps the runtime (it counts load the same way) but never triggers.
        interval = self.step_interval if self.mode != "off" else 10**12
        return EplbConfig(window_size=self.window_size, step_interval=interval,
                          num_redundant_experts=self.redundant, use_async=self.mode == "async",
                          policy=self.policy, num_nodes=self.nodes, num_groups=self.groups,
                          readiness_lag=self.readiness_lag, **self.extra)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(num_layers=self.layers, num_logical_experts=self.experts,
                         hidden_size=self.hidden, intermediate_size=self.intermediate,
                         top_k=self.top_k, seed=self.seed, num_expert_groups=self.groups,
                         exact=self.exact, dtype=getattr(torch, self.dtype))

    def trace(self) -> LoadTrace:
        if self.trace_file is not None:
            return RecordedTrace.from_file(self.trace_file, seed=self.seed, wrap=True)
        return SyntheticTrace(self.layers, self.experts, exponent=self.exponent,
                              drift=self.drift, shift_steps=self.shift_steps, seed=self.seed)




def _pass_rank_load(load_view: torch.Tensor, num_ranks: int, group: Any) -> np.ndarray:
    """[L, R] tokens each rank's slots received this pass, from every rank of the EP group."""
    total = load_view.detach().clone()
    dist.all_reduce(total, group=group)
    return rank_load_from_physical(total.cpu().numpy(), num_ranks)


def _same(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> bool:
    """Bit-identical in exact mode; within the stated tolerance in fast mode."""
    if exact:
        return bool(torch.equal(out, ref))
    return bool(torch.allclose(out.float(), ref.float(), rtol=FAST_RTOL, atol=FAST_ATOL))


def _stats(runtime: EplbRuntime) -> dict[str, Any]:
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
        now = _stats(serving.runtime)
        self.segments.append({"since": serving.since, "until": until,
                              "ranks": list(serving.ranks),
                              "stats": _stats_delta(now, serving.stats_at_start)})
        return now


async def _serve_pass(opts: SimulateOptions, serving: Serving, rec: Records, rank: int,
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
    rank_load = _pass_rank_load(serving.model.expert_load_view, len(serving.ranks),
                                serving.group)
    rec.balancedness[step] = float(balancedness_per_layer(rank_load).mean())
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


def _progress(opts: SimulateOptions, rank: int) -> Any:
    if not (opts.progress and rank == 0):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the progress extra is optional
        return None
    return tqdm(total=opts.steps, desc=f"simulate ({opts.mode})", unit="step",
                file=sys.stderr, disable=not sys.stderr.isatty())


async def _serve(opts: SimulateOptions, rank: int, world: int) -> dict[str, Any]:
    device = torch.device(opts.device if opts.device != "cuda" else
                          f"cuda:{torch.cuda.current_device()}")
    trace = opts.trace()
    rec = Records()
    serving: Serving | None
    scaler = None
    if opts.scale_at:
        from .simulate_elastic import Scaler  # imports this module: import on use

        scaler = Scaler(opts, rank, device, rec)
        serving = scaler.start()
        step = 0
        if serving is None:  # a spare: idle until it joins (or the run ends)
            serving, step = await scaler.sync_point(None, None)
    else:
        serving, step = Serving.start(opts, device, tuple(range(world))), 0
    bar = _progress(opts, rank)
    while serving is not None and step < opts.steps:
        step += 1
        await _serve_pass(opts, serving, rec, rank, step, trace, device)
        if bar is not None:
            bar.update(1)
        if scaler is not None:
            serving, step = await scaler.sync_point(serving, step)
    if bar is not None:
        bar.close()
    if serving is not None:
        rec.close_span(serving, opts.steps)
        runtime = serving.runtime
        rec.final = {"stats": _stats(runtime), "history": [tuple(r) for r in runtime.history()],
                     "placement": runtime.placement().physical_to_logical.tolist()}
        runtime.close()
    return {
        "rank": rank,
        "balancedness": rec.balancedness,
        "step_overhead_us": rec.overhead_us,
        "forward_us": rec.forward_us,
        "phases": rec.phases,
        "check_steps": rec.check_steps,
        "failed_checks": rec.failed_checks,
        "segments": rec.segments,
        "final": rec.final,
        "scale_events": rec.events,
        "scale_missed": rec.missed,
        "rank_load_first_window": None if rec.first_load is None else rec.first_load.tolist(),
        "rank_load_last_window": None if rec.last_load is None else rec.last_load.tolist(),
    }


def run_rank(rank: int, world: int, opts: SimulateOptions) -> dict[str, Any]:
    """The per-rank program (torch.distributed already initialised)."""
    torch.set_num_threads(1)
    return asyncio.run(_serve(opts, rank, world))


def options_dict(opts: SimulateOptions) -> dict[str, Any]:
    out = asdict(opts)
    out["shift_steps"] = list(opts.shift_steps)
    out["scale_at"] = [{"step": step, "ranks": list(ranks)} for step, ranks in opts.scale_at]
    return out
