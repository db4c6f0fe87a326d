"""The rest of a step's agreed work, once it first had to wait.

`EplbRuntime.step` counts the pass and runs the step's agreed work when it is
*called*: a task cancelled before it ever ran must not drop a pass on one
rank. Most steps finish there. One that must wait (a round not yet complete)
is suspended, and the awaitable `step()` returns resumes it (`Rest`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["Rest", "nothing", "raised"]


async def nothing() -> None:
    return None


async def raised(exc: BaseException) -> None:
    raise exc


class Rest:
    """The rest of a step's agreed work, from its first wait on.

    `EplbRuntime.step` runs the work up to the point where it must wait, then
    hands the suspended coroutine here; awaiting this resumes it in the
    awaiting task, forwarding what it yields (asyncio futures, trio traps)
    and what is thrown into it (a cancellation), exactly as if it had been
    awaited directly.
    """

    __slots__ = ("_work", "_yielded", "started", "step")

    def __init__(self, work: Coroutine[Any, Any, None], yielded: Any, step: int) -> None:
        self._work = work
        self._yielded = yielded
        self.started = False
        self.step = step

    def __await__(self) -> Generator[Any, Any, None]:
        self.started = True
        work, value = self._work, self._yielded
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                work.close()
                raise
            except BaseException as exc:
                try:
                    value = work.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = work.send(sent)
                except StopIteration:
                    return

    def run_blocking(self) -> None:
        """Finish the work without an event loop: each wait becomes a blocking
        poll (`rounds.pause` holds a cancellation and sleeps), and what it
        raises at the end is logged by the drivers already."""
        self.started = True
        while True:
            try:
                self._work.throw(asyncio.CancelledError())
            except StopIteration:
                return
            except BaseException:  # the held cancellation, or a failure (logged)
                return
