"""Planner speed and quality on DeepSeek-V3's shape (58 layers x 256 experts, 8 groups).

Four cases: 288 slots / 32 ranks / 4 nodes and 320 slots / 64 ranks / 8 nodes,
each with the hierarchical and the global policy. For each, the median time
of `eplb_fsm.plan` over many runs, the median time of the loop-per-item
reference algorithm (`eplb_fsm.testing.reference_rebalance`) over a few runs,
their ratio (same process, same load), whether the two agree exactly, and the
balancedness reached (mean/max per-rank load per layer, averaged over layers).

Load: Zipf-like popularity (exponent 1.0), each layer a random permutation,
multinomial token counts (so ties are rare but possible). Runs in < 1 minute.

    python benchmarks/plan_bench.py [--repeats 50] [--ref-repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from _machine import cpu_line

import eplb_fsm
from eplb_fsm.testing import reference_rebalance

LAYERS, EXPERTS, GROUPS = 58, 256, 8
CASES = [  # (slots, ranks, nodes)
    (288, 32, 4),
    (320, 64, 8),
]


def skewed_load(seed: int, exponent: float = 1.0, tokens: int = 1_000_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, EXPERTS + 1) ** exponent
    popularity /= popularity.sum()
    return np.stack([rng.multinomial(tokens, popularity[rng.permutation(EXPERTS)])
                     for _ in range(LAYERS)]).astype(np.float64)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = skewed_load(args.seed)
    rows = []
    for slots, ranks, nodes in CASES:
        for policy in ("default", "global"):
            groups, n = (GROUPS, nodes) if policy == "default" else (1, 1)
            kw = dict(num_physical_experts=slots, num_groups=groups, num_nodes=n,
                      num_ranks=ranks)
            ours = median_time(partial(eplb_fsm.plan, load, **kw), args.repeats)
            reference = partial(reference_rebalance, torch.tensor(load), slots, groups, n, ranks)
            ref = median_time(reference, args.ref_repeats)
            placement = eplb_fsm.plan(load, **kw)
            same = np.array_equal(placement.physical_to_logical, reference().numpy())
            bal = eplb_fsm.balancedness(eplb_fsm.rank_load_from_logical(load, placement, ranks))
            label = "hierarchical" if policy == "default" else "global"
            rows.append((f"{slots}/{ranks}/{nodes}", label, ours * 1e3, ref * 1e3,
                         ref / ours, same, bal))
    print(f"machine: {cpu_line()}; numpy {np.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} thread)")
    print(f"load: {LAYERS} layers x {EXPERTS} experts, {GROUPS} groups, Zipf 1.0, "
          f"seed {args.seed}; balancedness = mean/max per-rank load, per layer, averaged")
    head = (f"{'slots/ranks/nodes':>17} {'policy':>12} {'plan ms':>8} {'ref ms':>8} "
            f"{'speedup':>8} {'same':>5} {'balancedness':>12}")
    print(head)
    print("-" * len(head))
    for case, label, ours_ms, ref_ms, ratio, same, bal in rows:
        print(f"{case:>17} {label:>12} {ours_ms:>8.2f} {ref_ms:>8.1f} {ratio:>7.0f}x "
              f"{'yes' if same else 'no':>5} {bal:>12.4f}")


if __name__ == "__main__":
    main()
