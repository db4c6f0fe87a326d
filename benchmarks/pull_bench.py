"""Pull path vs NCCL: bandwidth per rank and the slowdown of a concurrent GEMM stream.

Every rank runs a stream of bf16 8192x8192 matmuls on a non-default CUDA
stream (``--gemm-on-default``: on the legacy default stream, the stream that
is current when the engine stages; docs/integration.md) while the
`TransferEngine` stages DeepSeek-V3-like experts (three bf16 tensors,
7168x2048 + 2048x7168 + 7168x2048 = 88 MB per slot) between two random
placements, `--repeats` times back to back (stage, poll `ready()`, release:
nothing is committed, so every repeat moves the same bytes). Methods:

- ``nccl``: ``TransferEngine(path="nccl")`` (batched send/recv);
- ``nccl, NCCL_MAX_CTAS=8``: the same in a separate spawn of ranks whose
  environment sets it before NCCL initialises (fewer SMs, less bandwidth);
- ``pull``: ``TransferEngine(path="pull")`` after ``share_weights`` (CUDA IPC,
  copy engines);
- ``pull bound``: every rank copies the bytes it receives in the plan as one
  large copy from a peer's mapped buffer, nothing else running. Per-rank
  bytes, not their mean: the plan may give one rank more to receive than
  another (up to 1.14x the mean here), and the slowest rank's time sets
  both the path's figure and the bound's, so the ratio compares the
  channel, not the plan's balance. (Before 2026-11-26 the bound copied the
  mean bytes on every rank.)

GB/s per rank = mean bytes received per rank x repeats / the slowest rank's
time. GEMM slowdown = the mean GPU time of the GEMMs that ran entirely
inside the transfer window (per-GEMM CUDA events) / their mean time alone.
Goals (issue 11): pull >= 90% of the pull bound while overlapped, and
slowdown <= 1.10.

    python benchmarks/pull_bench.py                    # every visible GPU
    python benchmarks/pull_bench.py --gpus 2 --layers 1 4
    python benchmarks/pull_bench.py --dry-run          # gloo on CPU, tiny tensors
"""

from __future__ import annotations

import os

# NVLink SHARP / multicast stay off on the lent machines (see KINDS.md there).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transfer_bench import (
    DEEPSEEK_SHAPES,
    DRY_SHAPES,
    add_run_arguments,
    card_name,
    check_markers,
    choose_world,
    gpu_setup,
    make_weights,
    rank_case,
    reduce_value,
    run_values,
    sync_device,
)

from eplb_fsm._adapters.pull import export, open_handle
from eplb_fsm.testing import run_ranks
from eplb_fsm.transfer import TransferEngine, plan_layers, shared_empty


class GemmStream:
    """bf16 matmuls in a loop, timed one by one: CUDA events on a side stream
    (GPU), or a thread with host clocks (CPU dry run)."""

    def __init__(self, device: torch.device, size: int, on_default: bool = False) -> None:
        """`on_default`: run the GEMMs on the legacy default stream, as a serving
        loop that never picks a stream does (docs/integration.md)."""
        self.device = device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.stream: torch.cuda.Stream | None = None
        self.marks_on: torch.cuda.Stream | None = None  # None: the current stream
        if device.type == "cuda":
            self.stream = (torch.cuda.default_stream(device) if on_default
                           else torch.cuda.Stream(device))
            if on_default:
                # A window edge on the GEMMs' own stream would queue behind them;
                # torch's pool streams are non-blocking, so one of them does not.
                self.marks_on = torch.cuda.Stream(device)
        self._marks: list[Any] = []
        self._thread: threading.Thread | None = None

    def start(self, count: int) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._marks = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
            with torch.cuda.stream(self.stream):
                for i in range(count):
                    self._marks[i].record()
                    torch.mm(self.a, self.b)
                self._marks[count].record()
            return
        self._marks = []

        def run() -> None:
            for _ in range(count):
                self._marks.append(time.perf_counter())
                torch.mm(self.a, self.b)
            self._marks.append(time.perf_counter())

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def mark(self) -> Any:
        """A point of the timeline to compare GEMMs against (a window edge)."""
        if self.stream is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.marks_on or torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def durations(self, window: tuple[Any, Any] | None = None) -> list[float]:
        """Seconds of every GEMM (that ran entirely inside `window`)."""
        if self.stream is not None:
            self.stream.synchronize()
            torch.cuda.synchronize(self.device)
            spans = [(m0, m1) for m0, m1 in zip(self._marks, self._marks[1:], strict=False)]
            if window is not None:
                lo, hi = window
                spans = [(m0, m1) for m0, m1 in spans
                         if lo.elapsed_time(m0) >= 0 and m1.elapsed_time(hi) >= 0]
            return [m0.elapsed_time(m1) / 1e3 for m0, m1 in spans]
        assert self._thread is not None
        self._thread.join()
        pairs = list(zip(self._marks, self._marks[1:], strict=False))
        if window is not None:
            pairs = [(a, b) for a, b in pairs if a >= window[0] and b <= window[1]]
        return [b - a for a, b in pairs]


