"""Every shell command README.md and docs/ show works as written.

Commands are taken from ```bash blocks, from plain ``` blocks that start with a
command, and from inline code that starts with ``eplb-fsm``. Each is run, or,
where running it as written would be long or needs what CI lacks, checked the
way the table below says, with the reason:

- ``eplb-fsm simulate`` runs of more than 60 steps: ``--dry-run`` (every flag and
  file is checked as a real run checks them; the same code runs at small sizes
  in test_simulate*.py). Shorter ones run for real.
- ``eplb-fsm plan`` / ``diagram``: run.
- ``eplb-fsm <command>`` alone, or with placeholders (``STEP:RANKS``), names a
  command in prose: its ``--help`` must list every flag shown.
- ``pip install``: not run (network); the pinned torch must be the installed one
  and every extra named must exist in pyproject.toml.
- ``ruff check .`` and ``mypy``: run; ``python -m pytest -q`` is this suite:
  collected only.
- ``python examples/...``: test_examples.py runs exactly these.
- ``python benchmarks/...`` on CPU: ``--help`` lists every flag shown.
- GPU and torchrun commands: skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from eplb_fsm._cli.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "benchmarks" / "diagnostics" / "README.md"]
COMMAND = re.compile(r"^(eplb-fsm|python3?|torchrun|bash|pip|ruff|mypy)\b(?! *\w*:)")
GPU_SCRIPTS = {"gpu_path.py", "pull_bench.py", "transfer_bench.py", "gpu_suite.sh",
               "balance_gain.py", "stream_waits.py", "pull_profile.py", "stage_profile.py",
               "stage_timeline.py"}
TIMEOUT_S = 300


def _commands() -> list[tuple[str, str]]:
    """(page:line, command) of every command shown."""
    found = []
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT)
        for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
            if block.group(1) not in ("bash", "sh", ""):
                continue
            line = text.count("\n", 0, block.start(2)) + 1
            body = block.group(2).replace("\\\n", " ")
            for offset, raw in enumerate(body.splitlines()):
                command = raw.split("  #")[0].strip()
                if COMMAND.match(command):
                    found.append((f"{name}:{line + offset}", command))
                elif block.group(1) == "":
                    break  # a plain block that is output, not commands
        for span in re.finditer(r"(?<!`)`(eplb-fsm[^`]*)`(?!`)", text):
            line = text.count("\n", 0, span.start()) + 1
            found.append((f"{name}:{line}", " ".join(span.group(1).split())))
    return found


COMMANDS = list({command: (where, command) for where, command in _commands()}.values())


def _run(argv: list[str], timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run `argv` from the repository root; ``eplb-fsm`` in this process (its console
    script is the same `main`, which test_cli_plan.py runs as a script)."""
    if argv[0] == "eplb-fsm":
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv[1:])
                except SystemExit as exc:  # --help
                    code = int(exc.code or 0)
        finally:
            os.chdir(cwd)
        assert code == 0, f"{shlex.join(argv)}:\n{out.getvalue()[-2000:]}{err.getvalue()}"
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    done = subprocess.run(argv, cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=")[0] for a in argv if a.startswith("-") and a not in ("-", "--")]


def _help_lists_flags(argv: list[str], program: int = 2) -> None:
    """The first `program` words' ``--help`` lists every flag `argv` shows."""
    text = _run([*argv[:program], "--help"]).stdout
    for flag in _flags(argv):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag


def _check_pip(argv: list[str]) -> None:
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[",
                        (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M)
    assert section is not None
    extras = re.findall(r"^(\w+) *=", section.group(1), flags=re.M)
    for arg in argv[2:]:
        if arg.startswith("torch=="):
            assert version("torch").split("+")[0] == arg.split("==")[1], arg
        elif arg.startswith("."):
            named = re.findall(r"\[(.*)\]", arg)
            for extra in (named[0].split(",") if named else []):
                assert extra in extras, f"extra {extra!r} is not in pyproject.toml"
        elif arg != "-e":
            raise AssertionError(f"unexpected pip argument {arg!r}")


def _check_eplb_fsm(argv: list[str]) -> None:
    sub = argv[1] if len(argv) > 1 else ""
    placeholders = [a for a in argv[2:] if re.fullmatch(r"[A-Z][A-Z_:]*[A-Z]", a.split("=")[-1])
                    or re.search(r"\bSTEP:RANKS\b", a)]
    if len(argv) <= 2 or placeholders:
        _help_lists_flags(argv)
        return
    if sub == "simulate":
        steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 240
        if steps > 60:
            assert "flags OK" in _run([*argv, "--dry-run"]).stdout
            return
    _run(argv)


def _check(command: str) -> None:
    for part in command.split("&&"):
        argv = shlex.split(part)
        tool = argv[0]
        scripts = {Path(a).name for a in argv if a.endswith((".py", ".sh"))}
        calibrate = argv[:2] == ["eplb-fsm", "calibrate"] and len(argv) > 2
        if tool == "torchrun" or scripts & GPU_SCRIPTS or calibrate:
            pytest.skip(f"needs CUDA GPUs or torchrun: {part.strip()}")
        if argv[:2] == ["eplb-fsm", "plan"] and "cost_model=h100.json" in part:
            pytest.skip("needs the calibration file `eplb-fsm calibrate` writes on a GPU")
        if tool == "pip":
            _check_pip(argv)
        elif tool == "eplb-fsm":
            _check_eplb_fsm(argv)
        elif argv[:3] == ["python", "-m", "pytest"]:
            _run([*argv, "--collect-only"])  # the suite this test is part of
        elif tool in ("ruff", "mypy"):
            _run(argv)
        elif tool in ("python", "python3") and argv[1].startswith("examples/"):
            from test_examples import COMMANDS as EXAMPLES

            shown = [c for c in EXAMPLES.values() if c[-1] == argv[1]]
            assert shown, f"{argv[1]} is not run by test_examples.py"
        elif tool in ("python", "python3") and argv[1].startswith("benchmarks/"):
            _help_lists_flags(argv)
        else:
            raise AssertionError(f"no rule for {part.strip()!r}: add one above")


def test_the_pages_show_commands() -> None:
    shown = [command for _, command in COMMANDS]
    assert "eplb-fsm simulate --redundant 64 --scale-at 80:2 --scale-at 160:4" in shown
    assert any(c.startswith("pip install") for c in shown)
    assert any(c.startswith("eplb-fsm plan examples/") for c in shown)


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_command_works_as_written(command: str) -> None:
    _check(command)
