"""Elastic EP across nodes: shrinking a two-node deployment to one node's worth of ranks
and growing it back. The joiners are launched with the deployment's original settings
(two nodes); they must plan as the staying ranks do, who plan for the node count the
shrink left, or the union's transfers pair messages of other sizes (gloo aborts)."""

from __future__ import annotations

import json
from pathlib import Path

from eplb_fsm._cli.cli import main

FLAGS = ["--ranks", "4", "--nodes", "2", "--groups", "4", "--layers", "2", "--experts", "8",
         "--redundant", "8", "--tokens", "16", "--hidden", "8", "--intermediate", "16",
         "--step-interval", "10", "--window-size", "5", "--mode", "sync", "--steps", "36",
         "--scale-at", "12:2", "--scale-at", "24:4"]


def test_two_nodes_shrink_and_grow_back(tmp_path: Path) -> None:
    assert main(["simulate", *FLAGS, "--report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["histories_agree"] and report["invariance_held"]
    events = report["scale_events"]
    assert [e["step"] for e in events] == [12, 24]
    for event in events:
        assert event["experts_lost"] == 0 and event["wrong_slots"] == 0, event
        assert event["maps_agree"] and not event["salvaged"], event
