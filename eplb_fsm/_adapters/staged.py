"""The handle of a launched transfer: poll it, commit it, or release it.

Split from the engine (`transfer.py`) because the two have different
lifetimes: the engine lives as long as the serving process, a `StagedLayers`
as long as one batch of layers is in flight or waiting for its agreed commit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import torch

from .._core.transfer_plan import TransferPlan
from .._core.transfer_schedule import RankSchedule, aligned

__all__ = ["CopyBatches", "InFlight", "SlotBytes", "StagedLayers", "Waiter", "Weights",
           "current_slots", "slot_nbytes", "typed_view"]

Weights = Sequence[Sequence[torch.Tensor]]


def slot_nbytes(weight: torch.Tensor) -> int:
    """Bytes of one local slot of `weight` (its first dimension is the slot)."""
    n = weight.element_size()
    for size in weight.shape[1:]:
        n *= size
    return n


def typed_view(buffer: torch.Tensor, offset: int, nbytes: int,
               like: torch.Tensor) -> torch.Tensor:
    """The `nbytes` at `offset` of a uint8 `buffer` seen as one slot of `like`."""
    return buffer[offset:offset + nbytes].view(like.dtype).view(like.shape[1:])


class SlotBytes:
    """One weight tensor, slot by slot, as the bytes copies to and from uint8
    buffers (staging rows, send buffers) move.

    Why: every copy is launched from the serving thread, where each
    ``copy_`` costs ~10 µs of host time and each dtype or shape view around
    it ~5 µs more (cProfile of `stage()`, H200 host). Viewing a contiguous
    weight as ``[slots, bytes]`` once per tensor and stage leaves one slice
    and one select per copy. Non-contiguous weights keep the typed views.
    """

    __slots__ = ("data_ptr", "nbytes", "rows", "slot_rows", "weight")

    def __init__(self, weight: torch.Tensor, per_slot: bool = False) -> None:
        """`per_slot`: also keep one view per slot (for tensors copied many times,
        like a peer's mapped weights or a rank's own shared ones, so a copy
        costs no select)."""
        self.weight = weight
        self.data_ptr = weight.data_ptr()  # to tell a stale cached view (`current_slots`)
        self.nbytes = slot_nbytes(weight)
        self.rows: torch.Tensor | None = None
        self.slot_rows: list[torch.Tensor] | None = None
        if weight.is_contiguous() and weight.numel():
            self.rows = weight.view(weight.shape[0], -1).view(torch.uint8)
            if per_slot:
                self.slot_rows = list(self.rows.unbind(0))

    def to_buffer(self, buffer: torch.Tensor, offset: int, slot: int) -> None:
        """Queue a copy of `slot` into `buffer` at byte `offset`."""
        self.in_buffer(buffer, offset).copy_(self.slot(slot), non_blocking=True)

    def from_buffer(self, buffer: torch.Tensor, offset: int, slot: int) -> None:
        """Queue a copy of `buffer`'s bytes at `offset` into `slot`."""
        self.slot(slot).copy_(self.in_buffer(buffer, offset), non_blocking=True)

    def move(self, dst: int, src: int) -> None:
        """Queue a copy of slot `src` into slot `dst` of the same tensor."""
        self.slot(dst).copy_(self.slot(src), non_blocking=True)

    def slot(self, slot: int) -> torch.Tensor:
        """`slot` of the weight: its bytes (contiguous weights) or its typed view."""
        if self.rows is None:
            return self.weight[slot]
        return self.slot_rows[slot] if self.slot_rows is not None else self.rows[slot]

    def in_buffer(self, buffer: torch.Tensor, offset: int) -> torch.Tensor:
        """The bytes of uint8 `buffer` at `offset` seen as `slot()` sees a slot."""
        if self.rows is None:
            return typed_view(buffer, offset, self.nbytes, self.weight)
        return buffer[offset:offset + self.nbytes]


