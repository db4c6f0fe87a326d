"""``eplb-fsm plan``: plan a placement for a recorded load and show what changes.

``--policy`` picks any registered policy (``default``, ``global``, ``refined``,
``incremental``, ...), ``--option KEY=VALUE`` passes its options, and with
``--old FILE`` the plan is relabeled to keep experts where they are
(``--no-minimize-moves`` turns that off); ``incremental`` plans its moves from
``--old`` (or from the initial layout without it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .._core import policies as _policies  # noqa: F401  (registers refined, incremental)
from .._core.balance import balancedness_per_layer, rank_load_from_logical
from .._core.placement import Placement
from .._core.planning import available_policies, plan, policy_needs_old_placement
from .args import HelpFormatter, check_output_file, positive_int
from .files import PLACEMENT_SUFFIXES, check_suffix, read_load, read_placement, write_placement

__all__ = ["add_parser", "policy_option", "positive_int"]


def policy_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is read as JSON when it parses (numbers, true/false,
    quoted strings), else taken as a plain string (``reference=refined``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="plan a placement for a recorded load",
        description="Plan a placement for a load file ([layers, experts] as .npy, .pt or "
        ".json) and print per-layer balancedness before and after.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("load", type=Path, help="load file, [layers, experts]")
    p.add_argument("-P", "--num-physical-experts", type=positive_int, required=True,
                   help="physical slots per layer (logical experts + redundant)")
    p.add_argument("-R", "--num-ranks", type=positive_int, required=True, help="EP ranks")
    p.add_argument("-G", "--num-groups", type=positive_int, default=1, help="expert groups")
    p.add_argument("-N", "--num-nodes", type=positive_int, default=1, help="nodes")
    p.add_argument("--policy", default="default",
                   help=f"planning policy (known: {', '.join(available_policies())})")
    p.add_argument("--option", type=policy_option, action="append", default=[],
                   metavar="KEY=VALUE", help="a policy option, repeatable (incremental: "
                   "tolerance=0.005, reference=default, max_rounds=64; refined: rounds=48; "
                   "time: cost_model=FILE from eplb-fsm calibrate, passes=1, rounds=48)")
    p.add_argument("--old", type=Path, help="previous placement (.npz or .json); "
                   "'before' figures and moved slots are measured against it")
    p.add_argument("--minimize-moves", action=argparse.BooleanOptionalAction, default=None,
                   help="relabel the plan's ranks and slots to keep experts of the old "
                   "placement in place (default: on with --old; off, experts a rank keeps "
                   "still keep their slots)")
    p.add_argument("-o", "--output", type=Path, help="write the placement (.npz or .json)")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    if args.output is not None:  # before any work: a plan that cannot be saved is not printed
        check_output_file(args.output, "-o/--output")
        check_suffix(args.output, PLACEMENT_SUFFIXES, "-o/--output")
    if args.policy not in available_policies():
        raise ValueError(f"--policy {args.policy!r} is unknown; known policies: "
                         f"{', '.join(available_policies())}")
    load = read_load(args.load, ndim=2)
    num_layers, num_logical = load.shape
    if args.old is not None:
        old = read_placement(args.old)
    else:
        if args.num_physical_experts < num_logical:
            raise ValueError(f"--num-physical-experts={args.num_physical_experts} must be >= "
                             f"the number of logical experts {num_logical}")
        old = Placement.initial(num_layers, num_logical, args.num_physical_experts)
    minimize = args.old is not None if args.minimize_moves is None else args.minimize_moves
    options = dict(args.option)
    # The initial layout is only the 'before' baseline, unless the policy plans from it.
    given_old = old if args.old is not None or policy_needs_old_placement(args.policy) else None
    new = plan(load, args.num_physical_experts, args.num_groups, args.num_nodes,
               args.num_ranks, policy=args.policy, old_placement=given_old,
               minimize_moves=minimize and given_old is not None, policy_options=options)
    before = balancedness_per_layer(rank_load_from_logical(load, old, args.num_ranks))
    after = balancedness_per_layer(rank_load_from_logical(load, new, args.num_ranks))
    changed = (old.physical_to_logical != new.physical_to_logical).sum(axis=1)
    rc = new.replica_count
    print(f"plan: {num_layers} layers x {num_logical} experts -> {new.num_physical} slots on "
          f"{args.num_ranks} ranks ({args.num_nodes} nodes, {args.num_groups} groups), "
          f"policy {args.policy!r}"
          + (f" {options}" if options else "")
          + f", minimize_moves {'on' if minimize else 'off'}")
    print("balancedness = mean/max of per-rank load, per layer "
          f"(before: {'--old' if args.old else 'initial layout'})")
    print(f"{'layer':>5} {'before':>8} {'after':>8} {'replicated':>10} {'max_rep':>7} "
          f"{'changed':>7}")
    for layer in range(num_layers):
        print(f"{layer:>5} {before[layer]:>8.4f} {after[layer]:>8.4f} "
              f"{int((rc[layer] > 1).sum()):>10} {int(rc[layer].max()):>7} "
              f"{int(changed[layer]):>7}")
    worst = int(np.argmin(after))
    print(f"{'mean':>5} {before.mean():>8.4f} {after.mean():>8.4f}")
    print(f"worst layer after: {worst} ({after[worst]:.4f}); slots changed: "
          f"{int(changed.sum())} of {num_layers * new.num_physical}")
    if args.output is not None:
        write_placement(args.output, new)
        print(f"wrote {args.output}")
    return 0


