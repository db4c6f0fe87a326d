"""Readiness rounds: what each rank contributes and what all ranks learn.

A round is one SUM all-reduce of ``1 + 4 * R`` int64 values:

    [ timed_out, errored[0..R-1], not_ready[0..R-1], step[0..R-1], epoch[0..R-1] ]

Rank r sets ``errored[r]`` if its local work raised, ``not_ready[r]`` if its
work is not complete, and ``timed_out`` if the phase has outlasted the
configured timeout on its clock. Every rank reads the same sums, so every
rank takes the same decision at the same step — and an error names the
ranks that were late or broken, not just how many.

Every round, the load round included, also carries each rank's step and
epoch (the header): steps are *agreed*, not assumed. A rank whose step
counter or failure count drifted from its peers' would commit a pass early
or late, routing tokens to slots whose weights are not there; instead the
round shows the mismatch to every rank at once, and all fail loudly,
naming the ranks and their steps.

A round that does not complete in time is *abandoned* through its register
(`_adapters.collectives`): every rank then fails on it at the same step with
the same words, including a rank that completes it long after.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass

import anyio
import numpy as np
import numpy.typing as npt

from .._adapters.interfaces import ReadinessRound

__all__ = [
    "Header",
    "PeerTimeout",
    "RoundOutcome",
    "deferred_cancellation",
    "encode_flags",
    "maps_digest",
    "maps_disagreement",
    "pause",
    "split_digests",
    "wait_round",
    "with_digest",
]

POLL_S = 0.0002


@dataclass(frozen=True)
class Header:
    """Each rank's step and epoch, as one round carried them (2 R values)."""

    steps: tuple[int, ...]
    epochs: tuple[int, ...]

    @staticmethod
    def encode(rank: int, world_size: int, step: int, epoch: int) -> npt.NDArray[np.int64]:
        values = np.zeros(2 * world_size, dtype=np.int64)
        values[rank] = step
        values[world_size + rank] = epoch
        return values

    @classmethod
    def decode(cls, values: npt.NDArray[np.int64], world_size: int) -> Header:
        return cls(tuple(int(v) for v in values[:world_size]),
                   tuple(int(v) for v in values[world_size:2 * world_size]))

    def disagreement(self) -> str | None:
        """None if every rank is at the same step and epoch, else what differs."""
        if len(set(self.steps)) == 1 and len(set(self.epochs)) == 1:
            return None
        what = []
        if len(set(self.steps)) > 1:
            what.append("steps " + ", ".join(f"rank {r}: {s}" for r, s in enumerate(self.steps)))
        if len(set(self.epochs)) > 1:
            what.append("epochs " + ", ".join(f"rank {r}: {e}"
                                              for r, e in enumerate(self.epochs)))
        return "ranks disagree on " + "; ".join(what)


def with_header(values: npt.NDArray[np.int64], rank: int, world_size: int, step: int,
                epoch: int) -> npt.NDArray[np.int64]:
    """`values` followed by this rank's header (see `Header`)."""
    return np.concatenate([np.asarray(values, dtype=np.int64).ravel(),
                           Header.encode(rank, world_size, step, epoch)])


def split_header(values: npt.NDArray[np.int64],
                 world_size: int) -> tuple[npt.NDArray[np.int64], Header]:
    cut = len(values) - 2 * world_size
    return values[:cut], Header.decode(values[cut:], world_size)


