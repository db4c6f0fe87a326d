"""The ``eplb-fsm`` command line.

Each subcommand lives in its own module (``cli_<name>.py``) that parses and
checks its flags, then calls the public API; no balancing logic lives here.
Errors in flags or files end the program with one line naming the flag or
file, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import cli_diagram, cli_plan, cli_simulate

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eplb-fsm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cli_simulate.add_parser(sub)
    cli_plan.add_parser(sub)
    cli_diagram.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the cause said
        print(f"eplb-fsm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
