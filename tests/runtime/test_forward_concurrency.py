"""The runtime's collectives next to the forward pass's own, on skewed ranks.

Each rank's "forward pass" runs an EP MoE's collectives on every pass: an
all-reduce (a tensor-parallel reduction) and an ``all_to_all_single`` (the
dispatch), on the model's data group, while the runtime rebalances
concurrently: its weight transfers on its transfer group (launched at one
step, in flight through the next passes), its load and readiness
all-reduces on its own gloo group. One rank, changing every few passes,
sleeps a random 0-3 ms before its forward pass, so ranks reach every
collective and every ``step()`` at different times, as stragglers do.

Why this cannot deadlock (docs/design.md, "Why the runtime's collectives
cannot deadlock the forward pass's"): a rank issues its NCCL/gloo calls on
each communicator in program order, and the runtime adds its calls only
inside ``step()``, at a step number agreed by all ranks, between the same two
forward passes on every rank. So on any communicator (shared or not) every
rank issues the same sequence: forward s's collectives, the transfer launched
at step s, forward s + 1's collectives. The readiness rounds go to a third
(gloo) group and are only launched and polled, never waited on while a
forward collective could be blocked on this rank. A wrong order — a rank
launching a transfer one step late — shows up here as a hang (bounded by
`run_ranks`' timeout, so the test fails), as a garbled forward result, or
as weights landing in the wrong slot.

Variants:

- gloo (CI, CPU): the all-reduce shares the transfer group (WORLD); the
  all-to-all runs on a separate gloo group.
- NCCL (``-m gpu``, skipped without GPUs): ``separate`` — the forward on
  WORLD, the transfers on another NCCL communicator; ``shared`` — forward and
  transfers on the same NCCL communicator (WORLD)::

      python -m pytest -q -m gpu tests/runtime/test_forward_concurrency.py
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_fsm import EplbConfig, EplbRuntime
from eplb_fsm.testing import TaggedMoEModel, run_ranks

L, E = 3, 12  # and `world` redundant slots, so 12 + world slots split evenly
STEPS, INTERVAL = 240, 60  # rebalances start at 60, 120, 180 (and 240, unfinished)
IN_FLIGHT = ("staging", "awaiting_all_ranks")


class WideTaggedModel(TaggedMoEModel):
    """`TaggedMoEModel` plus one wide float tensor per layer, also tagged.

    Why: the base model's slots are a few bytes, so a transfer finishes before
    the next forward pass starts. A wide slot keeps NCCL transfers in flight
    while the next passes issue their collectives. ``wrong_slots`` checks the
    new tensor too (it checks every tensor of a layer against its tag).
    """

    def __init__(self, rank: int, world: int, width: int, device: torch.device) -> None:
        super().__init__(rank, world, L, E, world, device=device)
        n = self.num_local_physical_experts
        experts = (np.arange(rank * n, (rank + 1) * n) % E).tolist()
        for layer, tensors in enumerate(self.expert_weights):
            tags = torch.tensor([float(self.tag(layer, e, len(tensors))) for e in experts])
            tensors.append(tags[:, None].expand(n, width).contiguous().to(device))


def _load(step: int) -> np.ndarray:
    """[L, E] logical load; the hot set changes every interval, so each rebalance moves."""
    rng = np.random.default_rng(step // INTERVAL)
    return np.stack([rng.permutation(np.arange(1, E + 1) ** 2) for _ in range(L)])


def _forward(step: int, rank: int, world: int, reduce_group: Any, dispatch_group: Any,
             device: torch.device) -> bool:
    """One pass's collectives; True if both results are exactly what they must be.

    The all-reduce sums ``(r + 1) * step`` over ranks r; in the all-to-all
    rank r sends ``1000 r + 10 j + step % 7`` to rank j.
    """
    x = torch.full((1024,), float(step), device=device) * (rank + 1)
    dist.all_reduce(x, group=reduce_group)
    send = torch.tensor([[1000 * rank + 10 * j + step % 7] * 16 for j in range(world)],
                        dtype=torch.int64, device=device)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=dispatch_group)
    expect = torch.tensor([[1000 * i + 10 * rank + step % 7] * 16 for i in range(world)],
                          dtype=torch.int64)
    total = step * world * (world + 1) / 2
    return bool((x.cpu() == total).all()) and torch.equal(received.cpu(), expect)


def _serve(rank: int, world: int, backend: str, shared: bool) -> dict[str, Any]:
    """One rank: STEPS forward passes, each followed by ``await rt.step()``."""
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        width = 1 << 20  # 4 MB per slot tensor: transfers outlive a forward pass
    else:
        device, width = torch.device("cpu"), 256
    torch.set_num_threads(1)
    world_group = dist.group.WORLD
    if backend == "nccl":
        # separate: the transfers get their own NCCL communicator; shared: WORLD's.
        transfer_group = world_group if shared else dist.new_group(backend="nccl")
        reduce_group = dispatch_group = world_group
    else:
        # The all-reduce shares WORLD with the transfers; the all-to-all does not.
        transfer_group = reduce_group = world_group
        dispatch_group = dist.new_group(backend="gloo")

    async def main() -> dict[str, Any]:
        # The NCCL path on purpose (same-node ranks could also pull): the point
        # is NCCL transfers next to NCCL forward collectives.
        cfg = EplbConfig(window_size=20, step_interval=INTERVAL, num_redundant_experts=world,
                         readiness_lag=2, peer_timeout_s=60.0, load_record_interval=1,
                         transfer_path="nccl")
        rt = EplbRuntime(cfg, group=transfer_group, device=device)
        model = WideTaggedModel(rank, world, width, device)
        rt.add_model(model, "main")
        correct, in_flight, commits = 0, 0, 0
        maps_per_pass = []  # which placement each pass was routed with
        for step in range(1, STEPS + 1):
            straggler = (step // 7) % world
            if rank == straggler:
                time.sleep(np.random.default_rng((step, rank)).uniform(0.0, 0.003))
            in_flight += rt.phase() in IN_FLIGHT
            maps_per_pass.append(zlib.crc32(rt.placement().physical_to_logical.tobytes()))
            correct += _forward(step, rank, world, reduce_group, dispatch_group, device)
            model.feed(_load(step))
            before = len(rt.history())
            await rt.step()
            if any(r.dest == "committing" for r in rt.history()[before:]):
                commits += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
                p = rt.placement()
                assert model.wrong_slots(p.physical_to_logical) == [], (step, rank)
                assert model.logical_to_physical_map is not None
                assert np.array_equal(model.logical_to_physical_map.cpu().numpy(),
                                      p.logical_to_physical)
        stats = rt.stats()["models"]["main"]
        rt.close()
        return {"history": [tuple(r) for r in rt.history()], "correct": correct,
                "maps_per_pass": maps_per_pass, "steps": rt.step_count,
                "in_flight_passes": in_flight, "commits": commits,
                "done": stats["rebalances"]["done"], "failed": stats["rebalances"]["failed"],
                "bytes": stats["bytes_moved"],
                "placement": rt.placement().physical_to_logical.tolist()}

    return asyncio.run(main())


def _check(results: list[dict[str, Any]]) -> None:
    histories = [r["history"] for r in results]
    assert all(h == histories[0] for h in histories)
    # The maps changed before the same forward pass on every rank.
    assert all(r["maps_per_pass"] == results[0]["maps_per_pass"] for r in results)
    assert len(set(results[0]["maps_per_pass"])) >= 4  # initial + 3 rebalances
    assert all(r["steps"] == STEPS for r in results)
    assert all(r["placement"] == results[0]["placement"] for r in results)
    assert [r["correct"] for r in results] == [STEPS] * len(results)
    assert all(r["done"] >= 3 and r["failed"] == 0 for r in results), results
    # Every rank committed a layer at least once per finished rebalance, and
    # forward passes ran while a layer's transfer was launched but not committed.
    assert all(r["commits"] >= 3 for r in results)
    assert all(r["in_flight_passes"] >= 3 * 2 * 2 for r in results)
    assert sum(r["bytes"] for r in results) > 0


@pytest.mark.timeout(120)
def test_forward_collectives_and_rebalances_interleave_on_gloo() -> None:
    _check(run_ranks(_serve, 3, "gloo", True, timeout=90))


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("world", [2, 4])
def test_forward_collectives_and_rebalances_interleave_on_nccl(world: int,
                                                               shared: bool) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, found {torch.cuda.device_count()}")
    _check(run_ranks(_serve, world, "nccl", shared, timeout=240, backend="nccl"))