def profiling_case(rank: int, world: int) -> tuple[torch.device, np.ndarray, np.ndarray,
                                                   list[list[torch.Tensor]], TransferEngine,
                                                   GemmStream, float]:
    """What the GPU diagnostics (pull_profile.py, stage_timeline.py) start from:
    `gpu_setup`'s case, a pull engine that has shared the weights (a
    collective), and a warmed-up GEMM stream with one GEMM's seconds alone."""
    device, old, new, weights = gpu_setup(rank, world)
    engine = TransferEngine(path="pull")
    engine.share_weights(weights)
    gemm = GemmStream(device, 8192)
    gemm.start(20)
    alone = statistics.median(gemm.durations()[1:])
    return device, old, new, weights, engine, gemm, alone


def _transfers(engine: TransferEngine, old: np.ndarray, new: np.ndarray, layers: list[int],
               weights: list[list[torch.Tensor]], repeats: int) -> None:
    # Planned beforehand, as the runtime's planning thread does: stage() only launches.
    prepared = engine.prepare(old, new, layers)
    for _ in range(repeats):
        handle = engine.stage(old, new, layers, weights, prepared)
        while not handle.ready():
            pass
        handle.release()  # nothing committed: the sender's live slots never change


def _measure(engine: TransferEngine, gemm: GemmStream, alone: float, old: np.ndarray,
             new: np.ndarray, layers: list[int], weights: list[list[torch.Tensor]],
             repeats: int, device: torch.device) -> tuple[float, float]:
    """(slowest rank's seconds for `repeats` transfers, mean GEMM slowdown), overlapped."""
    _transfers(engine, old, new, layers, weights, 1)  # warm-up (allocator, communicators)
    dist.barrier()
    sync_device(device)
    start = time.perf_counter()
    _transfers(engine, old, new, layers, weights, 1)
    single = reduce_value(time.perf_counter() - start, device, dist.ReduceOp.MAX)
    # Enough GEMMs to outlast every repeat even if the transfers slow down 2x.
    count = int(max(8, 2.5 * single * repeats / alone))
    dist.barrier()
    sync_device(device)
    gemm.start(count)
    if device.type == "cpu":
        time.sleep(alone)  # let the thread get going
    lo = gemm.mark()
    start = time.perf_counter()
    # ready() polls the transfer's own event: no device-wide sync here, which
    # would also wait for the GEMMs still queued and time them, not the transfer.
    _transfers(engine, old, new, layers, weights, repeats)
    took = time.perf_counter() - start
    hi = gemm.mark()
    inside = gemm.durations((lo, hi))
    slowdown = statistics.mean(inside) / alone if inside else float("nan")
    took = reduce_value(took, device, dist.ReduceOp.MAX)
    slowdown = reduce_value(slowdown, device, dist.ReduceOp.SUM) / dist.get_world_size()
    return took, slowdown


