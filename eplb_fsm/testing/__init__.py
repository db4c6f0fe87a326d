"""Tools for testing code built on eplb_fsm (as `trio.testing` is for trio).

- `reference_rebalance`: DeepSeek's planner as plain loops, an oracle for
  differential tests of planning policies.
- `FakeCluster`: N in-process ranks, each a real `EplbRuntime` over fake
  transports; delay a rank's readiness, make it never ready or silence it,
  and assert on phases, histories and weights (`TaggedMoEModel`).
- `run_ranks`: run a function on N spawned processes in a gloo (or NCCL)
  group on a free port, bounded in time; `RankFailed` names the rank that
  raised, died or hung.
"""

from .._adapters.launch import RankFailed, free_port, run_ranks
from ._fake_cluster import FakeCluster, TaggedMoEModel
from ._reference import reference_rebalance

__all__ = [
    "FakeCluster",
    "RankFailed",
    "TaggedMoEModel",
    "free_port",
    "reference_rebalance",
    "run_ranks",
]
