"""What a rebalance costs the serving loop: ``eplb-fsm simulate`` async against off, one run.

Runs the simulate command's per-rank program (`eplb_fsm._sim.simulate.run_rank`)
with ``--mode async`` and then ``--mode off`` on the same spawned gloo ranks'
settings, and prints, over all ranks' steps:

- `step()` p50 / p99 / max in each mode, and async's p99 and max as a share
  of the forward pass's p50 (goals: <= 10% and <= 20%);
- async steps split by what they did: committed a layer batch (and launched
  the next: same step), only launched a transfer (`stage()`), the other
  steps while a rebalance was in flight, and idle steps; plus the time
  inside `stage()` and `commit()` themselves;
- the forward pass's p50 in async over the steps a rebalance was in flight,
  against off over the same steps (goal: within 5%). The launch worker's
  Python holds the GIL between its torch calls and its copies take CPU, so
  this is where the worker's cost to the forward pass shows.

    python benchmarks/simulate_bench.py [--ranks 2] [--steps 180] [--layers 4]
        [--hidden 512] [--intermediate 1024]   # the defaults: --preset realistic
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from _machine import cpu_line  # benchmarks/ is on sys.path

from eplb_fsm._sim.options import SimulateOptions
from eplb_fsm._sim.simulate import run_rank
from eplb_fsm.testing import run_ranks


def _rank(rank: int, world: int, opts: SimulateOptions) -> dict[str, Any]:
    """The simulate program, with `stage()` and `commit()` timed from inside."""
    from eplb_fsm._adapters.staged import StagedLayers
    from eplb_fsm._adapters.transfer import TransferEngine

    timed: dict[str, list[float]] = {"stage": [], "commit": []}
    stage, commit = TransferEngine.stage, StagedLayers.commit

    def timed_stage(self: TransferEngine, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return stage(self, *args, **kwargs)
        finally:
            timed["stage"].append((time.perf_counter() - start) * 1e6)

    def timed_commit(self: StagedLayers, layers: Any = None) -> None:
        start = time.perf_counter()
        try:
            commit(self, layers)
        finally:
            timed["commit"].append((time.perf_counter() - start) * 1e6)

    TransferEngine.stage = timed_stage  # type: ignore[method-assign]
    StagedLayers.commit = timed_commit  # type: ignore[method-assign]
    out = run_rank(rank, world, opts)
    out["timed"] = timed
    return out


def _kinds(history: list[tuple[Any, ...]], steps: int) -> list[str]:
    """Each step's kind (index = step - 1) from a rank's transition history."""
    kinds = ["idle"] * steps
    busy_from = None
    for step, source, dest, trigger in ((r[0], r[1], r[2], r[3]) for r in history):
        if source == "collecting" and dest == "planning":
            busy_from = step
        if dest == "collecting" and busy_from is not None:
            for s in range(busy_from, min(step, steps) + 1):
                kinds[s - 1] = "in flight" if kinds[s - 1] == "idle" else kinds[s - 1]
            busy_from = None
        if 1 <= step <= steps:
            if trigger == "layers_committed" or dest == "committing":
                kinds[step - 1] = "commit (+ next stage)"
            elif dest == "staging" and trigger == "plan_agreed":
                kinds[step - 1] = "stage only"
            elif kinds[step - 1] == "idle":
                kinds[step - 1] = "in flight"
    if busy_from is not None:
        for s in range(busy_from, steps + 1):
            kinds[s - 1] = "in flight" if kinds[s - 1] == "idle" else kinds[s - 1]
    return kinds


def _row(name: str, values: list[float], forward_p50: float) -> str:
    if not values:
        return f"{name:>26} {0:>6}"
    v = np.asarray(values)
    p50, p99, peak = np.percentile(v, 50), np.percentile(v, 99), v.max()
    return (f"{name:>26} {v.size:>6} {p50:>10.1f} {p99:>11.1f} {peak:>11.1f} "
            f"{p99 / forward_p50:>8.1%} {peak / forward_p50:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=180)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    args = parser.parse_args()
    runs = {}
    for mode in ("async", "off"):
        opts = SimulateOptions(ranks=args.ranks, steps=args.steps, mode=mode, layers=args.layers,
                               hidden=args.hidden, intermediate=args.intermediate, exact=False)
        runs[mode] = run_ranks(_rank, args.ranks, opts, timeout=1800)
    slot = 3 * args.hidden * args.intermediate * 4
    print(f"machine: {cpu_line()} at the end; torch {torch.__version__}, gloo on CPU; "
          f"{args.ranks} ranks, {args.steps} steps, {args.layers} layers x 64 experts + 16 "
          f"redundant, hidden {args.hidden}, intermediate {args.intermediate}, float32 "
          f"({slot / 2**20:.1f} MiB per slot); microseconds over all ranks' steps")
    forward = {mode: [f for r in results for f in r["forward_us"]]
               for mode, results in runs.items()}
    fwd_p50 = float(np.median(forward["async"]))
    head = (f"{'steps':>26} {'n':>6} {'p50 us':>10} {'p99 us':>11} {'max us':>11} "
            f"{'p99/fwd':>8} {'max/fwd':>8}")
    print(head)
    print("-" * len(head))
    for mode, results in runs.items():
        base = float(np.median(forward[mode]))
        print(_row(f"{mode}: all", [t for r in results for t in r["step_overhead_us"]], base))
    by_kind: dict[str, list[float]] = {}
    fwd_busy: dict[str, list[float]] = {"async": [], "off": []}
    for rank, result in enumerate(runs["async"]):
        history = result["final"]["history"]
        kinds = _kinds(history, args.steps)
        for kind, t in zip(kinds, result["step_overhead_us"], strict=True):
            by_kind.setdefault(kind, []).append(t)
        for i, kind in enumerate(kinds):
            if kind != "idle":
                fwd_busy["async"].append(result["forward_us"][i])
                fwd_busy["off"].append(runs["off"][rank]["forward_us"][i])
    for kind in ("commit (+ next stage)", "stage only", "in flight", "idle"):
        print(_row(f"async: {kind}", by_kind.get(kind, []), fwd_p50))
    for call in ("stage", "commit"):
        print(_row(f"async: inside {call}()",
                   [t for r in runs["async"] for t in r["timed"][call]], fwd_p50))
    moved = sum(r["final"]["stats"]["bytes_moved"] for r in runs["async"])
    done = runs["async"][0]["final"]["stats"]["rebalances"]["done"]
    print(f"\nbytes received, all ranks: {moved}; rebalances done: {done}")
    print(f"{'forward p50 us':>40} {'async':>10} {'off':>10} {'async/off':>9}")
    for name, a, o in (("all steps", forward["async"], forward["off"]),
                       ("steps with a rebalance in flight", fwd_busy["async"],
                        fwd_busy["off"])):
        pa, po = float(np.median(a)), float(np.median(o))
        print(f"{name:>40} {pa:>10.1f} {po:>10.1f} {pa / po:>9.3f}")


if __name__ == "__main__":
    main()
