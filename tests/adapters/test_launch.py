"""run_ranks: results in rank order, a raising rank, a hanging rank, a dying rank,
and a rendezvous that no other process can take the port of."""

from __future__ import annotations

import os
import socket
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


def test_rendezvous_survives_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parent once picked a free port and rank 0 bound it later; a port taken
    # in between failed the launch (EADDRINUSE). Now rank 0 binds whatever the OS
    # gives it, so even a parent-side pick of a busy port changes nothing.
    from eplb_fsm._adapters import launch

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(launch, "free_port", lambda: busy.getsockname()[1])
        assert run_ranks(_sum_ranks, 2, 0, timeout=60) == [1, 1]
