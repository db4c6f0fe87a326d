"""``eplb-fsm calibrate``: measure what one expert slot costs, write the cost model file.

Why: the ``time`` policy balances modelled layer time, and the model is only
as good as its figures. A slot's time as a function of its rows is a property
of the card, the GEMM library and the expert's shape, so it is measured where
the experts run: one expert MLP (gate-up GEMM, SiLU-and-multiply, down GEMM;
DeepSeek-V3's shape by default) at a grid of row counts, rotating over
several experts' weights so that no run finds the previous one's in cache.

On CUDA each grid point is a CUDA graph of a few slots in a row (what engines
run in decode), replayed after a warm-up that brings the clocks up, timed with
CUDA events; the figure is the median over repeats. On a CPU the same runs
are timed with the host clock (the least of the repeats: other processes
only ever add to it) (``--device cpu``; slow at DeepSeek-V3's size,
use ``--hidden``/``--intermediate`` of the model you run). Without CUDA and
without ``--device cpu`` nothing is measured: the command writes the
analytic roofline (``--bandwidth``, ``--flops``) and says so.

`SlotBench` is also what ``benchmarks/balance_gain.py`` times ranks with.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .._core.cost_model import H100_BANDWIDTH, H100_FLOPS, CostModel
from .args import HelpFormatter, check_output_file, positive_int

__all__ = ["SlotBench", "add_parser", "calibrate", "default_grid", "warm_up"]

#: GPU clock cycles `SlotBench.time_blocks` spins before timing (~1 ms on Hopper).
LEAD_CYCLES = 2_000_000
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_grid(max_rows: int) -> list[int]:
    """Row counts to measure: every 16 up to 1024 (decode, where GEMM tiles
    make the cost step), every 128 up to 4096, then doubling to `max_rows`."""
    grid = [1, 8, *range(16, 1025, 16), *range(1152, 4097, 128)]
    n = 8192
    while n <= max_rows:
        grid.append(n)
        n *= 2
    return [g for g in grid if g <= max_rows] or [1]


class SlotBench:
    """Expert weights and inputs on one device, and one slot's MLP run on them.

    Weights are random (never zeros: a GEMM on zeros can run faster than on
    data), ``num_experts`` distinct experts; inputs are one random
    ``[max_rows, hidden]`` buffer whose first ``n`` rows a slot of ``n`` rows
    reads, so every placement sees the same inputs. Outputs go to static
    buffers, so a CUDA graph of slots allocates nothing.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, hidden: int,
                 intermediate: int, num_experts: int, max_rows: int, seed: int = 0) -> None:
        self.device, self.dtype = device, dtype
        self.hidden, self.intermediate = hidden, intermediate
        gen = torch.Generator(device=device).manual_seed(seed)
        # Drawn in place on the device: gigabytes of weights, no host copies.
        self.w13 = torch.empty(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype)
        self.w13.normal_(0.0, hidden ** -0.5, generator=gen)
        self.w2 = torch.empty(num_experts, hidden, intermediate, device=device, dtype=dtype)
        self.w2.normal_(0.0, intermediate ** -0.5, generator=gen)
        self.x = torch.empty(max_rows, hidden, device=device, dtype=dtype).normal_(generator=gen)
        self.h = torch.empty(max_rows, 2 * intermediate, device=device, dtype=dtype)
        self.a = torch.empty(max_rows, intermediate, device=device, dtype=dtype)
        self.out = torch.empty(max_rows, hidden, device=device, dtype=dtype)
        self.cuda = device.type == "cuda"

    @property
    def num_experts(self) -> int:
        return int(self.w13.shape[0])

    @property
    def max_rows(self) -> int:
        return int(self.x.shape[0])

    def slot(self, expert: int, rows: int) -> None:
        """Enqueue one slot's MLP on `rows` rows (nothing for 0 rows: engines skip it)."""
        if rows <= 0:
            return
        i = self.intermediate
        h, a = self.h[:rows], self.a[:rows]
        torch.mm(self.x[:rows], self.w13[expert].t(), out=h)
        torch.ops.aten.silu.out(h[:, :i], out=a)
        a.mul_(h[:, i:])
        torch.mm(a, self.w2[expert].t(), out=self.out[:rows])

    def runner(self, slots: Sequence[tuple[int, int]]) -> Callable[[], None]:
        """A callable that runs `slots` ([(expert, rows)]) in turn: a CUDA graph
        on CUDA (captured here, after one eager run), the eager loop on CPU."""
        def eager() -> None:
            for expert, rows in slots:
                self.slot(expert, rows)

        if not self.cuda or not any(rows > 0 for _, rows in slots):
            return eager
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            eager()  # cuBLAS picks and loads its kernels outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        return graph.replay

    def time_blocks(self, blocks: Sequence[Callable[[], None]]) -> list[float]:
        """Seconds each of `blocks` takes, run back to back, on the device clock.

        On CUDA the GPU first spins for about a millisecond (`LEAD_CYCLES`)
        while the host enqueues the blocks: without it the first block's start
        event fires on an idle GPU before its launch has even been issued, and
        the first block reads 10-30% slow (seen on an H100: the first of 32
        ranks was the slowest in every decode case)."""
        if not self.cuda:
            out = []
            for block in blocks:
                start = time.perf_counter()
                block()
                out.append(time.perf_counter() - start)
            return out
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(blocks) + 1)]
        torch.cuda._sleep(LEAD_CYCLES)
        events[0].record()
        for block, end in zip(blocks, events[1:], strict=True):
            block()
            end.record()
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]


