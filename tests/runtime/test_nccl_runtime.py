"""The runtime on NCCL (GPU): the gloo runtime test's checks, with CUDA weights and maps.

Skipped without enough GPUs (CI has none); run on the lent machines with
``python -m pytest -m gpu tests/runtime/test_nccl_runtime.py``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_fsm import EplbConfig, EplbRuntime
from eplb_fsm.testing import TaggedMoEModel, run_ranks

L, E, REDUNDANT, STEPS = 3, 16, 4, 240


def _load(step: int) -> np.ndarray:
    rng = np.random.default_rng(0 if step < 120 else 1)
    return np.stack([rng.permutation(np.arange(1, E + 1) ** 2) for _ in range(L)])


def _serve(rank: int, world: int, use_async: bool) -> dict[str, Any]:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)

    async def main() -> dict[str, Any]:
        cfg = EplbConfig(window_size=30, step_interval=80, num_redundant_experts=REDUNDANT,
                         use_async=use_async, readiness_lag=2, peer_timeout_s=60.0)
        rt = EplbRuntime(cfg)
        model = TaggedMoEModel(rank, world, L, E, REDUNDANT, device=device)
        rt.add_model(model, "main")
        assert model.expert_load_view.is_cuda and model.logical_to_physical_map.is_cuda
        checks = 0
        for step in range(1, STEPS + 1):
            model.feed(_load(step))
            dist.barrier()
            before = len(rt.history())
            await rt.step()
            if any(r.dest == "committing" for r in rt.history()[before:]):
                torch.cuda.synchronize()
                assert model.wrong_slots(rt.placement().physical_to_logical) == []
                checks += 1
        torch.cuda.synchronize()
        p = rt.placement()
        assert model.wrong_slots(p.physical_to_logical) == []
        assert np.array_equal(model.logical_to_physical_map.cpu().numpy(),
                              p.logical_to_physical)
        stats = rt.stats()["models"]["main"]
        rt.close()
        return {"history": [tuple(r) for r in rt.history()], "checks": checks,
                "done": stats["rebalances"]["done"], "placement": p.physical_to_logical.tolist()}

    return asyncio.run(main())


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
def test_runtime_on_nccl_keeps_weights_and_maps_true(world: int, use_async: bool) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    results = run_ranks(_serve, world, use_async, backend="nccl", timeout=300)
    assert all(r["history"] == results[0]["history"] for r in results)
    assert all(r["placement"] == results[0]["placement"] for r in results)
    assert all(r["done"] >= 2 and r["checks"] >= 2 for r in results)