def _pull_bound(nbytes: int, device: torch.device, repeats: int,
                gemm: GemmStream | None = None, alone: float = 0.0) -> tuple[float, float]:
    """Slowest rank's seconds for one copy of its `nbytes` from the next rank's memory,
    and the mean GEMM slowdown when `gemm` runs meanwhile (NaN without).

    Overlapped, it tells the copy mechanism's own sensitivity to a busy GPU
    apart from the engine's: the same single copy, no staging, no schedule."""
    rank, world = dist.get_rank(), dist.get_world_size()
    size = int(reduce_value(nbytes, device, dist.ReduceOp.MAX))  # every peer's is enough
    mine = (shared_empty((size,), torch.uint8) if device.type == "cpu"
            else torch.empty(size, dtype=torch.uint8, device=device))
    handles: list[Any] = [None] * world
    dist.all_gather_object(handles, export(mine)[0])
    peer = open_handle(handles[(rank + 1) % world], device)[:nbytes]
    local = torch.empty(nbytes, dtype=torch.uint8, device=device)
    local.copy_(peer)
    times, slowdowns = [], []
    for _ in range(repeats):
        dist.barrier()
        sync_device(device)
        if gemm is not None:
            gemm.start(int(max(8, 4 * nbytes / 300e9 / alone)))
            lo = gemm.mark()
        start = time.perf_counter()
        if device.type == "cuda":
            # The copy, not the GEMMs: off their stream when they run on the current one.
            copier = (gemm.marks_on if gemm is not None and gemm.marks_on is not None
                      else torch.cuda.current_stream(device))
            with torch.cuda.stream(copier):
                local.copy_(peer, non_blocking=True)
            copier.synchronize()
        else:
            local.copy_(peer)
        times.append(reduce_value(time.perf_counter() - start, device, dist.ReduceOp.MAX))
        if gemm is not None:
            inside = gemm.durations((lo, gemm.mark()))
            slowdowns.append(statistics.mean(inside) / alone if inside else float("nan"))
    dist.barrier()
    slowdown = statistics.median(slowdowns) if slowdowns else float("nan")
    return statistics.median(times), slowdown


