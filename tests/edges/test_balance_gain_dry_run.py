"""`benchmarks/balance_gain.py --dry-run` runs on CPU and writes every table and file
the GPU run writes (the GPU run happens on lent machines only; this keeps the
script from rotting between those runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eplb_fsm._core.cost_model import CostModel

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("initial", "default", "global", "incremental", "refined", "time", "time/roofline")


@pytest.mark.timeout(200)
def test_balance_gain_dry_run_writes_the_tables(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/balance_gain.py", "--dry-run",
                           "--repeats", "2", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          text=True, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "(dry run: tiny sizes)" in out and "Goals" in out and "Plan time, ms" in out
    table = (tmp_path / "balance_gain.txt").read_text()
    for row in ROWS:
        assert f"\n  {row} " in table, row
    model = CostModel.load(tmp_path / "cost_model.json")
    assert model.source == "calibrated" and model.expert["hidden"] == 128
    doc = json.loads((tmp_path / "balance_gain.json").read_text())
    assert len(doc["cases"]) == 7  # 2 shapes x 3 token counts + the drift case
    for case in doc["cases"]:
        figs = case["figures"]
        assert list(figs) == list(ROWS)
        assert all(0 < f["time_bal"] <= 1 and 0 < f["token_bal"] <= 1 for f in figs.values())
        if not case["case"]["drift"]:
            # Planned on the measured pass itself: swaps never lose token balance.
            assert figs["refined"]["token_bal"] >= figs["default"]["token_bal"] - 1e-9
        # Every rank of every repeat was timed, and every slot's rows add up to the pass.
        ranks = case["case"]["ranks"]
        for f in figs.values():
            assert all(len(layer) == ranks for rep in f["rank_seconds"] for layer in rep)
        totals = {name: [sum(layer) for layer in f["slot_rows"]] for name, f in figs.items()}
        assert all(t == totals["initial"] for t in totals.values())
