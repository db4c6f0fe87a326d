"""The transfer engine on real gloo processes (world sizes 2, 3 and 4).

One spawn per world size runs every scenario of `_transfer_checks.check_all`:
the group's first transfer with idle ranks, local-only moves, blocking
`rearrange_weights` (one layer and several per batch, with and without node
preference), identical placements, the staged path layer by layer, several
layers in one batch (two pieces per message) committed one layer at a time, release, and
input validation. The parent then checks the ranks' byte counts against the
plan: together they received exactly what the plan moves, and not nothing.
"""

from __future__ import annotations

import pytest
from _transfer_checks import LAYERS, SEED, SLOT_BYTES, check_all, expected_totals

from eplb_fsm.testing import run_ranks


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_transfer_engine_on_gloo(world: int) -> None:
    results = run_ranks(check_all, world, SEED, "cpu", timeout=60)
    totals = {name: sum(r[name] for r in results) for name in results[0]}
    assert totals == expected_totals(world)
    # Random placements really move data (so the checks are not vacuous).
    assert totals["staged"] > LAYERS * SLOT_BYTES
