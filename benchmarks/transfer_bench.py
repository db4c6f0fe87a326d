"""Transfer engine bandwidth on DeepSeek-V3-like expert weights, against the bound.

Each rank holds `--slots` local slots per layer; each slot is one expert's
three bf16 tensors (7168x2048, 2048x7168, 7168x2048: 88 MB). The experts are
rearranged between two random placements (E = P - ranks logical experts, one
redundant slot per rank, every layer drawn independently: close to the 94% of
slots a from-scratch re-plan changes). For one layer and for several layers
batched into one stage, it times:

- ``TransferEngine``: `stage()` until `ready()` polls true (allocation,
  packing one message per peer, the ``batch_isend_irecv`` launch, local
  copies), then `commit()` separately; "+plan" plans inside the timed
  `stage()`, "prepared" uses `prepare()` as the runtime does (in its planning
  thread), "pieces=N" launches each message in N pieces so packing overlaps
  sending ("auto", the default, picks 1 or 2 from the stage's size);
- the bound: a plain ``batch_isend_irecv`` of the same bytes between the same
  rank pairs, one preallocated contiguous message per pair.

Each timing is the slowest rank's, median over `--repeats` runs after
warm-up; GB/s per rank is the mean bytes a rank receives over that time
(GB = 1e9 bytes). A correctness pass (stage, commit, check every slot's
marker value) runs before the timings. The table is printed last.

    python benchmarks/transfer_bench.py                 # every visible GPU, NCCL
    python benchmarks/transfer_bench.py --gpus 2 --layers 1 4
    torchrun --nproc-per-node 4 benchmarks/transfer_bench.py
    python benchmarks/transfer_bench.py --dry-run       # gloo on CPU, tiny tensors
"""

from __future__ import annotations

import os

# NVLink SHARP / multicast stay off on the lent machines (see KINDS.md there).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from eplb_fsm.testing import run_ranks
from eplb_fsm.transfer import TransferEngine, plan_layers

DEEPSEEK_SHAPES = ((7168, 2048), (2048, 7168), (7168, 2048))
DRY_SHAPES = ((64, 32), (32, 64), (64, 32))


@dataclass(frozen=True)
class Row:
    layers: int
    method: str
    mb_per_rank: float  # mean MB received per rank
    ms: float  # slowest rank, median over repeats
    gbps_per_rank: float
    pct_of_bound: float
    commit_ms: float | None = None
    ready_us: float | None = None  # mean cost of one ready() poll
    prepare_ms: float | None = None  # the plan, computed before the timed stage()
    stage_ms: float | None = None  # host time until stage() returns (median, slowest rank)


# -- setup -----------------------------------------------------------------------------------


def random_p2l(rng: np.random.Generator, layers: int, world: int, slots: int) -> np.ndarray:
    num_physical = world * slots
    num_logical = num_physical - world
    return np.stack([
        rng.permutation(np.concatenate([np.arange(num_logical),
                                        rng.integers(0, num_logical, world)]))
        for _ in range(layers)
    ]).astype(np.int64)


def marker(layer: int, expert: int, tensor: int) -> float:
    """A value exact in bf16 (an integer below 256) that names the expert's weights."""
    return float((layer * 37 + expert * 5 + tensor * 3) % 251)


def make_weights(p2l: np.ndarray, rank: int, world: int, shapes: tuple[tuple[int, int], ...],
                 device: torch.device) -> list[list[torch.Tensor]]:
    slots = p2l.shape[1] // world
    weights = []
    for layer in range(p2l.shape[0]):
        tensors = [torch.empty(slots, *shape, dtype=torch.bfloat16, device=device)
                   for shape in shapes]
        for j in range(slots):
            expert = int(p2l[layer, rank * slots + j])
            for t, w in enumerate(tensors):
                w[j].fill_(marker(layer, expert, t))
        weights.append(tensors)
    return weights


