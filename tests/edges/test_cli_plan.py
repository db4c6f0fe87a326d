"""`eplb-fsm plan` end to end: files in every format, the table, and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb_fsm
from eplb_fsm import Placement, plan
from eplb_fsm._cli.cli import main
from eplb_fsm._cli.files import read_load, read_placement, write_placement

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "load_8x64.json"
ARGS = ["-P", "80", "-R", "8", "-G", "8", "-N", "2"]


def test_plan_prints_table_and_writes_placement(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "p.npz"
    assert main(["plan", str(EXAMPLE), *ARGS, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "worst layer after" in text
    load = read_load(EXAMPLE)
    assert read_placement(out) == plan(load, 80, 8, 2, 8)
    mean_line = next(line for line in text.splitlines() if line.strip().startswith("mean"))
    before, after = (float(x) for x in mean_line.split()[1:3])
    assert after > before + 0.3  # the example load is skewed; the plan must help


def test_old_placement_means_zero_moves_when_replanning_same_load(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = tmp_path / "p.json"
    assert main(["plan", str(EXAMPLE), *ARGS, "-o", str(first)]) == 0
    capsys.readouterr()
    assert main(["plan", str(EXAMPLE), *ARGS, "--old", str(first)]) == 0
    assert "slots changed: 0 of 640" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".json"])
def test_load_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    load = np.arange(12, dtype=np.float64).reshape(3, 4)
    path = tmp_path / f"load{suffix}"
    if suffix == ".npy":
        np.save(path, load)
    elif suffix == ".pt":
        torch.save(torch.tensor(load), path)
    else:
        path.write_text(json.dumps(load.tolist()))
    assert np.array_equal(read_load(path), load)


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_placement_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    p = Placement([[0, 1, 2, 0], [2, 2, 1, 0]], 3)
    write_placement(tmp_path / f"p{suffix}", p)
    assert read_placement(tmp_path / f"p{suffix}") == p


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (b"{not json", "l.json", "not valid JSON"),
        (b"\x93NUMPY\x01\x00trunc", "l.npy", "cannot read load file"),
        (b"garbage", "l.pt", "cannot read load file"),
        (b"[[1, 2], [3]]", "l.json", "rectangular"),
        (b"[1, 2, 3]", "l.json", "2-D"),
        (b"[[1, -2]]", "l.json", "non-negative"),
        (b"[[1, 2]]", "l.csv", "unknown suffix"),
    ],
)
def test_bad_load_files_get_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes, name: str, match: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["plan", str(path), "-P", "2", "-R", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_bad_flags_are_named(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(EXAMPLE), "-P", "81", "-R", "8"]) == 2
    assert "num_physical_experts=81 must be divisible by num_ranks=8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", str(EXAMPLE), "-P", "-3", "-R", "8"])
    assert "--num-physical-experts" in capsys.readouterr().err


def test_console_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "eplb_fsm", "plan", str(EXAMPLE), *ARGS],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "worst layer after" in done.stdout


def test_policy_option_and_old_expose_incremental_and_refined(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = tmp_path / "first.json"
    assert main(["plan", str(EXAMPLE), *ARGS, "-o", str(first)]) == 0
    load = read_load(EXAMPLE)
    rng = np.random.default_rng(3)
    drifted = load * rng.uniform(0.8, 1.25, size=load.shape)
    drifted_path = tmp_path / "drifted.npy"
    np.save(drifted_path, drifted)
    out = tmp_path / "incr.npz"
    capsys.readouterr()
    assert main(["plan", str(drifted_path), *ARGS, "--policy", "incremental", "--old",
                 str(first), "--option", "tolerance=0.02", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "policy 'incremental' {'tolerance': 0.02}" in text
    old, incr = read_placement(first), read_placement(out)
    fresh = plan(drifted, 80, 8, 2, 8)
    rank_load = eplb_fsm.rank_load_from_logical
    assert (eplb_fsm.balancedness(rank_load(drifted, incr, 8))
            >= eplb_fsm.balancedness(rank_load(drifted, fresh, 8)) - 0.02)
    assert incr.slots_changed(old) < fresh.slots_changed(old) / 2
    assert f"slots changed: {incr.slots_changed(old)} of 640" in text

    # --old turns relabeling on; --no-minimize-moves turns it off again.
    for flags, want in (([], plan(drifted, 80, 8, 2, 8, old_placement=old, minimize_moves=True)),
                        (["--no-minimize-moves"], plan(drifted, 80, 8, 2, 8, old_placement=old))):
        assert main(["plan", str(drifted_path), *ARGS, "--old", str(first), *flags,
                     "-o", str(out)]) == 0
        assert read_placement(out) == want
    assert main(["plan", str(drifted_path), *ARGS, "--policy", "refined", "--option",
                 "rounds=5", "-o", str(out)]) == 0
    assert read_placement(out) == plan(drifted, 80, 8, 2, 8, policy="refined",
                                       policy_options={"rounds": 5})


def test_bad_policy_options_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(EXAMPLE), *ARGS, "--policy", "incremental",
                 "--option", "tolerance=-1"]) == 2
    err = capsys.readouterr().err
    assert "policy_options['tolerance'] must be a finite number >= 0" in err
    assert main(["plan", str(EXAMPLE), *ARGS, "--option", "tolerance=0.1"]) == 2
    assert "policy 'default' takes no policy_options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", str(EXAMPLE), *ARGS, "--option", "tolerance"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
