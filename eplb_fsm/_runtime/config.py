"""`EplbConfig`: vLLM's EPLB settings, with their names and defaults, plus ours."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from .._core.arrays import MAX_ID

__all__ = ["EplbConfig"]

#: Upper bounds of the int fields, checked at construction so that a value no
#: process could allocate or count with is a ValueError naming the field, not a
#: TypeError or an allocator error at `add_model` (or an int64 that wraps later).
#: Each is far beyond any sane setting.
LIMITS: dict[str, tuple[int, str]] = {
    # The load window holds one [layers, slots] int64 entry per pass (per
    # load_record_interval passes) plus two int64s of bookkeeping per entry on the
    # host: 2**24 passes are days of serving, and their ring is already tens of GiB
    # for a real model. Torch cannot even express a ring of 2**62 entries.
    "window_size": (2**24, "the load window's ring must be allocatable"),
    "load_record_interval": (2**24, "the load view sums this many passes, like the window"),
    # Step numbers travel as int64 (readiness rounds); `step + interval` must not
    # wrap for any step a process can reach. 2**62 still means "never" in practice.
    "step_interval": (2**62, "step numbers are int64"),
    "log_balancedness_interval": (2**62, "step numbers are int64"),
    # A round launched at step s is read at s + lag, several times per layer: the
    # due steps of a whole rebalance must stay far inside int64.
    "readiness_lag": (2**31 - 1, "due steps (step + lag, per layer) are int64"),
    # Counts of ranks, nodes, groups, slots and layers: every id the runtime builds
    # from them must stay below the core's id limit (MAX_ID, 2**31).
    "num_nodes": (MAX_ID - 1, "rank and node ids are below 2**31"),
    "num_groups": (MAX_ID - 1, "group ids are below 2**31"),
    "ranks_per_node": (MAX_ID - 1, "rank ids are below 2**31"),
    "layers_per_transfer": (MAX_ID - 1, "layer ids are below 2**31"),
    "num_redundant_experts": (MAX_ID - 1, "physical slot ids are below 2**31"),
}


@dataclass(frozen=True)
class EplbConfig:
    """Settings of the balancer. The first seven are vLLM's ``EPLBConfig`` fields.

    Ours, and why they exist:

    - ``num_nodes`` / ``num_groups``: the hierarchical policy packs expert
      groups onto nodes; leave 1 for the global policy. ``num_groups=None``
      takes the model's ``num_expert_groups``.
    - ``readiness_lag``: a readiness all-reduce launched at step s is read at
      s + lag on every rank. Larger lags hide more latency and make fewer
      steps pay for a launch; each layer costs at least ``2 * lag`` steps.
    - ``layers_per_transfer``: layers staged and committed together. Larger
      batches move bigger messages (NCCL bandwidth grows with message size)
      but hold more staging memory.
    - ``min_balancedness_gain``: a plan whose predicted balancedness gain is
      below this is dropped and counted, and nothing moves.
    - ``peer_timeout_s``: how long a phase may wait for peers before the
      rebalance fails (agreed by all ranks through the readiness round).
    - ``on_failure``: ``"raise"`` raises `RebalanceFailed` from ``step()``;
      ``"absorb"`` logs it, counts it and carries on serving.
    - ``ranks_per_node``: lets the transfer prefer a same-node source.
    - ``minimize_moves``: relabel each plan's ranks and slots to keep experts
      where they are (same balancedness, far fewer bytes moved; see
      `eplb_fsm.plan`). On by default: a server wants the cheapest rebalance.
    - ``policy_options``: settings for the policy (e.g. ``{"tolerance": 0.01}``
      for ``incremental``), checked when the runtime is created.
    - ``load_record_interval``: passes the model's load view accumulates before
      the window records them (a device copy and a zero: two kernel launches,
      ~20 us on the serving thread on an H100). ``None`` picks 1 on CPU and 8
      on CUDA, so most GPU steps launch nothing. The window still spans
      ``window_size`` passes; it is flushed before every map change and every
      plan, so no pass is attributed to the wrong placement. The price: a dummy
      pass inside a partly filled interval is counted with its real neighbours
      (a dummy pass carries a token or two); with 1, dummy passes are dropped
      exactly.
    - ``transfer_path``: how weights move between a pair of ranks. ``"auto"``
      pulls within a node (the receiver copies from the sender's live
      weights through CUDA IPC / shared memory: copy engines, no SMs, so the
      serving GEMMs slow down far less than under NCCL) and uses NCCL across
      nodes, falling back to NCCL where it cannot pull; ``"nccl"`` always
      sends; ``"pull"`` pulls every pair and fails where it cannot. See
      docs/transfers.md.
    - ``handover_timeout_s``: how long the ranks of an elastic reconfiguration
      wait for every rank of the union to arrive (a joining rank may first
      build its model) before the reconfiguration fails, naming the ranks
      that never came. Per-phase waits (``peer_timeout_s``) count from then,
      so a slow joiner delays the handover instead of making a live rank give
      up. A rank whose heartbeat stopped is not waited for.
    """

    window_size: int = 1000
    step_interval: int = 3000
    num_redundant_experts: int = 0
    log_balancedness: bool = False
    log_balancedness_interval: int = 1
    use_async: bool = True
    policy: str = "default"
    num_nodes: int = 1
    num_groups: int | None = None
    readiness_lag: int = 2
    layers_per_transfer: int = 1
    min_balancedness_gain: float = 0.0
    peer_timeout_s: float = 60.0
    on_failure: Literal["raise", "absorb"] = "raise"
    ranks_per_node: int | None = None
    minimize_moves: bool = True
    policy_options: Mapping[str, Any] | None = None
    load_record_interval: int | None = None
    transfer_path: Literal["auto", "nccl", "pull"] = "auto"
    handover_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        positive = ("window_size", "step_interval", "log_balancedness_interval",
                    "num_nodes", "readiness_lag", "layers_per_transfer")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EplbConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_groups", "ranks_per_node", "load_record_interval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(
                    f"EplbConfig.{name} must be a positive int or None, got {value!r}")
        if (isinstance(self.num_redundant_experts, bool)
                or not isinstance(self.num_redundant_experts, int)
                or self.num_redundant_experts < 0):
            raise ValueError("EplbConfig.num_redundant_experts must be an int >= 0, got "
                             f"{self.num_redundant_experts!r}")
        for name, (limit, why) in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"EplbConfig.{name}={value} is too large: the limit is "
                                 f"{limit} ({why})")
        if self.policy_options is not None and not isinstance(self.policy_options, Mapping):
            raise ValueError("EplbConfig.policy_options must be a mapping or None, got "
                             f"{type(self.policy_options).__name__}")
        for name in ("log_balancedness", "use_async", "minimize_moves"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EplbConfig.{name} must be a bool")
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"EplbConfig.policy must be a policy name, got {self.policy!r}")
        gain = self.min_balancedness_gain
        if not isinstance(gain, (int, float)) or isinstance(gain, bool) or not (-1 <= gain <= 1):
            raise ValueError(f"EplbConfig.min_balancedness_gain must be a number in [-1, 1], "
                             f"got {gain!r}")
        timeout = self.peer_timeout_s
        # A bound the waits can express (datetime.timedelta in the gloo adapter):
        # a day is far beyond any sane wait for a peer.
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or not 0 < timeout <= 86_400:
            raise ValueError(f"EplbConfig.peer_timeout_s must be > 0 and <= 86400 s, got "
                             f"{timeout!r}")
        handover = self.handover_timeout_s
        if not isinstance(handover, (int, float)) or isinstance(handover, bool) \
                or not 0 < handover <= 86_400:
            raise ValueError(f"EplbConfig.handover_timeout_s must be > 0 and <= 86400 s, got "
                             f"{handover!r}")
        if self.transfer_path not in ("auto", "nccl", "pull"):
            raise ValueError(f"EplbConfig.transfer_path must be 'auto', 'nccl' or 'pull', got "
                             f"{self.transfer_path!r}")
        if self.on_failure not in ("raise", "absorb"):
            raise ValueError(f"EplbConfig.on_failure must be 'raise' or 'absorb', got "
                             f"{self.on_failure!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
