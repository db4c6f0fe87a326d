"""Timeline of the pull path's staging step on GPU (a diagnostic for issue 11).

pull_bench.py says how far the pull path is from one large peer copy;
pull_profile.py says which alternative copy schemes close the gap. This
script says *where in time* the gap sits, from a torch.profiler trace of
`TransferEngine(path="pull")` stages (host and device events on one clock),
per stage, medians over repeats, every rank, idle and next to a bf16 GEMM stream:

- ``unprofiled``: from entering stage() to its first copy call, without the
  profiler (which slows every torch call it records), in a separate run;
- ``to 1st API``: from entering stage() to the first ``cudaMemcpyAsync``
  call (Python and torch work the transfer waits for);
- ``to 1st copy``: from entering stage() to the first copy starting on the
  device;
- ``copies``: from the first copy's start to the last one's end on the device,
  and ``gaps``: the idle time between consecutive copies in that span;
- ``to ready``: from the last copy's end to ``ready()`` returning True;
- ``stage host``: stage()'s whole host time; ``repeat``: one stage + poll +
  release, stage entry to stage entry (what pull_bench times).

Then one repeat of the slowest rank, event by event from entering stage():
the host operations (slices and ``copy_`` calls left out) and the device
copies, with their start offsets: what the first copy waits for.

    python benchmarks/diagnostics/stage_timeline.py            # every visible GPU
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
import itertools
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from pull_bench import profiling_case
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from eplb_fsm._adapters.staged import SlotBytes
from eplb_fsm.testing import run_ranks
from eplb_fsm.transfer import TransferEngine

COLUMNS = ("unprofiled", "to 1st API", "to 1st copy", "copies", "gaps", "to ready",
           "stage host", "repeat")


def _spans(prof: Any, repeats: int) -> tuple[list[dict[str, float]], list[str]]:
    """Per-repeat figures (µs) from the trace, and the host ops of the middle repeat."""
    events = list(prof.events())
    cpu = torch.autograd.DeviceType.CPU
    # Host ranges only: with CUDA activity on, each range also appears as a device
    # annotation spanning its device work, under the same name.
    marks = {e.name: e.time_range for e in events
             if e.device_type == cpu and e.name.startswith(("stage#", "poll#"))}
    api = sorted(e.time_range.start for e in events if e.name == "cudaMemcpyAsync")
    device = sorted((e.time_range.start, e.time_range.end) for e in events
                    if e.name.startswith("Memcpy") and e.device_type != cpu)
    rows, ops = [], []
    for i in range(repeats):
        stage, poll = marks[f"stage#{i}"], marks[f"poll#{i}"]
        end = marks[f"stage#{i + 1}"].start if i + 1 < repeats else poll.end
        copies = [c for c in device if stage.start <= c[0] < end]
        calls = [t for t in api if stage.start <= t < stage.end]
        if not copies or not calls:
            continue
        gaps = sum(max(0.0, b[0] - a[1]) for a, b in itertools.pairwise(copies))
        rows.append({"to 1st API": calls[0] - stage.start,
                     "to 1st copy": copies[0][0] - stage.start,
                     "copies": copies[-1][1] - copies[0][0], "gaps": gaps,
                     "to ready": poll.end - copies[-1][1],
                     "stage host": stage.end - stage.start, "repeat": end - stage.start})
        if i == repeats // 2:
            ops = [f"{e.time_range.start - stage.start:8.1f} us  {e.name} "
                   f"({e.time_range.end - e.time_range.start:.1f} us)"
                   for e in sorted(events, key=lambda e: e.time_range.start)
                   if e.device_type == cpu and stage.start <= e.time_range.start < end
                   and e.name not in ("aten::slice", "aten::as_strided", "aten::copy_",
                                      "cudaEventQuery")]
            ops += [f"{a - stage.start:8.1f} us  device copy ({b - a:.1f} us)"
                    for a, b in copies]
            ops.sort(key=lambda line: float(line.split()[0]))
    return rows, ops


def _unprofiled(engine: TransferEngine, old: Any, new: Any, layers: list[int],
                weights: list[list[torch.Tensor]], prepared: Any, repeats: int) -> float:
    """Median µs from entering stage() to its first copy call, no profiler running."""
    first: list[float] = []
    to_buffer = SlotBytes.to_buffer

    def noted(self: SlotBytes, *args: Any) -> None:
        if not first:
            first.append(time.perf_counter())
        to_buffer(self, *args)

    SlotBytes.to_buffer = noted  # type: ignore[method-assign,assignment]
    try:
        waits = []
        for _ in range(repeats):
            first.clear()
            start = time.perf_counter()
            handle = engine.stage(old, new, layers, weights, prepared)
            waits.append((first[0] - start) * 1e6)
            handle.wait_blocking()
            handle.release()
    finally:
        SlotBytes.to_buffer = to_buffer  # type: ignore[method-assign]
    return statistics.median(waits)


def rank_fn(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    device, old, new, weights, engine, gemm, alone = profiling_case(rank, world)
    repeats = args["repeats"]
    table, listing = [], []
    for count in (1, 4):
        layers = list(range(count))
        prepared = engine.prepare(old, new, layers)
        for _ in range(3):  # warm-up: allocator, first-use checks
            handle = engine.stage(old, new, layers, weights, prepared)
            handle.wait_blocking()
            handle.release()
        unprofiled = _unprofiled(engine, old, new, layers, weights, prepared, repeats)
        for busy in (False, True):
            dist.barrier()
            torch.cuda.synchronize(device)
            if busy:
                gemm.start(int(max(8, 3 * repeats * count * 1.2e-3 / alone)))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(repeats):  # back to back, as pull_bench stages
                    with record_function(f"stage#{i}"):
                        handle = engine.stage(old, new, layers, weights, prepared)
                    with record_function(f"poll#{i}"):
                        while not handle.ready():
                            pass
                        handle.release()
            gemm.durations()  # drain the GEMMs before the next case
            rows, ops = _spans(prof, repeats)
            for row in rows:
                row["unprofiled"] = unprofiled
            table.append({"layers": count, "busy": busy, "n": len(rows),
                          **{c: statistics.median(r[c] for r in rows) if rows else float("nan")
                             for c in COLUMNS}})
            if busy and count == 1:
                listing = ops
    return {"table": table, "ops": listing, "card": torch.cuda.get_device_name(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=12)
    ns = parser.parse_args()
    world = ns.gpus or torch.cuda.device_count()
    outs = run_ranks(rank_fn, world, {"repeats": ns.repeats}, backend="nccl", timeout=400)
    print(f"stage_timeline: {world} x {outs[0]['card']}, torch {torch.__version__}; "
          f"medians of {ns.repeats} stages per rank, microseconds")
    print(f"{'layers':>6} {'GEMMs':>5} {'rank':>4} " + " ".join(f"{c:>11}" for c in COLUMNS))
    rows = sorted(((r["layers"], r["busy"], rank, r) for rank, out in enumerate(outs)
                   for r in out["table"]), key=lambda row: row[:3])
    for layers, busy, rank, r in rows:
        print(f"{layers:>6} {('on' if busy else 'off'):>5} {rank:>4} "
              + " ".join(f"{r[c]:11.1f}" for c in COLUMNS))
    # The slowest rank's repeat sets the transfer's time: list that one.
    slowest = max(range(world), key=lambda k: next(
        r["repeat"] for r in outs[k]["table"] if r["layers"] == 1 and r["busy"]))
    print(f"\none 1-layer repeat of rank {slowest} (GEMMs on), from entering stage(): host "
          "ops (slices and copy_ calls left out) and device copies:")
    print("\n".join(outs[slowest]["ops"]))


if __name__ == "__main__":
    main()
