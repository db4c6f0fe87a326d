"""The pull path on real gloo processes, CPU weights in shared memory (2, 3, 4 ranks).

One spawn per world size runs every scenario of `_pull_checks.check_gloo`:
random placements with redundancy and empty slots over several layers and
dtypes, pulled (``path="pull"``) and sent (``path="nccl"``, i.e. gloo
send/recv); on 4 ranks, two "nodes" of two ranks (pull within, gloo across);
on 2 ranks, weights that cannot be shared (``auto`` falls back, ``pull``
refuses), a reallocation after sharing, the commit-ordering guarantee with a
late puller, the hazard it prevents (a negative control that commits early),
and blocking `rearrange` with a late puller. The parent then checks that the
ranks' shared-memory blocks are gone.
"""

from __future__ import annotations

import os

import pytest
from _pull_checks import check_gloo

from eplb_fsm.testing import run_ranks


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_pull_path_on_gloo(world: int) -> None:
    results = run_ranks(check_gloo, world, 20240611 + world, timeout=75)
    pulled = [r["pull_bytes"] for r in results]
    assert pulled == [r["nccl_bytes"] for r in results]
    assert sum(pulled) > 0  # random placements really moved data
    segments = [name for r in results for name in r["segments"]]
    assert segments, "the ranks allocated their weights in shared memory"
    leaked = [name for name in segments if os.path.exists(os.path.join("/dev/shm", name))]
    assert not leaked, f"shared-memory blocks left behind: {leaked}"
