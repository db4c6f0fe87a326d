"""The pull path on GPUs (CUDA IPC) against the NCCL path, on 2 and 4 GPUs.

Random placements with redundancy over several layers and dtypes (one tensor
non-contiguous), staged layer by layer and all at once: pulled weights must
be bitwise identical to the NCCL path's and to the expected ones, on the
legacy default stream and on a side stream. Also checks that a stage that
only pulls does not wait for compute queued on the current stream, that one
that packs for NCCL does, and that the legacy default stream does not wait
for the engine's side stream. Skipped without enough GPUs.

    python -m pytest -q -m gpu tests/adapters/test_pull_nccl.py
"""

from __future__ import annotations

import pytest
import torch
from _pull_checks import check_pull_vs_nccl

from eplb_fsm.testing import run_ranks


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_pull_matches_nccl(world: int) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, found {torch.cuda.device_count()}")
    results = run_ranks(check_pull_vs_nccl, world, 20240612, timeout=150, backend="nccl")
    assert sum(r["bytes"] for r in results) > 0
