"""The default planner: vLLM's test vector, agreement with the reference
algorithm on tie-free loads, output invariants, and bad input."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb_fsm
from eplb_fsm import Placement, plan
from eplb_fsm.testing import reference_rebalance

VLLM_LOAD = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]


def test_vllm_test_vector() -> None:
    p = plan(VLLM_LOAD, num_physical_experts=16, num_groups=4, num_nodes=2, num_ranks=8)
    assert p.physical_to_logical.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert p.replica_count.tolist() == [
        [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
    ]


def test_torch_and_numpy_inputs_of_any_dtype_agree() -> None:
    want = plan(VLLM_LOAD, 16, 4, 2, 8)
    for load in (torch.tensor(VLLM_LOAD, dtype=torch.bfloat16).float(),
                 torch.tensor(VLLM_LOAD), np.array(VLLM_LOAD, dtype=np.int32),
                 np.array(VLLM_LOAD, dtype=np.float16)):
        assert plan(load, 16, 4, 2, 8) == want


@st.composite
def tie_free_cases(draw: st.DrawFn) -> dict:
    """Shapes the planner accepts, with distinct, widely spread integer loads.

    Ties between per-replica loads (a/2 == b) remain possible; the exactness
    check below skips the rare case that has one (ties have no exact answer).
    """
    num_nodes = draw(st.integers(1, 3))
    ranks_per_node = draw(st.integers(1, 3))
    num_ranks = num_nodes * ranks_per_node
    groups_per_node = draw(st.integers(1, 3))
    use_groups = draw(st.booleans())
    num_groups = num_nodes * groups_per_node if use_groups else draw(st.integers(1, 4))
    group_size = draw(st.integers(1, 4))
    num_logical = num_groups * group_size
    slots_per_rank = draw(st.integers(1, 4))
    num_physical = num_ranks * slots_per_rank
    if num_physical < num_logical:
        num_physical = num_ranks * -(-num_logical // num_ranks)
    num_layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    load = rng.permutation(num_layers * num_logical).reshape(num_layers, num_logical)
    load = (load * 7919 + rng.integers(1, 7000, size=load.shape)).astype(np.float64)
    return dict(load=load, num_physical_experts=num_physical, num_groups=num_groups,
                num_nodes=num_nodes, num_ranks=num_ranks)


def _has_ties(load: np.ndarray, max_copies: int) -> bool:
    # Per-replica loads load/k for k=1..max_copies: any exact duplicate can tie.
    vals = np.concatenate([(load / k).ravel() for k in range(1, max_copies + 1)])
    return len(np.unique(vals.astype(np.float32))) != vals.size


@given(tie_free_cases())
@settings(max_examples=150, deadline=None)
def test_matches_reference_algorithm_without_ties(case: dict) -> None:
    got = plan(**case)
    got.validate()
    load = case["load"]
    max_copies = case["num_physical_experts"] - load.shape[1] + 1
    want = reference_rebalance(torch.tensor(load), case["num_physical_experts"],
                               case["num_groups"], case["num_nodes"], case["num_ranks"])
    if not _has_ties(load, max_copies):
        assert got.physical_to_logical.tolist() == want.tolist()
    assert got.replica_count.min() >= 1


@given(tie_free_cases())
@settings(max_examples=50, deadline=None)
def test_every_rank_gets_equal_slot_count_and_groups_stay_on_their_node(case: dict) -> None:
    got = plan(**case)
    n, g, r = case["num_nodes"], case["num_groups"], case["num_ranks"]
    e = case["load"].shape[1]
    if g % n == 0 and n > 1:
        slots_per_node = case["num_physical_experts"] // n
        group_size = e // g
        for layer in got.physical_to_logical:
            for node in range(n):
                groups = {int(x) // group_size for x in
                          layer[node * slots_per_node:(node + 1) * slots_per_node]}
                assert len(groups) == g // n
    assert got.physical_to_logical.shape[1] % r == 0


def test_global_policy_is_default_with_one_group_and_node() -> None:
    rng = np.random.default_rng(3)
    load = rng.permutation(4 * 32).reshape(4, 32) + 1
    assert plan(load, 48, 4, 2, 8, policy="global") == plan(load, 48, 1, 1, 8)


def test_plan_improves_balancedness_on_skewed_load() -> None:
    rng = np.random.default_rng(4)
    load = rng.zipf(1.3, size=(6, 64)).astype(float)
    before = eplb_fsm.rank_load_from_logical(load, Placement.initial(6, 64, 80), 8)
    after = eplb_fsm.rank_load_from_logical(load, plan(load, 80, 8, 2, 8), 8)
    assert eplb_fsm.balancedness(after) > eplb_fsm.balancedness(before) + 0.1


def _rank_sets(p2l: np.ndarray, ranks: int) -> list[list[list[int]]]:
    per = p2l.shape[1] // ranks
    return [[sorted(row[r * per:(r + 1) * per].tolist()) for r in range(ranks)] for row in p2l]


def test_old_placement_keeps_slots_within_ranks_only() -> None:
    """With the old map, experts that stay on a rank keep their slot; each rank still
    holds what the policy gave it (vLLM's behaviour); keep_slots=False: the plan as is."""
    rng = np.random.default_rng(0)
    old = Placement(np.stack([rng.permutation(np.arange(16) % 12) for _ in range(2)]), 12)
    fresh = plan(VLLM_LOAD, 16, 4, 2, 8)
    kept = plan(VLLM_LOAD, 16, 4, 2, 8, old_placement=old)
    assert plan(VLLM_LOAD, 16, 4, 2, 8, old_placement=old, keep_slots=False) == fresh
    assert _rank_sets(kept.physical_to_logical, 8) == _rank_sets(fresh.physical_to_logical, 8)
    assert kept.slots_changed(old) < fresh.slots_changed(old)
    old_p2l, new_p2l = old.physical_to_logical, kept.physical_to_logical
    for layer in range(2):
        for rank in range(8):
            cols = slice(rank * 2, rank * 2 + 2)
            # every copy the rank keeps (multiset intersection) sits in its old slot
            stays = Counter(old_p2l[layer, cols].tolist()) & Counter(
                fresh.physical_to_logical[layer, cols].tolist())
            unchanged = int((new_p2l[layer, cols] == old_p2l[layer, cols]).sum())
            assert unchanged == sum(stays.values())


class _Fixed:
    """A policy that returns a fixed map (the "planner's answer" of vLLM's examples)."""

    def __init__(self, p2l: list[list[int]]) -> None:
        self.p2l = np.asarray(p2l)

    def __call__(self, req: eplb_fsm.PlanRequest) -> np.ndarray:
        return self.p2l


@pytest.mark.parametrize(("ranks", "old", "planned", "expected"), [
    # 2 ranks x 4 slots: rank 0 keeps experts 0 and 1 and takes 5 and 4 in; rank 1
    # keeps 6 and 7 and takes 2 and 3 in.
    (2, [0, 1, 2, 3, 4, 5, 6, 7], [1, 5, 0, 4, 6, 2, 7, 3], [0, 1, 5, 4, 2, 3, 6, 7]),
    # Replicas: rank 0 had expert 0 twice and keeps both copies where they were.
    (2, [0, 1, 0, 2, 3, 4, 5, 6, 1, 2], [0, 5, 4, 0, 1, 6, 2, 3, 2, 1],
     [0, 1, 0, 5, 4, 3, 2, 6, 1, 2]),
    # 3 ranks: two ranks now hold only expert 0, the third reorders.
    (3, [0, 1, 2, 3] * 3, [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0],
     [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]),
])
def test_kept_slots_match_vllms_published_cases(ranks: int, old: list[int], planned: list[int],
                                                 expected: list[int]) -> None:
    eplb_fsm.register_policy("test-fixed", _Fixed([planned]), replace=True, uses_groups=False)
    try:
        num_logical = max(old) + 1
        load = [[1.0] * num_logical]
        new = plan(load, len(old), 1, 1, ranks, policy="test-fixed",
                   old_placement=Placement([old], num_logical))
        assert new.physical_to_logical.tolist() == [expected]
    finally:
        from eplb_fsm._core import planning

        planning._POLICIES.pop("test-fixed", None)


def test_default_plans_globally_when_groups_do_not_divide_over_nodes() -> None:
    """As vLLM and DeepSeek's reference: no error for experts % groups there."""
    load = [[10, 20, 30, 40]]
    p = plan(load, 8, num_groups=3, num_nodes=2, num_ranks=4)
    assert p == plan(load, 8, 1, 1, 4, policy="global")
    assert p.replica_count.sum() == 8
    for policy in ("global", "refined"):
        plan(load, 8, num_groups=3, num_nodes=2, num_ranks=4, policy=policy)
    # Where groups divide over the nodes, default packs groups: they must divide the experts.
    with pytest.raises(ValueError, match=r"divisible by num_groups=4: policy 'default' plans "
                                         r"with groups here \(num_groups % num_nodes == 0\)"):
        plan([[1, 2, 3, 4, 5, 6]], 8, num_groups=4, num_nodes=2, num_ranks=4)


GOOD = dict(num_physical_experts=16, num_groups=4, num_nodes=2, num_ranks=8)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(load=[1, 2, 3]), "load must be 2-D"),
        (dict(load=np.ones((2, 3, 4))), "load must be 2-D"),
        (dict(load=[[1.0, float("nan")] * 6] * 2), "finite"),
        (dict(load=[[1.0, float("inf")] * 6] * 2), "finite"),
        (dict(load=[[1.0, -1.0] * 6] * 2), "non-negative"),
        (dict(load=[["a"] * 12] * 2), "real numbers"),
        (dict(num_physical_experts=8, num_ranks=4), "must be >= the number of logical experts"),
        (dict(num_physical_experts=18), "divisible by num_ranks=8"),
        (dict(num_groups=8), "divisible by num_groups=8"),
        (dict(num_nodes=3), "num_ranks=8 must be divisible by num_nodes=3"),
        (dict(num_ranks=0), "num_ranks must be a positive int"),
        (dict(num_groups=2.0), "num_groups must be a positive int"),
        (dict(policy="nope"), r"policy 'nope' is unknown; known policies: default, global"),
        (dict(old_placement=Placement.initial(3, 12, 16)), "old_placement has shape"),
        (dict(old_placement=np.zeros((2, 16))), "old_placement must be a Placement"),
    ],
)
def test_bad_input_is_rejected_before_planning(override: dict, match: str) -> None:
    args = dict(load=VLLM_LOAD, **GOOD)
    args.update(override)
    with pytest.raises(ValueError, match=match):
        plan(**args)


