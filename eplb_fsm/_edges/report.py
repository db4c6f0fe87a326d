"""The simulator's report: one JSON document, a summary table, optional PNG plots.

JSON schema (``report.json``; all keys always present):

- ``options``: the run's settings (ranks, steps, mode, shapes, trace, ...).
- ``balancedness``: actual balancedness of each pass — mean over ranks / max
  over ranks of the tokens each rank's slots received, per layer, averaged
  over layers — summarised as ``first`` (mean over the first window of
  ``window_size`` passes), ``last`` (mean over the last window), ``min``
  (worst single pass), plus ``per_step`` (every pass) and ``definition``.
- ``invariance_held``: every check (every ``check_every`` passes and the
  first pass after every commit) found the outputs bit-identical to a dense
  single-process evaluation; ``invariance_checks``: checks per rank.
- ``rebalances``: ``done``, ``dropped``, ``failed``, ``started``,
  ``skipped_triggers``, and ``steps`` (the steps at which each rebalance
  began).
- ``bytes_moved``: bytes received over all ranks for weight transfers.
- ``step_overhead_us``: ``p50``, ``p99``, ``max`` of ``await rt.step()``
  over every rank's steps; ``forward_us``: the same for the forward pass.
- ``states``: steps and seconds rank 0 spent in each lifecycle state.
- ``final_placement``: ``physical_to_logical`` [L, P] at the end.
- ``rank_load``: ``first_window`` and ``last_window`` per-rank load [L, R].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .simulate import SimulateOptions, options_dict

__all__ = ["build_report", "format_summary", "write_report"]


def _pct(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
            "max": float(arr.max())}


def build_report(opts: SimulateOptions, results: list[dict[str, Any]]) -> dict[str, Any]:
    first = results[0]
    bal = np.asarray(first["balancedness"])
    window = min(opts.window_size, len(bal))
    stats = first["stats"]
    begun = [step for step, _source, dest, _trigger in first["history"] if dest == "planning"]
    return {
        "options": options_dict(opts),
        "balancedness": {
            "definition": "mean/max of per-rank load, per layer, averaged over layers",
            "first": float(bal[:window].mean()),
            "last": float(bal[-window:].mean()),
            "min": float(bal.min()),
            "per_step": [float(b) for b in bal],
        },
        "invariance_held": all(r["invariance_held"] for r in results),
        "invariance_checks": min(r["invariance_checks"] for r in results),
        "rebalances": {**stats["rebalances"], "steps": begun},
        "bytes_moved": int(sum(r["stats"]["bytes_moved"] for r in results)),
        "step_overhead_us": _pct([t for r in results for t in r["step_overhead_us"]]),
        "forward_us": _pct([t for r in results for t in r["forward_us"]]),
        "states": {"steps": stats["steps_in_state"], "seconds": stats["seconds_in_state"]},
        "final_placement": first["placement"],
        "rank_load": {"first_window": first["rank_load_first_window"],
                      "last_window": first["rank_load_last_window"]},
    }


def format_summary(report: dict[str, Any]) -> str:
    o = report["options"]
    b, r, s = report["balancedness"], report["rebalances"], report["step_overhead_us"]
    lines = [
        f"eplb-fsm simulate: mode={o['mode']}, {o['ranks']} ranks, {o['steps']} steps, "
        f"{o['layers']} layers x {o['experts']} experts + {o['redundant']} redundant, "
        f"top-{o['top_k']}, policy {o['policy']!r}",
        "balancedness = mean/max per-rank load per layer, averaged over layers (actual, "
        "every pass)",
        f"  {'first window':<24}{b['first']:>10.4f}",
        f"  {'last window':<24}{b['last']:>10.4f}",
        f"  {'min (one pass)':<24}{b['min']:>10.4f}",
        f"  {'rebalances done':<24}{r['done']:>10}",
        f"  {'rebalances dropped':<24}{r['dropped']:>10}",
        f"  {'rebalances failed':<24}{r['failed']:>10}",
        f"  {'bytes moved':<24}{report['bytes_moved']:>10}",
        f"  {'step() p50 / p99 us':<24}{s['p50']:>10.1f} / {s['p99']:.1f} (max {s['max']:.0f})",
        f"  {'forward p50 us':<24}{report['forward_us']['p50']:>10.1f}",
        f"  {'invariance held':<24}{'yes' if report['invariance_held'] else 'NO':>10}"
        f" ({report['invariance_checks']} checks per rank, "
        f"{'bit-identical' if o['exact'] else 'within rtol/atol 1e-4'})",
        "  steps (seconds) per state, rank 0:",
    ]
    for state, steps in report["states"]["steps"].items():
        lines.append(f"    {state:<22}{steps:>8} ({report['states']['seconds'][state]:.3f} s)")
    return "\n".join(lines)


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write report.json and, when matplotlib is installed, the plots."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "report.json"]
    written[0].write_text(json.dumps(report, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra is optional
        return written
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(np.arange(1, len(report["balancedness"]["per_step"]) + 1),
            report["balancedness"]["per_step"], lw=0.8)
    for step in report["rebalances"]["steps"]:
        ax.axvline(step, color="tab:red", lw=0.6, ls="--")
    ax.set(xlabel="step", ylabel="balancedness (mean/max)", ylim=(0, 1.02),
           title=f"balancedness per pass, mode={report['options']['mode']} "
                 "(dashed: rebalance starts)")
    fig.tight_layout()
    fig.savefig(directory / "balancedness.png", dpi=110)
    written.append(directory / "balancedness.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    loads = [np.asarray(report["rank_load"][k]) for k in ("first_window", "last_window")]
    vmax = max(float(x.max()) for x in loads) or 1.0
    for ax, load, title in zip(axes, loads, ("first window", "last window"), strict=True):
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=f"per-rank load, {title}", xlabel="rank", ylabel="layer")
    fig.colorbar(image, ax=axes, label="tokens")
    fig.savefig(directory / "rank_load.png", dpi=110)
    written.append(directory / "rank_load.png")
    plt.close(fig)
    return written
