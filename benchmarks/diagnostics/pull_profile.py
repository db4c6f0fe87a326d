"""Where the pull path's time goes on GPU (a diagnostic for issue 11, one table).

pull_bench.py measures the pull path end to end against one large peer copy
(the "pull bound"). This script takes the gap apart, on an idle GPU and next
to a bf16 GEMM stream, for 1 and 4 DeepSeek-V3-like layers (as in
transfer_bench.py). Per row, medians over repeats, the slowest rank:

- ``engine``: `TransferEngine(path="pull")`: stage(), then poll ready();
  split into the host time of stage() and the wall time until ready;
- ``raw, 1 stream``: the same copies (one per tensor and slot, the engine's
  layout) issued in a plain loop on one stream;
- ``raw, stream per peer``: the same, one stream per source rank;
- ``raw, 2 streams``: the same, alternating over two streams;
- ``raw + N local copies``: the raw copies plus what the engine staged
  before local moves went to commit (same-device copies on the side stream:
  under GEMMs they wait for SMs);
- ``one copy per peer``: the same bytes per source as one copy each;
- ``bound``: the rank's bytes as one copy from the next rank, on the current
  stream; ``side stream`` and ``fresh buffer`` (another destination) vary
  one thing each.

Also printed: rank 0's profiler table of one engine stage under GEMMs, and a
cProfile of stage() for 4 layers.

    python benchmarks/diagnostics/pull_profile.py            # every visible GPU
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# the shared helpers (pull_bench, transfer_bench) live one folder up
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import transfer_bench as tb
from pull_bench import GemmStream, profiling_case

from eplb_fsm._adapters.pull import export, open_handle
from eplb_fsm._adapters.staged import slot_nbytes, typed_view
from eplb_fsm._core.transfer_schedule import aligned, expert_stride
from eplb_fsm.testing import run_ranks
from eplb_fsm.transfer import TransferEngine


def _timed(fn: Callable[[], Callable[[], bool]], repeats: int,
           device: torch.device, busy: bool) -> tuple[float, float]:
    """(median host ms of fn(), median ms until its returned poll is true), slowest rank.

    Idle, every repeat starts at a barrier. Busy, the repeats run back to back:
    an NCCL barrier is a kernel, and under a GEMM stream it would wait for SMs."""
    times = []
    dist.barrier()
    for _ in range(repeats + 1):
        if not busy:
            dist.barrier()
            torch.cuda.current_stream(device).synchronize()
        start = time.perf_counter()
        poll = fn()
        host = time.perf_counter() - start
        while not poll():
            pass
        times.append((host, time.perf_counter() - start))
    # Reduced after the loop: no NCCL kernel inside the measured window.
    slowest = torch.tensor(times[1:], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    hosts, walls = slowest.cpu().T.tolist()
    return statistics.median(hosts) * 1e3, statistics.median(walls) * 1e3


def _profile(count: int, rank: int, world: int, engine: TransferEngine,
             weights: list[list[torch.Tensor]], old: np.ndarray, new: np.ndarray,
             gemm: GemmStream, alone: float, big: torch.Tensor,
             peer_big: dict[int, torch.Tensor], streams: dict[int, torch.cuda.Stream],
             repeats: int) -> list[dict[str, Any]]:
    device = big.device
    record = engine._shared[0]  # a diagnostic may look inside
    rows = []
    layers = list(range(count))
    prepared = engine.prepare(old, new, layers)
    sched = prepared.schedule
    nbytes = {layer: [slot_nbytes(w) for w in weights[layer]] for layer in layers}
    strides = {layer: expert_stride(sizes) for layer, sizes in nbytes.items()}
    layout = sched.layout(strides, 1, record.channels)
    staging = torch.empty(max(layout.staging_bytes, 1), dtype=torch.uint8, device=device)
    copies = []  # (src rank, dst view, src view)
    for offset, src, layer, slot in layout.pulls:
        at = offset
        for weight, peer_w, n in zip(weights[layer], record.peers[src][layer],
                                     nbytes[layer], strict=True):
            copies.append((src, typed_view(staging, at, n, weight), peer_w[slot]))
            at += aligned(n)
    # What the engine staged before local moves went to commit: one same-device
    # copy per local move and tensor, into a row after the pulled ones.
    moves = [(layer, step.src) for layer in layers for step in sched.steps_of(layer)
             if step.kind == "move"]
    move_rows = torch.empty(max(sum(strides[layer] for layer, _ in moves), 1),
                            dtype=torch.uint8, device=device)
    local = []  # (dst view, src view)
    at = 0
    for layer, slot in moves:
        for weight, n in zip(weights[layer], nbytes[layer], strict=True):
            local.append((typed_view(move_rows, at, n, weight), weight[slot]))
            at += aligned(n)
    per_src: dict[int, int] = {}
    for src, dst, _ in copies:
        per_src[src] = per_src.get(src, 0) + dst.numel() * dst.element_size()
    pulled = sum(per_src.values())
    mean_pulled = int(tb.reduce_value(pulled, device, dist.ReduceOp.SUM) / world)

    def engine_run() -> Callable[[], bool]:
        handle = engine.stage(old, new, layers, weights, prepared)

        def poll() -> bool:
            if handle.ready():
                handle.release()
                return True
            return False
        return poll

    def raw(per_peer: bool, whole: bool) -> Callable[[], bool]:
        events = []
        cur = torch.cuda.current_stream(device)
        at = 0
        for src in sorted(per_src):
            stream = streams[src] if per_peer else streams[rank]
            stream.wait_stream(cur)
            with torch.cuda.stream(stream):
                if whole:
                    n = per_src[src]
                    staging[at:at + n].copy_(peer_big[src][:n], non_blocking=True)
                    at += n
                else:
                    for s, dst, source in copies:
                        if s == src:
                            dst.copy_(source, non_blocking=True)
                if per_peer or src == max(per_src):
                    event = torch.cuda.Event()
                    event.record()
                    events.append(event)
        return lambda: all(e.query() for e in events)

    def two_streams() -> Callable[[], bool]:
        pair = [streams[rank], streams[(rank + 1) % world]]
        cur = torch.cuda.current_stream(device)
        for stream in pair:
            stream.wait_stream(cur)
        for index, (_, dst, source) in enumerate(copies):
            with torch.cuda.stream(pair[index % 2]):
                dst.copy_(source, non_blocking=True)
        events = []
        for stream in pair:
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return lambda: all(e.query() for e in events)

    def with_local(stream: torch.cuda.Stream) -> Callable[[], bool]:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _, dst, source in copies:
                dst.copy_(source, non_blocking=True)
            for dst, source in local:
                dst.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return event.query

    def bound(stream: torch.cuda.Stream | None, dst: torch.Tensor) -> Callable[[], bool]:
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            dst[:pulled].copy_(peer_big[(rank + 1) % world][:pulled], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return event.query

    fresh = torch.empty(max(pulled, 1), dtype=torch.uint8, device=device)
    methods: list[tuple[str, Callable[[], Callable[[], bool]]]] = [
        ("engine", engine_run),
        ("raw, 1 stream", lambda: raw(False, False)),
        ("raw, stream per peer", lambda: raw(True, False)),
        ("raw, 2 streams", lambda: two_streams()),
        (f"raw + {len(local)} local copies", lambda: with_local(streams[rank])),
        ("one copy per peer", lambda: raw(True, True)),
        ("bound, side stream", lambda: bound(streams[rank], big)),
        ("bound, fresh buffer", lambda: bound(None, fresh)),
        ("bound", lambda: bound(None, big)),
    ]
    idle_wall: dict[str, float] = {}
    for busy in (False, True):
        for name, fn in methods:
            if busy:
                # Enough GEMMs to outlast every repeat even at half speed.
                span = (repeats + 1) * (idle_wall[name] + 1.0) / 1e3
                gemm.start(int(max(8, 2 * span / alone)))
                lo = gemm.mark()
            host, wall = _timed(fn, repeats, device, busy)
            if not busy:
                idle_wall[name] = wall
            slow = float("nan")
            if busy:
                inside = gemm.durations((lo, gemm.mark()))
                slow = statistics.mean(inside) / alone if inside else float("nan")
                slow = tb.reduce_value(slow, device, dist.ReduceOp.SUM) / world
                torch.cuda.synchronize(device)  # the next method starts on an idle GPU
            moved = mean_pulled
            rows.append(dict(layers=count, busy=busy, method=name, host=host, wall=wall,
                             gbps=moved / 1e9 / (wall / 1e3), copies=len(copies),
                             mb=moved / 1e6, slow=slow))
    if rank == 0 and count == 1:  # which device work the engine's stage runs, under GEMMs
        from torch.profiler import ProfilerActivity, profile
        gemm.start(12)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            poll = engine_run()
            while not poll():
                pass
            torch.cuda.synchronize(device)
        rows.append(dict(trace=prof.key_averages().table(sort_by="self_cuda_time_total",
                                                         row_limit=14)))
        gemm.durations()
    if rank == 0 and count == 4:  # where stage()'s host time goes
        import cProfile
        import io
        import pstats
        cprof = cProfile.Profile()
        for _ in range(5):
            cprof.enable()
            handle = engine.stage(old, new, layers, weights, prepared)
            cprof.disable()
            handle.wait_blocking()
            handle.release()
        text = io.StringIO()
        pstats.Stats(cprof, stream=text).sort_stats("tottime").print_stats(18)
        rows.append(dict(trace=text.getvalue()))
    return rows


def rank_fn(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    device, old, new, weights, engine, gemm, alone = profiling_case(rank, world)
    # A buffer every peer maps: the source of "one copy per peer" and "bound".
    big = torch.empty(4 * 2**30, dtype=torch.uint8, device=device)
    handles: list[Any] = [None] * world
    dist.all_gather_object(handles, export(big)[0])
    peer_big = {src: open_handle(handles[src], device) for src in range(world) if src != rank}
    streams = {src: torch.cuda.Stream(device) for src in range(world)}
    rows = []
    for count in (1, 4):
        rows += _profile(count, rank, world, engine, weights, old, new, gemm, alone, big,
                         peer_big, streams, args["repeats"])
    return {"rows": rows, "card": torch.cuda.get_device_name(device), "gemm_ms": alone * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    ns = parser.parse_args()
    world = ns.gpus or torch.cuda.device_count()
    out = run_ranks(rank_fn, world, {"repeats": ns.repeats}, backend="nccl", timeout=400)[0]
    print(f"pull_profile: {world} x {out['card']}, torch {torch.__version__}; medians of "
          f"{ns.repeats}, slowest rank; GEMM {out['gemm_ms']:.2f} ms alone")
    print(f"{'layers':>6} {'GEMMs':>5} {'method':<22} {'copies':>6} {'MB':>7} {'host ms':>8} "
          f"{'wall ms':>8} {'GB/s':>7} {'GEMM slow':>9}")
    traces = [r["trace"] for r in out["rows"] if "trace" in r]
    for r in out["rows"]:
        if "trace" in r:
            continue
        print(f"{r['layers']:>6} {('on' if r['busy'] else 'off'):>5} {r['method']:<22} "
              f"{r['copies']:>6} {r['mb']:7.0f} {r['host']:8.3f} {r['wall']:8.3f} "
              f"{r['gbps']:7.1f} {r['slow']:9.3f}")
    for trace in traces:
        print(trace)


if __name__ == "__main__":
    main()
