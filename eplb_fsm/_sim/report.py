"""The simulator's report: one JSON document, a summary table, optional PNG plots.

``report.json``'s keys, their types and meanings are documented as a JSON
Schema in docs/report.schema.json (the tests validate every report they make
against it). In short: ``options``; ``balancedness`` (``first``, ``last``,
``min``, ``per_step``); ``moe_time`` (the modelled MoE layer time of every pass
under the serving placement and under the initial layout, their medians and
``speedup``: see `moe_time`); ``invariance_held`` / ``_checks`` / ``_failed_steps``;
``rebalances``; ``bytes_moved``; ``step_overhead_us`` and ``forward_us``
percentiles; ``states``; ``final_placement``, ``final_ranks``,
``histories_agree``, ``history``; ``rank_load``; ``scale_events`` and
``scale_missed`` (elastic runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .moe_time import moe_time_report, speedup_line
from .options import SimulateOptions, options_dict

__all__ = ["REPORT_FILES", "build_report", "format_summary", "plot_figures", "write_report"]

REPORT_FILES = ("report.json", "balancedness.png", "rank_load.png")


def _pct(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
            "max": float(arr.max())}


def _merged_steps(results: list[dict[str, Any]], steps: int) -> np.ndarray:
    """Balancedness of every pass: all-reduced, so any rank serving that pass has it."""
    per_step: dict[int, float] = {}
    for r in results:
        for step, value in r["balancedness"].items():
            per_step.setdefault(step, value)
    return np.asarray([per_step[step] for step in range(1, steps + 1)])


def _merged_moe_us(results: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """Modelled MoE time of every pass, from any rank that served it (all-reduced loads)."""
    per_step: dict[int, tuple[float, float]] = {}
    for r in results:
        for step, value in r["moe_us"].items():
            per_step.setdefault(step, value)
    return per_step


def _spans(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One counter delta per span between scale events, from that span's lowest rank
    (serving ranks move in lockstep, so any serving rank's counts are the span's)."""
    chosen: dict[int, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: r["rank"]):
        for segment in r["segments"]:
            chosen.setdefault(segment["since"], segment["stats"])
    return [chosen[since] for since in sorted(chosen)]


