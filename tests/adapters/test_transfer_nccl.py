"""The transfer engine on NCCL with CUDA tensors: the gloo checks, on 2 and 4 GPUs.

Same scenarios as `test_transfer_gloo.py` (see `_transfer_checks.check_all`),
run where torch sees enough GPUs; skipped elsewhere. On GPU they also cover
what only CUDA shows: the side stream, the staging event that `ready()`
polls and `commit()` waits on, and NCCL's rule that a group's first batched
P2P call must include every rank (the first scenario leaves ranks idle).
In a spawn of its own, a fresh process's first NCCL and pull stages must
not hold the host behind a running kernel (`warm_up()` loads NCCL's
send/recv kernels before serving).

    python -m pytest -q -m gpu tests/adapters/test_transfer_nccl.py
"""

from __future__ import annotations

import pytest
import torch
from _transfer_checks import SEED, check_all, check_first_stages_never_block, expected_totals

from eplb_fsm.testing import run_ranks


@pytest.mark.gpu
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 4])
def test_transfer_engine_on_nccl(world: int) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, found {torch.cuda.device_count()}")
    results = run_ranks(check_all, world, SEED, "cuda", timeout=120, backend="nccl")
    totals = {name: sum(r[name] for r in results) for name in results[0]}
    assert totals == expected_totals(world)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_first_stages_never_block_the_host() -> None:
    """Its own spawn: the first NCCL and pull stages of a fresh process."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    results = run_ranks(check_first_stages_never_block, 2, timeout=90, backend="nccl")
    assert all(set(r) == {"nccl", "pull"} for r in results)
