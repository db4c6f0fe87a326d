"""Run a function on N local processes joined in a torch.distributed group.

Used by the multi-process tests and by ``eplb-fsm simulate``: each rank is
a fresh process, and the whole run is bounded in time: a rank that hangs or
dies makes `run_ranks` kill the others and raise, naming the rank, instead of
blocking its caller.

Ranks come from a *fork server* (multiprocessing's ``forkserver``): a clean
process, started once per parent, that imports torch once and forks each rank
from that state. Never the caller itself: torch's threads and an initialised
CUDA context don't survive a fork. A spawned interpreter per rank would import
torch again every time (about 3 s of CPU on a laptop core, per rank, per run:
most of a multi-process test's time). The server imports only torch and the
rank program when it is one of ours: a caller's module might touch CUDA as
it is imported, which would make every fork unsafe.

The rendezvous store is bound by rank 0 on a port the OS picks (port 0),
and rank 0 hands the port to the others. Picking a free port in the parent
and binding it later in rank 0 raced with every other process on the
machine (tests run in parallel, and gloo opens ephemeral ports): it failed
once with EADDRINUSE.

Start-up barrier. ``init_process_group`` returns on a rank once *its* side of
gloo's full mesh is connected, which may be before a peer's side is: a rank
that then ran `fn`, raised and exited closed its sockets under a peer still
in ``connectFullMesh`` ("Connection closed by peer"), and the run reported
whichever of the two failures reached the parent first. So no rank calls
`fn` before every rank has returned from ``init_process_group`` (a counter
in the store).

Reports. Each rank writes its outcome (value, or traceback and the time it
raised) into its own pipe *synchronously*, before it tears down its process
group or exits; the parent waits on every pipe and every process at once. A
failure a peer causes (its exit, its closed sockets) therefore always comes
after the peer's own report is readable. When several ranks fail, `RankFailed`
names the earliest failure, lists the others (ranks that raised later, and
how much later; ranks that exited without a result, a death being timed when
the parent sees the process end; ranks not finished when the parent stops
waiting, ``_SETTLE_S`` after the first failure, which are killed), and ends
with the earliest failure's traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import multiprocessing as mp
import multiprocessing.connection as mpc
import multiprocessing.forkserver as forkserver
import os
import pickle
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RankFailed", "free_port", "run_ranks"]

#: Store keys of the start-up barrier (one fresh store per run).
_STARTED = "eplb_fsm.run_ranks/started"
_GO = "eplb_fsm.run_ranks/go"
#: After the first failure, how long the parent waits for the other ranks to
#: report or end (only to name them: the first failure is already known).
_SETTLE_S = 3.0


class RankFailed(RuntimeError):
    """A rank raised, died or outlived the deadline; the message says which and why."""


def free_port() -> int:
    """A TCP port free at the time of the call (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_barrier(store: Any, world_size: int, timeout_s: float) -> None:
    """Return once every rank has called this, i.e. finished ``init_process_group``."""
    if int(store.add(_STARTED, 1)) == world_size:
        store.set(_GO, b"1")
    try:
        store.wait([_GO], datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        arrived = "?"
        with contextlib.suppress(Exception):
            arrived = str(int(store.add(_STARTED, 0)))
        raise TimeoutError(f"start-up barrier: {arrived} of {world_size} ranks finished "
                           f"init_process_group within {timeout_s:.0f} s ({exc})") from None


#: What every rank imports, imported once by the fork server instead.
_PRELOAD = ("torch", "torch.distributed")


def _context(fn: Callable[..., Any]) -> Any:
    """The fork-server context. Its preload list counts only until the server
    starts (the first run in this process); later runs fork from that server."""
    ctx = mp.get_context("forkserver")
    module = getattr(fn, "__module__", None) or ""
    ours = module.startswith("eplb_fsm.")  # nothing of ours touches CUDA on import
    ctx.set_forkserver_preload([*_PRELOAD, *([module] if ours else [])])
    return ctx


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: Any,
    backend: str,
    timeout_s: float,
    args: Sequence[Any],
    report: mpc.Connection,
) -> None:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if rank == 0:
            store = dist.TCPStore("127.0.0.1", 0, None, True, timeout)
            port.value = store.port
        else:
            deadline = time.monotonic() + timeout_s
            while not port.value:  # rank 0 binds the store first
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank 0 bound no store within {timeout_s:.0f} s")
                time.sleep(0.01)
            store = dist.TCPStore("127.0.0.1", port.value, None, False, timeout)
        # For code that reads the usual variables (e.g. a nested launcher).
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port.value),
                          RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        _start_barrier(store, world_size, timeout_s)
        value = fn(rank, world_size, *args)
        # Pickled here, by value: the queue's own pickler would send tensors as
        # shared-memory handles that the parent can only open while this
        # process lives, and it may exit before the parent reads them.
        message = pickle.dumps((True, 0.0, pickle.dumps(value)))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        message = pickle.dumps((False, time.monotonic(), traceback.format_exc()))
    try:
        # Synchronous: written before any teardown below can disturb a peer.
        report.send_bytes(message)
        report.close()
    finally:
        if dist.is_initialized():
            # A peer's death can break teardown; the result is already sent.
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        # A forked process ends in os._exit, which skips the atexit handlers a
        # normal interpreter exit runs (the pull path unlinks its shared-memory
        # blocks there, logging flushes): run them as a spawned rank would.
        atexit._run_exitfuncs()


