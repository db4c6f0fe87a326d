"""``eplb-fsm diagram``: the lifecycle as a Mermaid state diagram, from the table."""

from __future__ import annotations

import argparse

from .._core.lifecycle import mermaid_diagram
from .args import HelpFormatter

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagram", help="print the rebalance lifecycle as a Mermaid diagram",
                       description="Print the lifecycle state machine as a Mermaid "
                       "stateDiagram, generated from the transitions table in the code.",
                       formatter_class=HelpFormatter)
    p.add_argument("--markdown", action="store_true",
                   help="wrap it in a ```mermaid fence, ready for a Markdown file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    text = mermaid_diagram()
    print(f"```mermaid\n{text}\n```" if args.markdown else text)
    return 0
