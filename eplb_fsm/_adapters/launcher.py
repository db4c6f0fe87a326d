"""The engine's launch worker: one long-lived thread that launches transfers in order.

Why a worker: `stage()` runs inside ``step()``, on the serving thread, at an
agreed step. Everything a launch does whose cost grows with the bytes or the
slots moved -- allocating buffers, packing slots into send buffers, building
the point-to-point ops, posting the sends and receives, queueing pulls --
would sit between two forward passes: measured on CPU (2 gloo ranks, 6 MB
slots), a launching step cost 60-200 ms against an 83-170 ms forward pass.
So `stage()` validates (cheap, and it must raise where every rank raises
alike), hands the launch to this worker and returns a handle; the serving
thread's share is a hand-off and, later, polls of a flag.

Why one thread, in order: NCCL pairs point-to-point operations in issue
order per pair of ranks, so every rank must issue its transfers in the same
order. The serving thread hands them over in the agreed order and one FIFO
worker launches them in that order. It never *waits* for a transfer (the
`Waiter` threads and CUDA events do), so a transfer a failed rank never
matched cannot hold back the launch of later ones.

Why long-lived: starting a thread costs ~1.6 ms of the caller's time on a
loaded 2-core machine (``Thread.start`` waits for the thread to run). The
thread starts with the engine, holds no reference to it, and ends when the
engine is collected (`weakref.finalize`) or closed.

`BufferPool` keeps CPU staging and send buffers for reuse: a fresh buffer's
first write faults in every page, which cost 2-9x the copy itself on the
measured machine (80 MB: 51 ms to copy into warm memory, 170-480 ms into
fresh), on the worker and on gloo's receiving threads alike -- CPU the
serving ranks' forward passes share. CUDA has its caching allocator.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

__all__ = ["BufferPool", "Launcher"]

Job = Callable[[], None]


class Launcher:
    """A FIFO worker thread: `submit` queues a job, which runs after every job
    submitted before it. A job must catch its own errors (it has a handle to
    report them through); one that raises anyway is dropped and the worker
    keeps going, since later transfers are still owed to peers."""

    def __init__(self, name: str = "eplb-launch") -> None:
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._closed = False
        self.launched = 0  # jobs run so far (tests read it)
        self.thread = threading.Thread(target=self._run, args=(self._queue,), name=name,
                                       daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; returns at once (O(1): a queue put)."""
        if self._closed:
            raise RuntimeError("the transfer engine's launch worker was closed")
        self._queue.put(job)

    def close(self) -> None:
        """End the thread once the jobs already queued have run."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def _run(self, jobs: queue.SimpleQueue[Job | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # a job reports through its handle; keep launching
                pass
            finally:
                self.launched += 1
                del job  # hold nothing while idle


class BufferPool:
    """Free uint8 CPU buffers for reuse, best fit first, at most `keep` of them.

    `take` returns a view of exactly the bytes asked for; `give` returns the
    whole buffer behind such a view. Thread-safe: the worker takes, the
    serving thread gives back (after a commit, or once sends completed). A
    buffer is given back only when no transfer can still write or read it,
    so reuse never races one (a transfer released while in flight keeps its
    buffers until it completes and then drops them).

    Memory: at most `keep` idle buffers stay allocated, each no larger than
    the largest one transfer used; `clear` drops them.
    """

    def __init__(self, keep: int = 4) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._keep = keep
        self.reused = 0  # takes served from the pool (tests read it)
        self.largest = 0  # bytes of the largest buffer a transfer took

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self.largest = max(self.largest, nbytes)
            fits = [b for b in self._free if b.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda b: b.numel())
                self._free = [b for b in self._free if b is not best]
                self.reused += 1
                return best[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor | None) -> None:
        if buffer is None:
            return
        base = buffer._base if buffer._base is not None else buffer
        if base.device.type != "cpu" or base.dtype != torch.uint8 or base.dim() != 1 \
                or not base.numel():
            return
        with self._lock:
            if any(b is base for b in self._free):
                return
            self._free.append(base)
            if len(self._free) > self._keep:  # drop the smallest: the largest serve all
                smallest = min(self._free, key=lambda b: b.numel())
                self._free = [b for b in self._free if b is not smallest]

    @property
    def keep(self) -> int:
        return self._keep

    def idle(self) -> list[torch.Tensor]:
        """The idle buffers (a memory census can tell them from leaks)."""
        with self._lock:
            return list(self._free)

    def clear(self) -> None:
        with self._lock:
            self._free = []

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(int(b.numel()) for b in self._free)
