"""The serving-like loop behind ``eplb-fsm simulate``, one call per rank.

Each rank runs the reference EP MoE model on its own tokens, routed by a
load trace, calls ``await rt.step()`` after every forward pass, and records
what a user wants to see: actual balancedness of every pass (the global
per-slot load, all-reduced), `step()` overhead, forward time, lifecycle
states, and whether the outputs still equal a dense single-process
evaluation of the same weights (checked every ``check_every`` steps and on
the first pass after every commit and every scale event).

`run_rank` is the whole per-rank program: spawned by `run_ranks` (the
default), or called directly under ``torchrun``. With ``scale_at`` the run
changes its rank set mid-way (elastic EP); `simulate_elastic` holds that part,
and this module's loop only asks it, after each pass, whether a scale is due.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import torch

from .options import SimulateOptions, options_dict
from .serving import Records, Serving, runtime_stats, serve_pass
from .simulate_elastic import Scaler

__all__ = ["Records", "Serving", "SimulateOptions", "options_dict", "run_rank"]


def _progress(opts: SimulateOptions, rank: int) -> Any:
    if not (opts.progress and rank == 0):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the progress extra is optional
        return None
    # tqdm's default lock is a multiprocessing semaphore, registered with the
    # launcher's resource tracker; a rank killed on Ctrl-C or --timeout leaves
    # it behind, and the tracker then warns at exit. One process draws the bar.
    tqdm.set_lock(threading.RLock())
    return tqdm(total=opts.steps, desc=f"simulate ({opts.mode})", unit="step",
                file=sys.stderr, disable=not sys.stderr.isatty())


async def _serve(opts: SimulateOptions, rank: int, world: int) -> dict[str, Any]:
    device = torch.device(opts.device if opts.device != "cuda" else
                          f"cuda:{torch.cuda.current_device()}")
    trace = opts.trace()
    rec = Records()
    serving: Serving | None
    scaler = None
    if opts.scale_at:
        scaler = Scaler(opts, rank, device, rec)
        serving = scaler.start()
        step = 0
        if serving is None:  # a spare: idle until it joins (or the run ends)
            serving, step = await scaler.sync_point(None, None)
    else:
        serving, step = Serving.start(opts, device, tuple(range(world))), 0
    bar = _progress(opts, rank)
    while serving is not None and step < opts.steps:
        step += 1
        await serve_pass(opts, serving, rec, rank, step, trace, device)
        if bar is not None:
            bar.update(1)
        if scaler is not None:
            serving, step = await scaler.sync_point(serving, step)
    if bar is not None:
        bar.close()
    if serving is not None:
        rec.close_span(serving, opts.steps)
        runtime = serving.runtime
        rec.final = {"stats": runtime_stats(runtime),
                     "history": [tuple(r) for r in runtime.history()],
                     "placement": runtime.placement().physical_to_logical.tolist()}
        runtime.close()
    return {
        "rank": rank,
        "balancedness": rec.balancedness,
        "moe_us": rec.moe_us,
        "step_overhead_us": rec.overhead_us,
        "forward_us": rec.forward_us,
        "phases": rec.phases,
        "check_steps": rec.check_steps,
        "failed_checks": rec.failed_checks,
        "segments": rec.segments,
        "final": rec.final,
        "scale_events": rec.events,
        "scale_missed": rec.missed,
        "rank_load_first_window": None if rec.first_load is None else rec.first_load.tolist(),
        "rank_load_last_window": None if rec.last_load is None else rec.last_load.tolist(),
    }


def run_rank(rank: int, world: int, opts: SimulateOptions) -> dict[str, Any]:
    """The per-rank program (torch.distributed already initialised)."""
    torch.set_num_threads(1)
    return asyncio.run(_serve(opts, rank, world))
