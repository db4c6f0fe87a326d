"""`eplb-fsm simulate` end to end on spawned gloo ranks, judged by its JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _report_schema import SCHEMA_PATH, check_report, errors

from eplb_fsm._cli.cli import main
from eplb_fsm._core.cost_model import CostModel
from eplb_fsm._sim.report import format_summary

ROOT = Path(__file__).resolve().parents[2]

# 190 steps: rebalances start at 50, 100 and 150, and the last one has time to
# finish in async mode too, so both modes end on the same plan.
SMALL = ["--ranks", "4", "--steps", "190", "--layers", "4", "--experts", "16",
         "--redundant", "4", "--tokens", "64", "--step-interval", "50", "--window-size", "25",
         "--exponent", "1.5", "--shift-at", "100", "--check-every", "20"]


def _simulate(tmp_path: Path, mode: str) -> dict:
    out = tmp_path / mode
    assert main(["simulate", *SMALL, "--mode", mode, "--report", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("first", "last", "min"):
        assert 0 < report["balancedness"][key] <= 1
    for key in ("p50", "p99"):
        assert report["step_overhead_us"][key] >= 0
    assert len(report["final_placement"]) == 4 and len(report["final_placement"][0]) == 20
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("simulate")
    return {mode: _simulate(tmp, mode) for mode in ("async", "sync", "off")}


def test_balancing_beats_no_balancing_on_a_skewed_trace(reports: dict[str, dict]) -> None:
    assert reports["async"]["balancedness"]["last"] > reports["off"]["balancedness"]["last"] + 0.1
    assert reports["async"]["rebalances"]["done"] >= 2
    assert reports["off"]["rebalances"]["done"] == 0 and reports["off"]["bytes_moved"] == 0


def test_outputs_never_changed(reports: dict[str, dict]) -> None:
    for mode, report in reports.items():
        assert report["invariance_held"], mode
        assert report["invariance_checks"] >= 190 // 20, mode  # plus one per commit


def test_async_and_sync_reach_the_same_placement(reports: dict[str, dict]) -> None:
    assert reports["async"]["final_placement"] == reports["sync"]["final_placement"]
    assert reports["sync"]["rebalances"]["done"] == reports["async"]["rebalances"]["done"]


def test_summary_says_what_balancing_bought_in_modelled_time(
        reports: dict[str, dict]) -> None:
    for mode, report in reports.items():
        t = report["moe_time"]
        serving, initial = t["serving_us"], t["initial_us"]
        assert len(serving["per_step"]) == len(initial["per_step"]) == 190, mode
        assert serving["median"] == pytest.approx(np.median(serving["per_step"])), mode
        assert initial["median"] == pytest.approx(np.median(initial["per_step"])), mode
        assert t["speedup"] == pytest.approx(initial["median"] / serving["median"]), mode
        assert t["cost_model"]["file"] is None and t["cost_model"]["source"] == "roofline"
        summary = format_summary(report).splitlines()
        assert summary[-1] == (f"balancing made the MoE layers {t['speedup']:.2f}x faster "
                               f"(modelled: {t['model']}, median over passes)"), mode
        assert f"{serving['median']:.1f}" in "\n".join(summary)
    off = reports["off"]["moe_time"]
    assert off["serving_us"]["per_step"] == off["initial_us"]["per_step"]
    assert off["speedup"] == 1.0
    assert "balancing made the MoE layers 1.00x faster" in format_summary(reports["off"])
    for mode in ("async", "sync"):  # the same trace: each pass's initial-layout time is off's
        t = reports[mode]["moe_time"]
        assert t["initial_us"]["per_step"] == off["initial_us"]["per_step"], mode
        served, initial = (np.asarray(t[k]["per_step"]) for k in ("serving_us", "initial_us"))
        # Until the first rebalance lands the initial layout serves, so the counterfactual
        # (the model's replica rule applied to the initial maps) must equal what was served.
        np.testing.assert_array_equal(served[:50], initial[:50])
        assert np.any(served[60:] != initial[60:]), mode


def test_cost_model_file_is_what_the_time_is_modelled_with(tmp_path: Path) -> None:
    # Every slot with rows costs 1 ms whatever its rows: a pass's time is then 1 ms per
    # non-empty slot of each layer's busiest rank (5 slots per rank, 4 layers).
    path = tmp_path / "card.json"
    CostModel.from_measurements([1, 4096], [1e-3, 1e-3], device="test card",
                                expert={"hidden": 32, "intermediate": 64,
                                        "dtype_bytes": 4}).save(path)
    out = tmp_path / "out"
    assert main(["simulate", *SMALL, "--steps", "20", "--shift-at", "--mode", "off",
                 "--cost-model", str(path), "--report", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    check_report(report)
    t = report["moe_time"]
    assert t["cost_model"]["file"] == str(path) and t["cost_model"]["device"] == "test card"
    assert t["model"] == "calibrated, test card, 32x64 fp32 experts"
    per_step = np.asarray(t["serving_us"]["per_step"])
    np.testing.assert_allclose(per_step, np.round(per_step / 1000) * 1000)
    assert per_step.min() >= 4 * 1000 and per_step.max() <= 4 * 5 * 1000


def test_reports_follow_the_documented_schema(reports: dict[str, dict]) -> None:
    """docs/report.schema.json describes every key, and a broken report fails it."""
    schema = json.loads(SCHEMA_PATH.read_text())
    for report in reports.values():
        check_report(report)
    broken = dict(reports["async"])
    del broken["bytes_moved"]
    broken["invariance_held"] = "yes"
    broken["surprise"] = 1
    assert sorted(errors(broken, schema)) == [
        "report.invariance_held: expected boolean, got str", "report.surprise: not allowed",
        "report: missing 'bytes_moved'"]


def test_plots_are_written(reports: dict[str, dict], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert main(["simulate", *SMALL, "--steps", "30", "--shift-at", "--mode", "off",
                 "--report", str(tmp_path)]) == 0
    assert (tmp_path / "balancedness.png").stat().st_size > 1000
    assert (tmp_path / "rank_load.png").stat().st_size > 1000


@pytest.mark.parametrize(("flags", "match"), [
    (["--ranks", "3"], "20 slots must split evenly over 3 ranks"),
    (["--nodes", "3"], "--nodes=3 must divide the 4 ranks"),
    (["--top-k", "17"], "--top-k=17 exceeds --experts=16"),
    (["--groups", "3"], "--experts=16 must be divisible by --groups=3"),
    (["--policy", "nope"], "--policy 'nope' is unknown"),
    (["--redundant", "-4"], "--redundant must be >= 0"),
    (["--trace", "missing.npy"], "does not exist"),
    (["--cost-model", "missing.json"], "--cost-model missing.json: cost model file"),
    (["--cost-model", str(ROOT / "pyproject.toml")], "pyproject.toml: cost model is not valid "
     "JSON"),
    (["--cost-model", str(ROOT / "examples" / "load_8x64.json")],
     "load_8x64.json: cost model format must be 'eplb-fsm cost model'"),
])
def test_bad_flags_fail_before_any_process_starts(
    flags: list[str], match: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["simulate", *SMALL, *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
