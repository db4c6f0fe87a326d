"""Lifecycle hooks: user callbacks that can watch the lifecycle but never steer or stall it.

`EplbRuntime.on(kind, callback)` registers a callback for one kind of event:

- ``"transition"``: every state change (entry into ``event.dest``);
- ``"commit"``: a batch of layers committed on this rank (``event.layers``);
- ``"failure"``: a rebalance ended in ``failed`` (``event.error``);
- ``"rebalance"``: a rebalance finished (done or dropped; ``event.trigger``).

Why they cannot hurt the lifecycle: the driver only *enqueues* an event (a
deque append). Sync callbacks run in order on one worker thread, so a slow
one delays only later callbacks; async callbacks are scheduled as tasks on
the running loop. A callback that raises is logged (with its traceback) and
counted in ``stats()["hooks"]["errors"]``; the lifecycle never sees it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["EVENT_KINDS", "Hooks", "LifecycleEvent"]

log = logging.getLogger("eplb_fsm")

EVENT_KINDS = ("transition", "commit", "failure", "rebalance")


@dataclass(frozen=True)
class LifecycleEvent:
    kind: str
    model: str
    step: int
    source: str
    dest: str
    trigger: str
    layers: tuple[int, ...] = ()
    error: str | None = None
    seconds_in_source: float | None = None  # transitions: time spent in `source`


_DRAIN = LifecycleEvent("", "", 0, "", "", "")


class Hooks:
    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callable[[LifecycleEvent], Any]]] = {
            kind: [] for kind in EVENT_KINDS}
        self._queue: queue.SimpleQueue[tuple[Callable[[LifecycleEvent], Any],
                                             LifecycleEvent] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.errors = 0
        self.delivered = 0

    def add(self, kind: str, callback: Callable[[LifecycleEvent], Any]) -> None:
        if kind not in self._callbacks:
            raise ValueError(f"unknown hook kind {kind!r}; known: {', '.join(EVENT_KINDS)}")
        if not callable(callback):
            raise ValueError(f"callback for {kind!r} must be callable")
        self._callbacks[kind].append(callback)

    def remove(self, kind: str, callback: Callable[[LifecycleEvent], Any]) -> None:
        if kind not in self._callbacks or callback not in self._callbacks[kind]:
            raise ValueError(f"{callback!r} is not registered for {kind!r}")
        self._callbacks[kind].remove(callback)

    def emit(self, event: LifecycleEvent) -> None:
        for callback in self._callbacks[event.kind]:
            if inspect.iscoroutinefunction(callback):
                self._schedule(callback, event)
            else:
                self._ensure_thread()
                self._queue.put((callback, event))

    def _schedule(self, callback: Callable[[LifecycleEvent], Any], event: LifecycleEvent) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the blocking rearrange()): run it to completion
            self._ensure_thread()
            self._queue.put((lambda e: asyncio.run(callback(e)), event))
            return
        task = loop.create_task(self._guarded_async(callback, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded_async(self, callback: Callable[[LifecycleEvent], Any],
                             event: LifecycleEvent) -> None:
        try:
            await callback(event)
            self.delivered += 1
        except Exception:
            self.errors += 1
            log.exception("eplb_fsm hook %r failed on %s", callback, event)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eplb-hooks", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            callback, event = item
            if event is _DRAIN:
                callback(event)
                continue
            try:
                callback(event)
                self.delivered += 1
            except Exception:
                self.errors += 1
                log.exception("eplb_fsm hook %r failed on %s", callback, event)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until queued sync callbacks ran (for tests and shutdown)."""
        done = threading.Event()
        if self._thread is None:
            return
        self._queue.put((lambda _e: done.set(), _DRAIN))
        done.wait(timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
