"""The serving-like loop behind ``eplb-fsm simulate``, one call per rank.

Each rank runs the reference EP MoE model on its own tokens, routed by a
load trace, calls ``await rt.step()`` after every forward pass, and records
what a user wants to see: actual balancedness of every pass (the global
per-slot load, all-reduced), `step()` overhead, forward time, lifecycle
states, and whether the outputs still equal a dense single-process
evaluation of the same weights (checked every ``check_every`` steps and on
the first pass after every commit).

`run_rank` is the whole per-rank program: spawned by `run_ranks` (the
default), or called directly under ``torchrun``.
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
from .moe import FAST_ATOL, FAST_RTOL, MoEConfig, ReferenceMoE, sample_tokens
from .traces import LoadTrace, RecordedTrace, SyntheticTrace

__all__ = ["SimulateOptions", "run_rank"]

Mode = Literal["async", "sync", "off"]


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

    @property
    def physical(self) -> int:
        return self.experts + self.redundant

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


def _pass_rank_load(load_view: torch.Tensor, world: int) -> np.ndarray:
    """[L, R] tokens each rank's slots received this pass, from every rank."""
    total = load_view.detach().clone()
    dist.all_reduce(total)
    return rank_load_from_physical(total.cpu().numpy(), world)


def _same(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> bool:
    """Bit-identical in exact mode; within the stated tolerance in fast mode."""
    if exact:
        return bool(torch.equal(out, ref))
    return bool(torch.allclose(out.float(), ref.float(), rtol=FAST_RTOL, atol=FAST_ATOL))


async def _serve(opts: SimulateOptions, rank: int, world: int) -> dict[str, Any]:
    device = torch.device(opts.device if opts.device != "cuda" else
                          f"cuda:{torch.cuda.current_device()}")
    config = opts.moe_config()
    model = ReferenceMoE(config, opts.physical, device=device)
    runtime = EplbRuntime(opts.eplb_config(), device=device)
    runtime.add_model(model, "main")
    dense = model.dense_reference() if opts.check_every else None  # 0: no checks
    trace = opts.trace()
    bar = None
    if opts.progress and rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=opts.steps, desc=f"simulate ({opts.mode})", unit="step",
                       file=sys.stderr, disable=not sys.stderr.isatty())
        except ImportError:  # the progress extra is optional
            bar = None
    balancedness, overhead_us, forward_us, phases = [], [], [], []
    window = min(opts.window_size, opts.steps)
    first_load = np.zeros((opts.layers, world))
    last_load = np.zeros((opts.layers, world))
    checks, held, committed_before = 0, True, 0
    for step in range(1, opts.steps + 1):
        hidden = sample_tokens(config, opts.tokens, step=step, rank=rank).to(device)
        routing = trace.routing(step, rank, opts.tokens, opts.top_k)
        start = time.perf_counter()
        out = model(hidden, routing)
        forward_us.append((time.perf_counter() - start) * 1e6)
        history = runtime.history()
        committed = sum(1 for r in history if r.dest == "committing")
        if dense is not None and (step % opts.check_every == 0
                                  or committed != committed_before):
            checks += 1
            held = held and _same(out, dense(hidden, routing), opts.exact)
            committed_before = committed
        rank_load = _pass_rank_load(model.expert_load_view, world)
        balancedness.append(float(balancedness_per_layer(rank_load).mean()))
        if step <= window:
            first_load += rank_load
        if step > opts.steps - window:
            last_load += rank_load
        start = time.perf_counter()
        await runtime.step()
        overhead_us.append((time.perf_counter() - start) * 1e6)
        phases.append(runtime.phase())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    stats = runtime.stats()["models"]["main"]
    runtime.close()
    return {
        "rank": rank,
        "balancedness": balancedness,
        "step_overhead_us": overhead_us,
        "forward_us": forward_us,
        "phases": phases,
        "invariance_checks": checks,
        "invariance_held": held,
        "stats": stats,
        "history": [tuple(r) for r in runtime.history()],
        "placement": runtime.placement().physical_to_logical.tolist(),
        "rank_load_first_window": first_load.tolist(),
        "rank_load_last_window": last_load.tolist(),
    }


def run_rank(rank: int, world: int, opts: SimulateOptions) -> dict[str, Any]:
    """The per-rank program (torch.distributed already initialised)."""
    torch.set_num_threads(1)
    return asyncio.run(_serve(opts, rank, world))


def options_dict(opts: SimulateOptions) -> dict[str, Any]:
    out = asdict(opts)
    out["shift_steps"] = list(opts.shift_steps)
    return out
