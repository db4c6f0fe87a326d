"""Reference pages that are generated or must list everything: they cannot drift."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eplb_fsm import EplbConfig, available_policies
from eplb_fsm._cli.cli import cli_reference

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_cli_reference_is_current() -> None:
    # Regenerate: python -c "from eplb_fsm._cli.cli import cli_reference as r;
    #   open('docs/cli.md', 'w').write(r())"
    assert (DOCS / "cli.md").read_text() == cli_reference()


def test_every_config_field_is_documented_with_its_default() -> None:
    text = (DOCS / "configuration.md").read_text()
    for field in dataclasses.fields(EplbConfig):
        row = next((line for line in text.splitlines() if line.startswith(f"| `{field.name}` ")),
                   None)
        assert row is not None, f"docs/configuration.md lacks {field.name}"
        assert f"`{field.default!r}`" in row, f"{field.name}: default {field.default!r}"


def test_every_policy_is_documented() -> None:
    text = (DOCS / "policies.md").read_text()
    for name in available_policies():
        assert f"| `{name}` |" in text, name
