"""Offline planning from a recorded load: compare policies on balance and on weights moved.

Reads a [layers, experts] token-count file (``examples/load_8x64.json`` by
default: 8 layers x 64 experts, recorded skew) and plans it for a
deployment (``-P`` slots per layer on ``-R`` ranks, ``-N`` nodes, ``-G``
expert groups) with the ``default`` (DeepSeek's), ``refined`` and
``incremental`` policies. Two scenarios:

1. from vLLM's initial layout (slot i holds expert i % E), as at start-up;
2. after a 5% drift of the load, from the first scenario's ``default``
   plan, as in a running server: ``minimize_moves`` (on in the runtime)
   relabels a fresh plan to keep experts in place, ``incremental`` moves
   only what buys balance. The first row re-plans from scratch without it.

Balancedness is predicted from the load (mean/max per-rank load per layer;
the table shows the average and the worst layer). "moved" counts experts
crossing the network, one per (rank, expert it newly holds), computed by
`eplb_fsm.transfer.plan_layers`, and prices them at ``--expert-bytes``
(default: one DeepSeek-V3 expert, 3 x 7168 x 2048 fp8 = 44 MB)::

    python examples/offline_planning.py
    python examples/offline_planning.py my_load.json -P 288 -R 32 -N 4 -G 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import eplb_fsm
from eplb_fsm import Placement, balancedness_per_layer, rank_load_from_logical
from eplb_fsm.transfer import plan_layers

HERE = Path(__file__).resolve().parent
POLICIES = ("default", "refined", "incremental")


def read_load(path: Path) -> np.ndarray:
    """A .json load file: a nested [layers, experts] list, or {"load": [...]}."""
    data = json.loads(path.read_text())
    return np.asarray(data["load"] if isinstance(data, dict) else data, dtype=np.float64)


def drifted(load: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Move `fraction` of each layer's load mass onto a shuffled copy of itself."""
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(row) for row in load])
    return (1 - fraction) * load + fraction * shuffled


def row(name: str, load: np.ndarray, new: Placement, old: Placement | None, ranks: int,
        expert_bytes: int) -> str:
    per_layer = balancedness_per_layer(rank_load_from_logical(load, new, ranks))
    text = f"  {name:<28}{per_layer.mean():>8.4f}{per_layer.min():>8.4f}"
    if old is None:
        return text
    changed = int((old.physical_to_logical != new.physical_to_logical).sum())
    moved = len(plan_layers(old.physical_to_logical, new.physical_to_logical, ranks).transfers)
    return (text + f"{changed:>9}/{new.physical_to_logical.size:<5}{moved:>8}"
            f"{moved * expert_bytes / 1e9:>9.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("load", type=Path, nargs="?", default=HERE / "load_8x64.json",
                        help="[layers, experts] load, .json")
    parser.add_argument("-P", "--num-physical-experts", type=int, default=80)
    parser.add_argument("-R", "--num-ranks", type=int, default=8)
    parser.add_argument("-N", "--num-nodes", type=int, default=2)
    parser.add_argument("-G", "--num-groups", type=int, default=8)
    parser.add_argument("--expert-bytes", type=int, default=3 * 7168 * 2048)
    args = parser.parse_args()
    load = read_load(args.load)
    layers, experts = load.shape
    slots, ranks = args.num_physical_experts, args.num_ranks

    def plan(load: np.ndarray, policy: str, old: Placement, minimize: bool) -> Placement:
        return eplb_fsm.plan(load, slots, args.num_groups, args.num_nodes, ranks,
                             policy=policy, old_placement=old, minimize_moves=minimize)

    print(f"offline planning: {args.load.name}, {layers} layers x {experts} experts -> {slots} "
          f"slots on {ranks} ranks ({args.num_nodes} nodes, {args.num_groups} groups)")
    print("balancedness = mean/max per-rank load per layer, predicted from the load; avg and "
          "min over layers")
    header = (f"  {'policy':<28}{'avg':>8}{'min':>8}{'slots changed':>15}{'moved':>8}"
              f"{'x ' + format(args.expert_bytes / 1e6, '.0f') + ' MB':>12}")

    initial = Placement.initial(layers, experts, slots)
    print(f"\n1) from vLLM's initial layout (slot i holds expert i % {experts})")
    print(header)
    print(row("initial layout", load, initial, None, ranks, args.expert_bytes))
    plans = {policy: plan(load, policy, initial, minimize=False) for policy in POLICIES}
    for policy, new in plans.items():
        print(row(policy, load, new, initial, ranks, args.expert_bytes))

    old = plans["default"]
    later = drifted(load, 0.05)
    print("\n2) after a 5% load drift, from the default plan above")
    print(header)
    print(row("keep the old placement", later, old, None, ranks, args.expert_bytes))
    print(row("default, from scratch", later, plan(later, "default", old, minimize=False), old,
              ranks, args.expert_bytes))
    for policy in POLICIES:
        name = f"{policy} + minimize_moves" if policy != "incremental" else policy
        print(row(name, later, plan(later, policy, old, minimize=True), old, ranks,
                  args.expert_bytes))


if __name__ == "__main__":
    main()
