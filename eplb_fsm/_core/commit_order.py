"""The order in which a commit writes one layer's slots on one rank.

A commit writes every slot whose expert changes, from one of two places:

- a *staging row*: an expert received (or pulled) from a peer, written by
  ``fill`` steps;
- another of the rank's own *old* slots (a `LocalCopy`: an expert the rank
  already holds moves, or gains a replica), written by ``move`` steps
  straight from slot to slot.

Local moves used to be staged like received experts (copied into the
staging buffer during the transfer, then into their slot at commit). That
costs a second copy and staging memory, and on GPU it delayed every
transfer: a same-device copy queued on the transfer's side stream waits for
SMs that the serving kernels hold, so a stage under a GEMM stream finished
several GEMMs late (measured on H200s, docs/transfers.md). Done at commit,
on the serving stream, a move is one copy and delays nothing.

The price is ordering, because a move reads a slot that the same commit may
overwrite. The rules:

1. A slot is written only after every move that reads its old content has
   run (moves form chains: the last reader goes first).
2. Moves whose reads form a cycle (two slots trading experts, or a longer
   ring) are broken by a ``save`` of one slot of the cycle into a temp row;
   the move that would read that slot reads the temp row instead
   (``restore``). Every component of the move graph holds at most one cycle
   (each slot is written by at most one move), and a component is finished
   before the next cycle is broken, so one temp row serves the whole layer.
3. ``fill`` steps go last: they read no live slot, and a slot they overwrite
   may be the source of a move.

Pure and deterministic: the same plan gives the same steps on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .transfer_plan import RankPlan

__all__ = ["CommitStep", "commit_steps", "needs_temp"]


class CommitStep(NamedTuple):
    """One write of a commit.

    ``kind`` is ``"save"`` (temp row <- old `slot`), ``"move"`` (`slot` <- old
    `src`), ``"restore"`` (`slot` <- temp row) or ``"fill"`` (`slot` <- the
    staging row of `expert`). `src` is -1 where it does not apply.
    """

    kind: str
    slot: int
    src: int
    expert: int


def commit_steps(plan: RankPlan) -> tuple[CommitStep, ...]:
    """Every write of `plan`'s commit, in an order that reads no overwritten slot."""
    moves = {c.dst_slot: c for c in plan.local_copies}  # one writer per slot
    readers: dict[int, list[int]] = {}  # old slot -> dst slots of the moves reading it
    for c in plan.local_copies:
        readers.setdefault(c.src_slot, []).append(c.dst_slot)
    pending = {slot: len(dsts) for slot, dsts in readers.items()}
    from_temp: set[int] = set()
    remaining = set(moves)
    steps: list[CommitStep] = []
    # Ascending order, and a stack: deterministic, and chains run back to back.
    ready = sorted((dst for dst in moves if not pending.get(dst)), reverse=True)
    while remaining:
        while ready:
            dst = ready.pop()
            move = moves[dst]
            remaining.discard(dst)
            if dst in from_temp:
                steps.append(CommitStep("restore", dst, -1, move.expert))
                continue
            steps.append(CommitStep("move", dst, move.src_slot, move.expert))
            src = move.src_slot
            pending[src] -= 1
            if not pending[src] and src in remaining:
                ready.append(src)
        if remaining:
            # Nothing is ready: every remaining move waits for a reader that waits
            # too, and what is left is cycles (the trees hanging off them ran
            # first). Save the lowest slot; its remaining reader reads the copy.
            slot = min(remaining)
            steps.append(CommitStep("save", slot, -1, -1))
            for dst in readers[slot]:
                if dst in remaining:
                    from_temp.add(dst)
                    pending[slot] -= 1
            ready.append(slot)
    fills = sorted([(t.dst_slot, t.expert) for t in plan.receives]
                   + [(d.dst_slot, d.expert) for d in plan.duplicates])
    steps += [CommitStep("fill", slot, -1, expert) for slot, expert in fills]
    return tuple(steps)


def needs_temp(steps: Sequence[CommitStep]) -> bool:
    """Whether `steps` use the temp row (a cycle of moves)."""
    return any(step.kind == "save" for step in steps)