def maps_digest(physical_to_logical: npt.NDArray[np.int64]) -> int:
    """A 56-bit digest of a rank's maps (what its next transfer plan starts from)."""
    data = np.ascontiguousarray(physical_to_logical, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def with_digest(values: npt.NDArray[np.int64], rank: int, world_size: int,
                digest: int) -> npt.NDArray[np.int64]:
    """`values` followed by R slots, this rank's holding `digest` (a sum round
    then carries every rank's digest)."""
    slots = np.zeros(world_size, dtype=np.int64)
    slots[rank] = digest
    return np.concatenate([np.asarray(values, dtype=np.int64).ravel(), slots])


def split_digests(values: npt.NDArray[np.int64],
                  world_size: int) -> tuple[npt.NDArray[np.int64], tuple[int, ...]]:
    cut = len(values) - world_size
    return values[:cut], tuple(int(v) for v in values[cut:])


def maps_disagreement(digests: tuple[int, ...]) -> str | None:
    """None if every rank holds the same maps, else the ranks that differ from rank 0."""
    others = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if not others:
        return None
    return f"rank(s) {others} hold other maps than rank 0"


def encode_flags(rank: int, world_size: int, *, ready: bool, errored: bool,
                 timed_out: bool, step: int = 0, epoch: int = 0) -> npt.NDArray[np.int64]:
    values = np.zeros(1 + 2 * world_size, dtype=np.int64)
    values[0] = int(timed_out)
    values[1 + rank] = int(errored)
    values[1 + world_size + rank] = int(not ready)
    return with_header(values, rank, world_size, step, epoch)


@dataclass(frozen=True)
class RoundOutcome:
    timed_out: bool
    errored_ranks: tuple[int, ...]
    not_ready_ranks: tuple[int, ...]
    header: Header | None = None

    @classmethod
    def decode(cls, values: npt.NDArray[np.int64], world_size: int) -> RoundOutcome:
        errored = values[1:1 + world_size]
        not_ready = values[1 + world_size:1 + 2 * world_size]
        header = (Header.decode(values[1 + 2 * world_size:], world_size)
                  if len(values) >= 1 + 4 * world_size else None)
        return cls(bool(values[0] > 0), tuple(int(r) for r in np.flatnonzero(errored)),
                   tuple(int(r) for r in np.flatnonzero(not_ready)), header)

    @property
    def all_ready(self) -> bool:
        return not self.not_ready_ranks and not self.errored_ranks

    @property
    def failed(self) -> bool:
        return bool(self.errored_ranks) or (self.timed_out and bool(self.not_ready_ranks))


class PeerTimeout(TimeoutError):
    pass


# Cancellation that arrives while a step waits is held here until the step is done.
_deferred: ContextVar[list[BaseException] | None] = ContextVar("eplb_deferred", default=None)


class _Deferral:
    """The context manager `deferred_cancellation` returns (see there).

    A plain class with slots rather than ``@contextmanager``: every ``step()``
    enters one, idle or not, and the generator-based version costs more than
    the rest of an idle step together: 1.2 of 1.9 us in a warm loop and
    ~24 of ~33 us when the step runs cache-cold right after a forward pass
    (2-core AMD EPYC, Python 3.11); this one measured 0.5 and ~11 us, and
    the whole idle step 1.2 and ~30 us. contextlib's version
    builds a helper object (copying the function's docstring), a generator,
    and steps it twice through Python frames; this is two C calls.
    """

    __slots__ = ("_held", "_previous")

    def __init__(self) -> None:
        self._held: list[BaseException] = []
        self._previous: list[BaseException] | None = None

    def __enter__(self) -> list[BaseException]:
        self._previous = _deferred.get()
        _deferred.set(self._held)
        return self._held

    def __exit__(self, *exc_info: object) -> None:
        # set(), not reset(token): a step's work may end in another task's
        # context than it began in (EplbRuntime.step runs it up to its first
        # wait in the caller's), where a token from the first is refused.
        _deferred.set(self._previous)
        self._previous = None


def deferred_cancellation() -> _Deferral:
    """Hold cancellations raised inside `pause` until the block ends; the caller
    re-raises the first one::

        with deferred_cancellation() as cancelled:
            ...  # the step's agreed work
        if cancelled:
            raise cancelled[0]

    Why: a step's agreed work (read a round, commit a layer, launch the next
    transfer) must happen at that step on every rank. If a cancelled rank
    dropped it, it would act one step later than its peers and route one pass
    with different maps. So a step, once started, finishes — every wait in it
    is bounded by ``peer_timeout_s`` — and only then does the cancellation
    take effect. Works for plain ``task.cancel()`` (edge-triggered) and anyio
    cancel scopes (level-triggered; anyio's shielding does not cover the
    former, which is why this does not rely on it).
    """
    return _Deferral()


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        trio = sys.modules.get("trio")
        if trio is None:
            return False
        try:
            trio.lowlevel.current_task()
            return True
        except RuntimeError:
            return False


async def pause(seconds: float) -> None:
    """Sleep, yielding to the event loop; cancellation is deferred (see above).

    Outside any event loop it blocks instead: `EplbRuntime.step` does a step's
    agreed work when it is *called*, which synchronous code may do before it
    hands the awaitable to a loop (``loop.run_until_complete(rt.step())``).
    """
    if not _in_event_loop():
        time.sleep(seconds)
        return
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class() as exc:
        held = _deferred.get()
        if held is None:
            raise
        if not held:
            held.append(exc)
        # A cancelled anyio scope raises at every await from now on; wait
        # without the event loop so the poll keeps its pace.
        time.sleep(seconds)


async def wait_round(round_: ReadinessRound, timeout_s: float,
                     who: str = "") -> npt.NDArray[np.int64]:
    """The round's result, yielding to the event loop while it is not done.

    In the common case the round completed long ago and this returns at
    once. Otherwise it polls (other tasks keep running) until `timeout_s`,
    then gives the round up (`abandon`, where the transport supports it) and
    raises `PeerTimeout` with the verdict every rank will see: a peer that
    never answers cannot hang us. If the round was confirmed done elsewhere
    first, it waits one more `timeout_s` for it instead. `who` (e.g. "rank 2
    at step 40") opens the verdict.
    """
    if not round_.done():
        deadline = time.monotonic() + timeout_s
        extended = False
        while not round_.done():
            if time.monotonic() > deadline:
                verdict = _abandon(round_, who, timeout_s)
                if verdict is None and not extended:
                    extended, deadline = True, time.monotonic() + timeout_s
                    continue
                raise PeerTimeout(verdict or f"no answer from every peer within {timeout_s:g} s")
            await pause(POLL_S)
    return round_.result(timeout=timeout_s)


def _abandon(round_: ReadinessRound, who: str, timeout_s: float) -> str | None:
    """Give `round_` up; the verdict for every rank, or None if it completed elsewhere."""
    stragglers = getattr(round_, "stragglers", None)
    late = stragglers() if stragglers is not None else None
    why = f"no answer from every peer within {timeout_s:g} s ({who or 'a rank'} gave up"
    why += f"; rank(s) {list(late)} had not launched the round)" if late else ")"
    abandon = getattr(round_, "abandon", None)
    return abandon(why) if abandon is not None else why
