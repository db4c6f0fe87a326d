"""The ``eplb-fsm`` command line (``plan``, ``simulate``, ``diagram``, ``calibrate``)
and the load and placement file formats it reads and writes.

`main` is the console script. It imports the command line only inside its
call, and until that import is done Ctrl-C ends the process at once with one
line and status 130. The import takes seconds (numpy, scipy, torch), and a
`KeyboardInterrupt` raised inside it is not always one when it arrives: C
code that imports a module on the way turns it into an `ImportError` with a
page of advice. Nothing has started yet, so there is nothing to clean up.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    named = args[:1] if args and not args[0].startswith("-") else []
    command = " ".join(["eplb-fsm", *named])

    def interrupted(signum: int, frame: FrameType | None) -> None:
        print(f"{command}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    # Only where Ctrl-C would interrupt anyway: a process started with SIGINT
    # ignored (a background job of a script) keeps ignoring it.
    on_main = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = signal.signal(signal.SIGINT, interrupted) if on_main else None
    try:
        from .cli import main as run
    finally:
        if on_main:
            signal.signal(signal.SIGINT, previous)
    return run(argv)