def test_registry_accepts_new_policies_and_checks_their_output() -> None:
    calls = []

    def identity(req: eplb_fsm.PlanRequest) -> np.ndarray:
        calls.append(req)
        return np.tile(np.arange(req.num_physical_experts) % req.num_logical_experts,
                       (req.num_layers, 1))

    eplb_fsm.register_policy("test-identity", identity)
    try:
        with pytest.raises(ValueError, match="already registered"):
            eplb_fsm.register_policy("test-identity", identity)
        assert "test-identity" in eplb_fsm.available_policies()
        p = plan(VLLM_LOAD, **GOOD, policy="test-identity")
        assert p == Placement.initial(2, 12, 16)
        assert calls[0].load.dtype == np.float64

        eplb_fsm.register_policy("test-broken", lambda req: np.zeros((2, 16), dtype=int))
        with pytest.raises(ValueError, match="no replica"):
            plan(VLLM_LOAD, **GOOD, policy="test-broken")
        # A custom policy uses groups unless it says otherwise.
        with pytest.raises(ValueError, match="policy 'test-identity' plans with groups"):
            plan(VLLM_LOAD, 16, 5, 2, 8, policy="test-identity")
    finally:
        from eplb_fsm._core import planning

        planning._POLICIES.pop("test-identity", None)
        planning._POLICIES.pop("test-broken", None)


