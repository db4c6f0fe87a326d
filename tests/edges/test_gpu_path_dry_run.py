"""`benchmarks/gpu_path.py --dry-run` runs on CPU and prints every table the GPU run prints.

The GPU run happens on lent machines only; this keeps the script from rotting
between those runs (2 gloo ranks, tiny sizes, every run and meter exercised).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _row(lines: list[str], name: str) -> list[str]:
    """The cells after the name of the first table row named `name`."""
    for line in lines:
        if line.startswith(" ") and line.strip().startswith(name + " "):
            cells = line.strip()[len(name):].split()
            if cells and cells[0][0].isdigit():
                return cells
    raise AssertionError(f"no row {name!r} in:\n" + "\n".join(lines))


@pytest.mark.timeout(200)
def test_gpu_path_dry_run_prints_the_tables() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_path.py", "--dry-run"], cwd=ROOT,
                          env=env, text=True, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    lines = out.splitlines()
    assert "gpu_path: 2 x CPU (dry run" in out
    # Serving table: every run's ranks kept identical histories; async runs rebalanced.
    for mode in ("off", "async", "async x4", "sync"):
        assert _row(lines, mode)[-1] == "yes", mode
    for mode in ("async", "async x4", "sync"):
        assert int(_row(lines, mode)[6]) >= 1, mode  # rebalances done
    assert "baseline (blocking gloo all-reduce" in out and "in-flight p99 / baseline p99" in out
    # Transfer table (the second row of each name): batches launched, bytes moved,
    # a plain bound measured and the stage() host cost.
    assert "transfer bandwidth inside the serving loop" in out
    transfer = lines[lines.index(next(x for x in lines if x.startswith("transfer bandwidth"))):]
    for run in ("async", "async x4", "sync"):
        cells = _row(transfer, run)
        assert int(cells[0]) >= 1 and float(cells[1]) > 0 and float(cells[3]) > 0, cells
    # The idle-step breakdown, every part measured.
    for part in ("empty coroutine, first after forward", "ModelDriver.record_pass [record]",
                 "load-window record (copy + zero)", "EplbRuntime.step rest [record]",
                 "main-thread CPU time in step() [record]", "empty coroutine, right after step()",
                 "same idle step, 2nd runtime, warm", "GCs inside step()",
                 "event-loop turns inside step()"):
        assert part in out, part
