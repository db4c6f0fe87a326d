"""What balancing buys, in time: one MoE layer's time under each placement, on one GPU.

An expert-parallel MoE layer ends when its slowest rank ends. This runs every
rank's expert MLPs of one layer in turn on one card (DeepSeek-V3's routed
expert: hidden 7168, intermediate 2048, bf16; top-8 of 256 experts; each
slot one gate-up GEMM, SiLU-and-multiply, one down GEMM; a slot with no rows
is skipped, as grouped kernels skip it) and takes the layer's time as the
slowest rank's, timed with CUDA events. Care taken so that noise is not read
as imbalance:

- clocks warmed up before anything is timed;
- the same inputs for every placement: per case and layer one sampled pass
  (rows per expert, multinomial over Zipf popularity with a random expert
  order per layer), split evenly over an expert's replicas, each slot reading
  the first rows of one random input buffer; placements are planned on that
  same pass (the drift cases plan on a window of earlier passes instead);
- placements interleaved (the order rotates every repeat) and ranks run in a
  fresh random order every repeat; ``--repeats`` timings of every rank (10
  up to 512 tokens/rank, 3 above); each rank's slots run as one CUDA graph
  (what engines replay in decode), replayed once untimed first, and the GPU
  spins for a millisecond before each timed block so that no launch is
  waited for inside it;
- the noise printed next to every spread: ``spread`` is the std over ranks of
  a rank's mean time, ``noise`` the std over repeats of one rank's reading
  (pooled), both in % of the mean rank time; ``± `` after time balancedness
  is its std over bootstrap resamples of the repeats.

Cases: EP 32 (288 slots) and 64 (320 slots); tokens per rank 64, 128, 256
(decode), 512, 2048, 4096 (prefill); Zipf 0.8 and 1.0; and a drifting trace
(EP 32, Zipf 1.0: plans from a window of 8 passes, measured on a pass after
10% of the load moved between experts). Rows: the initial layout (slot i
holds expert i mod 256), every registered policy (``incremental`` from the
initial layout), ``time`` with the cost model calibrated at the start of the
run (as ``eplb-fsm calibrate`` does) and ``time/roofline`` with the H100
datasheet roofline instead. Columns: token balancedness (mean over ranks /
max over ranks of the rows each rank's slots received, per layer, averaged
over layers); time balancedness (the same for each rank's mean measured time)
with its noise; spread and noise; layer ms (the slowest rank's mean time,
averaged over layers); the same modelled by the calibrated cost model; the
speed-up over the initial layout. Then plan time per policy, on the host's
CPU, for 58 layers x 256 experts, and a check of the goals.

    python benchmarks/balance_gain.py [--repeats 10] [--prefill-repeats 3] [--out DIR]
    python benchmarks/balance_gain.py --dry-run   # CPU, tiny sizes, a minute

Writes ``balance_gain.txt`` (every table), ``balance_gain.json`` (every
figure, per-rank times included) and ``cost_model.json`` to ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb_fsm import Placement, available_policies, plan
from eplb_fsm._cli.cli_calibrate import SlotBench, calibrate, default_grid, device_name, warm_up
from eplb_fsm._core.cost_model import CostModel
from eplb_fsm._core.planning import policy_needs_old_placement
from eplb_fsm.reference import drift_load

DRIFT_WINDOW, DRIFT_MOVED = 8, 0.10


@dataclass(frozen=True)
class Setup:
    device: torch.device
    dtype: torch.dtype
    experts: int
    hidden: int
    intermediate: int
    topk: int
    shapes: tuple[tuple[int, int], ...]  # (ranks, slots)
    tokens: tuple[int, ...]
    zipfs: tuple[float, ...]
    drift_tokens: tuple[int, ...]
    plan_layers: int
    plan_tokens: tuple[int, ...]  # loads the plan-time table uses (Zipf 1.0)


GPU = Setup(torch.device("cuda"), torch.bfloat16, 256, 7168, 2048, 8, ((32, 288), (64, 320)),
            (64, 128, 256, 512, 2048, 4096), (0.8, 1.0), (128, 2048), 58, (128, 2048))
DRY = Setup(torch.device("cpu"), torch.float32, 16, 128, 64, 4, ((4, 20), (8, 24)),
            (4, 32, 512), (1.0,), (16,), 4, (32, 512))


@dataclass(frozen=True)
class Case:
    ranks: int
    slots: int
    tokens: int
    zipf: float
    drift: bool = False

    @property
    def title(self) -> str:
        kind = "decode" if self.tokens <= 256 else "prefill"
        drift = f", drift (plan on {DRIFT_WINDOW} passes, {DRIFT_MOVED:.0%} moved)" \
            if self.drift else ""
        return (f"EP {self.ranks} ({self.slots} slots), {self.tokens} tokens/rank ({kind}), "
                f"Zipf {self.zipf}{drift}")


def cases(setup: Setup) -> list[Case]:
    out = [Case(r, p, t, z) for r, p in setup.shapes for t in setup.tokens for z in setup.zipfs]
    r, p = setup.shapes[0]
    return out + [Case(r, p, t, max(setup.zipfs), drift=True) for t in setup.drift_tokens]


def popularity(rng: np.random.Generator, layers: int, experts: int, s: float) -> np.ndarray:
    z = 1.0 / np.arange(1, experts + 1) ** s
    pop = np.stack([z[rng.permutation(experts)] for _ in range(layers)])
    return pop / pop.sum(axis=1, keepdims=True)


def sample(rng: np.random.Generator, pop: np.ndarray, rows: int) -> np.ndarray:
    return np.stack([rng.multinomial(rows, p) for p in pop]).astype(np.int64)


def case_loads(case: Case, setup: Setup, layers: int, seed: int
               ) -> tuple[np.ndarray, float, np.ndarray]:
    """(load to plan on, passes it sums, rows of the measured pass [L, E])."""
    rng = np.random.default_rng(seed)
    pop = popularity(rng, layers, setup.experts, case.zipf)
    rows = case.tokens * case.ranks * setup.topk
    if not case.drift:
        measured = sample(rng, pop, rows)
        return measured.astype(np.float64), 1.0, measured
    window = sum(sample(rng, pop, rows) for _ in range(DRIFT_WINDOW)).astype(np.float64)
    drifted = drift_load(pop, rng, DRIFT_MOVED)
    return window, float(DRIFT_WINDOW), sample(rng, drifted, rows)


def slot_rows(rows: np.ndarray, p2l: np.ndarray) -> np.ndarray:
    """[E] rows, [P] slots -> [P] rows per slot: an expert's rows split evenly over
    its replicas, the remainder one each to its first replicas in slot order."""
    counts = np.bincount(p2l, minlength=rows.size)
    nth = np.zeros_like(p2l)
    seen: dict[int, int] = {}
    for s, e in enumerate(p2l):
        nth[s] = seen.get(int(e), 0)
        seen[int(e)] = nth[s] + 1
    base, extra = rows[p2l] // counts[p2l], rows[p2l] % counts[p2l]
    return base + (nth < extra)


def placements(case: Case, load: np.ndarray, passes: float, models: dict[str, CostModel]
               ) -> dict[str, Placement]:
    num_layers, num_experts = load.shape
    initial = Placement.initial(num_layers, num_experts, case.slots)
    out = {"initial": initial}
    for policy in available_policies():
        if policy.startswith("test-"):
            continue
        old = initial if policy_needs_old_placement(policy) else None
        variants = ({f"time{'' if k == 'calibrated' else '/' + k}": m
                     for k, m in models.items()} if policy == "time" else {policy: None})
        for name, model in variants.items():
            opts = {"cost_model": model, "passes": passes} if model is not None else None
            out[name] = plan(load, case.slots, 1, 1, case.ranks, policy, old,
                             policy_options=opts)
    return out


def measure_case(bench: SlotBench, case: Case, places: dict[str, Placement],
                 measured: np.ndarray, repeats: int, model: CostModel) -> dict[str, Any]:
    """Per placement: rank times [repeats, L, R], slot rows, and the figures."""
    num_layers = measured.shape[0]
    per_rank = case.slots // case.ranks
    times = {name: np.zeros((repeats, num_layers, case.ranks)) for name in places}
    rows_of = {name: np.stack([slot_rows(measured[lay], p.physical_to_logical[lay])
                               for lay in range(num_layers)]) for name, p in places.items()}
    names = list(places)
    for lay in range(num_layers):
        cache: dict[tuple[tuple[int, int], ...], Any] = {}
        blocks = {}
        for name, p in places.items():
            ids = p.physical_to_logical[lay].reshape(case.ranks, per_rank)
            rws = rows_of[name][lay].reshape(case.ranks, per_rank)
            keys = [tuple((int(e), int(n)) for e, n in zip(ids[r], rws[r], strict=True))
                    for r in range(case.ranks)]
            for key in keys:
                if key not in cache:
                    cache[key] = bench.runner(key)
            blocks[name] = [cache[k] for k in keys]
        for name in names:  # first replay of fresh graphs: not timed
            bench.time_blocks(blocks[name])
        order_rng = np.random.default_rng(lay)
        for rep in range(repeats):
            # Placements rotate; ranks run in a fresh random order each repeat
            # (the same for every placement), so no rank owes its time to its
            # position in the block.
            order = order_rng.permutation(case.ranks)
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                got = bench.time_blocks([blocks[name][r] for r in order])
                times[name][rep, lay, order] = got
        del cache, blocks
    return {name: figures(times[name], rows_of[name], case.ranks, model) for name in names}


def figures(t: np.ndarray, rows: np.ndarray, ranks: int, model: CostModel) -> dict[str, Any]:
    """t [repeats, L, R] seconds; rows [L, P]."""
    rank_rows = rows.reshape(rows.shape[0], ranks, -1).sum(axis=2).astype(np.float64)
    tok = np.where(rank_rows.max(1) > 0, rank_rows.mean(1) / np.maximum(rank_rows.max(1), 1), 1)
    mean = t.mean(axis=0)  # [L, R]

    def time_bal(m: np.ndarray) -> float:
        return float((m.mean(axis=1) / m.max(axis=1)).mean())

    rng = np.random.default_rng(0)
    resampled = [t[rng.integers(0, t.shape[0], t.shape[0])].mean(axis=0) for _ in range(200)]
    boot = [time_bal(m) for m in resampled]
    boot_ms = [m.max(axis=1).mean() * 1e3 for m in resampled]
    scale = mean.mean(axis=1, keepdims=True)
    noise = float(np.sqrt((t.var(axis=0, ddof=1) / scale**2).mean())) if t.shape[0] > 1 else 0.0
    modelled = model.rank_seconds(rows, ranks)
    return {
        "token_bal": float(tok.mean()), "time_bal": time_bal(mean),
        "time_bal_noise": float(np.std(boot)),
        "spread_pct": float((mean.std(axis=1) / scale[:, 0]).mean() * 100),
        "noise_pct": noise * 100,
        "layer_ms": float(mean.max(axis=1).mean() * 1e3),
        "layer_ms_noise": float(np.std(boot_ms)),
        "model_ms": float(modelled.max(axis=1).mean() * 1e3),
        "model_time_bal": time_bal(modelled),
        "rank_seconds": t.tolist(), "slot_rows": rows.tolist(),
    }


def plan_times(setup: Setup, models: dict[str, CostModel], repeats: int = 5
               ) -> list[tuple[str, dict[str, float]]]:
    """Median plan seconds per policy for `plan_layers` layers x E experts, on this CPU."""
    out = []
    for ranks, slots in setup.shapes:
        for tokens in setup.plan_tokens:
            rng = np.random.default_rng(ranks * tokens)
            pop = popularity(rng, setup.plan_layers, setup.experts, 1.0)
            load = sample(rng, pop, tokens * ranks * setup.topk).astype(np.float64)
            case = Case(ranks, slots, tokens, 1.0)
            row = {}
            for name in placements(case, load[:1], 1.0, models):
                if name == "initial":
                    continue
                policy, _, kind = name.partition("/")
                old = (Placement.initial(setup.plan_layers, setup.experts, slots)
                       if policy_needs_old_placement(policy) else None)
                opts = ({"cost_model": models[kind or "calibrated"]}
                        if policy == "time" else None)
                spent = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    plan(load, slots, 1, 1, ranks, policy, old, policy_options=opts)
                    spent.append(time.perf_counter() - start)
                row[name] = statistics.median(spent)
            out.append((f"EP {ranks}/{slots} slots, {tokens} tokens/rank", row))
    return out


def table(case: Case, figs: dict[str, dict[str, Any]]) -> list[str]:
    base = figs["initial"]["layer_ms"]
    lines = [case.title,
             f"  {'placement':<16}{'tok bal':>8}{'time bal':>10}{'±':>7}{'spread%':>9}"
             f"{'noise%':>8}{'layer ms':>10}{'model ms':>10}{'speed-up':>10}"]
    for name, f in figs.items():
        lines.append(f"  {name:<16}{f['token_bal']:>8.3f}{f['time_bal']:>10.4f}"
                     f"{f['time_bal_noise']:>7.4f}{f['spread_pct']:>9.2f}{f['noise_pct']:>8.2f}"
                     f"{f['layer_ms']:>10.3f}{f['model_ms']:>10.3f}"
                     f"{base / f['layer_ms']:>9.2f}x")
    return lines


def goals(results: list[tuple[Case, dict[str, dict[str, Any]]]],
          plans: list[tuple[str, dict[str, float]]]) -> list[str]:
    lines = ["Goals (noise: 2 bootstrap std over repeats; a difference within it is a tie)"]
    for case, figs in results:
        t, ref, dft = figs["time"], figs["refined"], figs["default"]
        short = f"EP {case.ranks}, {case.tokens} tok, Zipf {case.zipf}" + (
            ", drift" if case.drift else "")
        if case.tokens <= 256:
            bal, err = t["time_bal"], 2 * t["time_bal_noise"]
            verdict = ("yes, beyond noise" if bal - err >= 0.98 else
                       "within noise" if bal + err >= 0.98 else "NO")
            gap = 2 * np.hypot(t["time_bal_noise"], ref["time_bal_noise"])
            vs = ("higher" if bal - ref["time_bal"] > gap else
                  "lower" if ref["time_bal"] - bal > gap else "tie")
            lines.append(f"  decode  {short:<32} time bal: time {bal:.4f}±{err:.4f}, refined "
                         f"{ref['time_bal']:.4f}, default {dft['time_bal']:.4f}; >= 0.98: "
                         f"{verdict}; vs refined: {vs}")
        else:
            ratio = t["layer_ms"] / dft["layer_ms"]
            gap = 2 * np.hypot(t["layer_ms_noise"], dft["layer_ms_noise"])
            verdict = ("faster" if dft["layer_ms"] - t["layer_ms"] > gap else
                       "SLOWER" if t["layer_ms"] - dft["layer_ms"] > gap else "tie")
            lines.append(f"  prefill {short:<32} layer ms: time {t['layer_ms']:.3f}, default "
                         f"{dft['layer_ms']:.3f} ({ratio:.3f}x, noise ±{gap:.3f}): {verdict}")
    for title, row in plans:
        ratio = row["time"] / row["refined"]
        lines.append(f"  plan time {title}: time {row['time'] * 1e3:.1f} ms, refined "
                     f"{row['refined'] * 1e3:.1f} ms ({ratio:.2f}x)  within 2x: "
                     f"{'yes' if ratio <= 2 else 'NO'}")
    return lines


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    ap.add_argument("--repeats", type=int, default=10,
                    help="timings of every rank, cases up to 512 tokens/rank")
    ap.add_argument("--prefill-repeats", type=int, default=3,
                    help="timings of every rank above 512 tokens/rank")
    ap.add_argument("--commit", default=None, help="commit to print (default: git HEAD)")
    ap.add_argument("--layers", type=int, default=2,
                    help="layers (Zipf orders) per case up to 512 tokens/rank")
    ap.add_argument("--prefill-layers", type=int, default=1,
                    help="layers per case above 512 tokens/rank (their ranks take ms each, "
                    "and their noise is small)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if min(args.repeats, args.prefill_repeats) < 2 or min(args.layers, args.prefill_layers) < 1:
        raise SystemExit("--repeats and --prefill-repeats must be >= 2, --layers and "
                         "--prefill-layers >= 1")
    sha = args.commit or commit()
    setup = DRY if args.dry_run else GPU
    if setup.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU version")
    started = time.perf_counter()
    all_cases = cases(setup)
    loads = [case_loads(c, setup, args.layers if c.tokens <= 512 else args.prefill_layers,
                        args.seed + k) for k, c in enumerate(all_cases)]
    grid = default_grid(2048 if args.dry_run else 32768)
    max_rows = max(max(int(m.max()) for _, _, m in loads), grid[-1])
    bench = SlotBench(setup.device, setup.dtype, setup.hidden, setup.intermediate,
                      setup.experts, max_rows, seed=args.seed)
    warm_up(bench, 0.2 if args.dry_run else 3.0)
    card = device_name(setup.device)
    calibrated = calibrate(bench, grid, repeats=3 if args.dry_run else 9, device_name=card)
    calibrated.save(args.out / "cost_model.json")
    roofline = CostModel.roofline(hidden=setup.hidden, intermediate=setup.intermediate,
                                  dtype_bytes=bench.x.element_size())
    models = {"calibrated": calibrated, "roofline": roofline}
    head = [f"balance_gain: {card}, torch {torch.__version__}, commit {sha}; per case "
            f"{args.layers} layers x {args.repeats} repeats up to 512 tokens/rank, "
            f"{args.prefill_layers} x {args.prefill_repeats} above"
            f"{' (dry run: tiny sizes)' if args.dry_run else ''}",
            f"expert {setup.hidden}x{setup.intermediate} {str(setup.dtype)[6:]}, "
            f"{setup.experts} experts, top-{setup.topk}; cost model {calibrated.describe()}",
            "balancedness = mean/max over ranks per layer, averaged over layers", ""]
    print("\n".join(head), flush=True)
    results, lines = [], list(head)
    text = args.out / "balance_gain.txt"  # rewritten after every case: a cut run keeps its part
    for case, (load, passes, measured) in zip(all_cases, loads, strict=True):
        places = placements(case, load, passes, models)
        repeats = args.repeats if case.tokens <= 512 else args.prefill_repeats
        figs = measure_case(bench, case, places, measured, repeats, calibrated)
        results.append((case, figs))
        block = table(case, figs)
        print("\n".join(block), flush=True)
        lines += [*block, ""]
        text.write_text("\n".join(lines) + "\n")
    plans = plan_times(setup, models)
    names = list(plans[0][1])
    plan_lines = [f"Plan time, ms (median of 5, {setup.plan_layers} layers x {setup.experts} "
                  f"experts, this host's CPU)", f"  {'load':<36}" +
                  "".join(f"{n:>15}" for n in names)]
    plan_lines += [f"  {title:<36}" + "".join(f"{row[n] * 1e3:>15.1f}" for n in names)
                   for title, row in plans]
    goal_lines = goals(results, plans)
    lines += [*plan_lines, "", *goal_lines,
              "", f"total {time.perf_counter() - started:.0f} s"]
    print("\n".join(["", *plan_lines, "", *goal_lines]), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    text.write_text("\n".join(lines) + "\n")
    doc = {"card": card, "torch": torch.__version__, "commit": sha,
           "repeats": [args.repeats, args.prefill_repeats],
           "layers": [args.layers, args.prefill_layers], "cost_model": calibrated.to_dict(),
           "cases": [{"case": c.__dict__, "figures": f} for c, f in results],
           "plan_seconds": plans}
    (args.out / "balance_gain.json").write_text(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
