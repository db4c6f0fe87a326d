"""Tools for testing code built on eplb_fsm (as `trio.testing` is for trio).

- `reference_rebalance`: DeepSeek's planner as plain loops, an oracle for
  differential tests of planning policies.
"""

from ._reference import reference_rebalance

__all__ = ["reference_rebalance"]