def warm_up(bench: SlotBench, seconds: float) -> None:
    """Run large slots for `seconds` so that clocks are up before anything is timed."""
    rows = min(bench.max_rows, 4096)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        bench.time_blocks([lambda: bench.slot(0, rows)] * 8)


def calibrate(bench: SlotBench, grid: Sequence[int], repeats: int = 9,
              per_timing: float = 2e-3, device_name: str = "") -> CostModel:
    """Median seconds of one slot at each row count of `grid`, as a `CostModel`.

    Each timing runs enough slots in a row (rotating experts) to last about
    `per_timing` seconds, so that event resolution and per-launch costs stay
    small against it; the per-slot figure is the block's time over its slots.
    """
    seconds = []
    for rows in grid:
        probe = bench.runner([(0, rows)])
        first = min(bench.time_blocks([probe] * 3))
        count = int(min(max(per_timing / max(first, 1e-7), 1), 64))
        block = bench.runner([(k % bench.num_experts, rows) for k in range(count)])
        times = [bench.time_blocks([block])[0] / count for _ in range(repeats)]
        # The host clock also counts other processes' time slices, which only
        # ever add: the least of the timings is the slot's own.
        seconds.append(statistics.median(times) if bench.cuda else min(times))
    expert = {"hidden": bench.hidden, "intermediate": bench.intermediate,
              "dtype_bytes": torch.tensor([], dtype=bench.dtype).element_size()}
    stat = "median" if bench.cuda else "least"
    note = (f"{stat} of {repeats} timings per row count, {bench.num_experts} experts rotated, "
            f"{'CUDA graphs, CUDA events' if bench.cuda else 'eager, host clock'}, "
            f"dtype {str(bench.dtype).removeprefix('torch.')}, torch {torch.__version__}")
    return CostModel.from_measurements(grid, seconds, device=device_name, expert=expert,
                                       note=note)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure an expert slot's time in its rows; write the cost model file",
        description="Measure one expert MLP (gate-up, SiLU-and-multiply, down) at a grid of "
        "row counts on this machine's GPU and write the cost model the 'time' policy reads "
        "(eplb-fsm plan --policy time --option cost_model=FILE). Without CUDA (and without "
        "--device cpu) it writes the analytic roofline from --bandwidth and --flops instead.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-o", "--output", type=Path, default=Path("cost_model.json"),
                   help="where to write the cost model (JSON)")
    p.add_argument("--device", default=None,
                   help="torch device to measure (cuda, cuda:1, cpu); default: cuda if "
                   "present, else no measurement (roofline)")
    p.add_argument("--hidden", type=positive_int, default=7168, help="expert hidden size")
    p.add_argument("--intermediate", type=positive_int, default=2048,
                   help="expert intermediate size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="weight and activation dtype")
    p.add_argument("--max-rows", type=positive_int, default=32768,
                   help="largest row count measured (the model extends linearly beyond)")
    p.add_argument("--repeats", type=positive_int, default=9, help="timings per row count")
    p.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH,
                   help="roofline only: memory bandwidth, bytes/s")
    p.add_argument("--flops", type=float, default=H100_FLOPS,
                   help="roofline only: matrix FLOP/s at --dtype")
    p.add_argument("--roofline", action="store_true",
                   help="write the roofline even where a GPU could be measured")
    p.set_defaults(func=_run)


def _model(args: argparse.Namespace) -> tuple[CostModel, str]:
    dtype_bytes = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    if args.roofline or (args.device is None and not torch.cuda.is_available()):
        model = CostModel.roofline(args.bandwidth, args.flops, hidden=args.hidden,
                                   intermediate=args.intermediate, dtype_bytes=dtype_bytes,
                                   device="roofline (not measured)")
        why = ("--roofline given" if args.roofline else
               "no CUDA device here, so nothing was measured (--device cpu measures this CPU)")
        return model, (f"wrote the analytic roofline ({why}): "
                       f"{args.bandwidth / 1e12:.3g} TB/s, {args.flops / 1e12:.4g} TFLOP/s; "
                       f"calibrate on the GPU that serves the model for real figures")
    try:
        device = torch.device(args.device or "cuda")
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: CUDA is not available on this machine")
    grid = default_grid(args.max_rows)
    bench = SlotBench(device, DTYPES[args.dtype], args.hidden, args.intermediate,
                      num_experts=4, max_rows=grid[-1])
    warm_up(bench, 1.0 if bench.cuda else 0.1)
    model = calibrate(bench, grid, args.repeats, device_name=device_name(device))
    return model, f"measured {len(grid)} row counts, 1 to {grid[-1]}, on {model.device}"


def _run(args: argparse.Namespace) -> int:
    check_output_file(args.output, "--output")
    for flag, value in (("--bandwidth", args.bandwidth), ("--flops", args.flops)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{flag} must be a finite number > 0, got {value}")
    model, what = _model(args)
    model.save(args.output)
    print(f"eplb-fsm calibrate: {what}")
    print(f"  {model.describe()}")
    print(f"  wrote {args.output} (use: --policy time --option cost_model={args.output})")
    return 0
