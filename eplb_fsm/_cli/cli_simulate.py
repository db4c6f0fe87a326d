"""``eplb-fsm simulate``: a serving-like run of the reference model with the balancer.

By default it spawns ``--ranks`` CPU processes on gloo (a laptop is enough);
under ``torchrun`` it runs in the launched processes instead (any backend,
several nodes), and rank 0 prints. Every flag is checked before any process
starts; a rank that dies ends the run with its error, never a hang.

``--scale-at STEP:RANKS`` (repeatable) changes the serving rank set after
pass STEP (elastic EP, docs/elastic.md): RANKS is a count N (global ranks
0..N-1: shrinking drops the highest ranks, growing adds the next ones) or a
comma-separated list of global ranks (``80:0,1,3`` drops rank 2 of four).
Enough processes for every set are spawned; the spare ones idle.

Ctrl-C (or ``--timeout``) kills the spawned ranks at once: they start with
SIGINT ignored, so a terminal's Ctrl-C reaches only this process, which ends
the run with one line.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .._adapters.launch import RankFailed, run_ranks
from .._core.cost_model import CostModel
from .._core.planning import available_policies
from .._sim.options import PRESETS
from .._sim.report import REPORT_FILES, build_report, format_summary, write_report
from .._sim.simulate import SimulateOptions, run_rank
from .args import HelpFormatter, check_output_dir, positive_int

__all__ = ["add_parser"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


class _Preset(argparse.Action):
    """Set the preset's flags when ``--preset`` is parsed (later flags win)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        for field, value in PRESETS[values].items():
            if field == "exact":
                namespace.fast = not value
            else:
                setattr(namespace, field, value)


