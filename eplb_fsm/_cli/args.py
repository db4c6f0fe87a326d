"""What every command shares: argument types, the help format, output-path checks.

Output paths are checked when the flags are, before any work, so a long run
never ends by failing to write its result.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn

__all__ = ["ArgumentParser", "HelpFormatter", "check_output_dir", "check_output_file",
           "positive_int"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default appended where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".lstrip()


def _writable_dir(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def check_output_file(path: Path, flag: str) -> None:
    """`path` can be written as a file: its directory exists and is writable."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {parent} does not exist")
    if not _writable_dir(parent) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


def check_output_dir(path: Path, flag: str, *, create: bool = True) -> None:
    """`path` is, or can be created as, a writable directory; created here if missing
    (with `create`), else only checked against its nearest existing parent."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    if not create:
        existing = next(p for p in [path, *path.absolute().parents] if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{flag} {path}: {existing} is not a directory")
        if not _writable_dir(existing):
            raise ValueError(f"{flag} {path}: {existing} is not writable")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create the directory "
                         f"({exc.strerror or type(exc).__name__})") from None
    if not _writable_dir(path):
        raise ValueError(f"{flag} {path}: the directory is not writable")
