"""Non-blocking int64 all-reduces on a torch.distributed group (gloo for readiness),
each confirmed in the group's key-value store before anyone acts on it.

Launching costs tens of microseconds on gloo; polling ``done()`` about one.
The runtime launches a round at an agreed step and reads it ``lag`` steps
later, so in the common case nobody waits.

Why rounds are *confirmed*: a rank that gives up on a round (a peer wedged
past ``peer_timeout_s``) cannot take back the contribution it already
made. When the wedged peer resumes and launches the same round, the round
completes on its side with the old contributions, and it would act on an
answer its peers abandoned: commit a layer they did not, or launch rounds
they will never match (the next mismatch in size makes gloo abort the
process). So every round has a register in the store, keyed by the round's
position in this group's sequence, written once with an atomic
compare-and-set:

- a rank whose round completed locally writes ``done`` (a background
  thread, right after completion: by the time the serving thread reads
  the round, this has long happened, so it costs the step nothing);
- a rank that gives up writes ``abandoned:<why>`` (`abandon`).

Whichever write comes first is the round's verdict for every rank: a
completed round whose register says abandoned raises `RoundAbandoned` with
the abandoner's words, so every rank fails at the step it reads the round,
with the same message; a rank that wanted to give up on a round already
confirmed done keeps waiting for it instead. Since every rank reads each
round at the same step, and nobody goes past a round that failed, all ranks
have launched exactly the same rounds when they move on: the group's
sequence stays aligned and the next rebalance pairs with nothing stale.

Without a store (a custom ``init_process_group``) rounds are unconfirmed,
as before: a wedged rank that resumes is then not contained.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import queue
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

__all__ = ["RoundAbandoned", "TorchAllReduce"]

log = logging.getLogger("eplb_fsm")

PREFIX = "eplb_fsm/round/"
DONE = b"done"
ABANDONED = b"abandoned:"
_KEEP = 16  # registers kept behind the newest confirmed round (see _Confirmer._confirm)
_instances: dict[str, itertools.count[int]] = {}
_instances_lock = threading.Lock()


class RoundAbandoned(RuntimeError):
    """A rank gave up on this round before it completed everywhere; the message is
    the abandoner's, identical on every rank."""


class _TorchRound:
    __slots__ = ("_confirmed", "_error", "_index", "_key", "_owner", "_tensor", "_verdict",
                 "_work")

    def __init__(self, owner: TorchAllReduce | None, index: int, work: dist.Work,
                 tensor: torch.Tensor) -> None:
        self._owner = owner
        self._index = index
        self._key = f"{owner._prefix}{index}" if owner is not None else ""
        self._work = work
        self._tensor = tensor
        self._confirmed = threading.Event()
        self._verdict: bytes | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        if self._owner is None:
            return bool(self._work.is_completed())
        return self._confirmed.is_set()

    def result(self, timeout: float | None = None) -> npt.NDArray[np.int64]:
        if self._owner is not None:
            if not self._confirmed.wait(timeout):
                raise TimeoutError(f"round {self._index} not confirmed within {timeout} s")
            if self._error is not None:
                raise self._error
            if self._verdict is not None and self._verdict.startswith(ABANDONED):
                raise RoundAbandoned(self._verdict[len(ABANDONED):].decode(errors="replace"))
        # wait() also re-raises a failed collective (a peer died) even when
        # is_completed() already reports True.
        if timeout is None:
            self._work.wait()
        else:
            self._work.wait(timeout=datetime.timedelta(seconds=timeout))
        return self._tensor.numpy().copy()

    def abandon(self, why: str) -> str | None:
        """Give up on this round: None if it was confirmed done somewhere first (keep
        waiting for it), else the verdict every rank will see."""
        owner = self._owner
        if owner is None:
            return why
        verdict = owner._claim(self._key, ABANDONED + why.encode())
        if verdict == DONE:
            return None
        return verdict[len(ABANDONED):].decode(errors="replace") if verdict else why

    def stragglers(self) -> tuple[int, ...] | None:
        """Ranks that had not launched this round (None if that cannot be known)."""
        owner = self._owner
        if owner is None:
            return None
        try:
            store = owner._store
            keys = [f"{owner._prefix}at/{r}" for r in range(owner.world_size)]
            # check() first: get() would wait for a key that a dead rank never wrote.
            at = [int(bytes(store.get(k))) if store.check([k]) else -1 for k in keys]
        except Exception:
            return None
        return tuple(r for r, index in enumerate(at) if index < self._index)


