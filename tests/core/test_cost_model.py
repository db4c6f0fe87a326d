"""CostModel: the roofline's arithmetic, calibrated knots, the file, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_fsm import Placement
from eplb_fsm._core.balance import slot_load_from_logical
from eplb_fsm._core.cost_model import (
    FORMAT,
    CostModel,
    layer_seconds,
    rank_seconds_from_logical,
    time_balancedness,
)

EXPERT = {"hidden": 64, "intermediate": 32, "dtype_bytes": 2}


@settings(max_examples=60, deadline=None)
@given(bw=st.floats(1e9, 1e13), flops=st.floats(1e11, 1e16), h=st.integers(1, 8192),
       i=st.integers(1, 4096), n=st.floats(1, 1e6), overhead=st.floats(0, 1e-4))
def test_roofline_is_the_closed_form_at_any_row_count(
    bw: float, flops: float, h: int, i: int, n: float, overhead: float
) -> None:
    m = CostModel.roofline(bw, flops, hidden=h, intermediate=i, dtype_bytes=2,
                           slot_overhead=overhead)
    expected = overhead + max((3 * h * i + n * (2 * h + 6 * i)) * 2 / bw, 6 * n * h * i / flops)
    assert math.isclose(float(m.slot_seconds(n)), expected, rel_tol=1e-9)
    # Below one row the cost ramps from 0: the expected cost of a slot busy n of the passes.
    assert float(m.slot_seconds(0.0)) == 0.0
    assert math.isclose(float(m.slot_seconds(0.25)), 0.25 * float(m.slot_seconds(1.0)),
                        rel_tol=1e-12)


def test_roofline_on_h100_figures_is_memory_bound_in_decode_and_linear_in_prefill() -> None:
    m = CostModel.roofline()  # DeepSeek-V3 expert, H100 datasheet
    t1, t64, t256 = (float(m.slot_seconds(n)) for n in (1, 64, 256))
    assert t256 < 1.2 * t1  # a slot's weights dominate: flat in rows
    assert 25e-6 < t1 < 35e-6  # 88 MB at 3.35 TB/s
    t4k, t8k = float(m.slot_seconds(4096)), float(m.slot_seconds(8192))
    assert math.isclose(t8k - t4k, 4096 * 6 * 7168 * 2048 / 989e12, rel_tol=1e-9)
    assert t64 >= t1


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.integers(1, 30))
def test_calibrated_model_is_monotone_and_passes_through_the_running_max(
    data: st.DataObject, size: int
) -> None:
    rows = np.asarray(data.draw(st.lists(st.integers(1, 100_000), min_size=size, max_size=size,
                                         unique=True)), dtype=float)
    secs = np.asarray(data.draw(st.lists(st.floats(1e-7, 1e-2), min_size=rows.size,
                                         max_size=rows.size)))
    m = CostModel.from_measurements(rows, secs, device="test", expert=EXPERT)
    assert m.source == "calibrated"
    order = np.argsort(rows)
    np.testing.assert_allclose(m.slot_seconds(rows[order]), np.maximum.accumulate(secs[order]))
    probe = np.sort(np.asarray(data.draw(st.lists(st.floats(0, 300_000), min_size=2,
                                                  max_size=40))))
    assert np.all(np.diff(m.slot_seconds(probe)) >= 0)


def test_beyond_the_last_knot_rows_are_never_free() -> None:
    # The last two measurements fall on one tile step (flat): extrapolating that
    # segment's slope would make every further row cost nothing.
    m = CostModel.from_measurements([1, 512, 1024, 1032], [10e-6, 50e-6, 100e-6, 100e-6],
                                    device="test", expert=EXPERT)
    slope = m.tail_slope
    assert slope > 0
    np.testing.assert_allclose(m.slot_seconds(2064), 100e-6 + 1032 * slope)
    assert float(m.slot_seconds(10_000)) > 5 * float(m.slot_seconds(1032))


def test_rank_seconds_sums_each_ranks_slots() -> None:
    m = CostModel([0, 1, 100], [0, 1.0, 2.0], "calibrated", "test", EXPERT)
    slot_rows = np.array([[0.0, 1.0, 100.0, 50.5]])
    np.testing.assert_allclose(m.rank_seconds(slot_rows, 2), [[1.0, 3.5]])
    np.testing.assert_allclose(m.rank_seconds(slot_rows, 1), [[4.5]])
    assert layer_seconds([[1.0, 3.5], [2.0, 2.0]]).tolist() == [3.5, 2.0]
    assert time_balancedness([[1.0, 3.5], [2.0, 2.0]]) == pytest.approx((2.25 / 3.5 + 1) / 2)


def test_rank_seconds_from_logical_splits_rows_over_replicas() -> None:
    m = CostModel([0, 10], [0, 10.0], "calibrated", "test", EXPERT)  # 1 s per row
    p = Placement([[0, 1, 0, 2]], 3)  # expert 0 twice: its 8 rows split 4 + 4
    load = np.array([[8.0, 3.0, 5.0]])
    np.testing.assert_allclose(slot_load_from_logical(load, p), [[4.0, 3.0, 4.0, 5.0]])
    np.testing.assert_allclose(rank_seconds_from_logical(m, load, p, 2), [[7.0, 9.0]])
    with pytest.raises(ValueError, match="logical_load has shape"):
        rank_seconds_from_logical(m, np.ones((1, 4)), p, 2)


def test_file_round_trip(tmp_path: Path) -> None:
    m = CostModel.from_measurements([1, 16, 256], [3e-5, 3.1e-5, 9e-5], device="NVIDIA X",
                                    expert=EXPERT, note="median of 20")
    path = tmp_path / "cost.json"
    m.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["version"] == 1 and doc["source"] == "calibrated"
    back = CostModel.load(path)
    np.testing.assert_array_equal(back.rows, m.rows)
    np.testing.assert_array_equal(back.seconds, m.seconds)
    assert (back.device, back.note, dict(back.expert)) == ("NVIDIA X", "median of 20", EXPERT)
    assert "calibrated (NVIDIA X)" in back.describe()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rows": [0, 1], "seconds": [0, 1, 2]}, "same length"),
    ({"rows": [1, 2], "seconds": [0, 1]}, "first knot must be rows=0"),
    ({"rows": [0, 2, 2], "seconds": [0, 1, 2]}, "rows must be strictly increasing"),
    ({"rows": [0, 1, 2], "seconds": [0, 2, 1]}, "seconds must be non-decreasing"),
    ({"rows": [0, 1], "seconds": [0, 0]}, "must not all be 0"),
    ({"rows": [0, math.nan], "seconds": [0, 1]}, "rows must be finite"),
    ({"rows": [0], "seconds": [0]}, "at least 2 knots"),
    ({"rows": [[0, 1]], "seconds": [[0, 1]]}, "rows must be 1-D"),
    ({"rows": ["a", "b"], "seconds": [0, 1]}, "rows must be a 1-D list of numbers"),
    ({"rows": [0, 1], "seconds": [0, 1], "source": "guess"}, "source must be"),
    ({"rows": [0, 1], "seconds": [0, 1], "expert": {"hidden": 1}}, "expert\\['intermediate'\\]"),
    ({"rows": [0, 1], "seconds": [0, 1], "expert": 5}, "expert must be a mapping"),
])
def test_bad_knots_are_rejected_naming_the_field(kwargs: dict, match: str) -> None:
    kwargs = {"source": "calibrated", "device": "t", "expert": EXPERT, **kwargs}
    with pytest.raises(ValueError, match=match):
        CostModel(**kwargs)


def test_bad_measurements_and_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="measured rows must be >= 1"):
        CostModel.from_measurements([0, 4], [1e-5, 2e-5], device="t", expert=EXPERT)
    with pytest.raises(ValueError, match="measured seconds must be > 0"):
        CostModel.from_measurements([1, 4], [0.0, 2e-5], device="t", expert=EXPERT)
    with pytest.raises(ValueError, match="must not repeat"):
        CostModel.from_measurements([4, 4], [1e-5, 2e-5], device="t", expert=EXPERT)
    for name, kwargs in [("memory_bandwidth", {"memory_bandwidth": 0}),
                         ("flops", {"flops": math.inf}), ("hidden", {"hidden": 2.5}),
                         ("slot_overhead", {"slot_overhead": -1.0})]:
        with pytest.raises(ValueError, match=name):
            CostModel.roofline(**kwargs)
    m = CostModel.roofline()
    with pytest.raises(ValueError, match="rows must be finite and >= 0"):
        m.slot_seconds([-1.0])
    with pytest.raises(ValueError, match="num_ranks must be a positive int dividing"):
        m.rank_seconds(np.ones((1, 6)), 4)
    with pytest.raises(ValueError, match="slot_rows must be 2-D"):
        m.rank_seconds(np.ones(6), 2)


@pytest.mark.parametrize(("text", "match"), [
    ("{", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ('{"format": "other", "version": 1}', "format must be"),
    (json.dumps({"format": FORMAT, "version": 2}), "version must be 1"),
    (json.dumps({"format": FORMAT, "version": 1, "source": "roofline"}), "lacks key 'device'"),
    (json.dumps({"format": FORMAT, "version": 1, "source": "roofline", "device": "x",
                 "expert": [], "rows": [0, 1], "seconds": [0, 1]}), "'expert' must be"),
])
def test_bad_files_are_rejected(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "cost.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        CostModel.load(path)


def test_missing_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cost model file .*nope\.json.* cannot be read"):
        CostModel.load(tmp_path / "nope.json")