@dataclass(frozen=True)
class _Failure:
    at: float  # time.monotonic(): when the rank raised, or when its exit was seen
    rank: int
    traceback: str | None  # None: exited without a result
    exitcode: int | None = None

    def summary(self, first: float) -> str:
        later = f"{self.at - first:.3f} s later"
        if self.traceback is None:
            return f"rank {self.rank} exited without a result (exit code {self.exitcode}, {later})"
        lines = [line for line in self.traceback.strip().splitlines() if line.strip()]
        return f"rank {self.rank} raised {lines[-1].strip() if lines else '?'} ({later})"


def _failure_message(failures: list[_Failure], running: list[int]) -> str:
    failures = sorted(failures, key=lambda f: f.at)
    root = failures[0]
    codes: dict[int, int | None] = {}
    if root.traceback is not None:
        head = f"rank {root.rank} raised:\n{root.traceback.rstrip()}"
        others = failures[1:]
    else:
        # Deaths are timed only when the parent sees them: name every one here.
        dead = sorted((f for f in failures if f.traceback is None), key=lambda f: f.rank)
        codes = {f.rank: f.exitcode for f in dead}
        head = (f"rank(s) {sorted(codes)} exited without a result "
                f"(exit codes {codes})")
        others = [f for f in failures if f.traceback is not None]
    notes = [f.summary(root.at) for f in others]
    if running:
        notes.append(f"rank(s) {running} had not finished when the run stopped waiting "
                     f"(killed)")
    if not notes:
        return head
    # The root cause last, so that the message's first and last lines (what a
    # one-line summary shows) name it and its exception.
    first = f"rank {root.rank}" if root.traceback is not None else f"rank(s) {sorted(codes)}"
    return "\n".join([f"{first} failed first (last below); after it:",
                      *(f"  {note}" for note in notes), head])


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    may_die: Sequence[int] = (),
    started: threading.Event | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on `world_size` fresh processes.

    `fn` and `args` must be picklable (a module-level function), and the script
    that calls `run_ranks` must guard its top level with
    ``if __name__ == "__main__":``: each rank imports the main module again
    (as a spawned process would), and without the guard would launch ranks
    of its own. No rank calls
    `fn` before every rank has joined the process group. Returns the ranks'
    return values in rank order; raises `RankFailed` if any rank raises,
    exits without a result, or the run outlasts `timeout` seconds. Where
    several ranks fail, the message starts with the earliest failure (with
    its traceback) and names the others. Ranks in `may_die` (fault-injection
    tests) may exit without a result; their value is None. `started`, if
    given, is set once the fork server is running (or starting it failed):
    from then on the ranks inherit nothing from this process's state. The
    server takes this process's signal dispositions when it starts, on the
    first run, so a caller that ignores SIGINT until `started` is set gets
    ranks that ignore it.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = _context(fn)
    try:
        forkserver.ensure_running()
    finally:
        if started is not None:
            started.set()
    # Set once by rank 0 once its store is bound. Lock-free: a lock is a named
    # semaphore, which leaks (with a warning at exit) when a rank is killed or
    # the launching thread is abandoned; one aligned int needs none.
    port = ctx.RawValue("i", 0)
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [
        ctx.Process(target=_rank_main, daemon=True,
                    args=(fn, rank, world_size, port, backend, timeout, args, pipes[rank][1]))
        for rank in range(world_size)
    ]
    readers: dict[Any, int] = {}
    succeeded = False
    try:
        for rank, proc in enumerate(procs):
            proc.start()
            reader, writer = pipes[rank]
            writer.close()  # the child holds the only writer: its exit is EOF here
            readers[reader] = rank
        values = _collect(procs, readers, timeout, set(may_die))
        succeeded = True
        return values
    finally:
        spawned = [proc for proc in procs if proc.pid is not None]
        if succeeded:  # every rank reported: let them tear down their groups
            until = time.monotonic() + 5
            for proc in spawned:
                proc.join(timeout=max(0.0, until - time.monotonic()))
        for proc in spawned:  # after a failure nothing more is to come from any rank
            if proc.is_alive():
                proc.kill()
        for proc in spawned:
            proc.join(timeout=5)
        for reader, writer in pipes:
            reader.close()
            writer.close()


