"""Soak: 4 gloo ranks, two models, thousands of steps, a rebalance every few dozen.

What a long run must show, and how this test shows it:

- Every slot serves the expert its map names, at every step on every rank:
  the weights are tagged (`TaggedMoEModel`, plus one large tensor per layer so
  that a leaked staging buffer is visible in memory) and checked after every
  step against the maps in force; at the end `TaggedMoEModel.wrong_slots` on
  every rank, the model's map tensors equal `rt.placement()`, and the
  placements are equal across ranks (``all_gather_object``).
- Every rank took the same transitions at the same steps (identical histories),
  and no rebalance failed.
- Memory is flat: at quiescent checkpoints after warm-up (both models
  collecting, so no staging buffer may be alive) the live torch storage is
  byte-for-byte the same; memory allocated by eplb_fsm's own code (tracemalloc,
  started after warm-up) grows only by the transition history, which grows by
  design (one small record per transition); the objects a rebalance creates
  (plan futures, staged transfers, in-flight handles, host loads, threads,
  tasks) do not accumulate; RSS stays within a bound that one leaked staging
  buffer per rebalance would exceed several times over.

Load: `SyntheticTrace` (Zipf, drifting, with a sudden shift of the hot set);
each rank draws its own tokens from the trace's popularity and spreads each
expert's tokens over its replicas through the model's own maps, as a router
does. Dummy steps (no tokens) are drawn from a seed shared by all ranks, plus
one idle stretch. A ``dist.barrier()`` per step stands in for the forward
pass's collectives; the loop yields to the event loop once per step, as a
serving loop does, so async hooks run. Sync and async lifecycle hooks count
every event; none may be lost.

Run a shorter soak or inject a leak by calling `_soak` through `run_ranks` with
other steps and checkpoints, then `_verify` (both take them as arguments).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb_fsm import EplbConfig, EplbRuntime, LifecycleEvent
from eplb_fsm._adapters.launcher import BufferPool
from eplb_fsm.reference import SyntheticTrace
from eplb_fsm.testing import TaggedMoEModel, run_ranks

WORLD = 4
STEPS = 3000
INTERVAL = 60  # a rebalance (planning + every changed layer) takes ~20-30 steps here
REDUNDANT = 8  # one EplbConfig: every model has the same number of redundant experts
SEED = 20240607
DUMMY_FRACTION = 0.1
#: An idle stretch (every step dummy) longer than two intervals. Dummy passes are not
#: recorded, so the second rebalance in it plans from the same window as the first,
#: finds nothing to move (same load, placement kept by minimize_moves) and is dropped.
IDLE = range(2000, 2130)
TOKENS, TOP_K = 64, 2  # per rank per step
HEAVY = 16_384  # float32 elements per slot of the large tensor: 64 KiB a slot
#: Models: layers, logical experts; trace settings. P = E + REDUNDANT, split over 4 ranks.
MODELS: dict[str, dict[str, Any]] = {
    "main": dict(layers=5, logical=16, exponent=1.2, drift=0.02, shift=1500, seed=1),
    "draft": dict(layers=2, logical=8, exponent=1.6, drift=0.05, shift=2200, seed=2),
}
#: Quiescent checkpoints are taken at the first step >= each target where every
#: model is collecting and no balancedness round is in flight (see `_quiescent`);
#: memory is compared from the second one (after warm-up) on.
CHECKPOINTS = (600, 1200, 1800, 2400, 2900)
LAG = 2  # readiness_lag
LOG_INTERVAL = 10  # log_balancedness_interval: one all-reduce per model every 10 steps
#: Growth allowed in memory allocated by the runtime's code beyond the transition
#: history's own growth: fluctuation of bounded structures (the load window's map
#: versions, the current placements, pending balancedness rounds), measured <= 16 KiB.
#: Leaking one map version per commit would add ~1 KiB x ~4 commits per rebalance
#: pair x ~28 pairs between the compared checkpoints.
PACKAGE_SLACK = 32 * 1024
#: RSS growth allowed between the first and last checkpoint after warm-up. One
#: leaked staging buffer per rebalance (>= 64 KiB a slot, several slots) over the
#: ~35 rebalances per model in between would add far more.
RSS_SLACK = 8 * 1024 * 1024
WATCHED = ("Future", "StagedLayers", "InFlight", "HostLoad", "_Job", "_Planned", "Thread",
           "Task", "TransferPlan", "LayerPlan", "_TorchRound")


class HeavyTaggedModel(TaggedMoEModel):
    """`TaggedMoEModel` with a third, large tensor per layer (same tags)."""

    def __init__(self, rank: int, world_size: int, num_layers: int, num_logical: int,
                 num_redundant: int) -> None:
        super().__init__(rank, world_size, num_layers, num_logical, num_redundant)
        n = self.num_local_physical_experts
        experts = np.arange(rank * n, (rank + 1) * n) % num_logical
        for layer, tensors in enumerate(self.expert_weights):
            tags = torch.tensor([self.tag(layer, int(e), 2) for e in experts],
                                dtype=torch.float32)
            tensors.append(tags[:, None].expand(n, HEAVY).contiguous())


def _dummy_steps(steps: int) -> set[int]:
    """The same steps on every rank: drawn from the shared seed."""
    rng = np.random.default_rng([SEED, 0])
    drawn = set(np.flatnonzero(rng.random(steps + 1) < DUMMY_FRACTION).tolist()) - {0}
    return drawn | {s for s in IDLE if s <= steps}


def _feed(model: TaggedMoEModel, trace: SyntheticTrace, step: int, rank: int) -> None:
    """This rank's tokens of `step`: per layer, TOKENS * TOP_K assignments drawn from
    the trace's popularity with the rank's own generator, then spread over each
    expert's replicas through the model's current maps (first replicas take the rest)."""
    rng = np.random.default_rng([SEED, 1, trace.seed, step, rank])
    counts = rng.multinomial(TOKENS * TOP_K, trace.popularity(step))  # [L, E]
    num_layers = counts.shape[0]
    assert model.logical_to_physical_map is not None and model.logical_replica_count is not None
    assert model.expert_load_view is not None
    l2p = model.logical_to_physical_map.numpy()
    rc = model.logical_replica_count.numpy()
    assert (rc >= 1).all(), "a logical expert lost its last replica"
    k = np.arange(l2p.shape[2])
    amount = counts[..., None] // rc[..., None] + (k < (counts % rc)[..., None])
    valid = k < rc[..., None]
    assert (l2p[valid] >= 0).all()
    layer = np.broadcast_to(np.arange(num_layers)[:, None, None], l2p.shape)
    view = model.expert_load_view.numpy()
    np.add.at(view, (layer[valid], l2p[valid]), amount[valid])
    assert int(view.sum()) == TOKENS * TOP_K * num_layers


def _wrong_slot_count(model: TaggedMoEModel, p2l: np.ndarray, full: bool) -> int:
    """Slots of this rank whose weights are not the tagged weights of the expert `p2l`
    puts there: a vectorised `wrong_slots`. Every element when `full`; otherwise the
    small tensors whole and the large one at its first, middle and last element."""
    n = model.num_local_physical_experts
    local = torch.tensor(p2l[:, model.rank * n:(model.rank + 1) * n])
    wrong = 0
    for layer, tensors in enumerate(model.expert_weights):
        ids = local[layer]
        for i, tensor in enumerate(tensors):
            flat = tensor.reshape(n, -1)
            if not full and flat.shape[1] > 8:
                flat = flat[:, [0, flat.shape[1] // 2, -1]]
            want = (layer * 10_000 + ids * 10 + i).to(tensor.dtype)
            ok = (flat == want[:, None]).all(dim=1) | (ids < 0)
            wrong += int((~ok).sum())
    return wrong


def _check_maps(rt: EplbRuntime, name: str, model: TaggedMoEModel) -> None:
    p = rt.placement(name)
    assert model.logical_to_physical_map is not None and model.logical_replica_count is not None
    assert np.array_equal(model.logical_to_physical_map.numpy(), p.logical_to_physical), name
    assert np.array_equal(model.logical_replica_count.numpy(), p.replica_count), name


def _history_bytes(rt: EplbRuntime, names: Any) -> int:
    """What the transition histories hold: the records, the list slots and the step
    numbers (ints shared by the records of one step)."""
    total = 0
    for name in names:
        history = rt.history(name)
        total += sys.getsizeof(history) + sum(sys.getsizeof(r) for r in history)
        total += sum(sys.getsizeof(step) for step in {r.step for r in history})
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _census(pooled: frozenset[int] | set[int] = frozenset()) -> dict[str, Any]:
    """Live torch storage (count, bytes; deduplicated) and the watched object counts.
    Storage in `pooled` (data pointers of the transfer engine's idle reusable
    buffers) is counted apart: the pool keeps a few buffers as large as the
    largest transfer it served, by design, and their sizes follow the plans."""
    gc.collect()
    storages: dict[int, int] = {}
    kinds: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in WATCHED:
            kinds[name] += 1
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    pool = {ptr: n for ptr, n in storages.items() if ptr in pooled}
    rest = {ptr: n for ptr, n in storages.items() if ptr not in pooled}
    return {"tensors": len(rest), "tensor_bytes": sum(rest.values()),
            "pool_buffers": len(pool), "pool_bytes": sum(pool.values()),
            "objects": dict(kinds), "threads": threading.active_count()}


def _package_memory() -> dict[str, int]:
    """Bytes allocated since tracemalloc started by the runtime's code (core, runtime,
    adapters; not the edges, whose trace caches layouts) and still alive, per file."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, f"*/eplb_fsm/{part}/*")
         for part in ("_core", "_runtime", "_adapters")])
    return {str(stat.traceback[0].filename).split("eplb_fsm/", 1)[-1]: stat.size
            for stat in snapshot.statistics("filename")}


def _quiescent(rt: EplbRuntime, names: Any, step: int) -> bool:
    """Nothing of a rebalance or a balancedness round alive after `step`: every model
    collecting, and the log's rounds (launched at multiples of LOG_INTERVAL, read LAG
    steps later, each holding its [L, P] load tensor) all read. Which steps have
    every model collecting depends on how fast staging went (under load a rebalance
    takes more steps), so without the second condition a checkpoint could land on
    either side of a round's read: 2 tensors (1216 B) more or fewer, and the soak
    reported a leak that is not one (3 times in 4 under a CPU hog)."""
    return (step % LOG_INTERVAL >= LAG
            and all(rt.phase(name) == "collecting" for name in names))


def _soak(rank: int, world: int, steps: int, checkpoint_steps: tuple[int, ...]
          ) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        cfg = EplbConfig(window_size=40, step_interval=INTERVAL, num_redundant_experts=REDUNDANT,
                         readiness_lag=LAG, layers_per_transfer=2, peer_timeout_s=60.0,
                         log_balancedness=True, log_balancedness_interval=LOG_INTERVAL)
        rt = EplbRuntime(cfg)
        models = {name: HeavyTaggedModel(rank, world, spec["layers"], spec["logical"],
                                         REDUNDANT) for name, spec in MODELS.items()}
        for name, model in models.items():
            rt.add_model(model, name)
        traces = {name: SyntheticTrace(spec["layers"], spec["logical"],
                                       exponent=spec["exponent"], drift=spec["drift"],
                                       shift_steps=(spec["shift"],), seed=spec["seed"])
                  for name, spec in MODELS.items()}
        delivered = {"transition": 0, "commit": 0}

        def on_transition(event: LifecycleEvent) -> None:  # worker thread; keeps nothing
            delivered["transition"] += 1

        async def on_commit(event: LifecycleEvent) -> None:  # a task on this loop
            delivered["commit"] += 1

        rt.on("transition", on_transition)
        rt.on("commit", on_commit)

        dummies = _dummy_steps(steps)
        checkpoints: list[dict[str, Any]] = []
        targets = list(checkpoint_steps)
        worst_step_s = 0.0
        started = time.perf_counter()
        for step in range(1, steps + 1):
            dummy = step in dummies
            if not dummy:
                for name, model in models.items():
                    _feed(model, traces[name], step, rank)
            dist.barrier()  # the forward pass's collectives
            t0 = time.perf_counter()
            await rt.step(is_dummy=dummy)
            worst_step_s = max(worst_step_s, time.perf_counter() - t0)
            await asyncio.sleep(0)  # a serving loop yields between passes
            # Weights against the maps in force, every step: whole tensors at every
            # 10th step and wherever the lifecycle moved, sampled elsewhere.
            moved = any(rt.history(name)[-1:] and rt.history(name)[-1].step == step
                        for name in models)
            for name, model in models.items():
                wrong = _wrong_slot_count(model, rt.placement(name).physical_to_logical,
                                          full=moved or step % 10 == 0)
                assert wrong == 0, f"rank {rank} step {step} {name}: {wrong} wrong slots"
                _check_maps(rt, name, model)
            if targets and step >= targets[0] and _quiescent(rt, models, step):
                targets.pop(0)
                if not checkpoints:
                    tracemalloc.start()
                stats = rt.stats()["models"]
                pool = rt._mover.pool  # the TransferEngine's BufferPool
                checkpoints.append({
                    "step": step, "rss": _rss_bytes(),
                    **_census({b.untyped_storage().data_ptr() for b in pool.idle()}),
                    "package": _package_memory(),
                    "tracemalloc_overhead": tracemalloc.get_tracemalloc_memory(),
                    "history": sum(len(rt.history(name)) for name in models),
                    "history_bytes": _history_bytes(rt, models),
                    "done": sum(stats[name]["rebalances"]["done"] for name in models),
                })
        elapsed = time.perf_counter() - started
        tracemalloc.stop()
        assert not targets, f"no quiescent step for checkpoints {targets}"

        # Hooks: every event delivered, none lost (poll: they run off the step).
        total = {"transition": sum(len(rt.history(n)) for n in models),
                 "commit": sum(1 for n in models for r in rt.history(n)
                               if r.trigger == "layers_committed")}
        deadline = time.monotonic() + 10
        while delivered != total and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert delivered == total, (delivered, total)
        assert rt.stats()["hooks"]["errors"] == 0

        # Final verification on this rank, and across ranks.
        out: dict[str, Any] = {"checkpoints": checkpoints, "elapsed": elapsed,
                               "largest_buffer": rt._mover.pool.largest,
                               "worst_step_s": worst_step_s, "models": {}}
        for name, model in models.items():
            p = rt.placement(name)
            p.validate()
            assert model.wrong_slots(p.physical_to_logical) == []
            _check_maps(rt, name, model)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, p.physical_to_logical.tolist())
            assert all(g == gathered[0] for g in gathered), f"{name}: placements differ"
            stats = rt.stats()["models"][name]
            out["models"][name] = {
                "history": [tuple(r) for r in rt.history(name)],
                "rebalances": stats["rebalances"], "bytes_moved": stats["bytes_moved"],
                "layers_committed": stats["layers_committed"],
                "last_error": stats["last_error"], "placement": gathered[0],
            }
        out["dummies"] = len(dummies)
        rt.close()
        return out

    torch.manual_seed(rank)
    torch.set_num_threads(1)  # 4 ranks share 2 cores
    return asyncio.run(main())


def _growth(checkpoints: list[dict[str, Any]], key: str) -> int:
    return int(checkpoints[-1][key] - checkpoints[1][key])


def _verify(results: list[dict[str, Any]], steps: int,
            checkpoint_steps: tuple[int, ...]) -> dict[str, Any]:
    """Every cross-rank and memory assertion of the soak; returns its figures."""
    # Identical transition histories and placements on every rank; nothing failed.
    for name in MODELS:
        histories = [r["models"][name]["history"] for r in results]
        assert all(h == histories[0] for h in histories), f"{name}: histories differ"
        assert all(r["models"][name]["placement"] == results[0]["models"][name]["placement"]
                   for r in results)
        for r in results:
            reb = r["models"][name]["rebalances"]
            assert reb["failed"] == 0, r["models"][name]["last_error"]
            assert reb == results[0]["models"][name]["rebalances"]
    summary = {name: results[0]["models"][name]["rebalances"] for name in MODELS}
    for name, reb in summary.items():
        # Every interval started a rebalance (or found one in flight), most moved weights.
        assert reb["started"] + reb["skipped_triggers"] == steps // INTERVAL, (name, reb)
        assert reb["done"] >= steps // INTERVAL // 2, (name, reb)
        assert sum(r["models"][name]["bytes_moved"] for r in results) > 0
        if steps >= IDLE[-1]:
            assert reb["dropped"] >= 1, (name, reb)  # replanning an unchanged window

    # Memory: compared from the second checkpoint (tracemalloc's start) on.
    for rank, r in enumerate(results):
        cps = r["checkpoints"]
        assert len(cps) == len(checkpoint_steps)
        where = f"rank {rank}"
        span = cps[-1]["step"] - cps[1]["step"]
        assert cps[-1]["done"] - cps[1]["done"] >= span // INTERVAL, (where, cps)
        # No staging buffer (or anything else torch) outlives its rebalance, but for
        # the engine's pool of idle buffers, bounded: at most `keep` of them, each
        # no larger than the largest transfer's staging or send buffer.
        assert {(c["tensors"], c["tensor_bytes"]) for c in cps[1:]} == \
            {(cps[1]["tensors"], cps[1]["tensor_bytes"])}, (where, cps)
        assert all(c["pool_buffers"] <= BufferPool().keep for c in cps), (where, cps)
        assert all(c["pool_bytes"] <= BufferPool().keep * r["largest_buffer"] for c in cps), \
            (where, cps, r["largest_buffer"])
        # Plan futures, staged transfers, rounds, threads, tasks: no accumulation.
        for kind in WATCHED:
            counts = [c["objects"].get(kind, 0) for c in cps[1:]]
            assert max(counts) <= counts[0] + 2, (where, kind, counts)
        threads = [c["threads"] for c in cps[1:]]
        assert max(threads) <= threads[0] + 2, (where, threads)
        # The runtime's own allocations: the transition history grows by design (its
        # records, and the step numbers they hold), nothing else does.
        first, last = cps[1]["package"], cps[-1]["package"]
        grew = sum(last.values()) - sum(first.values())
        history_grew = _growth(cps, "history_bytes")
        per_file = {path: last.get(path, 0) - first.get(path, 0)
                    for path in set(first) | set(last)}
        assert grew <= history_grew + PACKAGE_SLACK, (where, grew, history_grew, per_file)
        assert _growth(cps, "rss") <= RSS_SLACK, (where, [c["rss"] for c in cps])

    first = results[0]
    return {
        "steps": steps, "dummy_steps": first["dummies"], "ranks": len(results),
        "rebalances_done": {name: reb["done"] for name, reb in summary.items()},
        "rebalances": summary,
        "layers_committed": {n: first["models"][n]["layers_committed"] for n in MODELS},
        "transitions": {n: len(first["models"][n]["history"]) for n in MODELS},
        "bytes_moved_all_ranks": {n: sum(r["models"][n]["bytes_moved"] for r in results)
                                  for n in MODELS},
        "checkpoint_steps": [c["step"] for c in first["checkpoints"]],
        "rss_mib_per_rank": [[round(c["rss"] / 2**20, 2) for c in r["checkpoints"]]
                             for r in results],
        "tensor_bytes_rank0": [c["tensor_bytes"] for c in first["checkpoints"]],
        "runtime_alloc_bytes_rank0": [sum(c["package"].values())
                                      for c in first["checkpoints"]],
        "history_bytes_rank0": [c["history_bytes"] for c in first["checkpoints"]],
        "loop_s": [round(r["elapsed"], 1) for r in results],
        "worst_step_ms": [round(r["worst_step_s"] * 1e3, 1) for r in results],
    }


@pytest.mark.slow
def test_soak_four_gloo_ranks_two_models_thousands_of_steps(
        record_property: Callable[[str, object], None]) -> None:
    started = time.perf_counter()
    results = run_ranks(_soak, WORLD, STEPS, CHECKPOINTS, timeout=240)
    figures = {**_verify(results, STEPS, CHECKPOINTS),
               "wall_s": round(time.perf_counter() - started, 1)}
    print(f"soak: {figures}")
    for key, value in figures.items():
        record_property(f"soak_{key}", value)
