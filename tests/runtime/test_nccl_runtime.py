"""The runtime on NCCL (GPU): the gloo runtime test's checks, with CUDA weights and maps.

Skipped without enough GPUs (CI has none); run on the lent machines with
``python -m pytest -m gpu tests/runtime/test_nccl_runtime.py``.
"""

from __future__ import annotations

import asyncio
import os
import time
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
@pytest.mark.parametrize("world", [1, 2, 4])  # world 1: every move a local commit copy
@pytest.mark.parametrize("use_async", [True, False], ids=["async", "sync"])
def test_runtime_on_nccl_keeps_weights_and_maps_true(world: int, use_async: bool) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    results = run_ranks(_serve, world, use_async, backend="nccl", timeout=300)
    assert all(r["history"] == results[0]["history"] for r in results)
    assert all(r["placement"] == results[0]["placement"] for r in results)
    assert all(r["done"] >= 2 and r["checks"] >= 2 for r in results)


SPIN_CYCLES = 400_000_000  # ~0.2 s of one kernel on an H200: the pass in flight at step()


def _serve_with_a_pass_in_flight(rank: int, world: int, path: str) -> dict[str, Any]:
    """Every step() is called as a serving loop calls it: the host has just
    synchronised (sampling) and queued the next forward pass, here ~0.2 s of
    one kernel, so any host wait inside step() (a device sync, a blocking
    copy, a kernel's first launch in the process) lasts until that kernel ends."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)

    async def main() -> dict[str, Any]:
        cfg = EplbConfig(window_size=6, step_interval=10, num_redundant_experts=REDUNDANT,
                         use_async=True, readiness_lag=2, peer_timeout_s=60.0,
                         transfer_path=path)
        rt = EplbRuntime(cfg)
        model = TaggedMoEModel(rank, world, L, E, REDUNDANT, device=device)
        rt.add_model(model, "main")
        await rt.step(is_profile=True)  # as an engine's memory profiling does (integration.md)
        torch.cuda._sleep(1000)  # the spin kernel's own first launch, while nothing runs
        torch.cuda.synchronize()
        took = []
        for step in range(1, 61):
            model.feed(_load(step * 4))  # the hot set moves at step 30
            dist.barrier()
            torch.cuda.synchronize()
            torch.cuda._sleep(SPIN_CYCLES)
            start = time.perf_counter()
            await rt.step()
            took.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        assert model.wrong_slots(rt.placement().physical_to_logical) == []
        done = rt.stats()["models"]["main"]["rebalances"]["done"]
        rt.close()
        held = {i + 1: round(t * 1e3) for i, t in enumerate(took) if t >= 0.1}
        assert not held, f"steps held the host behind the pass in flight (step: ms): {held}"
        return {"done": done, "slowest_ms": max(took) * 1e3}

    return asyncio.run(main())


@pytest.mark.gpu
@pytest.mark.timeout(200)
@pytest.mark.parametrize("path", ["auto", "nccl"])
def test_step_never_waits_for_the_pass_in_flight(path: str) -> None:
    """A fresh process per path: first launches of kernels inside step() show here."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_ranks(_serve_with_a_pass_in_flight, 2, path, backend="nccl", timeout=150)
    assert all(r["done"] >= 1 for r in results), results
