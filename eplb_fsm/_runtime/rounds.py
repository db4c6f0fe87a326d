"""Readiness rounds: what each rank contributes and what all ranks learn.

A round is one SUM all-reduce of ``1 + 2 * R`` int64 values:

    [ timed_out, errored[0..R-1], not_ready[0..R-1] ]

Rank r sets ``errored[r]`` if its local work raised, ``not_ready[r]`` if its
work is not complete, and ``timed_out`` if the phase has outlasted the
configured timeout on its clock. Every rank reads the same sums, so every
rank takes the same decision at the same step — and an error names the
ranks that were late or broken, not just how many.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from dataclasses import dataclass

import anyio
import numpy as np
import numpy.typing as npt

from .._adapters.interfaces import ReadinessRound

__all__ = [
    "PeerTimeout",
    "RoundOutcome",
    "deferred_cancellation",
    "encode_flags",
    "pause",
    "wait_round",
]

POLL_S = 0.0002


def encode_flags(rank: int, world_size: int, *, ready: bool, errored: bool,
                 timed_out: bool) -> npt.NDArray[np.int64]:
    values = np.zeros(1 + 2 * world_size, dtype=np.int64)
    values[0] = int(timed_out)
    values[1 + rank] = int(errored)
    values[1 + world_size + rank] = int(not ready)
    return values


@dataclass(frozen=True)
class RoundOutcome:
    timed_out: bool
    errored_ranks: tuple[int, ...]
    not_ready_ranks: tuple[int, ...]

    @classmethod
    def decode(cls, values: npt.NDArray[np.int64], world_size: int) -> RoundOutcome:
        errored = values[1:1 + world_size]
        not_ready = values[1 + world_size:1 + 2 * world_size]
        return cls(bool(values[0] > 0), tuple(int(r) for r in np.flatnonzero(errored)),
                   tuple(int(r) for r in np.flatnonzero(not_ready)))

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

    __slots__ = ("_held", "_token")

    def __init__(self) -> None:
        self._held: list[BaseException] = []
        self._token: Token[list[BaseException] | None] | None = None

    def __enter__(self) -> list[BaseException]:
        self._token = _deferred.set(self._held)
        return self._held

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None
        _deferred.reset(self._token)
        self._token = None


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


async def pause(seconds: float) -> None:
    """Sleep, yielding to the event loop; cancellation is deferred (see above)."""
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


async def wait_round(round_: ReadinessRound, timeout_s: float) -> npt.NDArray[np.int64]:
    """The round's result, yielding to the event loop while it is not done.

    In the common case the round completed long ago and this returns at
    once. Otherwise it polls (other tasks keep running) until `timeout_s`,
    then raises `PeerTimeout`: a peer that never answers cannot hang us.
    """
    if not round_.done():
        deadline = time.monotonic() + timeout_s
        while not round_.done():
            if time.monotonic() > deadline:
                raise PeerTimeout(f"no answer from every peer within {timeout_s:g} s")
            await pause(POLL_S)
    return round_.result(timeout=timeout_s)
