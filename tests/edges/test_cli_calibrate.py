"""``eplb-fsm calibrate``: the roofline where nothing can be measured, a real CPU
calibration with --device cpu, flag errors, and the file feeding ``plan --policy time``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eplb_fsm._cli.cli import main
from eplb_fsm._core.cost_model import CostModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_without_cuda_it_writes_the_roofline_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cm.json"
    assert main(["calibrate", "-o", str(out), "--bandwidth", "2e12", "--flops", "5e14"]) == 0
    said = capsys.readouterr().out
    assert "wrote the analytic roofline" in said and "no CUDA device" in said
    model = CostModel.load(out)
    assert model.source == "roofline"
    assert model == model and model.note.startswith("roofline: 2 TB/s, 500 TFLOP/s")
    expected = CostModel.roofline(2e12, 5e14)
    np.testing.assert_allclose(model.slot_seconds([1, 100, 5000]),
                               expected.slot_seconds([1, 100, 5000]))


def test_device_cpu_measures_this_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    out = tmp_path / "cm.json"
    assert main(["calibrate", "-o", str(out), "--device", "cpu", "--hidden", "64",
                 "--intermediate", "32", "--dtype", "float32", "--max-rows", "64",
                 "--repeats", "2"]) == 0
    assert "measured 6 row counts, 1 to 64, on CPU" in capsys.readouterr().out
    model = CostModel.load(out)
    assert model.source == "calibrated"
    assert dict(model.expert) == {"hidden": 64, "intermediate": 32, "dtype_bytes": 4}
    assert model.rows.tolist() == [0, 1, 8, 16, 32, 48, 64]
    assert np.all(np.diff(model.seconds) >= 0) and model.seconds[1] > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--bandwidth", "0"], "--bandwidth must be a finite number > 0"),
    (["--flops", "nan"], "--flops must be a finite number > 0"),
    (["-o", "/no/such/dir/cm.json"], "--output /no/such/dir/cm.json: the directory"),
    (["--device", "warp-drive"], "--device 'warp-drive' is not a torch device"),
])
def test_bad_flags_end_with_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    if "-o" not in argv:
        argv = [*argv, "-o", str(tmp_path / "cm.json")]
    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_file_feeds_plan_policy_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    cm = tmp_path / "cm.json"
    CostModel([0, 1, 64, 1024], [0, 1e-5, 1e-5, 2.5e-4], "calibrated", "test").save(cm)
    placement = tmp_path / "p.json"
    code = main(["plan", str(ROOT / "examples" / "load_8x64.json"), "-P", "80", "-R", "8",
                 "--policy", "time", "--option", f"cost_model={cm}", "-o", str(placement)])
    assert code == 0, capsys.readouterr().err
    assert placement.exists()
    bad = main(["plan", str(ROOT / "examples" / "load_8x64.json"), "-P", "80", "-R", "8",
                "--policy", "time", "--option", f"cost_model={tmp_path / 'none.json'}"])
    assert bad == 2
    assert "cost model file" in capsys.readouterr().err
