"""Run a function on N local processes joined in a torch.distributed group.

Used by the multi-process tests and by ``eplb-fsm simulate``: each rank is
a fresh *spawned* process (never forked: torch and threads don't survive a
fork), and the whole run is bounded in time: a rank that hangs or dies
makes `run_ranks` kill the others and raise, naming the rank, instead of
blocking its caller.

The rendezvous store is bound by rank 0 on a port the OS picks (port 0),
and rank 0 hands the port to the others. Picking a free port in the parent
and binding it later in rank 0 raced with every other process on the
machine (tests run in parallel, and gloo opens ephemeral ports): it failed
once with EADDRINUSE.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["RankFailed", "free_port", "run_ranks"]


class RankFailed(RuntimeError):
    """A rank raised, died or outlived the deadline; the message says which and why."""


def free_port() -> int:
    """A TCP port free at the time of the call (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: Any,
    backend: str,
    timeout_s: float,
    args: Sequence[Any],
    results: Any,
) -> None:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if rank == 0:
            store = dist.TCPStore("127.0.0.1", 0, None, True, timeout)
            with port.get_lock():
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
        value = fn(rank, world_size, *args)
        # Pickled here, by value: the queue's own pickler would send tensors as
        # shared-memory handles that the parent can only open while this
        # process lives, and it may exit before the parent reads them.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            # A peer's death can break teardown; the result is already sent.
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    may_die: Sequence[int] = (),
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on `world_size` spawned processes.

    `fn` and `args` must be picklable (a module-level function). Returns the
    ranks' return values in rank order; raises `RankFailed` if any rank
    raises, exits without a result, or the run outlasts `timeout` seconds.
    Ranks in `may_die` (fault-injection tests) may exit without a result;
    their value is None.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = ctx.Value("i", 0)  # set by rank 0 once its store is bound
    procs = [
        ctx.Process(target=_rank_main, daemon=True,
                    args=(fn, rank, world_size, port, backend, timeout, args, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    expected = set(range(world_size))
    try:
        while not expected <= values.keys():
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in values and p.exitcode is not None]
                if dead:
                    # Give a dying rank's last message a moment to arrive.
                    time.sleep(0.5)
                    while not results.empty():
                        rank, ok, value = results.get()
                        if not ok:
                            raise RankFailed(f"rank {rank} raised:\n{value}") from None
                        values[rank] = pickle.loads(value)
                    dead = [r for r in dead if r not in values]
                    for r in [r for r in dead if r in may_die]:
                        values[r] = None
                        dead.remove(r)
                    if dead:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise RankFailed(f"rank(s) {dead} exited without a result "
                                         f"(exit codes {codes})") from None
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in values]
                    raise RankFailed(f"rank(s) {missing} did not finish within "
                                     f"{timeout:.0f} s") from None
                continue
            if not ok:
                raise RankFailed(f"rank {rank} raised:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
    return [values[r] for r in range(world_size)]
