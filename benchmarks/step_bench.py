"""Cost of ``await rt.step()`` on gloo CPU ranks: idle, and while a rebalance is in flight.

Against a baseline loop that does what vLLM's async EPLB does on every step
while a rebalance is in flight: one blocking gloo all-reduce of an int.
Each rank runs the same loop; outside the timed region a barrier and
``--forward-ms`` of busy computation stand in for the forward pass (its
collectives keep ranks in step, as serving does, and its compute lets the
barrier's gloo threads go quiet before `step()` runs, as they would in
serving). Times are per step, in microseconds, over all ranks' steps.

In flight, steps are split by what they did: launched a weight transfer
(`stage()`: on its own, or right after committing the previous layer batch,
at the same agreed step), launched a collective (a load or readiness
all-reduce), or nothing agreed. Each slot carries ``--slot-kb`` of weights
(default 1 MB) beside the tagged ones, so a transfer's cost in bytes shows:
a launch hands the bytes to the engine's worker and should cost about an
idle step; a commit copies one layer's changed slots on the serving thread
(CPU; on GPU it queues device copies) and costs what those bytes cost.

    python benchmarks/step_bench.py [--ranks 2 4] [--steps 3000] [--slot-kb 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from _machine import cpu_line  # benchmarks/ is on sys.path

from eplb_fsm import EplbConfig, EplbRuntime
from eplb_fsm.testing import TaggedMoEModel, run_ranks


class HeavyModel(TaggedMoEModel):
    """`TaggedMoEModel` plus one float32 tensor of `slot_kb` KiB per slot and layer."""

    def __init__(self, rank: int, world: int, slot_kb: int) -> None:
        super().__init__(rank, world, L, E, REDUNDANT)
        if slot_kb:
            n = self.num_local_physical_experts
            for tensors in self.expert_weights:
                tensors.append(torch.ones(n, slot_kb * 256, dtype=torch.float32))

L, E, REDUNDANT = 8, 64, 16


def _count_calls(obj: Any, name: str, took: list[float] | None = None) -> list[int]:
    """Count calls of `obj.name` (the bench's own instrumentation); `took` gets
    each call's microseconds."""
    counter = [0]
    method = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            if took is not None:
                took.append((time.perf_counter() - start) * 1e6)

    setattr(obj, name, counted)
    return counter


def _count_commits(took: list[float]) -> list[int]:
    from eplb_fsm._adapters.staged import StagedLayers

    counter = [0]
    commit = StagedLayers.commit

    def counted(self: StagedLayers, layers: Any = None) -> None:
        counter[0] += 1
        start = time.perf_counter()
        commit(self, layers)
        took.append((time.perf_counter() - start) * 1e6)

    StagedLayers.commit = counted  # type: ignore[method-assign]
    return counter


def _count_launches(rt: EplbRuntime) -> list[int]:
    """Wrap the runtime's all-reduce so the bench can tell launching steps apart."""
    counter = [0]
    allreduce = rt._allreduce
    launch = allreduce.launch

    def counted(values: Any) -> Any:
        counter[0] += 1
        return launch(values)

    allreduce.launch = counted  # type: ignore[method-assign]
    return counter


def _forward(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def _rank(rank: int, world: int, steps: int, forward_ms: float,
          record_every: int | None, slot_kb: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    rng = np.random.default_rng(rank)
    loads = torch.from_numpy(rng.integers(0, 50, size=(16, L, E + REDUNDANT)))
    inside: dict[str, list[float]] = {"inside stage()": [], "inside commit()": []}
    commits = _count_commits(inside["inside commit()"])

    async def measure(cfg: EplbConfig, steps: int) -> tuple[list[float], list[bool], list[str]]:
        rt = EplbRuntime(cfg)
        model = HeavyModel(rank, world, slot_kb)
        rt.add_model(model, "main")
        launches = _count_launches(rt)
        stages = _count_calls(rt._mover, "stage", inside["inside stage()"])
        driver = rt._drivers["main"]
        times, busy, kinds = [], [], []
        for i in range(steps):
            model.expert_load_view += loads[i % len(loads)]
            dist.barrier()
            _forward(forward_ms)
            before, was_busy = (launches[0], stages[0], commits[0]), driver.busy
            start = time.perf_counter()
            await rt.step()
            times.append((time.perf_counter() - start) * 1e6)
            busy.append(was_busy or driver.busy)
            kinds.append("commit" if commits[0] != before[2] else
                         "stage" if stages[0] != before[1] else
                         "round" if launches[0] != before[0] else "other")
        rt.close()
        return times, busy, kinds

    idle_cfg = EplbConfig(window_size=100, step_interval=10**9,
                          num_redundant_experts=REDUNDANT, load_record_interval=record_every)
    idle, _, _ = asyncio.run(measure(idle_cfg, steps))
    flight_cfg = EplbConfig(window_size=100, step_interval=200, readiness_lag=4,
                            num_redundant_experts=REDUNDANT, load_record_interval=record_every)
    times, busy, kinds = asyncio.run(measure(flight_cfg, steps))
    in_flight = [t for t, b in zip(times, busy, strict=True) if b]

    def of(kind: str) -> list[float]:
        return [t for t, b, k in zip(times, busy, kinds, strict=True) if b and k == kind]

    async def noop() -> None:
        return None

    async def empty_steps() -> list[float]:
        # The same loop with a coroutine that does nothing: what the process and
        # machine cost a step right after the barrier, before the runtime does anything.
        times = []
        for _ in range(steps):
            dist.barrier()
            _forward(forward_ms)
            start = time.perf_counter()
            await noop()
            times.append((time.perf_counter() - start) * 1e6)
        return times

    empty = asyncio.run(empty_steps())
    cpu_group = dist.new_group(backend="gloo")
    baseline = []
    for _ in range(steps):
        dist.barrier()
        _forward(forward_ms)
        start = time.perf_counter()
        flag = torch.ones(1, dtype=torch.int64)
        dist.all_reduce(flag, group=cpu_group)  # blocking, every step in flight
        baseline.append((time.perf_counter() - start) * 1e6)
    return {"empty coroutine": empty, "idle": idle, "in_flight": in_flight,
            "in_flight_stage_only": of("stage"), "in_flight_commit_and_stage": of("commit"),
            "in_flight_round": of("round"), "in_flight_other": of("other"),
            "baseline": baseline, **inside}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--record-every", type=int, default=None,
                        help="EplbConfig.load_record_interval (default: 1 on CPU)")
    parser.add_argument("--forward-ms", type=float, default=0.0,
                        help="busy compute standing in for the forward pass")
    parser.add_argument("--slot-kb", type=int, default=1024,
                        help="KiB of extra weights per slot and layer (0: tagged weights only)")
    args = parser.parse_args()
    rows = []
    for world in args.ranks:
        results = run_ranks(_rank, world, args.steps, args.forward_ms, args.record_every,
                            args.slot_kb, timeout=900)
        merged: dict[str, list[float]] = {}
        for result in results:
            for key, values in result.items():
                merged.setdefault(key, []).extend(values)
        rows.append((world, merged))
    print(f"machine: {cpu_line()} at the end; torch {torch.__version__}, gloo on CPU; "
          f"model {L} layers x {E} experts + {REDUNDANT} redundant, "
          f"{args.slot_kb} KiB more per slot; {args.steps} steps per "
          f"loop per rank, {args.forward_ms:g} ms forward, load_record_interval "
          f"{args.record_every or 1}; microseconds per step over all ranks")
    head = (f"{'ranks':>5} {'loop':>28} {'steps':>6} {'p50 us':>8} {'p99 us':>9} "
            f"{'p50 vs baseline':>15} {'p50 vs idle':>11}")
    print(head)
    print("-" * len(head))
    for world, merged in rows:
        base = float(np.median(merged["baseline"]))
        idle = float(np.median(merged["idle"]))
        for key in ("empty coroutine", "idle", "in_flight", "in_flight_stage_only",
                    "in_flight_commit_and_stage", "in_flight_round", "in_flight_other",
                    "baseline", "inside stage()", "inside commit()"):
            values = np.asarray(merged[key])
            if values.size == 0:
                continue
            p50, p99 = np.percentile(values, [50, 99])
            print(f"{world:>5} {key:>28} {values.size:>6} {p50:>8.1f} {p99:>9.1f} "
                  f"{p50 / base:>14.2f}x {p50 / idle:>10.2f}x")


if __name__ == "__main__":
    main()
