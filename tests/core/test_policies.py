"""Placement-aware relabeling and the refined and incremental policies:
guarantees over generated inputs, behaviour on drifting loads, option checks."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb_fsm
from eplb_fsm import Placement, plan
from eplb_fsm._core import planning
from eplb_fsm._core.relabel import relabel
from eplb_fsm.reference import drift_load


def bal(load: np.ndarray, p: Placement, ranks: int) -> float:
    return eplb_fsm.balancedness(eplb_fsm.rank_load_from_logical(load, p, ranks))


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """Any shape `plan` accepts (small), loads with ties and zeros allowed, and
    a random old placement of the same shape (sometimes with empty slots)."""
    num_nodes = draw(st.integers(1, 3))
    num_ranks = num_nodes * draw(st.integers(1, 3))
    if draw(st.booleans()):
        num_groups = num_nodes * draw(st.integers(1, 2))
    else:
        num_groups = draw(st.integers(1, 3))
    num_logical = num_groups * draw(st.integers(1, 3))
    num_physical = num_ranks * draw(st.integers(1, 4))
    if num_physical < num_logical:
        num_physical = num_ranks * -(-num_logical // num_ranks)
    num_layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["zipf", "ties", "uniform"]))
    shape = (num_layers, num_logical)
    if kind == "zipf":
        load = rng.zipf(1.4, size=shape).astype(float)
    elif kind == "ties":
        load = rng.integers(0, 4, size=shape).astype(float)
    else:
        load = rng.random(shape) * 1000
    rows = []
    for _ in range(num_layers):
        extra = rng.integers(-1 if draw(st.booleans()) else 0, num_logical,
                             num_physical - num_logical)
        rows.append(rng.permutation(np.concatenate([np.arange(num_logical), extra])))
    old = Placement(np.stack(rows), num_logical)
    return dict(load=load, num_physical_experts=num_physical, num_groups=num_groups,
                num_nodes=num_nodes, num_ranks=num_ranks, old=old)


def _args(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "old"}


def _rank_contents(p: Placement, ranks: int) -> list[Counter]:
    """Per layer: the multiset of ranks' expert multisets."""
    rows = p.physical_to_logical.reshape(p.num_layers, ranks, -1)
    return [Counter(tuple(sorted(r)) for r in layer.tolist()) for layer in rows]


def _exact_rank_loads(load: np.ndarray, p: Placement, ranks: int) -> list[list[float]]:
    """Per layer, sorted per-rank loads summed exactly (order-independent fsum)."""
    per_replica = load / np.maximum(p.replica_count, 1)
    rows = p.physical_to_logical.reshape(p.num_layers, ranks, -1)
    return [sorted(math.fsum(per_replica[layer, e] for e in r if e >= 0) for r in rows[layer])
            for layer in range(p.num_layers)]


@given(cases())
@settings(max_examples=120, deadline=None)
def test_refined_is_never_below_default_and_validates(case: dict) -> None:
    load, ranks = case["load"], case["num_ranks"]
    default = plan(**_args(case))
    refined = plan(**_args(case), policy="refined")
    refined.validate()
    assert bal(load, refined, ranks) >= bal(load, default, ranks)
    # Per layer too: the swaps are kept only where they did not hurt.
    per_layer = eplb_fsm.balancedness_per_layer
    assert np.all(per_layer(eplb_fsm.rank_load_from_logical(load, refined, ranks))
                  >= per_layer(eplb_fsm.rank_load_from_logical(load, default, ranks)))


@given(cases(), st.sampled_from(["default", "global", "refined"]))
@settings(max_examples=120, deadline=None)
def test_relabeling_changes_no_load_figure_and_never_moves_more(case: dict, policy: str) -> None:
    load, ranks, old = case["load"], case["num_ranks"], case["old"]
    plain = plan(**_args(case), policy=policy, old_placement=old)
    moved = plan(**_args(case), policy=policy, old_placement=old, minimize_moves=True)
    moved.validate()
    assert np.array_equal(moved.replica_count, plain.replica_count)
    assert _rank_contents(moved, ranks) == _rank_contents(plain, ranks)
    assert _exact_rank_loads(load, moved, ranks) == _exact_rank_loads(load, plain, ranks)
    assert moved.slots_changed(old) <= plain.slots_changed(old)


