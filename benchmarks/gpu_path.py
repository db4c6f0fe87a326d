"""The serving loop on GPUs: async vs sync vs off, step() overhead, on one machine.

Runs the reference EP MoE model (fast mode, bf16 weights) on every visible
GPU over NCCL with the runtime in each mode on the same trace, and reports:

- forward-pass throughput (tokens/s over forward + step() time) over the whole
  run and over the passes during a rebalance, as a ratio to ``off``;
- balancedness (first window, last window) and time per rebalance;
- ``step()`` overhead: idle p50/p99, in flight p50/p99, against a blocking
  gloo all-reduce of one int per step (what vLLM's async path does in flight),
  all measured in the same processes.

    python benchmarks/gpu_path.py [--gpus N] [--steps 240]

Keeps NCCL_NVLS_ENABLE=0 and the other multicast switches off. Prints a table
last, with the card's name.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb_fsm._edges.simulate import SimulateOptions, run_rank
from eplb_fsm.testing import run_ranks


def _rank(rank: int, world: int, opts: SimulateOptions) -> dict[str, Any]:
    if opts.device == "cuda":
        torch.cuda.set_device(rank)
    result = run_rank(rank, world, opts)
    baseline = []
    if opts.mode == "async":
        cpu = dist.new_group(backend="gloo")
        for _ in range(500):
            dist.barrier(group=cpu)
            start = time.perf_counter()
            flag = torch.ones(1, dtype=torch.int64)
            dist.all_reduce(flag, group=cpu)
            baseline.append((time.perf_counter() - start) * 1e6)
    result["baseline_us"] = baseline
    return result


def _summary(results: list[dict[str, Any]], opts: SimulateOptions) -> dict[str, Any]:
    r0 = results[0]
    phases = np.array(r0["phases"])
    busy = phases != "collecting"
    # Pass time of the slowest rank, step by step (forward + step()).
    passes = np.max([np.asarray(r["forward_us"]) + np.asarray(r["step_overhead_us"])
                     for r in results], axis=0)
    tokens = opts.tokens * len(results)
    steps_us = np.concatenate([np.asarray(r["step_overhead_us"]) for r in results])
    busy_all = np.concatenate([busy for _ in results])
    bal = np.asarray(r0["balancedness"])
    window = opts.window_size
    history = r0["history"]
    starts = [s for s, _src, dest, _t in history if dest == "planning"]
    ends = [s for s, _src, dest, _t in history if dest == "collecting"]
    durations = [e - s for s, e in zip(starts, ends, strict=False)]
    base = np.concatenate([np.asarray(r["baseline_us"]) for r in results]) \
        if results[0]["baseline_us"] else np.array([])
    return {
        "tok_s": tokens / (passes.mean() / 1e6),
        "tok_s_busy": tokens / (passes[busy].mean() / 1e6) if busy.any() else float("nan"),
        "pass_ms_p50": float(np.median(passes) / 1e3),
        "bal_first": float(bal[:window].mean()), "bal_last": float(bal[-window:].mean()),
        "rebalances": r0["stats"]["rebalances"]["done"],
        "steps_per_rebalance": float(np.mean(durations)) if durations else float("nan"),
        "step_idle": np.percentile(steps_us[~busy_all], [50, 99]) if (~busy_all).any()
        else [float("nan")] * 2,
        "step_busy": np.percentile(steps_us[busy_all], [50, 99]) if busy_all.any()
        else [float("nan")] * 2,
        "step_max_ms": float(steps_us.max() / 1e3),
        "baseline": np.percentile(base, [50, 99]) if base.size else None,
        "invariance": all(r["invariance_held"] for r in results) if opts.check_every else None,
        "bytes": sum(r["stats"]["bytes_moved"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--dry-run", action="store_true",
                        help="2 CPU ranks on gloo, tiny sizes: checks the script, not a GPU")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank per pass")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=1024)
    args = parser.parse_args()
    backend, device = ("gloo", "cpu") if args.dry_run else ("nccl", "cuda")
    if args.dry_run:
        args.gpus, args.tokens, args.hidden, args.intermediate = 2, 32, 64, 64
    base = SimulateOptions(
        ranks=args.gpus, steps=args.steps, layers=8, experts=64, redundant=16,
        tokens=args.tokens, hidden=args.hidden, intermediate=args.intermediate,
        step_interval=60, window_size=30, shift_steps=(130,), check_every=0,
        backend=backend, device=device, exact=False, dtype="bfloat16")
    rows = {}
    for mode in ("off", "async", "sync"):
        opts = dataclasses.replace(base, mode=mode)
        results = run_ranks(_rank, args.gpus, opts, backend=backend, timeout=900)
        rows[mode] = _summary(results, opts)
    card = "CPU (dry run, gloo)" if args.dry_run else torch.cuda.get_device_name(0)
    nccl = "" if args.dry_run else ".".join(map(str, torch.cuda.nccl.version()))
    print(f"gpu_path: {args.gpus} x {card}, torch {torch.__version__}, NCCL "
          f"{nccl or '-'}; model: 8 layers x 64 experts + 16 "
          f"redundant, hidden {args.hidden}, intermediate {args.intermediate}, bf16 weights, "
          f"top-2, {args.tokens} tokens/rank/pass, {args.steps} passes, interval 60, "
          "window 30, hot-set shift at 130; output invariance is checked by "
          "benchmarks/gpu_suite.sh's simulate run, not here (the dense oracle would hold "
          "every expert)")
    print("throughput = tokens / (forward + step()) of the slowest rank; 'busy' = passes "
          "while a rebalance is in flight; balancedness = mean/max per-rank load per layer, "
          "averaged over layers, actual per pass")
    off = rows["off"]["tok_s"]
    head = (f"{'mode':>6} {'tok/s':>10} {'vs off':>7} {'busy tok/s':>11} {'busy vs off':>11} "
            f"{'bal first':>9} {'bal last':>8} {'reb':>4} {'steps/reb':>9} "
            f"{'step idle p50/p99 us':>21} {'step busy p50/p99 us':>21} {'max ms':>7} "
            f"{'inv':>4}")
    print(head)
    print("-" * len(head))
    for mode, r in rows.items():
        print(f"{mode:>6} {r['tok_s']:>10.0f} {r['tok_s'] / off:>7.3f} "
              f"{r['tok_s_busy']:>11.0f} {r['tok_s_busy'] / off:>11.3f} "
              f"{r['bal_first']:>9.4f} {r['bal_last']:>8.4f} {r['rebalances']:>4} "
              f"{r['steps_per_rebalance']:>9.1f} "
              f"{r['step_idle'][0]:>10.1f}/{r['step_idle'][1]:<10.1f} "
              f"{r['step_busy'][0]:>10.1f}/{r['step_busy'][1]:<10.1f} "
              f"{r['step_max_ms']:>7.2f} "
              f"{'-' if r['invariance'] is None else 'yes' if r['invariance'] else 'NO':>4}")
    b = rows["async"]["baseline"]
    if b is not None:
        print(f"baseline (blocking gloo all-reduce of one int per step, same processes): "
              f"p50 {b[0]:.1f} us, p99 {b[1]:.1f} us; async in-flight p50 / baseline p50 = "
              f"{rows['async']['step_busy'][0] / b[0]:.3f}")


if __name__ == "__main__":
    main()
