"""The transfer engine's launch worker: `stage()` hands the launch over and returns.

Unit checks of `Launcher` (order, a job that raises, close) and `BufferPool`,
then one spawn of 2 gloo ranks that checks, on the real engine: no byte is
packed and no message posted on the calling thread; `stage()` returns while
the worker is busy and `ready()` says "not yet" until it launched; a launch
that raises on one rank becomes that handle's error while the peer's
transfer simply never completes (released), and the next, differently
tagged transfer between the same ranks completes on both; CPU buffers are
reused across transfers.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _transfer_checks import (
    LAYERS,
    _poll,
    after,
    assert_weights,
    make_weights,
    random_p2l,
)

from eplb_fsm._adapters import transfer as transfer_module
from eplb_fsm._adapters.launcher import BufferPool, Launcher
from eplb_fsm._adapters.transfer import TransferEngine
from eplb_fsm.testing import run_ranks

WAIT_S = 30.0


# -- Launcher and BufferPool, in process ------------------------------------------------------


def test_launcher_runs_jobs_in_order_and_survives_a_raising_job() -> None:
    launcher = Launcher()
    gate, ran, order = threading.Event(), threading.Event(), []

    def first() -> None:
        order.append("first")
        assert gate.wait(WAIT_S)

    def raising() -> None:
        order.append("raising")
        raise RuntimeError("a job's own error")

    launcher.submit(first)
    launcher.submit(raising)
    launcher.submit(lambda: (order.append("last"), ran.set()))
    assert order in ([], ["first"])  # the rest wait behind the blocked first job
    gate.set()
    assert ran.wait(WAIT_S)
    assert order == ["first", "raising", "last"]
    launcher.close()
    launcher.thread.join(WAIT_S)
    assert not launcher.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        launcher.submit(lambda: None)


def test_buffer_pool_reuses_best_fit_and_keeps_a_bounded_number() -> None:
    pool = BufferPool(keep=2)
    a = pool.take(100)
    assert a.numel() == 100 and pool.reused == 0
    pool.give(a)
    b = pool.take(60)  # a view of the 100-byte buffer, exactly 60 long
    assert b.numel() == 60 and b.data_ptr() == a.data_ptr() and pool.reused == 1
    assert pool.take(60).data_ptr() != a.data_ptr()  # taken: not handed out twice
    pool.give(b)  # gives back the whole buffer behind the view
    assert pool.idle_bytes == 100
    pool.give(b)  # twice is once
    assert pool.idle_bytes == 100
    big, small = torch.empty(500, dtype=torch.uint8), torch.empty(10, dtype=torch.uint8)
    pool.give(big)
    pool.give(small)  # three buffers, keep=2: the smallest goes
    assert pool.idle_bytes == 600
    assert pool.take(80).data_ptr() == a.data_ptr()  # best fit: 100, not 500
    pool.give(torch.empty(4, dtype=torch.float32))  # not a byte buffer: ignored
    assert pool.idle_bytes == 500
    pool.clear()
    assert pool.idle_bytes == 0


# -- the engine on 2 gloo ranks -------------------------------------------------------------


def _worker_checks(rank: int, world: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    p = [random_p2l(rng, world) for _ in range(4)]
    device = torch.device("cpu")
    engine = TransferEngine()
    assert engine.launcher is not None
    main = threading.current_thread()

    # 1. Nothing whose cost grows with bytes runs on the calling thread.
    seen: list[str] = []
    copy_slot, batch = TransferEngine._copy_slot, transfer_module.dist.batch_isend_irecv

    def spy_copy(*args: Any) -> None:
        seen.append("copy " + threading.current_thread().name)
        copy_slot(*args)

    def spy_batch(ops: Any) -> Any:
        seen.append("post " + threading.current_thread().name)
        return batch(ops)

    weights = make_weights(p[0], rank, world, device)
    TransferEngine._copy_slot = staticmethod(spy_copy)  # type: ignore[method-assign]
    transfer_module.dist.batch_isend_irecv = spy_batch  # type: ignore[attr-defined]
    try:
        handle = engine.stage(p[0], p[1], range(LAYERS), weights, tag=1)
        _poll(handle, "spied transfer")
    finally:
        TransferEngine._copy_slot = staticmethod(copy_slot)  # type: ignore[method-assign]
        transfer_module.dist.batch_isend_irecv = batch  # type: ignore[attr-defined]
    assert any(s.startswith("copy") for s in seen) and any(s.startswith("post") for s in seen)
    assert all(s.split(" ", 1)[1] == engine.launcher.thread.name for s in seen), seen
    assert main.name not in {s.split(" ", 1)[1] for s in seen}
    dist.barrier()  # every rank ready: the runtime's readiness round
    handle.commit()
    assert_weights(weights, make_weights(after(p[0], p[1]), rank, world, device), "spied")

    # 2. stage() returns while the worker is busy; ready() waits for the launch. The
    # same transfer again (fresh weights), so its buffers fit the first one's.
    current = after(p[0], p[1])
    again = make_weights(p[0], rank, world, device)
    gate = threading.Event()
    engine.launcher.submit(lambda: gate.wait(WAIT_S) and None)
    launched, reused = engine.launcher.launched, engine.pool.reused
    handle = engine.stage(p[0], p[1], range(LAYERS), again, tag=2)
    assert engine.launcher.launched == launched  # still blocked: nothing launched yet
    assert not handle.ready()
    gate.set()
    _poll(handle, "after the gate")
    dist.barrier()
    handle.commit()
    assert_weights(again, make_weights(current, rank, world, device), "gated")
    reused = engine.pool.reused - reused
    assert reused > 0  # the first transfer's buffers served the second

    # 3. A launch that raises on rank 1 is its handle's error; rank 0's transfer
    # never completes (its peer posted nothing) and is released; the next
    # transfer, tagged apart, completes on both.
    dist.barrier()
    send_and_receive = engine._send_and_receive
    if rank == 1:
        def failing(*args: Any, **kwargs: Any) -> None:
            raise MemoryError("no memory for the send buffer")
        engine._send_and_receive = failing  # type: ignore[method-assign]
    before = [[w.clone() for w in layer] for layer in weights]
    doomed = engine.stage(current, p[3], range(LAYERS), weights, tag=3)
    if rank == 1:
        with pytest.raises(RuntimeError, match=r"launch of the transfer .* MemoryError"):
            doomed.wait_blocking()
        engine._send_and_receive = send_and_receive  # type: ignore[method-assign]
    else:
        assert not doomed.ready()
    doomed.release()
    assert_weights(weights, before, "after the failed launch")
    dist.barrier()
    handle = engine.stage(current, p[3], range(LAYERS), weights, tag=4)
    _poll(handle, "after a failed launch")
    dist.barrier()
    handle.commit()
    assert_weights(weights, make_weights(after(current, p[3]), rank, world, device),
                   "after a failed launch")
    dist.barrier()
    engine.close()
    engine.launcher.thread.join(WAIT_S)
    assert not engine.launcher.thread.is_alive()

    # 4. An engine's worker ends when the engine is collected (rearrange_weights makes
    # one per call: no thread may outlive it).
    spare = TransferEngine()
    assert spare.launcher is not None
    thread = spare.launcher.thread
    assert thread.is_alive()
    del spare
    gc.collect()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    return {"reused": reused}


@pytest.mark.timeout(120)
def test_engine_launches_on_its_worker_on_gloo() -> None:
    results = run_ranks(_worker_checks, 2, 20240617, timeout=90)
    assert all(r["reused"] > 0 for r in results)
