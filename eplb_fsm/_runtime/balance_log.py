"""``log_balancedness``: the measured balancedness of recent passes, in the log.

Every ``log_balancedness_interval`` steps each rank launches an all-reduce of
the last recorded window entry (the tokens it sent to every slot); ``lag``
steps later every rank reads the global per-slot load and logs balancedness
(mean/max per-rank load per layer, averaged over layers). Reading the entry
copies it to host, a device sync: this is a diagnostic, off by default.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from .._adapters.interfaces import AllReduce, ReadinessRound
from .._core.balance import balancedness_per_layer, rank_load_from_physical
from .config import EplbConfig
from .load_window import LoadWindow
from .rounds import wait_round

__all__ = ["BalancednessLog"]

log = logging.getLogger("eplb_fsm")


class BalancednessLog:
    def __init__(self, name: str, config: EplbConfig, allreduce: AllReduce, num_layers: int,
                 num_physical: int) -> None:
        self._name = name
        self._config = config
        self._allreduce = allreduce
        self._shape = (num_layers, num_physical)
        self._rounds: list[tuple[int, ReadinessRound]] = []

    def drop(self) -> None:
        """Forget the rounds in flight (one failed; every rank drops them alike)."""
        self._rounds.clear()

    async def step(self, step: int, is_dummy: bool,
                   window: LoadWindow) -> npt.NDArray[Any] | None:
        """Launch and read this step's rounds; returns the last per-layer figure read."""
        latest = None
        lag = self._config.readiness_lag
        while self._rounds and self._rounds[0][0] + lag <= step:
            launched, round_ = self._rounds.pop(0)
            values = await wait_round(round_, self._config.peer_timeout_s)
            load = values.reshape(self._shape)
            latest = balancedness_per_layer(
                rank_load_from_physical(load, self._allreduce.world_size))
            log.info("eplb balancedness: model=%s step=%d avg=%.4f worst_layer=%.4f "
                     "(mean/max per-rank load per layer, averaged over layers)",
                     self._name, launched, latest.mean(), latest.min())
        if step % self._config.log_balancedness_interval == 0:
            # Every rank launches, dummy or not, so rounds stay paired; a dummy
            # pass contributes zeros.
            last = window.last() if not is_dummy else None
            values = last if last is not None else np.zeros(self._shape, dtype=np.int64)
            self._rounds.append((step, self._allreduce.launch(values.ravel())))
        return latest
