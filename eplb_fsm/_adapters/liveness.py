"""Which peers are still alive: heartbeats in the torch.distributed store.

A gloo collective whose peer died fails with "connection closed by peer
[address]", and one whose peer hangs just never completes: neither names
the rank. So each runtime's background thread writes a timestamp to the
process group's key-value store every `interval` seconds, and when a
rebalance fails on a broken or silent collective, the survivors read the
stamps and name the ranks that went quiet. It costs one small store write
per interval per rank, nothing per step.

The store is hosted by one process (rank 0 for the usual TCPStore); if that
process is the one that died, nothing can be read and the error says so.

Stamps are keyed by *global* rank when the group's global ranks are given
(`global_ranks`, index = rank in the group): elastic deployments run several
EP groups in one world, whose group ranks would otherwise share keys.
`silent_ranks` always answers in group ranks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["Heartbeat"]

PREFIX = "eplb_fsm/heartbeat/"


class Heartbeat:
    def __init__(self, store: Any, rank: int, world_size: int, interval: float = 0.2,
                 global_ranks: Sequence[int] | None = None) -> None:
        if global_ranks is not None and len(global_ranks) != world_size:
            raise ValueError(f"global_ranks names {len(global_ranks)} ranks, expected "
                             f"world_size={world_size}")
        # Its own connection where the store can make one (`Store.clone`): a
        # TCPStore client serves one request at a time, so another thread's
        # blocking request (a get waiting for a key) would hold the heartbeat
        # back as long, and peers would blame this live rank.
        try:
            self._store = store.clone() if hasattr(store, "clone") else store
        except Exception:
            self._store = store
        self._rank = rank
        self._world = world_size
        self._keys = [f"{PREFIX}{r}" for r in (global_ranks or range(world_size))]
        self._interval = interval
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="eplb-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def for_default_group(cls, rank: int, world_size: int,
                          global_ranks: Sequence[int] | None = None) -> Heartbeat | None:
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            return cls(_get_default_store(), rank, world_size, global_ranks=global_ranks)
        except Exception:  # no store (custom init): failures just won't name ranks
            return None

    def _beat(self) -> None:
        self._store.set(self._keys[self._rank], repr(time.time()))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:
                # Keep beating: one failed write (a store request timed out on a
                # loaded host) must not silence a live rank for good, or its peers
                # would blame it at their next failure. If the store host is gone,
                # every write fails and nobody can read the stamps anyway.
                continue

    def silent_ranks(self, wait: float = 1.5) -> tuple[int, ...] | None:
        """Ranks whose heartbeat is older than 5 intervals and does not move for 2 s
        more (waiting up to `wait` s for a recent death to show). None if the
        store cannot be read.

        Why the second look: on a loaded machine a live rank's heartbeat (its
        thread, or the store host serving it) can be held up for over a second
        (seen with three ranks and a CPU hog on two cores), and a stale stamp
        alone then blamed a healthy rank. A dead rank's stamp never moves again.
        """
        stale_after = 5 * self._interval
        deadline = time.monotonic() + wait
        while True:
            try:
                stamps = self._stamps()
                now = time.time()
                stale = {r: t for r, t in stamps.items() if now - t > stale_after}
                if stale:
                    time.sleep(max(10 * self._interval, 2.0))
                    again = self._stamps()
                    silent = tuple(r for r, t in stale.items() if again[r] == t)
                else:
                    silent = ()
            except Exception:
                return None
            if silent or time.monotonic() > deadline:
                return silent
            time.sleep(self._interval)

    def _stamps(self) -> dict[int, float]:
        return {r: float(self._store.get(self._keys[r])) for r in range(self._world)
                if r != self._rank}

    def close(self) -> None:
        self._stop.set()
