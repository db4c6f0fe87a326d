"""Which channel each (sender, receiver) pair uses: a pull or a network message.

Two channels move an expert from rank ``src`` to rank ``dst``:

- **send/recv** (NCCL on GPU, gloo on CPU): ``src`` packs, ``dst`` receives.
  Works between any two ranks, but NCCL's kernels occupy SMs: measured on 4
  H200s, a send/recv ring slowed a concurrent bf16 GEMM stream by 27-40%.
- **pull**: ``dst`` copies the expert straight out of ``src``'s *live*
  weights, mapped into its address space (CUDA IPC, or shared memory on
  CPU); ``src`` does nothing. Copy engines, not SMs: ~393 GB/s per rank and a
  5-9% GEMM slowdown on the same H200s. Only possible within one node, and
  only where ``dst`` could map ``src``'s weights.

Both ends of a pair must agree on the channel, or ``src`` packs and sends a
message nobody receives (or ``dst`` waits for one nobody sends). So the
decision is a pure function of facts every rank holds identically after the
handle-sharing collective: the mode, which node each rank is on, and the
matrix of which receiver could map which sender. This module is that
function; `_adapters.pull` gathers the facts.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["PATHS", "ChannelMap", "TransferPath", "check_path", "decide_channels"]

TransferPath = Literal["auto", "nccl", "pull"]
PATHS: tuple[str, ...] = ("auto", "nccl", "pull")


def check_path(path: object, name: str = "path") -> TransferPath:
    """`path` if it is one of `PATHS`, else a ValueError naming `name`."""
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"{name} must be one of 'auto', 'nccl', 'pull', got {path!r}")
    return path  # type: ignore[return-value]


@dataclass(frozen=True)
class ChannelMap:
    """The agreed channel of every ordered pair of ranks.

    ``pulls`` holds the (src, dst) pairs where ``dst`` pulls from ``src``;
    every other pair with transfers uses send/recv. ``fallbacks`` lists, for
    the log, the pairs that ``auto`` could not pull and why.
    """

    num_ranks: int
    pulls: frozenset[tuple[int, int]]
    fallbacks: tuple[tuple[int, int, str], ...] = ()

    def pulled_from(self, rank: int) -> frozenset[int]:
        """Senders `rank` pulls from (it posts no receive for them)."""
        return frozenset(src for src, dst in self.pulls if dst == rank)

    def pulled_by(self, rank: int) -> frozenset[int]:
        """Receivers that pull from `rank` (it packs and sends nothing to them)."""
        return frozenset(dst for src, dst in self.pulls if src == rank)

    @classmethod
    def network_only(cls, num_ranks: int) -> ChannelMap:
        return cls(num_ranks, frozenset())


def decide_channels(mode: str, nodes: Sequence[Hashable],
                    pullable: Sequence[Sequence[bool]]) -> ChannelMap:
    """The channel of every pair for `mode`, given `nodes[r]` (any key that is
    equal for ranks on one node) and `pullable[dst][src]` (``dst`` mapped
    ``src``'s weights).

    - ``"nccl"``: no pulls.
    - ``"auto"``: pull exactly where the pair shares a node and is pullable;
      every other pair is listed in `fallbacks` with its reason.
    - ``"pull"``: every pair must be pullable on one node; otherwise a
      ValueError lists the pairs that are not, and why.
    """
    mode = check_path(mode, "mode")
    num_ranks = len(nodes)
    if num_ranks < 1:
        raise ValueError("nodes must name the node of at least one rank")
    if len(pullable) != num_ranks or any(len(row) != num_ranks for row in pullable):
        raise ValueError(f"pullable must be a {num_ranks}x{num_ranks} matrix "
                         f"(pullable[dst][src]), one row per rank of nodes")
    if mode == "nccl":
        return ChannelMap.network_only(num_ranks)
    pulls: set[tuple[int, int]] = set()
    refused: list[tuple[int, int, str]] = []
    for dst in range(num_ranks):
        for src in range(num_ranks):
            if src == dst:
                continue
            if nodes[src] != nodes[dst]:
                refused.append((src, dst, "different nodes"))
            elif not pullable[dst][src]:
                refused.append((src, dst, f"rank {dst} could not map rank {src}'s weights"))
            else:
                pulls.add((src, dst))
    if mode == "pull" and refused:
        shown = "; ".join(f"{s}->{d}: {why}" for s, d, why in refused[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        raise ValueError(f"transfer_path='pull' but {len(refused)} pair(s) cannot pull: "
                         f"{shown}{more}; use 'auto' to fall back to send/recv there")
    return ChannelMap(num_ranks, frozenset(pulls), tuple(refused))
