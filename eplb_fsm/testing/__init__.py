"""Tools for testing code built on eplb_fsm (as `trio.testing` is for trio).

- `reference_rebalance`: DeepSeek's planner as plain loops, an oracle for
  differential tests of planning policies.
- `FakeCluster`: N in-process ranks, each a real `EplbRuntime` over fake
  transports; delay a rank's readiness, make it never ready or silence it,
  and assert on phases, histories and weights (`TaggedMoEModel`).
- `Faults` / `inject_faults`: late or missing readiness, errors or deaths at
  the planning, staging and commit points, for fake or real runtimes.
- `run_ranks`: run a function on N spawned processes in a gloo (or NCCL)
  group on a free port, bounded in time; `RankFailed` names the rank that
  raised, died or hung.
"""

from .._adapters.launch import RankFailed, free_port, run_ranks
from ._fake_cluster import FakeCluster, TaggedMoEModel
from ._faults import Faults, inject_faults
from ._reference import reference_rebalance

__all__ = [
    "FakeCluster",
    "Faults",
    "RankFailed",
    "TaggedMoEModel",
    "free_port",
    "inject_faults",
    "reference_rebalance",
    "run_ranks",
]