def bench_rank(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    device, shapes, old, new = rank_case(rank, world, args)
    num_layers = max(args["layers"])
    slot_bytes = sum(a * b for a, b in shapes) * 2
    weights = make_weights(old, rank, world, shapes, device)
    if device.type == "cpu":  # pullable on CPU only from shared memory
        for layer in weights:
            for i, w in enumerate(layer):
                layer[i] = shared_empty(tuple(w.shape), w.dtype).copy_(w)
    gemm = GemmStream(device, args["gemm_size"], args["gemm_on_default"])
    gemm.start(args["gemm_warmup"])
    alone = statistics.median(gemm.durations()[1:] or [1e-3])
    methods = (["nccl"] if args["only_nccl"]
               else ["nccl", "pull", "pull bound", "pull bound, overlapped"])
    rows = []
    for count in args["layers"]:
        layers = list(range(count))
        plan = plan_layers(old, new, world, layers)
        received = plan.bytes_received(rank, slot_bytes)
        mean_bytes = reduce_value(received, device, dist.ReduceOp.SUM) / world
        for method in methods:
            label = method + (", NCCL_MAX_CTAS=8" if args["only_nccl"] else "")
            if method.startswith("pull bound"):
                overlapped = method.endswith("overlapped")
                took, slow = _pull_bound(max(received, 1), device, args["repeats"],
                                         gemm if overlapped else None, alone)
                rows.append(dict(layers=count, method=label, mb=mean_bytes / 1e6,
                                 gbps=mean_bytes / 1e9 / took,
                                 slowdown=slow if overlapped else None))
                continue
            engine = TransferEngine(path=method)
            engine.share_weights(weights)
            if count == num_layers and method == "pull":  # correctness, once
                check = make_weights(old, rank, world, shapes, device)
                if device.type == "cpu":
                    check = [[shared_empty(tuple(w.shape), w.dtype).copy_(w) for w in layer]
                             for layer in check]
                check_engine = TransferEngine(path="pull")
                check_engine.share_weights(check)
                handle = check_engine.stage(old, new, layers, check)
                while not handle.ready():
                    pass
                dist.barrier()
                handle.commit()
                sync_device(device)
                check_markers(check, new, rank, world)
                del check, handle, check_engine
            took, slowdown = _measure(engine, gemm, alone, old, new, layers, weights,
                                      args["repeats"], device)
            rows.append(dict(layers=count, method=label, mb=mean_bytes / 1e6,
                             gbps=mean_bytes * args["repeats"] / 1e9 / took,
                             slowdown=slowdown))
    for row in rows:
        row["gemm_ms"] = alone * 1e3
    return rows


def table(rows: list[dict[str, Any]], args: dict[str, Any], world: int) -> str:
    shapes = DRY_SHAPES if args["dry_run"] else DEEPSEEK_SHAPES
    lines = [
        f"pull_bench: {world} x {card_name(args['backend'])}, torch {torch.__version__}",
        f"expert slot = 3 bf16 tensors {' + '.join(f'{a}x{b}' for a, b in shapes)}; "
        f"{args['slots']} slots/rank; random old -> random new placement, seed {args['seed']}",
        f"GEMM stream: {args['gemm_size']}^3 matmuls on "
        f"{'the legacy default' if args['gemm_on_default'] else 'a non-default'} stream, "
        f"{rows[0]['gemm_ms']:.2f} ms each alone (rank 0); {args['repeats']} transfers per "
        "measurement; GB/s per rank = mean bytes received / slowest rank's time",
        "",
        f"{'layers':>6}  {'method':<26} {'MB/rank':>9} {'GB/s/rank':>10} {'% pull bound':>13} "
        f"{'GEMM slowdown':>14}",
    ]
    bound = {r["layers"]: r["gbps"] for r in rows if r["method"] == "pull bound"}
    for r in sorted(rows, key=lambda r: r["layers"]):
        pct = f"{100 * r['gbps'] / bound[r['layers']]:13.1f}" if bound.get(r["layers"]) else \
            f"{'':>13}"
        slow = f"{r['slowdown']:14.3f}" if r["slowdown"] is not None else f"{'(alone)':>14}"
        lines.append(f"{r['layers']:>6}  {r['method']:<26} {r['mb']:9.1f} {r['gbps']:10.1f} "
                     f"{pct} {slow}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, repeats=5)
    parser.add_argument("--gemm-on-default", action="store_true",
                        help="run the GEMMs on the legacy default stream, the one current "
                             "when the engine stages, instead of a side stream "
                             "(docs/integration.md)")
    ns = parser.parse_args(argv)
    args: dict[str, Any] = {
        **run_values(ns, repeats=5),
        "gemm_size": 64 if ns.dry_run else 8192, "gemm_warmup": 5 if ns.dry_run else 20,
        "only_nccl": False, "gemm_on_default": ns.gemm_on_default,
    }
    if min(args["layers"]) < 1 or args["slots"] < 2 or args["repeats"] < 1:
        parser.error("--layers and --repeats must be >= 1 and --slots >= 2")
    world = choose_world(parser, ns.gpus, ns.dry_run)
    rows = run_ranks(bench_rank, world, args, backend=args["backend"], timeout=590)[0]
    # NCCL reads NCCL_MAX_CTAS when its communicators are created: a fresh spawn.
    os.environ["NCCL_MAX_CTAS"] = "8"
    try:
        rows += run_ranks(bench_rank, world, {**args, "only_nccl": True},
                          backend=args["backend"], timeout=590)[0]
    finally:
        del os.environ["NCCL_MAX_CTAS"]
    print(table(rows, args, world), flush=True)


if __name__ == "__main__":
    main()
