"""Readiness rounds' header and the abandoning wait, without processes: a fake round
stands in for a collective whose register says who gave up first."""

from __future__ import annotations

import numpy as np
import pytest

from eplb_fsm._runtime.rounds import (
    Header,
    PeerTimeout,
    RoundOutcome,
    encode_flags,
    split_header,
    wait_round,
    with_header,
)


def _summed(*parts: np.ndarray) -> np.ndarray:
    return np.sum(np.stack(parts), axis=0)


def test_every_rank_sees_every_rank_step_and_a_drift_is_named() -> None:
    ok = _summed(*(encode_flags(r, 3, ready=True, errored=False, timed_out=False, step=40,
                                epoch=1) for r in range(3)))
    outcome = RoundOutcome.decode(ok, 3)
    assert outcome.all_ready and outcome.header == Header((40, 40, 40), (1, 1, 1))
    assert outcome.header.disagreement() is None
    drift = _summed(*(encode_flags(r, 3, ready=True, errored=False, timed_out=False,
                                   step=40 if r != 1 else 39) for r in range(3)))
    header = RoundOutcome.decode(drift, 3).header
    assert header is not None
    assert header.disagreement() == "ranks disagree on steps rank 0: 40, rank 1: 39, rank 2: 40"


def test_the_load_round_carries_the_header_after_its_payload() -> None:
    load = np.arange(6)
    summed = _summed(with_header(load, 0, 2, 7, 0), with_header(load, 1, 2, 7, 0))
    payload, header = split_header(summed, 2)
    assert payload.tolist() == (2 * load).tolist() and header.steps == (7, 7)


class _Round:
    """A round that never completes here; its register answers `verdict`."""

    def __init__(self, verdict: str | None, late: tuple[int, ...] = ()) -> None:
        self.verdict, self.late, self.abandoned_with = verdict, late, ""
        self.abandons = 0

    def done(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> np.ndarray:
        raise AssertionError("never read")

    def stragglers(self) -> tuple[int, ...]:
        return self.late

    def abandon(self, why: str) -> str | None:
        self.abandoned_with = why
        self.abandons += 1
        return self.verdict if self.verdict is not None else None


@pytest.mark.asyncio
async def test_giving_up_names_the_late_ranks_and_raises_the_registers_verdict() -> None:
    round_ = _Round("the first rank's words", late=(2,))
    with pytest.raises(PeerTimeout, match="the first rank's words"):
        await wait_round(round_, 0.01, "rank 0 (model 'main', step 52)")
    assert "rank 0 (model 'main', step 52) gave up" in round_.abandoned_with
    assert "rank(s) [2] had not launched the round" in round_.abandoned_with


@pytest.mark.asyncio
async def test_a_round_confirmed_done_elsewhere_is_waited_for_once_more() -> None:
    round_ = _Round(None)  # the register already says done: its result must come
    with pytest.raises(PeerTimeout, match=r"no answer from every peer within 0\.01 s"):
        await wait_round(round_, 0.01)
    assert round_.abandons == 2  # one more timeout, then this rank is the broken one