def _collect(procs: list[Any], readers: dict[Any, int], timeout: float,
             may_die: set[int]) -> list[Any]:
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    failures: list[_Failure] = []
    exited: dict[int, float] = {}  # rank -> when its end was seen
    sentinels = {proc.sentinel: rank for rank, proc in enumerate(procs)}
    settle_by: float | None = None

    def read(reader: Any) -> None:
        """Everything readable on `reader` now (several messages never come, but
        EOF does once the rank has exited)."""
        rank = readers[reader]
        while reader.poll():
            try:
                ok, at, payload = pickle.loads(reader.recv_bytes())
            except (EOFError, OSError):
                del readers[reader]
                return
            if ok:
                values[rank] = pickle.loads(payload)
            else:
                failures.append(_Failure(at, rank, payload))

    while True:
        reported = values.keys() | {f.rank for f in failures}
        for rank, seen in exited.items():
            if rank not in reported:
                if rank in may_die:
                    values[rank] = None
                else:
                    # Its sentinel closes as it exits, a moment before it can be reaped.
                    procs[rank].join(timeout=5)
                    failures.append(_Failure(seen, rank, None, procs[rank].exitcode))
                reported = reported | {rank}
        pending = [r for r in range(world_size) if r not in reported]
        now = time.monotonic()
        if failures:
            if settle_by is None:
                settle_by = min(now + _SETTLE_S, deadline)
            if not pending or now >= settle_by:
                raise RankFailed(_failure_message(failures, pending))
        elif not pending:
            return [values[r] for r in range(world_size)]
        elif now > deadline:
            raise RankFailed(f"rank(s) {pending} did not finish within {timeout:.0f} s")
        until = deadline if settle_by is None else settle_by
        waitables = [*readers, *(s for s, r in sentinels.items() if r not in exited)]
        ready = mpc.wait(waitables, timeout=max(0.0, until - now) + 0.01)
        seen = time.monotonic()
        for obj in ready:
            if obj in readers:
                read(obj)
        for obj in ready:
            if obj in sentinels:
                rank = sentinels[obj]
                # A rank writes its report before it exits: drain it first.
                for reader in [r for r, owner in readers.items() if owner == rank]:
                    read(reader)
                exited[rank] = seen