def _summed(spans: list[dict[str, Any]], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for span in spans:
        for name, value in span[key].items():
            out[name] = out.get(name, 0) + value
    return out


def _window_mean(bal: np.ndarray, start: int, stop: int) -> float | None:
    """Mean balancedness of passes start+1..stop; None when there is none."""
    part = bal[start:stop]
    return float(part.mean()) if part.size else None


def _scale_events(opts: SimulateOptions, results: list[dict[str, Any]],
                  bal: np.ndarray) -> list[dict[str, Any]]:
    """Each scale event as the new ranks saw it, checked across them. Keyed by the
    requested step (unique): a deferred event can run at the same step as the next."""
    by_request: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for r in results:
        for event in r["scale_events"]:
            by_request.setdefault(event["requested_step"], []).append((r["rank"], event))
    requests = sorted(by_request)
    ran = [by_request[q][0][1]["step"] for q in requests]
    window = max(1, min(opts.window_size, opts.steps))
    checks = {r["rank"]: set(r["check_steps"]) for r in results}
    out = []
    for index, requested in enumerate(requests):
        seen = sorted(by_request[requested], key=lambda pair: pair[0])
        first = seen[0][1]
        step = first["step"]
        new = [e for _, e in seen if e["role"] in ("stays", "joins")]
        lost = new[0]["lost"]
        after_end = ran[index + 1] if index + 1 < len(ran) else opts.steps
        before_start = ran[index - 1] if index else 0
        # The ranks that serve the next pass: those of the last event run at this step.
        serving_next = next(by_request[q][0][1]["new_ranks"] for q in reversed(requests)
                            if by_request[q][0][1]["step"] == step)
        failed = [s for r in results for s in r["failed_checks"] if step < s <= after_end]
        out.append({
            "requested_step": requested,
            "step": step,
            "old_ranks": first["old_ranks"],
            "new_ranks": first["new_ranks"],
            "bytes_moved": int(sum(e["bytes_received"] for _, e in seen)),
            "experts_lost": int(sum(len(experts) for experts in lost.values())),
            "lost": lost,
            "salvaged": any(e["salvaged"] for _, e in seen),
            "wrong_slots": int(sum(e["wrong_slots"] for e in new)),
            "maps_agree": all(e["maps_agree"] for e in new),
            "min_replicas": min(e["min_replicas"] for e in new),
            "histories_agree": all(e["history"] == new[0]["history"]
                                   and e["placement"] == new[0]["placement"]
                                   and e["step_count"] == step for e in new),
            "checked_next_pass": step < opts.steps and all(
                step + 1 in checks[rank] for rank in serving_next),
            "invariance_held_until_next": not failed,
            "seconds": max(e["seconds"] for _, e in seen),
            "balancedness_before": _window_mean(bal, max(before_start, step - window), step),
            "balancedness_after": _window_mean(bal, step, min(after_end, step + window)),
            "final_placement": new[0]["placement"],
        })
    return out


def build_report(opts: SimulateOptions, results: list[dict[str, Any]]) -> dict[str, Any]:
    bal = _merged_steps(results, opts.steps)
    window = min(opts.window_size, len(bal))
    ending = [r for r in sorted(results, key=lambda r: r["rank"]) if r["final"] is not None]
    final = ending[0]["final"]
    spans = _spans(results)
    rebalances = _summed(spans, "rebalances")
    begun = [step for step, _source, dest, _trigger in final["history"] if dest == "planning"]
    check_steps = sorted({s for r in results for s in r["check_steps"]})
    first_load = next(r["rank_load_first_window"] for r in sorted(results, key=lambda r: r["rank"])
                      if r["rank_load_first_window"] is not None)
    return {
        "options": options_dict(opts),
        "balancedness": {
            "definition": "mean/max of per-rank load, per layer, averaged over layers",
            "first": float(bal[:window].mean()),
            "last": float(bal[-window:].mean()),
            "min": float(bal.min()),
            "per_step": [float(b) for b in bal],
        },
        "moe_time": moe_time_report(_merged_moe_us(results), opts.steps, opts.cost_model),
        "invariance_held": not any(r["failed_checks"] for r in results),
        "invariance_checks": len(check_steps),
        "invariance_failed_steps": sorted({s for r in results for s in r["failed_checks"]}),
        "rebalances": {**rebalances, "steps": begun},
        "bytes_moved": int(sum(span["bytes_moved"] for r in results
                               for span in (s["stats"] for s in r["segments"]))),
        "step_overhead_us": _pct([t for r in results for t in r["step_overhead_us"]]),
        "forward_us": _pct([t for r in results for t in r["forward_us"]]),
        "states": {"steps": _summed(spans, "steps_in_state"),
                   "seconds": _summed(spans, "seconds_in_state")},
        "final_placement": final["placement"],
        "final_ranks": ending[0]["segments"][-1]["ranks"],
        "histories_agree": all(r["final"]["history"] == final["history"] for r in ending),
        "history": final["history"],
        "rank_load": {"first_window": first_load,
                      "last_window": ending[0]["rank_load_last_window"]},
        "scale_events": _scale_events(opts, results, bal),
        "scale_missed": results[0]["scale_missed"],
    }


def format_summary(report: dict[str, Any]) -> str:
    o = report["options"]
    b, r, s = report["balancedness"], report["rebalances"], report["step_overhead_us"]
    t = report["moe_time"]
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
        f"  steps (seconds) per state, {'lowest serving rank' if o['scale_at'] else 'rank 0'}:",
    ]
    for state, steps in report["states"]["steps"].items():
        lines.append(f"    {state:<22}{steps:>8} ({report['states']['seconds'][state]:.3f} s)")
    if o["scale_at"]:
        lines += _scale_lines(report)
    lines += [
        f"modelled MoE time per pass, us ({o['layers']} layers, each as slow as its slowest "
        "rank; median over passes)",
        f"  {'placements served':<24}{t['serving_us']['median']:>10.1f}",
        f"  {'initial layout (= off)':<24}{t['initial_us']['median']:>10.1f}",
        speedup_line(t),
    ]
    return "\n".join(lines)