def _scale_point(text: str) -> tuple[int, tuple[int, ...]]:
    """``STEP:N`` (ranks 0..N-1) or ``STEP:R0,R1,...`` (global ranks) -> (step, ranks)."""
    usage = f"expected STEP:RANKS, e.g. 80:2 or 80:0,1,3, got {text!r}"
    step_text, sep, ranks_text = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(usage)
    try:
        step = int(step_text)
        numbers = [int(part) for part in ranks_text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if step < 1:
        raise argparse.ArgumentTypeError(f"STEP must be >= 1, got {step} in {text!r}")
    if "," not in ranks_text:
        if numbers[0] < 1:
            raise argparse.ArgumentTypeError(f"RANKS must be >= 1, got {numbers[0]} in {text!r}")
        return step, tuple(range(numbers[0]))
    if min(numbers) < 0 or len(set(numbers)) != len(numbers):
        raise argparse.ArgumentTypeError(f"a RANKS list names distinct global ranks >= 0, got "
                                         f"{ranks_text!r} in {text!r}")
    return step, tuple(sorted(numbers))


def _check_scale_at(points: list[tuple[int, tuple[int, ...]]], args: argparse.Namespace,
                    ranks: int) -> None:
    """What --scale-at implies with the other flags; raise ValueError naming it."""
    steps = [step for step, _ in points]
    if steps != sorted(set(steps)):
        raise ValueError(f"--scale-at steps must be strictly increasing, got {steps}")
    slots = (args.experts + args.redundant) // ranks
    current = tuple(range(ranks))
    for step, new in points:
        given = str(len(new)) if new == tuple(range(len(new))) else ",".join(map(str, new))
        where = f"--scale-at {step}:{given}"
        if step >= args.steps:
            raise ValueError(f"{where}: STEP must be below --steps={args.steps}, so that "
                             "passes follow the scale")
        if len(new) * slots < args.experts:
            fits = max(-(-args.experts // len(r)) * ranks - args.experts for _, r in points)
            raise ValueError(f"{where}: {len(new)} ranks x {slots} slots per rank = "
                             f"{len(new) * slots} slots cannot hold --experts={args.experts} "
                             "(slots per rank stay (--experts + --redundant) / --ranks); "
                             f"--redundant {fits} would fit")
        if new == current:
            raise ValueError(f"{where}: the ranks {list(new)} already serve")
        if not set(new) & set(current):
            raise ValueError(f"{where}: no rank of {list(current)} stays; at least one must "
                             "stay to hand the balancer's state over")
        current = new


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = SimulateOptions()
    p = sub.add_parser(
        "simulate", help="run the reference MoE model with the balancer on R ranks",
        description="Serve a skewed, drifting trace with the reference expert-parallel MoE "
        "model on R ranks and report balancedness, rebalances, step() overhead and output "
        "invariance. Spawns gloo CPU processes, or runs under torchrun.",
        formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), action=_Preset,
                   help="a named model shape: 'realistic' = --layers 4 --hidden 512 "
                   "--intermediate 1024 --fast (6 MB per slot, so a transfer's cost in "
                   "bytes shows in step()); flags after it override it")
    p.add_argument("--mode", choices=("async", "sync", "off"), default=d.mode,
                   help="async: the runtime; sync: rearrange inside the triggering step; "
                   "off: no balancing")
    p.add_argument("--ranks", type=positive_int, default=d.ranks, help="ranks to spawn")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="forward passes")
    p.add_argument("--layers", type=positive_int, default=d.layers, help="MoE layers")
    p.add_argument("--experts", type=positive_int, default=d.experts, help="logical experts")
    p.add_argument("--redundant", type=int, default=d.redundant, help="redundant slots")
    p.add_argument("--top-k", type=positive_int, default=d.top_k,
                   help="experts each token is routed to")
    p.add_argument("--tokens", type=positive_int, default=d.tokens,
                   help="tokens per rank per pass")
    p.add_argument("--hidden", type=positive_int, default=d.hidden, help="hidden size")
    p.add_argument("--intermediate", type=positive_int, default=d.intermediate,
                   help="expert intermediate size")
    p.add_argument("--groups", type=positive_int, default=d.groups, help="expert groups")
    p.add_argument("--nodes", type=positive_int, default=d.nodes,
                   help="nodes the ranks are spread over (for the hierarchical policy)")
    p.add_argument("--policy", default=d.policy,
                   help=f"planning policy (known: {', '.join(available_policies())})")
    p.add_argument("--window-size", type=positive_int, default=d.window_size,
                   help="passes of load the planner sees (EplbConfig.window_size)")
    p.add_argument("--step-interval", type=positive_int, default=d.step_interval,
                   help="passes between rebalances (EplbConfig.step_interval)")
    p.add_argument("--readiness-lag", type=positive_int, default=d.readiness_lag,
                   help="passes between a readiness round and acting on it "
                   "(EplbConfig.readiness_lag)")
    p.add_argument("--exponent", type=_nonneg_float, default=d.exponent,
                   help="Zipf exponent of expert popularity")
    p.add_argument("--drift", type=_fraction, default=d.drift,
                   help="fraction of popularity mass that moves per step")
    p.add_argument("--shift-at", type=positive_int, nargs="*", default=None,
                   help="steps at which the hot set changes suddenly; none after the flag: "
                   "no shift (default: "
                   f"{' '.join(map(str, d.shift_steps))}, those within --steps)")
    p.add_argument("--trace", type=Path, help="replay a recorded [steps, layers, experts] load")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds weights, tokens and trace")
    p.add_argument("--check-every", type=positive_int, default=d.check_every,
                   help="compare outputs with a dense evaluation every N passes")
    p.add_argument("--fast", action="store_true",
                   help="plain matmuls instead of the bit-exact products: for large models "
                   "(GPU); invariance is then checked within a tolerance")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                   help="expert weight dtype (compute stays float32)")
    p.add_argument("--cost-model", type=Path, metavar="FILE",
                   help="a slot's time in its rows, as `eplb-fsm calibrate` writes it, for the "
                   "modelled MoE layer time and what balancing saved over --mode off (default: "
                   "the H100 roofline of a DeepSeek-V3 expert)")
    p.add_argument("--scale-at", type=_scale_point, action="append", default=[],
                   metavar="STEP:RANKS",
                   help="after pass STEP, serve on RANKS (elastic EP; repeatable): a count N "
                   "(ranks 0..N-1) or a list of global ranks, e.g. 80:2 or 80:0,1,3; enough "
                   "processes for every set are spawned, spare ones idle")
    p.add_argument("--timeout", type=positive_int, default=900,
                   help="seconds the whole run may take before its ranks are killed")
    p.add_argument("--dry-run", action="store_true",
                   help="check every flag and file as a run would, print what it would run, "
                   "and exit without starting a process")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="write report.json (and, with the plot extra, PNG plots) into DIR, "
                   "created if missing; checked before the run")
    p.set_defaults(func=_run)


