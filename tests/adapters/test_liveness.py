"""Heartbeats: a live rank keeps beating through a failed store write, and
`silent_ranks` names only ranks whose stamp stopped, never one that still moves."""

from __future__ import annotations

import threading
import time

from eplb_fsm._adapters.liveness import Heartbeat


class _Store:
    """The two calls of a torch.distributed store that heartbeats use, in memory."""

    def __init__(self, fail_sets: int = 0) -> None:
        self._values: dict[str, str] = {}
        self._lock = threading.Lock()
        self.fail_sets = fail_sets

    def set(self, key: str, value: str) -> None:
        with self._lock:
            if self.fail_sets and key.endswith("/1"):
                self.fail_sets -= 1
                raise RuntimeError("store request timed out")
            self._values[key] = value

    def get(self, key: str) -> bytes:
        with self._lock:
            return self._values[key].encode()


def _wait_for(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_a_failed_store_write_does_not_stop_the_heartbeat() -> None:
    store = _Store()
    beats = [Heartbeat(store, rank, 2, interval=0.01) for rank in range(2)]
    try:
        store.fail_sets = 3  # rank 1's next writes time out, then the store recovers
        assert _wait_for(lambda: store.fail_sets == 0)
        before = store.get("eplb_fsm/heartbeat/1")
        assert _wait_for(lambda: store.get("eplb_fsm/heartbeat/1") != before), \
            "rank 1 stopped beating after a failed write"
        assert beats[0].silent_ranks(wait=0) == ()
    finally:
        for beat in beats:
            beat.close()


def test_silent_ranks_names_the_rank_whose_stamp_stopped() -> None:
    store = _Store()
    beats = [Heartbeat(store, rank, 3, interval=0.01) for rank in range(3)]
    try:
        beats[2].close()  # rank 2 "dies": its stamp never moves again
        time.sleep(0.1)  # older than 5 intervals
        assert beats[0].silent_ranks(wait=0) == (2,)
    finally:
        for beat in beats:
            beat.close()