@given(cases())
@settings(max_examples=80, deadline=None)
def test_hierarchical_relabeling_moves_whole_nodes(case: dict) -> None:
    nodes, ranks = case["num_nodes"], case["num_ranks"]
    plain = plan(**_args(case))
    moved = plan(**_args(case), old_placement=case["old"], minimize_moves=True)
    per_node = moved.num_physical // nodes

    def node_contents(p: Placement) -> list[Counter]:
        rows = p.physical_to_logical.reshape(p.num_layers, nodes, per_node)
        return [Counter(tuple(sorted(n)) for n in layer.tolist()) for layer in rows]

    if case["num_groups"] % nodes == 0:  # default is hierarchical: nodes stay whole
        assert node_contents(moved) == node_contents(plain)
    assert _rank_contents(moved, ranks) == _rank_contents(plain, ranks)


@given(cases(), st.sampled_from(["default", "global", "refined", "incremental"]))
@settings(max_examples=80, deadline=None)
def test_replanning_the_same_load_moves_nothing(case: dict, policy: str) -> None:
    current = plan(**_args(case), policy=policy if policy != "incremental" else "default")
    again = plan(**_args(case), policy=policy, old_placement=current, minimize_moves=True)
    assert again.slots_changed(current) == 0


@given(cases(), st.sampled_from([0.0, 0.002, 0.02, 0.2]),
       st.sampled_from(["default", "refined"]))
@settings(max_examples=120, deadline=None)
def test_incremental_stays_within_tolerance(case: dict, tolerance: float, ref: str) -> None:
    load, ranks, old = case["load"], case["num_ranks"], case["old"]
    got = plan(**_args(case), policy="incremental", old_placement=old,
               policy_options={"tolerance": tolerance, "reference": ref})
    got.validate()
    fresh = plan(**_args(case), policy=ref)
    assert bal(load, got, ranks) >= bal(load, fresh, ranks) - tolerance
    if bal(load, old, ranks) >= bal(load, fresh, ranks) - tolerance:
        assert got == old  # good enough already: no move at all


def _skewed(rng: np.random.Generator, layers: int = 6, experts: int = 64) -> np.ndarray:
    pop = 1.0 / np.arange(1, experts + 1)
    return np.stack([pop[rng.permutation(experts)] for _ in range(layers)]) * 1e5


def test_incremental_moves_a_fraction_of_what_default_moves_on_drift() -> None:
    rng = np.random.default_rng(7)
    load = _skewed(rng)
    shape = dict(num_physical_experts=80, num_ranks=16, num_nodes=2)
    old_default = old_incr = plan(load, **shape)
    moved_default = moved_incr = 0
    for _ in range(5):
        load = drift_load(load, rng)
        new_default = plan(load, **shape)
        new_incr = plan(load, **shape, policy="incremental", old_placement=old_incr)
        assert bal(load, new_incr, 16) >= bal(load, new_default, 16) - 0.005
        moved_default += new_default.slots_changed(old_default)
        moved_incr += new_incr.slots_changed(old_incr)
        old_default, old_incr = new_default, new_incr
    assert moved_incr <= 0.25 * moved_default


def test_minimize_moves_keeps_most_experts_after_a_small_drift() -> None:
    rng = np.random.default_rng(8)
    load = _skewed(rng)
    old = plan(load, 80, num_ranks=16, num_nodes=2)
    load = drift_load(load, rng, 0.01)
    plain = plan(load, 80, num_ranks=16, num_nodes=2)
    moved = plan(load, 80, num_ranks=16, num_nodes=2, old_placement=old, minimize_moves=True)
    assert moved.slots_changed(old) < 0.8 * plain.slots_changed(old)


