"""Every script in examples/ runs as a user would run it, and prints what its docstring says.

Each takes a few seconds on 2 cores, mostly process start-up (torch import, gloo
rendezvous); the serving loops themselves are small.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2"]
COMMANDS = {
    "asyncio": [sys.executable, "examples/asyncio_serving_loop.py"],
    "sync": [sys.executable, "examples/sync_serving_loop.py"],
    "offline": [sys.executable, "examples/offline_planning.py"],
    "torchrun": [*TORCHRUN, "examples/torchrun_multinode.py"],
}


def output(name: str) -> str:
    """Run one example as a user would, bounded in time; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(COMMANDS[name], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name} example did not finish in {TIMEOUT_S} s:\n{exc.stdout!r}")
    assert done.returncode == 0, f"{name} example failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


def check_serving(out: str) -> None:
    first = number(r"first 20 passes\s+([\d.]+)", out)
    last = number(r"last 20 passes\s+([\d.]+)", out)
    assert 0 < first < 1 and 0 < last <= 1
    assert last > first + 0.1, out  # the balancer fixed the skew the trace imposed
    assert number(r"done (\d+)", out) >= 2
    assert number(r"failed (\d+)", out) == 0
    assert "outputs equal the dense model after rebalancing: yes" in out


def test_asyncio_serving_loop() -> None:
    out = output("asyncio")
    check_serving(out)
    assert number(r"bytes received (\d+)", out) > 0
    assert re.search(r"hook on rank 0 saw: step \d+ done", out), out
    assert "same transitions at the same steps on every rank: yes" in out


def test_sync_serving_loop() -> None:
    out = output("sync")
    check_serving(out)
    assert "use_async=True" in out
    fresh = number(r"asyncio.run (\d+) us", out)
    kept = number(r"one kept loop (\d+) us", out)
    assert fresh > 2 * kept, out  # why the example keeps one loop


def table(section: str) -> dict[str, tuple[float, float, int | None]]:
    """Rows of one scenario: name -> (avg, min, slots changed or None)."""
    rows = {}
    for m in re.finditer(r"^  ([a-z][\w +,]*?)\s{2,}([\d.]+)\s+([\d.]+)(?:\s+(\d+)/\d+)?",
                         section, flags=re.M):
        rows[m.group(1)] = (float(m.group(2)), float(m.group(3)),
                            int(m.group(4)) if m.group(4) else None)
    return rows


def test_offline_planning() -> None:
    out = output("offline")
    start, drift = (table(part) for part in out.split("\n2) after"))
    assert set(start) == {"initial layout", "default", "refined", "incremental"}
    assert set(drift) == {"keep the old placement", "default, from scratch",
                          "default + minimize_moves", "refined + minimize_moves",
                          "incremental"}
    for avg, low, _ in [*start.values(), *drift.values()]:
        assert 0 < low <= avg <= 1
    # From the initial layout every policy balances far better than the layout itself.
    assert all(start[p][0] > start["initial layout"][0] + 0.3
               for p in ("default", "refined", "incremental"))
    assert start["refined"][0] >= start["default"][0]
    # After a drift: relabeling keeps experts in place, incremental moves a handful,
    # and both still beat keeping the old placement.
    moved = {name: row[2] for name, row in drift.items() if row[2] is not None}
    assert moved["default + minimize_moves"] <= moved["default, from scratch"]
    assert moved["incremental"] < moved["default + minimize_moves"] / 4
    assert drift["incremental"][0] > drift["keep the old placement"][0]
    assert drift["default + minimize_moves"][0] == drift["default, from scratch"][0]


def test_torchrun_multinode() -> None:
    out = output("torchrun")
    assert "torchrun: 2 ranks on 1 node(s), backend gloo" in out
    check_serving(out)
    assert "same placement on every rank: yes" in out
