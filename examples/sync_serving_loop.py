"""A plain synchronous serving loop (no asyncio in the engine) with the balancer embedded.

How to drive the awaitable ``rt.step()`` from synchronous code: keep **one**
event loop for the life of the server and run each step on it
(`BlockingStepper` below, ten lines to copy). Why not the alternatives:

- ``asyncio.run(rt.step())`` per pass builds and tears down an event loop
  every pass (about 90 us on a 2-core CPU host, as much again as a typical
  step; the script prints both), and cancels any async hook callback still
  pending when it returns.
- ``EplbConfig(use_async=False)`` (``--no-async`` here) needs no loop
  trickery, but the step that reaches the interval runs the whole
  rebalance, planning and every layer's transfer, before it returns:
  vLLM's synchronous path, a stall of the serving loop once per interval.
  The script prints the slowest ``step()`` so you can see it.

With the loop kept, the asynchronous lifecycle needs nothing from you
between steps: planning runs on a worker thread, transfers and readiness
all-reduces are launched non-blocking and polled at agreed steps, and sync
hook callbacks run on the runtime's own thread.

Runs on CPU on ``--ranks`` spawned gloo processes (a few seconds)::

    python examples/sync_serving_loop.py
    python examples/sync_serving_loop.py --no-async
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from eplb_fsm import EplbConfig, EplbRuntime, balancedness, rank_load_from_physical
from eplb_fsm.reference import MoEConfig, ReferenceMoE, SyntheticTrace, sample_tokens
from eplb_fsm.testing import run_ranks

LAYERS, EXPERTS, REDUNDANT, TOP_K, TOKENS = 4, 16, 4, 2, 32


class BlockingStepper:
    """Drives an `EplbRuntime` from synchronous code on one event loop, kept for its life."""

    def __init__(self, runtime: EplbRuntime) -> None:
        self.runtime = runtime
        self._loop = asyncio.new_event_loop()

    def step(self, is_dummy: bool = False) -> None:
        """Call once per forward pass on every rank (raises `RebalanceFailed` like step())."""
        self._loop.run_until_complete(self.runtime.step(is_dummy=is_dummy))

    def close(self) -> None:
        """Let pending async hook callbacks finish (5 s at most), then close everything."""
        pending = asyncio.all_tasks(self._loop)
        if pending:
            self._loop.run_until_complete(asyncio.wait(pending, timeout=5))
        self.runtime.close()
        self._loop.close()


def serve_rank(rank: int, world: int, steps: int, use_async: bool) -> dict[str, Any]:
    """One rank's synchronous serving loop (module level, so `run_ranks` can pickle it)."""
    torch.set_num_threads(1)
    config = MoEConfig(num_layers=LAYERS, num_logical_experts=EXPERTS, hidden_size=16,
                       intermediate_size=32, top_k=TOP_K)
    model = ReferenceMoE(config, num_physical_experts=EXPERTS + REDUNDANT)
    rt = EplbRuntime(EplbConfig(window_size=20, step_interval=steps // 3,
                                num_redundant_experts=REDUNDANT, use_async=use_async))
    rt.add_model(model, "main")
    stepper = BlockingStepper(rt)
    trace = SyntheticTrace(LAYERS, EXPERTS, exponent=1.4, shift_steps=(steps // 2,), seed=0)
    per_pass, step_s = [], []
    for step in range(1, steps + 1):
        hidden = sample_tokens(config, TOKENS, step=step, rank=rank)
        routing = trace.routing(step, rank, TOKENS, TOP_K)
        out = model(hidden, routing)                      # the forward pass
        load = model.expert_load_view.clone()             # for the printout only
        dist.all_reduce(load)
        per_pass.append(balancedness(rank_load_from_physical(load.numpy(), world)))
        start = time.perf_counter()
        stepper.step()                                    # once per pass, on every rank
        step_s.append(time.perf_counter() - start)
    same = torch.equal(out, model.dense_reference()(hidden, routing))
    stats = rt.stats()["models"]["main"]
    stepper.close()
    return {"balancedness": per_pass, "rebalances": stats["rebalances"], "step_s": step_s,
            "same": same}


def driver_cost_us(calls: int = 500) -> tuple[float, float]:
    """Per-call cost of running an empty coroutine: asyncio.run vs one kept loop."""
    async def nothing() -> None:
        return None

    start = time.perf_counter()
    for _ in range(calls):
        asyncio.run(nothing())
    fresh = (time.perf_counter() - start) / calls * 1e6
    loop = asyncio.new_event_loop()
    start = time.perf_counter()
    for _ in range(calls):
        loop.run_until_complete(nothing())
    kept = (time.perf_counter() - start) / calls * 1e6
    loop.close()
    return fresh, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks to spawn")
    parser.add_argument("--steps", type=int, default=120, help="forward passes")
    parser.add_argument("--async", dest="use_async", action=argparse.BooleanOptionalAction,
                        default=True, help="EplbConfig.use_async (default: on)")
    args = parser.parse_args()
    if (EXPERTS + REDUNDANT) % args.ranks or args.steps < 60:
        parser.error(f"--ranks must divide {EXPERTS + REDUNDANT} slots; --steps must be >= 60")
    results = run_ranks(serve_rank, args.ranks, args.steps, args.use_async, timeout=300)
    first, window = results[0], 20
    rebalances = first["rebalances"]
    steps_us = [s * 1e6 for s in first["step_s"]]
    fresh, kept = driver_cost_us()
    print(f"sync serving loop: {args.ranks} gloo ranks, {args.steps} passes, use_async="
          f"{args.use_async}, step() driven by one kept event loop (BlockingStepper)")
    print(f"balancedness (measured, mean/max per-rank load per layer, averaged over layers): "
          f"first {window} passes {sum(first['balancedness'][:window]) / window:.4f}, "
          f"last {window} passes {sum(first['balancedness'][-window:]) / window:.4f}")
    print(f"rebalances: done {rebalances['done']}, dropped {rebalances['dropped']}, "
          f"failed {rebalances['failed']}")
    print(f"step() on rank 0: p50 {statistics.median(steps_us):.0f} us, "
          f"slowest {max(steps_us) / 1000:.1f} ms")
    print(f"running an empty coroutine from sync code: asyncio.run {fresh:.0f} us per call, "
          f"one kept loop {kept:.0f} us")
    print(f"outputs equal the dense model after rebalancing: "
          f"{'yes' if all(r['same'] for r in results) else 'NO'}")


# The guard is required: run_ranks spawns processes that import this file.
if __name__ == "__main__":
    main()
