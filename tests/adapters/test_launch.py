"""run_ranks: results in rank order, a raising rank, a hanging rank, a dying rank."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from eplb_fsm.testing import RankFailed, run_ranks


def _sum_ranks(rank: int, world_size: int, offset: int) -> int:
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return int(t)


def _raise_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise KeyError("boom")


def _hang_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)


def _die_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)


def test_results_come_back_in_rank_order() -> None:
    assert run_ranks(_sum_ranks, 3, 10, timeout=60) == [33, 33, 33]


def test_raising_rank_is_named_with_its_traceback() -> None:
    with pytest.raises(RankFailed, match=r"rank 1 raised:(.|\n)*KeyError: 'boom'"):
        run_ranks(_raise_on_one, 2, timeout=60)


def test_hanging_rank_fails_within_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank\(s\) \[1\] did not finish within 10 s"):
        run_ranks(_hang_on_one, 2, timeout=10)
    assert time.monotonic() - start < 30


def test_dying_rank_is_reported() -> None:
    with pytest.raises(RankFailed, match=r"\[1\] exited without a result \(exit codes \{1: 3\}\)"):
        run_ranks(_die_on_one, 2, timeout=60)