class CopyBatches:
    """Copies queued in order, launched a batch at a time with `torch._foreach_copy_`.

    Why: a commit writes tens of slots per layer, one ``copy_`` per slot and
    tensor, and on GPU each costs ~10 µs of host time on the serving thread
    (the launch, not the bytes). One foreach call launches a batch of them
    at once. Copies in one batch run in any order, so a copy joins the
    batch only if it neither reads what the batch writes nor writes what
    the batch reads or writes; otherwise the batch is launched first. Keys
    name what a copy touches (a slot, the temp row); staging rows are read
    by one copy each and need none.
    """

    __slots__ = ("_dst", "_reads", "_src", "_writes")

    def __init__(self) -> None:
        self._dst: list[torch.Tensor] = []
        self._src: list[torch.Tensor] = []
        self._reads: set[object] = set()
        self._writes: set[object] = set()

    def add(self, writes: object, reads: object | None,
            pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if reads in self._writes or writes in self._reads or writes in self._writes:
            self.flush()
        self._writes.add(writes)
        if reads is not None:
            self._reads.add(reads)
        for dst, src in pairs:
            self._dst.append(dst)
            self._src.append(src)

    def flush(self) -> None:
        if self._dst:
            torch._foreach_copy_(self._dst, self._src, non_blocking=True)
        self._dst, self._src = [], []
        self._reads.clear()
        self._writes.clear()


def current_slots(weights: Weights, layer: int,
                  cached: Sequence[Sequence[SlotBytes]] | None) -> Sequence[SlotBytes]:
    """`weights[layer]` as `SlotBytes`: the ones `cached` (by layer, made once at
    `share_weights`) holds while every one still views the tensor at that place,
    in the same memory; otherwise views made now. A cached view of replaced or
    reallocated memory would write where the model no longer reads."""
    tensors = weights[layer]
    held = cached[layer] if cached is not None and layer < len(cached) else None
    if held is not None and len(held) == len(tensors) and all(
            c.weight is w and c.data_ptr == w.data_ptr()
            for c, w in zip(held, tensors, strict=True)):
        return held
    return [SlotBytes(w) for w in tensors]


class Waiter:
    """Daemon threads that call ``wait()`` on launched gloo work.

    Starting a thread per stage cost ~1.6 ms of the staging step on a loaded
    2-core machine (``Thread.start`` waits for the new thread to run), so
    threads are long-lived and reused. Yet one thread waiting in launch
    order is not enough: a transfer a failed rank never matched stays
    pending for good (gloo's send/recv work cannot be cancelled), and every
    transfer queued behind it would never be seen complete, so no later
    rebalance could finish. So a new thread starts whenever work arrives
    and none is idle; a thread stuck on abandoned work stays stuck alone.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[InFlight] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.threads = 0  # started so far (tests read it)

    def submit(self, inflight: InFlight) -> None:
        with self._lock:
            start = self._idle == 0
            if start:
                self._idle += 1  # the new thread counts as idle until it takes work
                self.threads += 1
            self._idle -= 1
        self._queue.put(inflight)
        if start:
            threading.Thread(target=self._run, name="eplb-transfer-wait", daemon=True).start()

    def _run(self) -> None:
        while True:
            inflight = self._queue.get()
            inflight.wait_all()
            del inflight  # hold nothing while idle
            with self._lock:
                self._idle += 1


_launch_lock = threading.Lock()  # guards InFlight's launch flag against a late Event


class InFlight:
    """A transfer handed to the engine's launch worker, then its launched work and
    what must stay alive until that work is done.

    The serving thread creates it at the agreed step and returns at once; the
    worker (`launcher.Launcher`) allocates the staging buffer, packs, posts
    the sends and receives and queues the pulls, then calls `launched` (or
    `launch_failed`). Until then `done()` is False, so `ready()` reads "not
    yet" and the readiness rounds carry on as for a slow network.

    On GPU, completion is ``Work.is_completed()`` plus the side stream's event.
    Gloo's send/recv work, however, reports ``is_completed() == False`` until
    someone calls ``wait()`` on it (measured with torch 2.13: the data had
    long arrived), has no future, and a ``wait(timeout)`` that expires closes
    the connection. So on CPU the engine's `Waiter` thread calls ``wait()``
    (gloo releases the GIL there) and `done()` reads its flag.
    """

    def __init__(self, waiter: Waiter, cpu: bool, error: BaseException | None = None) -> None:
        self.cpu = cpu  # gloo work: waited for by a `Waiter` thread
        self.works: list[Any] = []
        self.event: torch.cuda.Event | None = None
        self.buffers: list[torch.Tensor] = []
        self.staging: torch.Tensor | None = None  # set by the worker
        self.launch: Any = None  # the `prepared.Launch`, set at hand-off or by the worker
        # Preset when the launch itself knows the result is unusable (weights
        # reallocated since sharing): reported by `ready()` once the work is done.
        self.error: BaseException | None = error
        self.launch_error: BaseException | None = None
        self._waiter = waiter
        # A flag the serving thread polls; an Event only if someone blocks on it
        # (creating one per stage cost the serving thread tens of us).
        self._launch_flag = False
        self._launch_event: threading.Event | None = None
        self._finished: threading.Event | None = None

    # -- the worker's side ------------------------------------------------------------

    def launched(self, works: list[Any], event: torch.cuda.Event | None) -> None:
        """Called by the worker once everything is posted (in this order: the
        fields, then the flag the serving thread polls)."""
        self.works = works
        self.event = event
        if self.cpu and works:
            self._finished = threading.Event()
            self._waiter.submit(self)
        self._mark_launched()

    def launch_failed(self, exc: BaseException, works: list[Any]) -> None:
        """The worker raised while launching. Work it did post still runs (and
        reads or writes the buffers), so it is waited for before `done()`;
        `ready()` raises at once."""
        self.launch_error = exc
        if works:
            self.launched(works, None)
        else:
            self._mark_launched()

    def _mark_launched(self) -> None:
        with _launch_lock:
            self._launch_flag = True
            event = self._launch_event
        if event is not None:
            event.set()

    def _wait_launched(self) -> None:
        with _launch_lock:
            if self._launch_flag:
                return
            if self._launch_event is None:
                self._launch_event = threading.Event()
            event = self._launch_event
        event.wait()

    # -- the serving thread's side -------------------------------------------------------

    @property
    def launching(self) -> bool:
        """Not yet launched by the worker."""
        return not self._launch_flag

    def wait_all(self) -> None:
        assert self._finished is not None
        try:
            for work in self.works:
                work.wait()
        except BaseException as exc:  # reported to the caller by `StagedLayers.ready`
            self.error = exc
        finally:
            # The transfer is over: let go of its works now, not when this
            # thread object is finally collected (it may linger a while).
            self.works = []
            self._finished.set()

    def done(self) -> bool:
        """Launched, and every launched operation complete."""
        if not self._launch_flag:
            return False
        if self._finished is not None:
            return self._finished.is_set()
        if not all(work.is_completed() for work in self.works):
            return False
        return self.event is None or bool(self.event.query())

    def block(self) -> None:
        self._wait_launched()
        if self._finished is not None:
            self._finished.wait()
        elif self.event is not None:
            self.event.synchronize()


class StagedLayers:
    """The `StagedTransfer` handle `TransferEngine.stage` returns.

    Holds the staging buffer of one or more layers. `commit` accepts an
    optional subset of layers, so several layers staged in one batch can be
    committed one per agreed step.
    """

    def __init__(self, sched: RankSchedule, expert_weights: Weights, device: torch.device,
                 inflight: InFlight, keep_until_done: Callable[[InFlight], None],
                 pulls: bool = False,
                 note_commit: Callable[[torch.cuda.Event], None] | None = None,
                 own: Sequence[Sequence[SlotBytes]] | None = None,
                 give_back: Callable[[torch.Tensor | None], None] | None = None) -> None:
        self._sched = sched
        self._weights = expert_weights
        self._device = device
        self._inflight: InFlight | None = inflight
        self._give_back = give_back  # returns a CPU buffer no transfer uses to the pool
        # From the byte layout, which the worker makes when stage() had none ready:
        # (layer, expert) -> byte offset of its staged row; the byte offset of the
        # row commit saves a cycle's slot in, or -1; bytes received; staging bytes.
        self._offsets: Mapping[tuple[int, int], int] = {}
        self._temp = -1
        self._bytes_received = 0
        self._staging_bytes = 0
        self._have_layout = False
        self._keep_until_done = keep_until_done
        self._pulls = pulls
        self._note_commit = note_commit
        self._own = own  # this rank's weights as byte rows, by layer, if cached
        self._committed: set[int] = set()
        self._released = False
        self._completed = False

    # -- the StagedTransfer protocol -----------------------------------------------------

    @property
    def layers(self) -> tuple[int, ...]:
        return self._sched.layers

    @property
    def bytes_received(self) -> int:
        """Bytes this rank receives from peers for these layers (local copies excluded);
        0 until the worker has laid the transfer out."""
        self._take_layout()
        return self._bytes_received

    def _take_layout(self) -> None:
        """Copy what the handle needs of the byte layout, once the launch has it."""
        if self._have_layout or self._inflight is None:
            return
        launch = self._inflight.launch
        if launch is not None:
            layout = launch.layout
            self._offsets, self._temp = layout.staging, layout.temp
            self._bytes_received, self._staging_bytes = launch.received, layout.staging_bytes
            self._have_layout = True

    def ready(self) -> bool:
        """True once this rank's receives, sends and pulls are complete.

        Never blocks: on GPU it polls ``Work.is_completed()`` and ``Event.query()``;
        on CPU it reads the flag of the thread waiting on gloo. Raises if the
        transfer failed (say, a peer died).
        """
        if self._released:
            raise RuntimeError("ready() after release(): this staged transfer was dropped")
        if self._completed:
            return True
        inflight = self._inflight
        assert inflight is not None
        if inflight.launch_error is not None:  # the worker could not launch it
            raise RuntimeError(f"the launch of the transfer of layers {self.layers} failed on "
                               f"rank {self._sched.rank}: "
                               f"{type(inflight.launch_error).__name__}: "
                               f"{inflight.launch_error}") from inflight.launch_error
        if not inflight.done():
            return False
        self._take_layout()
        if inflight.error is not None:
            raise RuntimeError(f"the transfer of layers {self.layers} failed on rank "
                               f"{self._sched.rank}: {inflight.error}") from inflight.error
        self._completed = True
        # Sends are done: the send buffer can go back to the allocator (or pool) now.
        buffers, inflight.buffers = inflight.buffers, []
        if self._give_back is not None:
            for buffer in buffers:
                self._give_back(buffer)
        return True

    def commit(self, layers: Iterable[int] | None = None) -> None:
        """Copy the staged slots of `layers` (default: all not yet committed) into the
        live weights. Call only once every rank is `ready()` for these layers.

        On GPU the copies run on the current stream after it waits on the
        staging event; the host does not wait. Only the slots the plan writes
        are touched; unchanged and vacated slots are not.
        """
        if self._released:
            raise RuntimeError("commit() after release(): the staging buffers are gone")
        chosen = self._pending() if layers is None else tuple(layers)
        if not chosen:
            return
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers {chosen} names a layer twice")
        for layer in chosen:
            if layer not in self.layers:
                raise ValueError(f"layers holds {layer!r}, which was not staged "
                                 f"(staged: {self.layers})")
            if layer in self._committed:
                raise ValueError(f"layer {layer} is already committed")
        if not self.ready():
            raise RuntimeError("commit() before ready(): the staged weights are incomplete")
        assert self._inflight is not None and self._inflight.staging is not None
        staging = self._inflight.staging
        stream = None
        if self._device.type == "cuda":
            stream = torch.cuda.current_stream(self._device)
            if self._inflight.event is not None:
                stream.wait_event(self._inflight.event)
        with torch.no_grad():
            for layer in chosen:
                self._commit_layer(layer, staging)
                self._committed.add(layer)
        if stream is not None:
            staging.record_stream(stream)  # reused only after these copies ran
            if self._note_commit is not None:
                committed = torch.cuda.Event()
                committed.record(stream)
                self._note_commit(committed)
        if not self._pending():
            # On CPU the copies ran: the staging buffer is free for the next transfer.
            self._drop(reuse=stream is None)

    def release(self) -> None:
        """Drop the staging buffers without touching the live weights (abort path).

        If the transfers are still running, the engine keeps the buffers alive
        until they finish (peers will still write into them); nothing here waits.
        """
        if self._released:
            return
        self._released = True
        inflight = self._inflight
        if inflight is not None and not self._completed and not inflight.done():
            # Peers (and a launch still queued on the worker) will still write into
            # its buffers, which `inflight` holds; the engine keeps it until done.
            self._keep_until_done(inflight)
            self._drop(reuse=False)
            return
        self._drop(reuse=self._completed and self._device.type == "cpu")

    # -- helpers beyond the protocol -------------------------------------------------------

    @property
    def pulls(self) -> bool:
        """Whether the agreed channels route any pair to a pull (the same on every
        rank): then a rank's own `ready()` does not cover peers' reads of its live
        weights, and commit must wait for *every* rank's readiness."""
        return self._pulls

    @property
    def schedule(self) -> RankSchedule:
        return self._sched

    @property
    def plan(self) -> TransferPlan:
        return self._sched.plan

    @property
    def staging_bytes(self) -> int:
        """Bytes of staging memory this handle holds (received or pulled rows, and the
        temp row of a cycle of local moves)."""
        self._take_layout()
        return 0 if self._inflight is None else self._staging_bytes

    async def wait(self, poll_interval: float = 0.0005) -> None:
        """Await `ready()` by polling it every `poll_interval` seconds (anyio)."""
        while not self.ready():
            await anyio.sleep(poll_interval)

    def wait_blocking(self) -> None:
        """Block the calling thread until `ready()` (the synchronous path only)."""
        if self._released:
            raise RuntimeError("wait_blocking() after release()")
        if self._inflight is not None and not self._completed:
            self._inflight.block()
        self.ready()

    def _pending(self) -> tuple[int, ...]:
        return tuple(layer for layer in self.layers if layer not in self._committed)

    def _commit_layer(self, layer: int, staging: torch.Tensor) -> None:
        """Run `layer`'s commit steps in order (`_core.commit_order`): moves between
        live slots, the temp row for cycles, fills from staged rows; launched in
        batches that keep that order wherever it matters (`CopyBatches`)."""
        tensors = current_slots(self._weights, layer, self._own)
        batches = CopyBatches()
        temp = ("temp",)  # a key no slot number equals
        for step in self._sched.steps_of(layer):
            if step.kind == "move":
                batches.add(step.slot, step.src,
                            [(t.slot(step.slot), t.slot(step.src)) for t in tensors])
                continue
            at = self._temp if step.kind in ("save", "restore") else \
                self._offsets[(layer, step.expert)]
            pairs = []
            for t in tensors:
                row = t.in_buffer(staging, at)
                pairs.append((row, t.slot(step.slot)) if step.kind == "save"
                             else (t.slot(step.slot), row))
                at += aligned(t.nbytes)
            if step.kind == "save":
                batches.add(temp, step.slot, pairs)
            else:  # "restore" reads the temp row; a "fill" its own staged row
                batches.add(step.slot, temp if step.kind == "restore" else None, pairs)
        batches.flush()

    def _drop(self, reuse: bool = False) -> None:
        """Let go of the buffers; `reuse`: no transfer or queued copy uses the staging
        buffer any more, so it may serve the next transfer (CPU)."""
        self._take_layout()
        inflight, self._inflight = self._inflight, None
        self._offsets = {}
        if reuse and inflight is not None and self._give_back is not None:
            staging, inflight.staging = inflight.staging, None
            self._give_back(staging)
