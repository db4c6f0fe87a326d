"""The command line as a new user meets it: errors are one line and come before any
work, output paths are checked first, Ctrl-C and closed pipes end it quietly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import eplb_fsm
from eplb_fsm._cli.cli import main

ROOT = Path(__file__).resolve().parents[2]
LOAD = ROOT / "examples" / "load_8x64.json"
PLAN = ["plan", str(LOAD), "-P", "80", "-R", "8"]
CLI = [sys.executable, "-m", "eplb_fsm"]


def _one_error_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == "", "nothing may be printed before the error"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    version = (ROOT / "pyproject.toml").read_text().split('version = "')[1].split('"')[0]
    assert capsys.readouterr().out.strip() == f"eplb-fsm {version}" == \
        f"eplb-fsm {eplb_fsm.__version__}"


@pytest.mark.parametrize(("command", "shown"), [
    (["simulate"], ["(default: 240)", "(default: async)", "(default: 130, those within --steps)",
                    "(default: 900)"]),
    (["plan"], ["(default: default)", "(default: 1)"]),
])
def test_help_shows_defaults(command: list[str], shown: list[str],
                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--steps", "0"])
    assert exit_.value.code == 2
    _one_error_line(capsys, "argument --steps", "expected a positive integer, got 0")


def test_plan_checks_its_output_path_before_planning(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main([*PLAN, "-o", str(tmp_path / "missing" / "p.json")]) == 2
    _one_error_line(capsys, "-o/--output", "does not exist")
    assert main([*PLAN, "-o", str(tmp_path / "p.csv")]) == 2
    _one_error_line(capsys, "-o/--output", "unknown suffix '.csv'", ".npz, .json")
    assert main([*PLAN, "-o", str(tmp_path)]) == 2
    _one_error_line(capsys, "is a directory")
    assert main([*PLAN, "-o", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "p.json").exists()


@pytest.mark.parametrize(("content", "needles"), [
    ({"counts": [[1, 2]]}, ['needs a "load" key', "'counts'", "[layers][experts]"]),
    ("load", ["got a JSON str", "[layers][experts]"]),
    ([[1, 2], [3]], ["not a rectangular array", "[layers][experts]"]),
])
def test_json_load_errors_say_the_expected_format(
    tmp_path: Path, content: object, needles: list[str], capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "load.json"
    path.write_text(json.dumps(content))
    assert main(["plan", str(path), "-P", "4", "-R", "2"]) == 2
    _one_error_line(capsys, str(path), *needles)


def test_json_load_object_with_load_key_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"load": np.ones((2, 4)).tolist(), "note": "x"}))
    assert main(["plan", str(path), "-P", "4", "-R", "2"]) == 0


@pytest.mark.parametrize(("flags", "needles"), [
    (["--shift-at", "999", "--steps", "5"], ["--shift-at 999", "<= --steps=5"]),
    (["--scale-at", "80:2", "--scale-at", "160:4"],
     ["--scale-at 80:2", "--redundant 64 would fit"]),
])
def test_simulate_flag_rules(flags: list[str], needles: list[str],
                             capsys: pytest.CaptureFixture) -> None:
    assert main(["simulate", *flags]) == 2
    _one_error_line(capsys, *needles)


def test_report_path_is_checked_before_the_run(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("")
    start = time.monotonic()
    assert main(["simulate", "--report", str(a_file)]) == 2
    _one_error_line(capsys, "--report", "exists and is not a directory")
    assert main(["simulate", "--report", str(a_file / "sub")]) == 2
    _one_error_line(capsys, "--report", "cannot create the directory")
    (tmp_path / "out" / "report.json").mkdir(parents=True)
    assert main(["simulate", "--report", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "report.json there is a directory")
    assert time.monotonic() - start < 5, "no rank may have been started"


def test_default_shift_beyond_a_short_run_is_not_an_error(
        capsys: pytest.CaptureFixture) -> None:
    assert main(["simulate", "--dry-run", "--steps", "50"]) == 0
    assert "flags OK" in capsys.readouterr().out


def test_dry_run_checks_without_running(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = tmp_path / "new" / "dir"
    assert main(["simulate", "--dry-run", "--scale-at", "80:2", "--redundant", "64",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "flags OK" in out and "after pass 80 serve on ranks [0, 1]" in out
    assert not report.exists()  # a dry run creates nothing


def test_plot_hint_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    from eplb_fsm._cli import cli_simulate

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(cli_simulate, "format_summary", lambda report: "summary")
    args = type("Args", (), {"report": tmp_path})()
    cli_simulate._finish(args, {"any": "report"})  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "report.json" in out and "pip install 'eplb-fsm[plot]'" in out


def test_closed_pipe_ends_quietly() -> None:
    """``eplb-fsm ... | head`` whose reader has gone: no traceback, SIGPIPE's status."""
    for command in (["diagram", "--markdown"], PLAN):
        proc = subprocess.Popen([*CLI, *command], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first write
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, err
        assert err == "", err


def _as_in_a_terminal() -> None:
    """A terminal's foreground command starts with SIGINT at its default. This
    test run may itself run in the background of a script, where SIGINT is
    ignored and every child inherits that (and rightly keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignores_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def _ranks(pid: int) -> list[int]:
    """The ranks of the command `pid`: forked by its fork server, they are its
    grandchildren."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return [p for p, parent in parents.items() if parents.get(parent) == pid]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_stops_simulate_within_two_seconds() -> None:
    """A terminal's Ctrl-C signals the whole foreground process group."""
    proc = subprocess.Popen([*CLI, "simulate", "--ranks", "2", "--steps", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        # Until its fork server runs the command ignores Ctrl-C (the server and
        # the ranks it forks inherit that, so none prints a traceback); on a
        # loaded machine that can outlast the ranks' appearance in /proc.
        while len(_ranks(proc.pid)) < 2 or _ignores_sigint(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        ranks = _ranks(proc.pid)
        assert all(_ignores_sigint(rank) for rank in ranks)
        time.sleep(2)  # some ranks are serving by now, others may still start up
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert took < 2, f"took {took:.1f} s"
    assert "Traceback" not in err and err.strip() == "eplb-fsm simulate: interrupted", err
    assert out == ""
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc")
def test_ctrl_c_while_the_command_line_still_imports_is_one_line() -> None:
    # Importing numpy, scipy and torch takes seconds; a user who presses Ctrl-C
    # then (a typo seen late) gets the same one line as during the work.
    proc = subprocess.Popen([*CLI, "simulate", "--ranks", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 60
        maps = Path(f"/proc/{proc.pid}/maps")
        while "numpy" not in maps.read_text():  # importing: torch comes after numpy
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "eplb-fsm simulate: interrupted", err
    assert out == "" and took < 2, took


def test_timeout_is_one_clear_line() -> None:
    start = time.monotonic()
    done = subprocess.run([*CLI, "simulate", "--ranks", "2", "--steps", "100000",
                           "--timeout", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "eplb-fsm simulate: error: the run did not finish within --timeout=2 s; its ranks "
        "were killed (raise --timeout for larger runs)"]
    assert time.monotonic() - start < 30  # start-up plus the 2 s, not a join per rank


def test_rank_load_plot_labels_stay_inside_the_figure() -> None:
    pytest.importorskip("matplotlib")
    from eplb_fsm._sim.report import plot_figures

    report = {"balancedness": {"per_step": [0.5, 0.6, 0.7]},
              "rebalances": {"steps": [2]}, "scale_events": [], "options": {"mode": "async"},
              "rank_load": {"first_window": np.ones((8, 4)).tolist(),
                            "last_window": np.ones((8, 4)).tolist()}}
    for name, fig in plot_figures(report).items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        for ax in fig.axes:
            for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
                if label.get_text():
                    extent = label.get_window_extent(renderer)
                    assert extent.x0 >= box.x0 - 1 and extent.y0 >= box.y0 - 1, \
                        (name, label.get_text())
                    assert extent.x1 <= box.x1 + 1 and extent.y1 <= box.y1 + 1, \
                        (name, label.get_text())


def test_readme_summary_shows_every_state_row() -> None:
    from eplb_fsm import STATES

    text = (ROOT / "README.md").read_text()
    block = text.split("## What the main job prints", 1)[1].split("```")[1]
    rows = [line.split()[0] for line in block.splitlines() if line.startswith("    ")]
    assert rows == list(STATES)


@pytest.mark.asyncio
async def test_rearrange_during_a_rebalance_raises_as_the_readme_says() -> None:
    """README: rt.rearrange_async() raises RuntimeError while rt.busy."""
    from eplb_fsm import EplbConfig
    from eplb_fsm.testing import FakeCluster

    cluster = FakeCluster(2, EplbConfig(window_size=5, step_interval=10,
                                        num_redundant_experts=2))
    cluster.add_model("main", num_layers=2, num_logical=6)
    cluster.delay_readiness(1, 50)  # keep the rebalance in flight
    await cluster.run(12, lambda rank, step: {"main": [[6, 5, 4, 3, 2, 1]] * 2})
    runtime = cluster.runtimes[0]
    assert runtime.busy
    with pytest.raises(RuntimeError, match="already in flight"):
        await runtime.rearrange_async()