def _options(args: argparse.Namespace, ranks: int) -> SimulateOptions:
    """Check what the flags imply together; raise ValueError naming the flag."""
    if args.redundant < 0:
        raise ValueError(f"--redundant must be >= 0, got {args.redundant}")
    physical = args.experts + args.redundant
    if physical % ranks:
        raise ValueError(f"--experts + --redundant = {physical} slots must split evenly over "
                         f"{ranks} ranks (--ranks)")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k={args.top_k} exceeds --experts={args.experts}")
    if args.experts % args.groups:
        raise ValueError(f"--experts={args.experts} must be divisible by --groups={args.groups}")
    if ranks % args.nodes:
        raise ValueError(f"--nodes={args.nodes} must divide the {ranks} ranks")
    if args.policy not in available_policies():
        raise ValueError(f"--policy {args.policy!r} is unknown; known: "
                         f"{', '.join(available_policies())}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.shift_at is None:  # the default shifts, where the run reaches them
        args.shift_at = [step for step in SimulateOptions().shift_steps if step <= args.steps]
    if sorted(set(args.shift_at)) != list(args.shift_at):
        raise ValueError("--shift-at steps must be strictly increasing")
    beyond = [step for step in args.shift_at if step > args.steps]
    if beyond:
        raise ValueError(f"--shift-at {beyond[0]}: STEP must be <= --steps={args.steps}, or "
                         "the shift never happens")
    _check_scale_at(args.scale_at, args, ranks)
    trace_file = None
    if args.trace is not None:
        from .files import read_load

        loads = read_load(args.trace, ndim=3)  # checks the file before any process starts
        if loads.shape[1:] != (args.layers, args.experts):
            raise ValueError(f"--trace {args.trace} has [layers, experts] = "
                             f"{list(loads.shape[1:])}, but --layers={args.layers} "
                             f"--experts={args.experts}")
        trace_file = str(args.trace)
    if args.cost_model is not None:
        try:  # read and checked here, before any process starts
            CostModel.load(args.cost_model)
        except ValueError as exc:
            raise ValueError(f"--cost-model {args.cost_model}: {exc}") from None
    opts = SimulateOptions(
        ranks=ranks, steps=args.steps, mode=args.mode, layers=args.layers,
        experts=args.experts, redundant=args.redundant, top_k=args.top_k, tokens=args.tokens,
        hidden=args.hidden, intermediate=args.intermediate, groups=args.groups,
        nodes=args.nodes, policy=args.policy, window_size=args.window_size,
        step_interval=args.step_interval, readiness_lag=args.readiness_lag,
        exponent=args.exponent, drift=args.drift, shift_steps=tuple(args.shift_at),
        trace_file=trace_file, seed=args.seed, check_every=args.check_every, progress=True,
        exact=not args.fast, dtype=args.dtype, scale_at=tuple(args.scale_at),
        cost_model=None if args.cost_model is None else str(args.cost_model))
    opts.eplb_config()  # the runtime's own checks, before any process starts
    opts.moe_config()
    if args.report is not None:
        check_output_dir(args.report, "--report", create=not args.dry_run)
        for name in REPORT_FILES:
            if (args.report / name).is_dir():
                raise ValueError(f"--report {args.report}: {name} there is a directory")
    return opts


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def _run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    if _under_torchrun():
        if args.scale_at:
            raise ValueError("--scale-at runs on spawned gloo ranks only; under torchrun the "
                             "world's size is fixed by the launcher, so run it without torchrun")
        return _run_torchrun(args)
    opts = _options(args, args.ranks)
    _finish(args, build_report(opts, _run_spawned(opts, args.timeout)))
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    torchrun = _under_torchrun()
    if torchrun and args.scale_at:
        raise ValueError("--scale-at runs on spawned gloo ranks only")
    ranks = int(os.environ["WORLD_SIZE"]) if torchrun else args.ranks
    opts = _options(args, ranks)
    launch = ("the torchrun processes" if torchrun else
              f"{opts.world} spawned gloo CPU processes"
              + (f" ({opts.world - ranks} idle until a scale event)" if opts.world > ranks
                 else ""))
    scale = "".join(f"; after pass {step} serve on ranks {list(r)}" for step, r in opts.scale_at)
    print(f"eplb-fsm simulate --dry-run: flags OK; would run mode={opts.mode}, {opts.steps} "
          f"steps on {launch}, {opts.layers} layers x {opts.experts} experts + "
          f"{opts.redundant} redundant, policy {opts.policy!r}{scale}"
          + (f"; report to {args.report}" if args.report is not None else ""))
    return 0


def _run_spawned(opts: SimulateOptions, timeout: int) -> list[Any]:
    """`run_ranks` on a helper thread, while this (main) thread takes Ctrl-C and the
    deadline and, on either, kills the ranks at once instead of waiting for them.

    The ranks start with SIGINT ignored, so a terminal's Ctrl-C, sent to the whole
    process group, reaches only this process: no rank prints a traceback of its
    own. They are forked from a fork server, which takes this process's
    dispositions when it starts (a disposition that survives exec); so SIGINT is
    ignored here only for the few milliseconds until the launcher says the
    server is running (not until the ranks are alive: one that exits at once
    must not keep Ctrl-C ignored).
    """
    outcome: dict[str, Any] = {}
    started = threading.Event()

    def launch() -> None:
        try:  # the grace lets run_ranks' own deadline lose to the one below
            outcome["results"] = run_ranks(run_rank, opts.world, opts, timeout=timeout + 60,
                                           started=started)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=launch, name="eplb-fsm-ranks", daemon=True)
    deadline = time.monotonic() + timeout
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if on_main else None
    try:
        thread.start()
        while (thread.is_alive() and not started.wait(0.005)
               and time.monotonic() < deadline):
            pass
    finally:
        if on_main:
            signal.signal(signal.SIGINT, previous)
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.1)
    finally:  # on Ctrl-C, the deadline or success alike: no rank outlives this call
        _stop(thread)
    if "results" in outcome:
        return list(outcome["results"])
    if time.monotonic() >= deadline:
        raise ValueError(f"the run did not finish within --timeout={timeout} s; its ranks "
                         "were killed (raise --timeout for larger runs)")
    error = outcome.get("error")
    if isinstance(error, RankFailed):
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        raise ValueError(f"the run failed: {summary}") from error
    raise RuntimeError("the ranks' launcher ended without a result") from error


def _stop(thread: threading.Thread) -> None:
    """Kill the ranks until the launcher returns: it may still be starting some."""
    end = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < end:
        for child in mp.active_children():
            child.kill()
        thread.join(0.05)


def _run_torchrun(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    opts = _options(args, world)
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        opts = SimulateOptions(**{**opts.__dict__, "device": "cuda", "backend": "nccl"})
    result = run_rank(rank, world, opts)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        _finish(args, build_report(opts, gathered))
    dist.destroy_process_group()
    return 0


def _finish(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(format_summary(report))
    if args.report is not None:
        written = write_report(report, args.report)
        for path in written:
            print(f"wrote {path}")
        if not any(path.suffix == ".png" for path in written):
            print("no plots: matplotlib is not installed (pip install 'eplb-fsm[plot]')")