def test_refined_reaches_the_bound_where_default_falls_short() -> None:
    rng = np.random.default_rng(9)
    load = _skewed(rng, layers=8, experts=256)
    default = bal(load, plan(load, 320, num_ranks=64, num_nodes=8), 64)
    refined = bal(load, plan(load, 320, num_ranks=64, num_nodes=8, policy="refined"), 64)
    assert default < 0.99 and refined >= 0.995


def test_relabel_undoes_any_shuffle_of_ranks_and_slots() -> None:
    rng = np.random.default_rng(10)
    old = plan(_skewed(rng, 3, 32), 48, num_ranks=8).physical_to_logical
    shuffled = old.reshape(3, 8, 6).copy()
    for layer in shuffled:
        layer[:] = layer[rng.permutation(8)]
        for rank in layer:
            rank[:] = rank[rng.permutation(6)]
    assert not np.array_equal(shuffled.reshape(3, 48), old)
    assert np.array_equal(relabel(shuffled.reshape(3, 48), old, 8), old)


def test_hierarchical_relabel_never_keeps_fewer_than_the_plan_as_given() -> None:
    # Node matching by shared experts (an upper bound) picks nodes 0->?, which
    # keeps 7 experts; the identity node matching keeps 8 and must win.
    new = np.array([[4, 0, 2, 2, 1, 2, 4, 1, 2, 4, 2, 5, 3, 6, 5, 4, 5, 5]])
    old = np.array([[1, 5, 6, 6, 2, 3, 3, 3, 0, 2, 5, 4, 2, 3, 6, 4, 6, 2]])
    got = relabel(new, old, num_ranks=6, num_nodes=3)
    assert int((got == old).sum()) == 8
    nodes = lambda m: sorted(tuple(sorted(n)) for n in m.reshape(3, 6).tolist())  # noqa: E731
    assert nodes(got) == nodes(new)


def test_refined_keeps_the_start_of_a_layer_the_swaps_made_worse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eplb_fsm._core import policies

    def worst(load: np.ndarray, ids: np.ndarray, num_ranks: int, rounds: int) -> np.ndarray:
        out = ids.copy()  # layer 0: heaviest experts all on rank 0; layer 1 as given
        order = np.argsort(-load[0, ids[0]], kind="stable")
        out[0] = ids[0][order]
        return out

    monkeypatch.setattr(policies, "refine_swaps", worst)
    load = _skewed(np.random.default_rng(12), 2, 32)
    assert plan(load, 40, num_ranks=8, policy="refined") == plan(load, 40, num_ranks=8)


def test_incremental_replans_layers_whose_old_placement_lacks_an_expert() -> None:
    load = np.array([[5.0, 1, 3, 2], [1, 1, 1, 9]])
    old = Placement([[0, 0, 1, 1, 2, 2, 0, 0], [0, 1, 2, 3, 3, 3, 3, 3]], 4, allow_missing=True)
    got = plan(load, 8, num_ranks=4, policy="incremental", old_placement=old)
    got.validate()  # every expert has a replica again
    assert np.array_equal(got.physical_to_logical[1], old.physical_to_logical[1])


