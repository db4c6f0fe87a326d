"""`eplb-fsm simulate --scale-at`: elastic EP on spawned gloo ranks, judged by the report.

After each scale event every slot on every remaining rank holds its logical expert's
weights (joining ranks built their model without loading any: NaN until the transfer
filled it), every logical expert has a replica, the outputs still equal the dense
oracle (checked on the pass right after each event, and on), and the ranks' histories
agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _report_schema import check_report

from eplb_fsm._cli.cli import main

# 4 slots per rank: two ranks (8 slots) still hold the 8 experts.
TINY = ["--ranks", "4", "--layers", "2", "--experts", "8", "--redundant", "8",
        "--tokens", "16", "--hidden", "8", "--intermediate", "16", "--step-interval", "10",
        "--window-size", "5", "--check-every", "10"]


def _simulate(tmp_path: Path, *flags: str) -> dict[str, Any]:
    assert main(["simulate", *TINY, *flags, "--report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    check_report(report)  # docs/report.schema.json, scale events included
    return report


def _assert_every_event_sound(report: dict[str, Any]) -> None:
    assert report["invariance_held"] and report["invariance_failed_steps"] == []
    assert report["histories_agree"] and report["scale_missed"] == []
    for event in report["scale_events"]:
        where = f"event at step {event['step']}"
        assert event["experts_lost"] == 0 and event["lost"] == {} and not event["salvaged"], where
        assert event["wrong_slots"] == 0 and event["maps_agree"], where
        assert event["min_replicas"] >= 1, where
        assert event["histories_agree"], where
        assert event["checked_next_pass"] and event["invariance_held_until_next"], where
        assert event["bytes_moved"] > 0, where
        for key in ("balancedness_before", "balancedness_after"):
            # None only when another event ran right before or after this one.
            assert event[key] is None or 0 < event[key] <= 1, where
        slots = len(event["new_ranks"]) * 4
        assert all(len(layer) == slots for layer in event["final_placement"]), where
        assert all(set(layer) == set(range(8)) for layer in event["final_placement"]), where
    # Every pass has its balancedness, whichever ranks served it.
    assert len(report["balancedness"]["per_step"]) == report["options"]["steps"]


def test_sync_scale_down_middle_rank_then_up_at_the_requested_steps(tmp_path: Path) -> None:
    # Global rank 2 leaves first (a middle rank), then rank 3; both come back at 28.
    report = _simulate(tmp_path, "--mode", "sync", "--steps", "36", "--scale-at", "12:0,1,3",
                       "--scale-at", "20:2", "--scale-at", "28:4")
    _assert_every_event_sound(report)
    events = report["scale_events"]
    assert [(e["requested_step"], e["step"]) for e in events] == [(12, 12), (20, 20), (28, 28)]
    assert all(e["balancedness_before"] is not None and e["balancedness_after"] is not None
               for e in events)
    assert [(e["old_ranks"], e["new_ranks"]) for e in events] == [
        ([0, 1, 2, 3], [0, 1, 3]), ([0, 1, 3], [0, 1]), ([0, 1], [0, 1, 2, 3])]
    assert report["final_ranks"] == [0, 1, 2, 3]
    assert len(report["final_placement"][0]) == 16
    # Rebalancing goes on over every rank set (sync: inside the triggering step).
    assert report["rebalances"]["steps"] == [10, 20, 30]
    assert report["rebalances"]["done"] == 3
    assert report["invariance_checks"] >= 36 // 10 + len(events)


def test_async_scale_waits_for_the_rebalance_in_flight(tmp_path: Path) -> None:
    # The rebalance triggered at 10 resolves no earlier than 10 + readiness lag (2), so
    # the scale asked for after pass 11 must wait until that rebalance has ended.
    report = _simulate(tmp_path, "--mode", "async", "--steps", "40", "--scale-at", "11:2",
                       "--scale-at", "24:4")
    _assert_every_event_sound(report)
    down, up = report["scale_events"]
    assert (down["old_ranks"], down["new_ranks"]) == ([0, 1, 2, 3], [0, 1])
    assert (up["old_ranks"], up["new_ranks"]) == ([0, 1], [0, 1, 2, 3])
    assert down["step"] > 11 and up["step"] >= 24
    history = report["history"]
    for event in (down, up):
        if event["step"] > event["requested_step"]:  # deferred: a rebalance ended right then
            ended = [s for s, _src, dest, _t in history if dest == "collecting"
                     and event["requested_step"] <= s <= event["step"]]
            assert ended and max(ended) == event["step"], (event, history)
    assert 10 in report["rebalances"]["steps"]


@pytest.mark.parametrize(("flags", "match"), [
    (["--scale-at", "12"], "expected STEP:RANKS"),
    (["--scale-at", "x:2"], "expected STEP:RANKS"),
    (["--scale-at", "12:0"], "RANKS must be >= 1"),
    (["--scale-at", "0:2"], "STEP must be >= 1"),
    (["--scale-at", "12:1,1"], "distinct global ranks"),
    (["--scale-at", "40:2"], "--scale-at 40:2: STEP must be below --steps=40"),
    (["--scale-at", "12:1"], "1 ranks x 4 slots per rank = 4 slots cannot hold --experts=8"),
    (["--scale-at", "20:2", "--scale-at", "12:4"], "--scale-at steps must be strictly increasing"),
    (["--scale-at", "12:4"], "the ranks [0, 1, 2, 3] already serve"),
    (["--scale-at", "12:2", "--scale-at", "20:2,3"], "no rank of [0, 1] stays"),
])
def test_bad_scale_at_fails_before_any_process_starts(
    flags: list[str], match: str, capsys: pytest.CaptureFixture
) -> None:
    code: Any
    try:
        code = main(["simulate", *TINY, "--steps", "40", *flags])
    except SystemExit as exc:  # argparse's own errors: usage, then the message
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err
