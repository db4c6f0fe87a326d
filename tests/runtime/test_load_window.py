"""The load window maps each pass with the placement it ran under."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_fsm import EplbConfig, plan
from eplb_fsm._runtime.load_window import LOAD_LIMIT, LoadWindow, physical_to_logical_load
from eplb_fsm.testing import FakeCluster


def test_passes_count_for_the_experts_that_were_in_their_slots_then() -> None:
    old = np.array([[0, 1, 2, 0]])
    new = np.array([[2, 0, 1, 1]])
    window = LoadWindow(4, 1, 4, 3, torch.device("cpu"))
    window.set_map(old)
    window.record(torch.tensor([[1, 2, 3, 4]]))
    window.set_map(new)
    window.record(torch.tensor([[10, 20, 30, 40]]))
    # old: e0 = 1 + 4, e1 = 2, e2 = 3; new: e2 = 10, e0 = 20, e1 = 30 + 40
    np.testing.assert_array_equal(window.snapshot().logical(), [[25, 72, 13]])


def test_ring_buffer_forgets_the_oldest_pass_and_its_map() -> None:
    window = LoadWindow(2, 1, 2, 2, torch.device("cpu"))
    window.set_map(np.array([[0, 1]]))
    window.record(torch.tensor([[5, 0]]))
    window.set_map(np.array([[1, 0]]))
    window.record(torch.tensor([[1, 0]]))
    window.record(torch.tensor([[0, 7]]))  # overwrites the first pass
    np.testing.assert_array_equal(window.snapshot().logical(), [[7, 1]])
    assert window.passes == 2
    assert len(window._maps) == 1  # the first map is no longer referenced


def test_empty_slots_drop_their_load() -> None:
    load = physical_to_logical_load(np.array([[3, 4, 5]]), np.array([[1, -1, 1]]), 2)
    np.testing.assert_array_equal(load, [[0, 8]])


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       ops=st.lists(st.sampled_from(["record", "record", "record", "map"]), min_size=1,
                    max_size=30))
def test_snapshot_sums_every_pass_under_its_own_map(size: int, seed: int,
                                                    ops: list[str]) -> None:
    """Against a plain list of the last `size` passes and their maps: the snapshot
    sums each version's entries by ring slices, across wraps and many versions."""
    rng = np.random.default_rng(seed)
    layers, slots, experts = 2, 4, 3

    def a_map() -> np.ndarray:
        return rng.integers(-1, experts, size=(layers, slots))

    window = LoadWindow(size, layers, slots, experts, torch.device("cpu"))
    current = a_map()
    window.set_map(current)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for op in ops:
        if op == "map":
            current = a_map()
            window.set_map(current)
            continue
        load = rng.integers(0, 100, size=(layers, slots))
        window.record(torch.from_numpy(load))
        kept = [*kept, (load, current.copy())][-size:]
    expected = np.zeros((layers, experts), dtype=np.int64)
    for load, p2l in kept:
        expected += physical_to_logical_load(load, p2l, experts)
    np.testing.assert_array_equal(window.snapshot().logical(), expected)


def test_a_window_sum_beyond_int64_is_an_overflow_error_not_a_wrapped_load() -> None:
    # Two records of 2**62 sum to 2**63: int64 wraps to -2**63, which planning
    # reported as "negative" load.
    window = LoadWindow(4, 1, 2, 2, torch.device("cpu"))
    window.set_map(np.array([[0, 1]]))
    for _ in range(2):
        window.record(torch.tensor([[2**62, 0]]))
    with pytest.raises(ValueError, match=r"load overflow: .* count of 4611686018427387904 "
                                         r"for one slot .* 2 records could sum beyond int64"):
        window.snapshot().logical()


def test_a_layer_total_at_2_pow_53_is_an_overflow_error() -> None:
    window = LoadWindow(2, 2, 2, 1, torch.device("cpu"))
    window.set_map(np.array([[0, 0], [0, 0]]))
    window.record(torch.tensor([[1, 2], [2**52, 2**52]]))
    with pytest.raises(ValueError, match=r"load overflow: layer 1's load .* at or above the "
                                         r"limit 2\*\*53"):
        window.snapshot().logical()


def test_a_layer_total_just_below_the_limit_is_summed_exactly() -> None:
    window = LoadWindow(2, 1, 3, 2, torch.device("cpu"))
    window.set_map(np.array([[0, 0, 1]]))
    window.record(torch.tensor([[2**51, 2**51, 2**51]]))
    window.record(torch.tensor([[2**50, 2**50 - 1, 0]]))
    # 2**53 - 1 in all: below the limit, every partial sum exact in float64.
    expected = [[2**52 + 2**51 - 1, 2**51]]
    assert sum(expected[0]) == LOAD_LIMIT - 1
    np.testing.assert_array_equal(window.snapshot().logical(), expected)


def test_the_check_forgets_records_that_left_the_ring() -> None:
    window = LoadWindow(1, 1, 1, 1, torch.device("cpu"))
    window.set_map(np.array([[0]]))
    window.record(torch.tensor([[2**60]]))
    with pytest.raises(ValueError, match="load overflow"):
        window.snapshot().logical()
    window.record(torch.tensor([[5]]))  # overwrites the huge record
    np.testing.assert_array_equal(window.snapshot().logical(), [[5]])


def test_a_ring_that_cannot_be_allocated_names_the_config_fields() -> None:
    with pytest.raises(ValueError, match=r"load window cannot be allocated on cpu: "
                                         r"4611686018427387904 entries x 2 layers x 8 slots"
                                         r"(.|\n)*EplbConfig\.window_size"):
        LoadWindow(2**62, 2, 8, 4, torch.device("cpu"))


def test_the_runtime_reports_a_load_overflow_not_a_negative_load() -> None:
    # Each rank's engine counts 2**61 tokens a pass for expert 0: four passes sum to
    # 2**63, which wrapped to a "negative" load that planning refused as such.
    cluster = FakeCluster(2, EplbConfig(window_size=4, step_interval=4, num_redundant_experts=2,
                                        on_failure="absorb"))
    cluster.add_model("main", num_layers=1, num_logical=4)

    async def run() -> None:
        for _ in range(8):
            for rank in range(2):
                cluster.feed("main", rank, np.array([[2**61, 1, 1, 1]]))
            assert await cluster.step() == [None, None]

    asyncio.run(run())
    for rank, rt in enumerate(cluster.runtimes):
        stats = rt.stats()["models"]["main"]
        assert stats["rebalances"]["failed"] >= 1
        assert re.search(rf"rank {rank} \(ValueError: load overflow: layer 0's load in this "
                         r"rank's window sums to 9\.223e\+18 tokens, at or above the limit "
                         r"2\*\*53", stats["last_error"]), stats["last_error"]
    assert not any(cluster.wrong_slots().values())


def test_planning_names_a_negative_load_and_a_likely_int64_wrap() -> None:
    with pytest.raises(ValueError, match=r"^load must be non-negative, got load\[0, 1\] = -3$"):
        plan(np.array([[1, -3]]), 2)
    # An int64 sum of two 2**62 wraps to -2**63 (arrays wrap silently).
    wrapped = np.array([[2**62, 1], [1, 1]]) + np.array([[2**62, 0], [0, 0]])
    assert wrapped[0, 0] == -2**63
    with pytest.raises(ValueError, match=r"got load\[0, 0\] = -9223372036854775808 \(a load "
                                         r"this far below zero is what an int64 sum wraps to "
                                         r"when it overflows"):
        plan(wrapped, 2)