def check_markers(weights: list[list[torch.Tensor]], p2l: np.ndarray, rank: int,
                  world: int) -> None:
    slots = p2l.shape[1] // world
    for layer, tensors in enumerate(weights):
        for t, w in enumerate(tensors):
            for j in range(slots):
                want = marker(layer, int(p2l[layer, rank * slots + j]), t)
                lo, hi = float(w[j].min()), float(w[j].max())
                if lo != want or hi != want:
                    raise AssertionError(f"rank {rank} layer {layer} slot {j} tensor {t}: "
                                         f"holds [{lo}, {hi}], expected {want}")


# -- timing ------------------------------------------------------------------------------------


def rank_case(rank: int, world: int, args: dict[str, Any]
              ) -> tuple[torch.device, tuple[tuple[int, int], ...], np.ndarray, np.ndarray]:
    """(device, expert shapes, old, new) for one rank of a run with `args`
    (`run_values`): its GPU under NCCL (CPU for a dry run), and two random
    placements of max(layers) x (world x slots), the same on every rank."""
    device = torch.device("cpu")
    if args["backend"] == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    shapes = DRY_SHAPES if args["dry_run"] else DEEPSEEK_SHAPES
    rng = np.random.default_rng(args["seed"])
    old = random_p2l(rng, max(args["layers"]), world, args["slots"])
    new = random_p2l(rng, max(args["layers"]), world, args["slots"])
    return device, shapes, old, new


def gpu_setup(rank: int, world: int
              ) -> tuple[torch.device, np.ndarray, np.ndarray, list[list[torch.Tensor]]]:
    """(device, old, new, weights) of the profiling scripts: 4 layers, 9 slots per
    rank, seed 0, DeepSeek-V3-like weights for `old`."""
    args = {"backend": "nccl", "dry_run": False, "layers": [4], "slots": 9, "seed": 0}
    device, shapes, old, new = rank_case(rank, world, args)
    return device, old, new, make_weights(old, rank, world, shapes, device)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_value(value: float, device: torch.device, op: Any = dist.ReduceOp.SUM) -> float:
    """`value` all-reduced over every rank with `op` (SUM by default)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def _slowest(seconds: float, device: torch.device) -> float:
    return reduce_value(seconds, device, dist.ReduceOp.MAX)


def _mean(value: float, device: torch.device) -> float:
    return reduce_value(value, device) / dist.get_world_size()


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median over repeats of the slowest rank's time of `fn` (which must end done)."""
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        sync_device(device)
        start = time.perf_counter()
        fn()
        elapsed = _slowest(time.perf_counter() - start, device)
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def engine_run(engine: TransferEngine, old: np.ndarray, new: np.ndarray, layers: list[int],
               weights: list[list[torch.Tensor]], polls: list[float], stages: list[float],
               prepared: Any = None) -> None:
    start = time.perf_counter()
    handle = engine.stage(old, new, layers, weights, prepared)
    stages.append(time.perf_counter() - start)
    n, start = 0, time.perf_counter()
    while not handle.ready():
        n += 1
    polls.append((time.perf_counter() - start) / max(n, 1))
    handle.release()  # keep the old placement so every repeat moves the same bytes


