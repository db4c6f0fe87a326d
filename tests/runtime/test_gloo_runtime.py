"""The runtime on real gloo processes: 3 ranks, hundreds of steps, several rebalances.

After every commit, every slot on every rank holds the weights of the expert
its map names, and the three maps agree with each other and across ranks.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_fsm import EplbConfig, EplbRuntime
from eplb_fsm.testing import TaggedMoEModel, run_ranks

L, E, REDUNDANT, STEPS = 3, 12, 3, 300


def _load(step: int, layers: int = L, experts: int = E) -> np.ndarray:
    # The hot set shifts at step 150, so the second rebalance has work to do.
    rng = np.random.default_rng(0 if step < 150 else 1)
    return np.stack([rng.permutation(np.arange(1, experts + 1) ** 2) for _ in range(layers)])


def _check_maps(rt: EplbRuntime, model: TaggedMoEModel) -> None:
    p = rt.placement()
    assert model.wrong_slots(p.physical_to_logical) == []
    assert np.array_equal(model.logical_to_physical_map.numpy(), p.logical_to_physical)
    assert np.array_equal(model.logical_replica_count.numpy(), p.replica_count)


def _serve(rank: int, world: int, use_async: bool) -> dict:
    async def main() -> dict:
        cfg = EplbConfig(window_size=40, step_interval=100, num_redundant_experts=REDUNDANT,
                         use_async=use_async, readiness_lag=2, peer_timeout_s=30.0)
        rt = EplbRuntime(cfg)
        model = TaggedMoEModel(rank, world, L, E, REDUNDANT)
        rt.add_model(model, "main")
        commits = 0
        for step in range(1, STEPS + 1):
            model.feed(_load(step))
            dist.barrier()  # stands in for the forward pass's own collectives
            before = len(rt.history())
            await rt.step()
            if any(r.dest == "committing" for r in rt.history()[before:]):
                commits += 1
                _check_maps(rt, model)
        _check_maps(rt, model)
        placements = [None] * world
        dist.all_gather_object(placements, rt.placement().physical_to_logical.tolist())
        assert all(p == placements[0] for p in placements)
        stats = rt.stats()["models"]["main"]
        rt.close()
        return {"history": [tuple(r) for r in rt.history()], "commits": commits,
                "done": stats["rebalances"]["done"], "bytes": stats["bytes_moved"],
                "placement": placements[0]}

    torch.manual_seed(rank)
    return asyncio.run(main())


@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
def test_rebalances_on_three_gloo_ranks_keep_weights_and_maps_true(use_async: bool) -> None:
    results = run_ranks(_serve, 3, use_async, timeout=120)
    histories = [r["history"] for r in results]
    assert all(h == histories[0] for h in histories)
    assert all(r["done"] >= 2 for r in results), [r["done"] for r in results]
    assert all(r["commits"] >= 2 for r in results)
    assert sum(r["bytes"] for r in results) > 0
    if not use_async:
        assert {step for step, *_ in histories[0]} <= {100, 200, 300}