@pytest.mark.parametrize(("answer", "match"), [
    (np.zeros((2, 15), dtype=int), r"policy 'test-shape' must return physical_to_logical of "
     r"shape \[L, P\] = \[2, 16\], got shape \[2, 15\] \(ndarray\)"),
    (torch.zeros(16, dtype=torch.int64), r"\[L, P\] = \[2, 16\], got shape \[16\] \(Tensor\)"),
    ([[0] * 16, [0] * 15], r"policy 'test-shape' must return"),
    (np.zeros((2, 16)), r"policy 'test-shape' must return integer expert ids, got dtype float64"),
    (None, r"policy 'test-shape' must return .*got shape \[\] \(NoneType\)"),
])
def test_a_policys_answer_of_the_wrong_shape_is_named(answer: object, match: str) -> None:
    eplb_fsm.register_policy("test-shape", lambda req: answer, uses_groups=False)
    try:
        with pytest.raises(ValueError, match=match):
            plan(VLLM_LOAD, **GOOD, policy="test-shape")
    finally:
        from eplb_fsm._core import planning

        planning._POLICIES.pop("test-shape", None)


def test_built_in_policies_are_there_from_the_first_lookup_in_a_fresh_process() -> None:
    # They register lazily (importing eplb_fsm stays cheap); a user's policy
    # must still not silently take a built-in's name, and every way in sees them.
    code = (
        "import eplb_fsm\n"
        "from eplb_fsm._core import planning\n"
        "assert 'refined' not in planning._POLICIES\n"  # nothing imported yet
        "try:\n"
        "    eplb_fsm.register_policy('refined', lambda request: None)\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
        "print(','.join(planning.available_policies()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "policy 'refined' is already registered (pass replace=True)"
    assert lines[1] == "default,global,incremental,refined,time"
