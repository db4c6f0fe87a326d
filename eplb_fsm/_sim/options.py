"""What a simulated run is: `SimulateOptions`, and its JSON form for the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from .._reference.moe import MoEConfig
from .._reference.traces import LoadTrace, RecordedTrace, SyntheticTrace
from .._runtime.config import EplbConfig

__all__ = ["PRESETS", "Mode", "ScalePoint", "SimulateOptions", "options_dict"]

Mode = Literal["async", "sync", "off"]
# (step, global ranks that serve from the next pass on): one elastic scale event.
ScalePoint = tuple[int, tuple[int, ...]]


#: Named model shapes (`SimulateOptions` fields). The default model moves 24 KB
#: per slot, which hides what a transfer's bytes cost the serving thread;
#: "realistic" moves 6 MB per slot (hidden 512, intermediate 1024, float32:
#: ~160 MB per layer and rebalance on 2 ranks), where packing, sending or
#: committing on the serving thread would show in step() against a forward pass.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "realistic": {"layers": 4, "hidden": 512, "intermediate": 1024, "exact": False},
}


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
    cost_model: str | None = None  # a file `eplb-fsm calibrate` wrote; None: the H100 roofline

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


def options_dict(opts: SimulateOptions) -> dict[str, Any]:
    out = asdict(opts)
    out["shift_steps"] = list(opts.shift_steps)
    out["scale_at"] = [{"step": step, "ranks": list(ranks)} for step, ranks in opts.scale_at]
    return out