def _scale_lines(report: dict[str, Any]) -> list[str]:
    """The scale events: only in runs with --scale-at, so other summaries stay as they were."""
    lines = ["scale events (bytes moved over the union; balancedness over a window before "
             "-> after):"]
    for e in report["scale_events"]:
        deferred = "" if e["step"] == e["requested_step"] else \
            f" (asked for {e['requested_step']}: a rebalance was in flight)"
        before, after = ("-" if e[key] is None else f"{e[key]:.4f}"
                         for key in ("balancedness_before", "balancedness_after"))
        ok = e["wrong_slots"] == 0 and e["maps_agree"] and e["min_replicas"] >= 1
        lines += [
            f"  step {e['step']}{deferred}: {len(e['old_ranks'])} -> {len(e['new_ranks'])} "
            f"ranks {e['old_ranks']} -> {e['new_ranks']}",
            f"    {'bytes moved':<22}{e['bytes_moved']:>10}",
            f"    {'experts lost':<22}{e['experts_lost']:>10}",
            f"    {'balancedness':<22}{before:>10} -> {after}",
            f"    {'every slot correct':<22}{'yes' if ok else 'NO':>10}"
            f" ({e['wrong_slots']} wrong slots, fewest replicas {e['min_replicas']})",
            f"    {'histories agree':<22}{'yes' if e['histories_agree'] else 'NO':>10}",
            f"    {'outputs unchanged':<22}"
            f"{'yes' if e['checked_next_pass'] and e['invariance_held_until_next'] else 'NO':>10}"
            " (checked on the next pass)",
        ]
    for m in report["scale_missed"]:
        lines.append(f"  step {m['requested_step']} -> ranks {m['ranks']}: not done (a "
                     "rebalance was in flight until the last pass)")
    lines.append(f"  {'final ranks':<24}{len(report['final_ranks']):>10} "
                 f"{report['final_ranks']}; histories agree: "
                 f"{'yes' if report['histories_agree'] else 'NO'}")
    return lines


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write report.json and, when matplotlib is installed, the plots."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "report.json"]
    written[0].write_text(json.dumps(report, indent=1))
    try:
        figures = plot_figures(report)
    except ImportError:  # the plot extra is optional
        return written
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        fig.savefig(directory / name, dpi=110)
        written.append(directory / name)
        plt.close(fig)
    return written


def plot_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The report's plots as matplotlib figures, by file name (ImportError without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5), layout="constrained")
    ax.plot(np.arange(1, len(report["balancedness"]["per_step"]) + 1),
            report["balancedness"]["per_step"], lw=0.8)
    for step in report["rebalances"]["steps"]:
        ax.axvline(step, color="tab:red", lw=0.6, ls="--")
    for event in report["scale_events"]:  # solid: the rank set changed after this pass
        ax.axvline(event["step"], color="tab:green", lw=0.9)
    ax.set(xlabel="step", ylabel="balancedness (mean/max)", ylim=(0, 1.02),
           title=f"balancedness per pass, mode={report['options']['mode']} "
                 "(dashed: rebalance starts)")
    figures = {"balancedness.png": fig}
    # constrained layout keeps every label inside the figure, colorbar included
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True, layout="constrained")
    loads = [np.asarray(report["rank_load"][k]) for k in ("first_window", "last_window")]
    vmax = max(float(x.max()) for x in loads) or 1.0
    for ax, load, title in zip(axes, loads, ("first window", "last window"), strict=True):
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=f"per-rank load, {title}", xlabel="rank", ylabel="layer")
    fig.colorbar(image, ax=axes, label="tokens")
    figures["rank_load.png"] = fig
    return figures