def bound_run(pair_bytes: np.ndarray, rank: int, buffers: dict[str, dict[int, torch.Tensor]],
              device: torch.device) -> None:
    ops = [dist.P2POp(dist.isend, buf, dst) for dst, buf in buffers["send"].items()]
    ops += [dist.P2POp(dist.irecv, buf, src) for src, buf in buffers["recv"].items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    sync_device(device)


def bench_rank(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    device, shapes, old, new = rank_case(rank, world, args)
    batches: list[int] = args["layers"]
    num_layers = max(batches)
    slot_bytes = sum(a * b for a, b in shapes) * 2

    # Correctness first: a real staged transfer of every layer, committed and checked.
    weights = make_weights(old, rank, world, shapes, device)
    engine = TransferEngine()
    handle = engine.stage(old, new, list(range(num_layers)), weights)
    while not handle.ready():
        pass
    dist.barrier()
    handle.commit()
    sync_device(device)
    check_markers(weights, new, rank, world)
    del weights, handle
    weights = make_weights(old, rank, world, shapes, device)

    rows: list[Row] = []
    for count in batches:
        layers = list(range(count))
        plan = plan_layers(old, new, world, layers)
        pair = np.zeros((world, world), dtype=np.int64)
        for t in plan.transfers:
            pair[t.src_rank, t.dst_rank] += slot_bytes
        received = int(pair[:, rank].sum())
        mean_mb = _mean(received, device) / 1e6
        buffers = {
            "send": {d: torch.empty(int(n), dtype=torch.uint8, device=device)
                     for d, n in enumerate(pair[rank]) if n},
            "recv": {s: torch.empty(int(n), dtype=torch.uint8, device=device)
                     for s, n in enumerate(pair[:, rank]) if n},
        }
        warmup, repeats = args["warmup"], args["repeats"]
        bound_s = _timed(partial(bound_run, pair, rank, buffers, device), device, warmup,
                         repeats)
        buffers.clear()  # free the bound's buffers before the engine allocates its own
        rows.append(Row(count, "plain batch_isend_irecv (bound)", mean_mb, bound_s * 1e3,
                        mean_mb / 1e3 / bound_s, 100.0))
        # The runtime prepares each batch's plan in its planning thread, so the
        # agreed step only launches; "+plan" rows plan inside the timed stage().
        settings: list[tuple[int | Literal["auto"], bool]] = [("auto", False), ("auto", True)]
        settings += [(p, True) for p in args["pieces"]]
        for pieces, prepare in settings:
            eng = TransferEngine(pieces=pieces)
            polls: list[float] = []
            stages: list[float] = []
            start = time.perf_counter()
            prepared = eng.prepare(old, new, layers) if prepare else None
            prepare_s = _slowest(time.perf_counter() - start, device)
            took = _timed(partial(engine_run, eng, old, new, layers, weights, polls, stages,
                                  prepared), device, warmup, repeats)
            stage_s = _slowest(statistics.median(stages[warmup:]), device)
            commit_s = _commit_time(eng, old, new, layers, weights, device, warmup, repeats)
            name = (f"TransferEngine, pieces={pieces}"
                    + (" (prepared)" if prepare else " +plan"))
            rows.append(Row(count, name, mean_mb, took * 1e3, mean_mb / 1e3 / took,
                            100.0 * bound_s / took, commit_s * 1e3,
                            _mean(statistics.mean(polls), device) * 1e6,
                            prepare_s * 1e3 if prepare else None, stage_s * 1e3))
    return [asdict(r) for r in rows]


def _commit_time(engine: TransferEngine, old: np.ndarray, new: np.ndarray, layers: list[int],
                 weights: list[list[torch.Tensor]], device: torch.device, warmup: int,
                 repeats: int) -> float:
    """Slowest rank's commit (staged -> live copies, on the current stream), median."""
    times = []
    for i in range(warmup + repeats):
        handle = engine.stage(old, new, layers, weights)
        while not handle.ready():
            pass
        dist.barrier()
        sync_device(device)
        start = time.perf_counter()
        handle.commit()
        sync_device(device)
        elapsed = _slowest(time.perf_counter() - start, device)
        if i >= warmup:
            times.append(elapsed)
        back = engine.stage(new, old, layers, weights)  # restore the old placement
        while not back.ready():
            pass
        dist.barrier()
        back.commit()
    sync_device(device)
    return statistics.median(times)


# -- report ------------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The arguments transfer_bench and pull_bench share (ranks, placement, repeats)."""
    parser.add_argument("--gpus", type=int, default=None,
                        help="ranks to spawn (default: every visible GPU; 2 with --dry-run)")
    parser.add_argument("--slots", type=int, default=None,
                        help="local slots per rank (default 9; 3 with --dry-run)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4],
                        help="layers per stage to measure (default: 1 4)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"default {repeats} (2 with --dry-run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="gloo on CPU with tiny tensors: a smoke test of the script")


def run_values(ns: argparse.Namespace, repeats: int) -> dict[str, Any]:
    """The shared arguments' values, dry-run defaults applied."""
    return {
        "dry_run": ns.dry_run,
        "backend": "gloo" if ns.dry_run else "nccl",
        "slots": ns.slots or (3 if ns.dry_run else 9),
        "layers": sorted(set(ns.layers)),
        "repeats": ns.repeats or (2 if ns.dry_run else repeats),
        "seed": ns.seed,
    }


def choose_world(parser: argparse.ArgumentParser, gpus: int | None, dry_run: bool) -> int:
    """Ranks to spawn: `gpus`, else every visible GPU (2 for a CPU dry run)."""
    if dry_run:
        return gpus or 2
    if not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run for the CPU smoke test")
    world = gpus or torch.cuda.device_count()
    if world < 2 or world > torch.cuda.device_count():
        parser.error(f"--gpus must be in [2, {torch.cuda.device_count()}]")
    return world


def card_name(backend: str) -> str:
    if backend == "nccl":
        return torch.cuda.get_device_name(0)
    return "CPU (gloo dry run)"


def _version(version: Any) -> str:
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def table(rows: list[dict[str, Any]], args: dict[str, Any], world: int) -> str:
    shapes = DRY_SHAPES if args["dry_run"] else DEEPSEEK_SHAPES
    slot_mb = sum(a * b for a, b in shapes) * 2 / 1e6
    nccl = torch.cuda.nccl.version() if args["backend"] == "nccl" else None
    lines = [
        f"transfer_bench: {world} x {card_name(args['backend'])}, backend "
        f"{args['backend']}, torch {torch.__version__}"
        + (f", NCCL {_version(nccl)}" if nccl else ""),
        f"expert slot = 3 bf16 tensors {' + '.join(f'{a}x{b}' for a, b in shapes)} = "
        f"{slot_mb:.1f} MB; {args['slots']} slots/rank; P = {world * args['slots']}, "
        f"E = {world * (args['slots'] - 1)}; random old -> random new placement, "
        f"seed {args['seed']}",
        f"time = slowest rank, median of {args['repeats']} (after {args['warmup']} warm-up); "
        "GB/s per rank = mean bytes received per rank / time",
        "",
        f"{'layers':>6}  {'method':<36} {'MB/rank':>9} {'ms':>9} {'GB/s/rank':>10} "
        f"{'% bound':>8} {'commit ms':>10} {'ready() us':>10} {'plan ms':>8} "
        f"{'stage() ms':>10}",
    ]
    for r in rows:
        commit = f"{r['commit_ms']:10.2f}" if r["commit_ms"] is not None else f"{'':>10}"
        ready = f"{r['ready_us']:10.2f}" if r["ready_us"] is not None else f"{'':>10}"
        prep = f"{r['prepare_ms']:8.2f}" if r["prepare_ms"] is not None else f"{'':>8}"
        host = f"{r['stage_ms']:10.2f}" if r["stage_ms"] is not None else f"{'':>10}"
        lines.append(f"{r['layers']:>6}  {r['method']:<36} {r['mb_per_rank']:9.1f} "
                     f"{r['ms']:9.2f} {r['gbps_per_rank']:10.1f} {r['pct_of_bound']:8.1f} "
                     f"{commit} {ready} {prep} {host}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, repeats=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 2],
                        help="fixed pieces per message to measure besides 'auto' "
                             "(default: 1 2)")
    ns = parser.parse_args(argv)
    args = {
        **run_values(ns, repeats=10),
        "warmup": ns.warmup if not ns.dry_run else min(ns.warmup, 1),
        "pieces": sorted(set(ns.pieces)),
    }
    if min(args["layers"]) < 1 or args["slots"] < 2 or min(args["pieces"]) < 1:
        parser.error("--layers and --pieces must be >= 1 and --slots >= 2")

    if "LOCAL_RANK" in os.environ:  # under torchrun: this process is one rank
        dist.init_process_group(args["backend"])
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = bench_rank(rank, world, args)
        if rank == 0:
            print(table(rows, args, world), flush=True)
        dist.destroy_process_group()
        return

    world = choose_world(parser, ns.gpus, ns.dry_run)
    results = run_ranks(bench_rank, world, args, backend=args["backend"], timeout=590)
    print(table(results[0], args, world), flush=True)


if __name__ == "__main__":
    main()
