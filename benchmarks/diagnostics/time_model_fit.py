"""Why a time-balanced plan is not balanced in measured time (diagnostic).

`benchmarks/balance_gain.py` shows the ``time`` policy's decode plans, modelled
near-perfectly balanced, measured a few percent off. A rank's time is modelled
as the sum of its slots' times, each a function of its rows alone. This
measures, per decode case and per placement, each rank three ways and says
which assumption breaks:

- ``rank``: the rank's slots as one CUDA graph, as balance_gain times it;
- ``sum``: the sum of each slot timed alone (its own graph); ``rank`` minus
  ``sum`` is what running slots back to back adds or saves (not additive);
- ``model``: the calibrated cost model; ``sum`` minus ``model`` is what the
  rows alone do not say (which expert, how rows map to tiles).

Then every expert alone at one row count: the spread across experts, beside
the repeat noise, says whether the expert's identity (where its weights lie)
matters. Figures are std over ranks (or experts) in % of the mean.

    python benchmarks/diagnostics/time_model_fit.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balance_gain import DRY, GPU, Case, case_loads, placements, slot_rows

from eplb_fsm._cli.cli_calibrate import SlotBench, calibrate, default_grid, warm_up

CASES = (Case(32, 288, 128, 1.0), Case(64, 320, 128, 0.8), Case(32, 288, 256, 1.0),
         Case(64, 320, 64, 1.0))
PLACEMENTS = ("refined", "time")


def _median_times(bench: SlotBench, blocks: list[Callable[[], None]],
                  repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds of each block over `repeats` rounds, blocks in a fresh order each:
    (median per block [B], every timing [repeats, B])."""
    rng = np.random.default_rng(0)
    out = np.zeros((repeats, len(blocks)))
    for block in blocks:  # first replay of a fresh graph: not timed
        bench.time_blocks([block])
    for rep in range(repeats):
        order = rng.permutation(len(blocks))
        for start in range(0, len(order), 32):
            part = order[start:start + 32]
            out[rep, part] = bench.time_blocks([blocks[i] for i in part])
    return np.asarray(np.median(out, axis=0)), out


def _pct(values: np.ndarray) -> str:
    return f"{values.std() / values.mean() * 100:5.2f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (checks the script)")
    args = ap.parse_args()
    setup, cases = (DRY, (Case(4, 20, 32, 1.0),)) if args.dry_run else (GPU, CASES)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --dry-run)")
    bench = SlotBench(setup.device, setup.dtype, setup.hidden, setup.intermediate,
                      setup.experts, 4096)
    warm_up(bench, 0.2 if args.dry_run else 3.0)
    card = "CPU" if args.dry_run else torch.cuda.get_device_name()
    model = calibrate(bench, default_grid(4096), device_name=card)
    print(f"{card}, torch {torch.__version__}; cost model {model.describe()}")
    print("per case and placement: time balancedness rank / sum / model; std over ranks "
          "(% of mean) of rank, of rank-sum, of sum-model; repeat noise of one rank")
    for k, case in enumerate(cases):
        load, passes, measured = case_loads(case, setup, 1, k)
        places = placements(case, load, passes, {"calibrated": model})
        per_rank = case.slots // case.ranks
        print(f"\n{case.title}")
        for name in PLACEMENTS:
            p2l = places[name].physical_to_logical[0]
            rows = slot_rows(measured[0], p2l).reshape(case.ranks, per_rank)
            ids = p2l.reshape(case.ranks, per_rank)
            ranks = [bench.runner([(int(e), int(n)) for e, n in zip(ids[r], rows[r], strict=True)])
                     for r in range(case.ranks)]
            singles = {(int(e), int(n)): bench.runner([(int(e), int(n))])
                       for e, n in zip(ids.ravel(), rows.ravel(), strict=True) if n > 0}
            rank_t, rank_all = _median_times(bench, ranks, args.repeats)
            keys = list(singles)
            single_t, _ = _median_times(bench, [singles[key] for key in keys], args.repeats)
            alone = dict(zip(keys, single_t, strict=True))
            sum_t = np.array([sum(alone.get((int(e), int(n)), 0.0)
                                  for e, n in zip(ids[r], rows[r], strict=True))
                              for r in range(case.ranks)])
            model_t = model.rank_seconds(rows.reshape(1, -1).astype(float), case.ranks)[0]
            noise = float(np.sqrt((rank_all.var(axis=0, ddof=1)).mean()) / rank_t.mean() * 100)

            def bal(t: np.ndarray) -> float:
                return float(t.mean() / t.max())

            print(f"  {name:<8} bal {bal(rank_t):.3f} / {bal(sum_t):.3f} / {bal(model_t):.3f}"
                  f"  std rank {_pct(rank_t)}  rank-sum "
                  f"{(rank_t - sum_t).std() / rank_t.mean() * 100:5.2f}%  sum-model "
                  f"{(sum_t - model_t).std() / rank_t.mean() * 100:5.2f}%  noise {noise:5.2f}%"
                  f"  mean rank {rank_t.mean() * 1e6:6.1f} us sum {sum_t.mean() * 1e6:6.1f} "
                  f"model {model_t.mean() * 1e6:6.1f}")
            extremes = (("slowest", int(np.argmax(rank_t))), ("fastest", int(np.argmin(rank_t))))
            for what, r in extremes:
                print(f"           {what} rank {r}: rows {rows[r].tolist()} "
                      f"{rank_t[r] * 1e6:.1f} us (sum {sum_t[r] * 1e6:.1f}, model "
                      f"{model_t[r] * 1e6:.1f})")
    for rows in (16, 114, 256):
        blocks = [bench.runner([(e, rows)]) for e in range(setup.experts)]
        med, allt = _median_times(bench, blocks, args.repeats)
        noise = float(np.sqrt(allt.var(axis=0, ddof=1).mean()) / med.mean() * 100)
        print(f"\nevery expert alone at {rows} rows: mean {med.mean() * 1e6:.1f} us, std over "
              f"experts {_pct(med)}, repeat noise {noise:.2f}%, slowest/fastest "
              f"{med.max() / med.min():.3f}; model {model.slot_seconds(rows) * 1e6:.1f} us")
    grid = np.arange(1, 257)
    blocks = [bench.runner([(e % setup.experts, int(n)) for e in range(8)]) for n in grid]
    med, _ = _median_times(bench, blocks, max(3, args.repeats // 2))
    per_slot = med / 8
    steps = np.flatnonzero(np.diff(per_slot) > 0.02 * per_slot[:-1]) + 2
    print(f"\nslot time at 1..256 rows (8 slots per graph): {per_slot[0] * 1e6:.1f} us at 1, "
          f"{per_slot[127] * 1e6:.1f} at 128, {per_slot[255] * 1e6:.1f} at 256; jumps > 2% at "
          f"rows {steps.tolist()}; model error max "
          f"{np.abs(model.slot_seconds(grid) - per_slot).max() / per_slot.mean() * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
