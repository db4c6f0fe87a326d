"""Where a launching `step()` spends its host time, part by part (diagnostic).

One rank (world 1: every move is a local copy), the reference model in
``async`` mode, the driver's methods timed on every step. A "launching"
step is one that called ``stage()``; its parts are the driver methods that
ran inside it (agreeing on the plan, committing the previous batch, the
commit's map updates, staging, launching a readiness round).

    python benchmarks/diagnostics/launch_parts.py [--device cuda] [--steps 360] [--profile]

``--profile`` also runs every ``step()`` under cProfile and prints the
functions that take the most host time (their own time, summed over the
run, per launching step).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from eplb_fsm import EplbRuntime
from eplb_fsm._reference.moe import ReferenceMoE, sample_tokens
from eplb_fsm._sim.simulate import SimulateOptions
from eplb_fsm.testing import run_ranks

PARTS = ("_agree_on_plan", "_predicted", "_commit", "_commit_maps", "_record", "_stage_next",
         "_launch_round", "_outcome", "_transfer_ready", "_fire")


def _timed(obj: Any, name: str, spent: dict[str, float]) -> None:
    original: Callable[..., Any] = getattr(obj, name)
    if asyncio.iscoroutinefunction(original):
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        setattr(obj, name, async_wrapper)
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
    setattr(obj, name, wrapper)


async def _serve(opts: SimulateOptions, device: torch.device,
                 profile: bool) -> tuple[list[dict[str, float]], str]:
    config = opts.moe_config()
    model = ReferenceMoE(config, opts.physical, device=device)
    runtime = EplbRuntime(opts.eplb_config(), device=device)
    runtime.add_model(model, "main")
    driver = runtime._drivers["main"]
    mover = runtime._mover
    spent: dict[str, float] = collections.defaultdict(float)
    for name in PARTS:
        _timed(driver, name, spent)
    _timed(mover, "stage", spent)
    trace = opts.trace()
    rows = []
    profiler = cProfile.Profile() if profile else None
    for step in range(1, opts.steps + 1):
        hidden = sample_tokens(config, opts.tokens, step=step, rank=0).to(device)
        model(hidden, trace.routing(step, 0, opts.tokens, opts.top_k))
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step alone, not the pass's queued kernels
        spent.clear()
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        await runtime.step()
        total = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        if spent.get("stage"):
            rows.append({"step()": total, **spent})
    runtime.close()
    text = ""
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        text = f"cProfile over every step() (the counts cover {len(rows)} launching " \
               f"steps):\n" + out.getvalue()
    return rows, text


def _rank(rank: int, world: int, opts: SimulateOptions, device: str,
          profile: bool) -> tuple[list[dict[str, float]], str]:
    torch.set_num_threads(1)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    return asyncio.run(_serve(opts, dev, profile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=360)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of every step() (slows the steps)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    opts = SimulateOptions(
        ranks=1, steps=args.steps, layers=8, experts=64, redundant=16, tokens=256,
        hidden=args.hidden if cuda else 256, intermediate=args.intermediate if cuda else 256,
        step_interval=40, window_size=20, shift_steps=(100, 200, 300), check_every=0,
        backend="nccl" if cuda else "gloo", device=args.device, exact=False,
        dtype="bfloat16", mode="async")
    rows, profile = run_ranks(_rank, 1, opts, args.device, args.profile,
                              backend=opts.backend, timeout=900)[0]
    card = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"launch_parts: 1 x {card}, torch {torch.__version__}; {len(rows)} launching "
          f"steps of {args.steps}; microseconds of host time")
    head = f"{'part':>16} {'steps':>6} {'p50 us':>9} {'p90 us':>9} {'max us':>9}"
    print(head)
    print("-" * len(head))
    for part in ("step()", "stage", *PARTS):
        values = sorted(r[part] * 1e6 for r in rows if part in r)
        if values:
            print(f"{part:>16} {len(values):>6} {statistics.median(values):>9.1f} "
                  f"{values[int(0.9 * (len(values) - 1))]:>9.1f} {values[-1]:>9.1f}")
    if profile:
        print(f"\n{profile}")


if __name__ == "__main__":
    main()
