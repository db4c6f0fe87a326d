"""An asyncio serving loop with the balancer embedded: ``await rt.step()`` after each pass.

Each rank serves the reference expert-parallel MoE model
(`eplb_fsm.reference.ReferenceMoE`) on its own tokens, routed by a skewed
trace whose hot set shifts halfway, and calls ``await rt.step()`` once per
forward pass. The rebalance (planning, weight transfers, readiness rounds,
commits) is spread over later steps at agreed step numbers, so no pass
waits for it. An async callback on the ``"rebalance"`` hook stands for an
engine that wants to know when the placement changed.

Runs on CPU: it spawns ``--ranks`` gloo processes with
`eplb_fsm.testing.run_ranks` (a few seconds)::

    python examples/asyncio_serving_loop.py
    python examples/asyncio_serving_loop.py --ranks 4 --steps 240

`run_ranks` starts each rank as a fresh (spawned) Python process that
imports this file: a script that calls it must do so under
``if __name__ == "__main__":``, as this one does at the bottom, and the
function each rank runs must be defined at module level, so it pickles.
Without the guard each spawned rank, importing the file, would try to launch
ranks of its own, and the run fails with multiprocessing's RuntimeError about
the "bootstrapping phase".

Prints measured balancedness (mean/max per-rank token load per layer,
averaged over layers) over the first and last passes, the rebalances, the
hook's events, and two checks: the outputs still equal a dense
single-process evaluation of the same weights, and every rank went through
the same lifecycle transitions at the same steps. In your engine, replace
the model and the trace with yours; the loop stays the same.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import torch
import torch.distributed as dist

from eplb_fsm import EplbConfig, EplbRuntime, LifecycleEvent, balancedness, rank_load_from_physical
from eplb_fsm.reference import MoEConfig, ReferenceMoE, SyntheticTrace, sample_tokens
from eplb_fsm.testing import run_ranks

LAYERS, EXPERTS, REDUNDANT, TOP_K, TOKENS = 4, 16, 4, 2, 32


async def serve(rank: int, world: int, steps: int) -> dict[str, Any]:
    config = MoEConfig(num_layers=LAYERS, num_logical_experts=EXPERTS, hidden_size=16,
                       intermediate_size=32, top_k=TOP_K)
    model = ReferenceMoE(config, num_physical_experts=EXPERTS + REDUNDANT)
    rt = EplbRuntime(EplbConfig(window_size=20, step_interval=steps // 3,
                                num_redundant_experts=REDUNDANT))
    rt.add_model(model, "main")
    seen: list[str] = []

    async def on_rebalance(event: LifecycleEvent) -> None:
        # Runs as a task on this loop, off the step: a slow one cannot stall serving.
        seen.append(f"step {event.step} {event.trigger}")

    rt.on("rebalance", on_rebalance)
    trace = SyntheticTrace(LAYERS, EXPERTS, exponent=1.4, shift_steps=(steps // 2,), seed=0)
    per_pass: list[float] = []
    for step in range(1, steps + 1):
        hidden = sample_tokens(config, TOKENS, step=step, rank=rank)
        routing = trace.routing(step, rank, TOKENS, TOP_K)
        out = model(hidden, routing)                      # the forward pass
        # For the printout only: the pass's global per-slot load (one extra all-reduce).
        load = model.expert_load_view.clone()
        dist.all_reduce(load)
        per_pass.append(balancedness(rank_load_from_physical(load.numpy(), world)))
        await rt.step()                                   # once per pass, on every rank
    await asyncio.sleep(0)  # let the last async hook callbacks run
    same = torch.equal(out, model.dense_reference()(hidden, routing))
    stats = rt.stats()["models"]["main"]
    history = [tuple(record) for record in rt.history()]
    rt.close()
    return {"balancedness": per_pass, "rebalances": stats["rebalances"],
            "bytes": stats["bytes_moved"], "seen": seen, "same": same, "history": history}


def serve_rank(rank: int, world: int, steps: int) -> dict[str, Any]:
    """What `run_ranks` runs on each spawned rank (module level, so it pickles)."""
    torch.set_num_threads(1)
    return asyncio.run(serve(rank, world, steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks to spawn")
    parser.add_argument("--steps", type=int, default=120, help="forward passes")
    args = parser.parse_args()
    if (EXPERTS + REDUNDANT) % args.ranks or args.steps < 60:
        parser.error(f"--ranks must divide {EXPERTS + REDUNDANT} slots; --steps must be >= 60")
    results = run_ranks(serve_rank, args.ranks, args.steps, timeout=300)
    first = results[0]
    window = 20
    rebalances = first["rebalances"]
    print(f"asyncio serving loop: {args.ranks} gloo ranks, {args.steps} passes, {LAYERS} "
          f"layers x {EXPERTS} experts + {REDUNDANT} redundant slots, top-{TOP_K}")
    print("balancedness (measured every pass: mean/max per-rank load per layer, "
          "averaged over layers)")
    print(f"  first {window} passes  {sum(first['balancedness'][:window]) / window:.4f}")
    print(f"  last {window} passes   {sum(first['balancedness'][-window:]) / window:.4f}")
    print(f"rebalances: done {rebalances['done']}, dropped {rebalances['dropped']}, "
          f"failed {rebalances['failed']}; bytes received {sum(r['bytes'] for r in results)}"
          f" (all ranks)")
    print(f"async 'rebalance' hook on rank 0 saw: {', '.join(first['seen']) or 'nothing'}")
    print(f"outputs equal the dense model after rebalancing: "
          f"{'yes' if all(r['same'] for r in results) else 'NO'}")
    print(f"same transitions at the same steps on every rank: "
          f"{'yes' if all(r['history'] == first['history'] for r in results) else 'NO'}")


# The guard is required: run_ranks spawns processes that import this file.
if __name__ == "__main__":
    main()