class _Confirmer:
    """One daemon thread per group: waits for each round in launch order, then
    claims ``done`` in its register. Rounds complete in launch order on one
    group, so waiting in order costs nothing."""

    def __init__(self, owner: TorchAllReduce) -> None:
        self._owner = owner
        self._queue: queue.SimpleQueue[_TorchRound] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="eplb-round-confirm",
                                        daemon=True)
        self._thread.start()

    def submit(self, round_: _TorchRound) -> None:
        self._queue.put(round_)

    def _run(self) -> None:
        while True:
            round_ = self._queue.get()
            try:
                round_._work.wait()
            except Exception as exc:  # a peer died: every rank's round fails
                round_._error = exc
                round_._confirmed.set()
                continue
            try:
                round_._verdict = self._owner._claim(round_._key, DONE)
                self._confirm(round_._index)
            except Exception as exc:  # the store host is gone
                round_._error = RuntimeError(f"round {round_._index} completed but the store "
                                             f"could not confirm it: {exc}")
            round_._confirmed.set()
            del round_

    def _confirm(self, index: int) -> None:
        # Round `index` completed, so every rank launched it, and launched only
        # after it had read rounds well behind it: an old register is read by
        # no one any more. Rank 0 tidies, so the store does not grow.
        if self._owner.rank == 0 and index >= _KEEP:
            self._owner._store.delete_key(f"{self._owner._prefix}{index - _KEEP}")


class _Positions:
    """Publishes, off the serving thread, the newest round this rank launched, so
    that a rank giving up on a round can name the ranks that never launched it
    (a wedged rank's heartbeat thread still beats). Its own thread, never
    blocked by a round that does not complete."""

    def __init__(self, store: Any, key: str) -> None:
        self._store, self._key = store, key
        self.launched = -1
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="eplb-round-position", daemon=True).start()

    def note(self, index: int) -> None:
        self.launched = index
        self._wake.set()

    def _run(self) -> None:
        written = -1
        while True:
            self._wake.wait()
            self._wake.clear()
            index = self.launched
            if index != written:
                try:
                    self._store.set(self._key, str(index))
                except Exception:  # the store host is gone; nothing left to tell
                    return
                written = index


class TorchAllReduce:
    """`AllReduce` over a CPU-capable process group (gloo), rounds confirmed in
    `store` (default: the default group's store; None when there is none)."""

    def __init__(self, group: dist.ProcessGroup, store: Any = None) -> None:
        self._group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        if store is None:
            store = _default_store()
        self._store = store
        name = str(getattr(group, "group_name", "")) or "world"
        with _instances_lock:
            # Every rank builds its transports in the same order, so the n-th
            # instance on a group has the same prefix everywhere.
            instance = next(_instances.setdefault(name, itertools.count()))
        self._prefix = f"{PREFIX}{name}/{instance}/"
        self._count = itertools.count()
        self._confirmer = _Confirmer(self) if store is not None else None
        self._positions = (_Positions(store, f"{self._prefix}at/{self._rank}")
                           if store is not None else None)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def launch(self, values: npt.NDArray[np.int64]) -> _TorchRound:
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64).copy())
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
        assert work is not None
        confirmer = self._confirmer
        round_ = _TorchRound(self if confirmer is not None else None, next(self._count), work,
                             tensor)
        if confirmer is not None:
            confirmer.submit(round_)
            assert self._positions is not None
            self._positions.note(round_._index)
        return round_

    def _claim(self, key: str, value: bytes) -> bytes:
        """Write `value` into register `key` unless it holds a verdict; return the verdict."""
        verdict = self._store.compare_set(key, b"", value)
        return bytes(verdict)


def _default_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no default store (custom init): rounds stay unconfirmed
        log.info("eplb_fsm: no torch.distributed store; readiness rounds are not confirmed, "
                 "so a rank that resumes after its peers gave up on it is not contained")
        return None
