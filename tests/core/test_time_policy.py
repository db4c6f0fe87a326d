"""The ``time`` policy: valid plans, never modelled slower than ``default``, wins
where tokens are a poor proxy for time, options checked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb_fsm
from eplb_fsm import plan
from eplb_fsm._core.cost_model import CostModel, rank_seconds_from_logical, time_balancedness
from eplb_fsm._core.planning import check_policy_options, policy_keeps_nodes
from eplb_fsm._core.time_policy import layer_seconds_of_ids

EXPERT = {"hidden": 64, "intermediate": 32, "dtype_bytes": 2}
#: Memory-bound (flat) up to 64 rows, then 0.25 us per row: a decode-like slot.
KNEE = CostModel([0, 1, 64, 1024], [0, 10e-6, 10e-6, 250e-6], "calibrated", "test", EXPERT)


def _zipf_rows(seed: int, layers: int, experts: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = 1.0 / np.arange(1, experts + 1)
    pop = np.stack([z[rng.permutation(experts)] for _ in range(layers)])
    pop /= pop.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(rows, p) for p in pop]).astype(float)


@st.composite
def models(draw: st.DrawFn) -> CostModel:
    """Any monotone piecewise-linear cost: flat, convex, concave, stepped."""
    n = draw(st.integers(1, 6))
    rows = np.cumsum(draw(st.lists(st.integers(1, 200), min_size=n, max_size=n)))
    steps = draw(st.lists(st.floats(0, 1e-4), min_size=n, max_size=n))
    secs = np.cumsum(steps) + draw(st.floats(1e-7, 1e-4))
    return CostModel.from_measurements(rows, secs, device="test", expert=EXPERT)


@st.composite
def requests(draw: st.DrawFn) -> dict:
    num_nodes = draw(st.integers(1, 2))
    num_ranks = num_nodes * draw(st.integers(1, 4))
    num_groups = draw(st.sampled_from([1, num_nodes]))
    num_logical = num_groups * draw(st.integers(1, 8))
    num_physical = num_ranks * draw(st.integers(1, 4))
    if num_physical < num_logical:
        num_physical = num_ranks * -(-num_logical // num_ranks)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (draw(st.integers(1, 3)), num_logical)
    kind = draw(st.sampled_from(["zipf", "ties", "small"]))
    if kind == "zipf":
        load = rng.zipf(1.3, size=shape).astype(float) * draw(st.sampled_from([1, 30, 1000]))
    elif kind == "ties":
        load = rng.integers(0, 3, size=shape).astype(float)
    else:
        load = rng.random(shape) * 2  # below a row per slot: the cost's ramp
    return dict(load=load, num_physical_experts=num_physical, num_groups=num_groups,
                num_nodes=num_nodes, num_ranks=num_ranks)


@settings(max_examples=80, deadline=None)
@given(req=requests(), model=models(), passes=st.sampled_from([1.0, 3.0]))
def test_never_modelled_slower_than_default_on_any_layer(
    req: dict, model: CostModel, passes: float
) -> None:
    p = plan(**req, policy="time", policy_options={"cost_model": model, "passes": passes})
    base = plan(**req, policy="default")
    rows = req["load"] / passes
    ranks = req["num_ranks"]
    mine = layer_seconds_of_ids(model, rows, p.physical_to_logical, ranks)
    theirs = layer_seconds_of_ids(model, rows, base.physical_to_logical, ranks)
    assert np.all(mine <= theirs)
    # plan() built a Placement, so every expert has a replica; check the counts add up.
    assert np.all(p.replica_count.sum(axis=1) == req["num_physical_experts"])


def test_beats_token_balanced_plans_where_rows_per_slot_matter() -> None:
    """Decode-like: ~100 rows per slot around the knee of KNEE. Token-balanced
    plans leave a rank whose rows sit on few busy slots ~4% slow; packing by
    modelled time fixes most of it."""
    load = _zipf_rows(1, layers=8, experts=32, rows=128 * 8 * 4)
    got = {}
    for policy in ("default", "refined", "time"):
        opts = {"cost_model": KNEE} if policy == "time" else None
        p = plan(load, 40, 1, 1, 8, policy, policy_options=opts)
        rank_s = rank_seconds_from_logical(KNEE, load, p, 8)
        got[policy] = (time_balancedness(rank_s), rank_s.max(axis=1).mean())
    assert got["refined"][0] < 0.97 and got["default"][0] < 0.97
    assert got["time"][0] >= 0.975
    assert got["time"][1] < 0.99 * min(got["default"][1], got["refined"][1])


def test_linear_cost_balances_tokens_about_as_well_as_refined() -> None:
    """When time is proportional to rows, balancing time is balancing tokens."""
    linear = CostModel([0, 1], [0, 1e-6], "calibrated", "test", EXPERT)
    load = _zipf_rows(2, layers=6, experts=64, rows=64 * 16 * 8)
    p = plan(load, 80, 1, 1, 16, "time", policy_options={"cost_model": linear})
    bal = eplb_fsm.balancedness(eplb_fsm.rank_load_from_logical(load, p, 16))
    base = plan(load, 80, 1, 1, 16, "default")
    assert bal >= eplb_fsm.balancedness(eplb_fsm.rank_load_from_logical(load, base, 16))
    assert bal > 0.995


def test_passes_scale_the_load_to_rows_per_pass() -> None:
    load = _zipf_rows(3, layers=4, experts=32, rows=100 * 8 * 4)
    one = plan(load, 40, 1, 1, 8, "time", policy_options={"cost_model": KNEE})
    four = plan(load * 4, 40, 1, 1, 8, "time",
                policy_options={"cost_model": KNEE, "passes": 4})
    assert one == four  # a power of two: the same rows per pass, bit for bit
    # Read as one pass, the 4x load sits on the cost's linear part: a different plan.
    as_one = plan(load * 4, 40, 1, 1, 8, "time", policy_options={"cost_model": KNEE})
    assert as_one != four


def test_cost_model_from_a_file_or_its_json_object_plans_the_same(tmp_path: Path) -> None:
    load = _zipf_rows(4, layers=3, experts=32, rows=128 * 8 * 4)
    path = tmp_path / "cost.json"
    KNEE.save(path)
    plans = [plan(load, 40, 1, 1, 8, "time", policy_options={"cost_model": cm})
             for cm in (KNEE, str(path), path, KNEE.to_dict())]
    assert all(p == plans[0] for p in plans)
    # No cost model: the H100 roofline.
    opts = check_policy_options("time", {})
    assert opts["cost_model"].source == "roofline"
    assert (opts["passes"], opts["rounds"]) == (1.0, 48)


def test_is_global() -> None:
    req = eplb_fsm._core.planning.check_plan_args(np.ones((1, 8)), 8, 2, 2, 4, "time", None)
    assert not policy_keeps_nodes("time", req)


@pytest.mark.parametrize(("options", "match"), [
    ({"passes": 0}, "policy_options\\['passes'\\] must be a finite number > 0"),
    ({"passes": math.nan}, "policy_options\\['passes'\\]"),
    ({"passes": True}, "policy_options\\['passes'\\]"),
    ({"rounds": -1}, "policy_options\\['rounds'\\] must be an int >= 0"),
    ({"rounds": 2.0}, "policy_options\\['rounds'\\]"),
    ({"cost_model": 3}, "policy_options\\['cost_model'\\] must be a CostModel"),
    ({"cost_model": "/no/such/file.json"}, "cost model file .* cannot be read"),
    ({"cost_model": {"format": "x"}}, "cost model format must be"),
    ({"cost": None}, "policy_options\\['cost'\\] is not an option of policy 'time'"),
])
def test_bad_options_are_rejected_before_planning(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan(np.ones((1, 8)), 8, 1, 1, 2, "time", policy_options=options)