OLD = Placement.initial(2, 4, 8)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(policy_options={"x": 1}), "policy 'default' takes no policy_options"),
        (dict(policy="incremental"), "policy 'incremental' needs old_placement"),
        (dict(minimize_moves=True), "minimize_moves=True needs old_placement"),
        (dict(minimize_moves="yes", old_placement=OLD), "minimize_moves must be a bool"),
        (dict(policy="refined", policy_options=[("rounds", 1)]),
         "policy_options must be a mapping"),
        (dict(policy="refined", policy_options={"rounds": -1}), r"policy_options\['rounds'\]"),
        (dict(policy="refined", policy_options={"rounds": 2.5}), r"policy_options\['rounds'\]"),
        (dict(policy="refined", policy_options={"tolerance": 0.1}),
         r"policy_options\['tolerance'\] is not an option of policy 'refined'"),
        (dict(policy="incremental", old_placement=OLD, policy_options={"tolerance": -0.1}),
         r"policy_options\['tolerance'\] must be a finite number >= 0"),
        (dict(policy="incremental", old_placement=OLD,
              policy_options={"tolerance": float("nan")}), r"policy_options\['tolerance'\]"),
        (dict(policy="incremental", old_placement=OLD, policy_options={"tolerance": True}),
         r"policy_options\['tolerance'\]"),
        (dict(policy="incremental", old_placement=OLD, policy_options={"reference": "nope"}),
         r"policy_options\['reference'\] must name a registered policy"),
        (dict(policy="incremental", old_placement=OLD,
              policy_options={"reference": "incremental"}),
         r"policy_options\['reference'\] must be a policy that plans from scratch"),
        (dict(policy="incremental", old_placement=OLD, policy_options={"max_rounds": "many"}),
         r"policy_options\['max_rounds'\]"),
        (dict(policy="incremental", old_placement=OLD, policy_options={"speed": 1}),
         r"policy_options\['speed'\] is not an option of policy 'incremental'"),
    ],
)
def test_bad_options_are_rejected_naming_the_argument(override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan([[5, 1, 3, 2]] * 2, num_physical_experts=8, num_ranks=4, **override)


def test_options_reach_the_policy_and_zero_rounds_is_default() -> None:
    load = _skewed(np.random.default_rng(11), 2, 32)
    assert plan(load, 40, num_ranks=8, policy="refined", policy_options={"rounds": 0}) == plan(
        load, 40, num_ranks=8)
    seen = []

    def spy(req: eplb_fsm.PlanRequest) -> np.ndarray:
        seen.append(dict(req.options))
        return planning.run_policy("default", req, {})

    planning.register_policy("test-spy", spy, check_options=lambda raw: {"k": 1, **raw},
                             keeps_nodes=False)
    try:
        plan(load, 40, num_ranks=8, policy="test-spy", policy_options={"k": 2})
        plan(load, 40, num_ranks=8, policy="test-spy")
        assert seen == [{"k": 2}, {"k": 1}]
    finally:
        planning._POLICIES.pop("test-spy", None)


def test_relabeling_a_custom_policy_keeps_nodes_whole_unless_told_otherwise() -> None:
    rng = np.random.default_rng(13)
    load = _skewed(rng, 4, 32)
    old = Placement(np.stack([rng.permutation(np.arange(48) % 32) for _ in range(4)]), 32)
    planning.register_policy("test-hier", lambda req: planning.run_policy("default", req))
    planning.register_policy("test-broken", lambda req: np.zeros((4, 48), dtype=int))
    try:
        args = dict(num_physical_experts=48, num_groups=4, num_nodes=2, num_ranks=8)
        plain = plan(load, **args, policy="test-hier")
        moved = plan(load, **args, policy="test-hier", old_placement=old, minimize_moves=True)

        def halves(p: Placement) -> list:
            return [sorted(map(sorted, layer.reshape(2, 24).tolist()))
                    for layer in p.physical_to_logical]

        assert halves(moved) == halves(plain)
        assert moved.slots_changed(old) < plain.slots_changed(old)
        with pytest.raises(ValueError, match="no replica"):
            plan(load, **args, policy="test-broken", old_placement=old, minimize_moves=True)
        with pytest.raises(ValueError, match="keeps_nodes of policy 'x' must be a bool"):
            planning.register_policy("x", lambda req: None, keeps_nodes="yes")  # type: ignore[arg-type]
    finally:
        planning._POLICIES.pop("test-hier", None)
        planning._POLICIES.pop("test-broken", None)
