"""Set-up shared by the fake-cluster tests: a skewed load and a small cluster."""

from __future__ import annotations

import numpy as np

from eplb_fsm import EplbConfig
from eplb_fsm.testing import FakeCluster

BASE_CONFIG = dict(window_size=10, step_interval=20, num_redundant_experts=4, readiness_lag=2,
                   peer_timeout_s=30.0)


def skewed_load(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    """[layers, experts] load: squares 1..E, each layer its own permutation."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(1, experts + 1) ** 2) for _ in range(layers)])


def make_cluster(num_ranks: int = 4, *, layers: int, experts: int,
                 **overrides: object) -> FakeCluster:
    """`num_ranks` ranks with one model "main"; `overrides` replace `BASE_CONFIG` fields."""
    cluster = FakeCluster(num_ranks, EplbConfig(**{**BASE_CONFIG, **overrides}))  # type: ignore[arg-type]
    cluster.add_model("main", num_layers=layers, num_logical=experts)
    return cluster
