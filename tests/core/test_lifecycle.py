"""The lifecycle table on its own: no ranks, no devices, no event loop."""

from __future__ import annotations

import pytest
from transitions import MachineError

from eplb_fsm import STATES, mermaid_diagram
from eplb_fsm._core.lifecycle import TRANSITIONS, Facts, Lifecycle


def _walk(lc: Lifecycle, steps: list[tuple[str, Facts]]) -> list[str]:
    return [lc.fire(trigger, i, facts) for i, (trigger, facts) in enumerate(steps)]


def test_full_rebalance_of_two_batches() -> None:
    lc = Lifecycle()
    states = _walk(lc, [
        ("interval_reached", Facts()),
        ("plan_agreed", Facts(worth_moving=True)),
        ("round_launched", Facts()),
        ("round_resolved", Facts(all_ready=False)),
        ("round_launched", Facts()),
        ("round_resolved", Facts(all_ready=True)),
        ("layers_committed", Facts(all_layers_done=False)),
        ("round_launched", Facts()),
        ("round_resolved", Facts(all_ready=True)),
        ("layers_committed", Facts(all_layers_done=True)),
    ])
    assert states == ["planning", "staging", "awaiting_all_ranks", "staging",
                      "awaiting_all_ranks", "committing", "staging", "awaiting_all_ranks",
                      "committing", "collecting"]
    assert [r.step for r in lc.history] == list(range(10))


def test_plan_not_worth_moving_is_dropped() -> None:
    lc = Lifecycle()
    assert _walk(lc, [("interval_reached", Facts()), ("plan_agreed", Facts())]) == [
        "planning", "collecting"]


@pytest.mark.parametrize("trigger", ["plan_agreed", "round_launched", "round_resolved",
                                     "layers_committed", "fail", "recover"])
def test_triggers_the_table_forbids_raise(trigger: str) -> None:
    with pytest.raises(MachineError):
        Lifecycle().fire(trigger, 0)


def test_every_busy_state_can_fail_and_failed_recovers() -> None:
    for path in ([("interval_reached", Facts())],
                 [("interval_reached", Facts()), ("plan_agreed", Facts(worth_moving=True))],
                 [("interval_reached", Facts()), ("plan_agreed", Facts(worth_moving=True)),
                  ("round_launched", Facts())]):
        lc = Lifecycle()
        _walk(lc, path)
        assert lc.fire("fail", 99) == "failed"
        assert lc.fire("recover", 100) == "collecting"


def test_diagram_is_generated_from_the_table() -> None:
    text = mermaid_diagram()
    assert text.startswith("stateDiagram-v2")
    edges = sum(len(t["source"]) if isinstance(t["source"], list) else 1 for t in TRANSITIONS)
    assert text.count(" --> ") == edges + 1  # plus the initial [*] edge
    for state in STATES:
        assert state in text
    assert "awaiting_all_ranks --> committing: round_resolved [all_ready]" in text


def test_elastic_path_handoff_salvage_and_release() -> None:
    lc = Lifecycle()
    assert _walk(lc, [("reconfigure", Facts()), ("handoff_resolved", Facts(all_ready=True)),
                      ("resized", Facts())]) == ["reconfiguring", "resizing", "collecting"]
    lc = Lifecycle()
    assert _walk(lc, [("reconfigure", Facts()), ("handoff_resolved", Facts()),
                      ("salvaged", Facts()), ("resized", Facts(nothing_lost=False)),
                      ("recover", Facts())]) == [
        "reconfiguring", "salvaging", "resizing", "failed", "collecting"]
    lc = Lifecycle()
    assert _walk(lc, [("reconfigure", Facts()), ("handed_off", Facts())]) == [
        "reconfiguring", "released"]
    assert not lc.may_fire("recover") and not lc.may_fire("interval_reached")


def test_reconfigure_only_from_collecting() -> None:
    lc = Lifecycle()
    lc.fire("interval_reached", 0)
    with pytest.raises(MachineError):
        lc.fire("reconfigure", 1)
