"""`eplb-fsm diagram` prints what the table declares, and docs/ carries the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from eplb_fsm import mermaid_diagram
from eplb_fsm._cli.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"


def test_diagram_command_prints_the_generated_diagram(capsys: pytest.CaptureFixture) -> None:
    assert main(["diagram"]) == 0
    assert capsys.readouterr().out.strip() == mermaid_diagram()


def test_docs_carry_the_current_diagram() -> None:
    # Regenerate with: eplb-fsm diagram --markdown (paste into docs/lifecycle.md)
    assert mermaid_diagram() in DOCS.read_text()
