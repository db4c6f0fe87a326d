"""An in-process cluster of N ranks for deterministic lifecycle tests.

Every rank is a real `EplbRuntime`; only the transports are fake:

- all-reduces complete when every rank has launched the same round (the
  n-th launch of each rank), exactly the pairing a real collective enforces,
  so a rank that launches rounds in a different order breaks the test;
- weight transfers copy straight from the peer model's live weights;
- a `FaultHook` per rank can report a rank's readiness k steps late, never,
  or drop its contributions altogether (a rank that never answers).

All ranks' ``step()`` run concurrently under one event loop
(``asyncio.gather``), so a rank waiting on a round yields to the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .._core.lifecycle import TransitionRecord
from .._runtime.config import EplbConfig
from .._runtime.runtime import EplbRuntime
from ._faults import Faults, inject_faults

__all__ = ["FakeCluster", "TaggedMoEModel"]


def feed_load(model: Any, logical_load: npt.ArrayLike) -> None:
    """Add one pass of [L, E] logical load to `model`'s load view, as a router
    would: each expert's tokens split evenly over its current replicas (the
    first replicas take the remainder, so the totals are exact). `model` is
    any `MoEModel` after `set_eplb_state`."""
    load = np.asarray(logical_load, dtype=np.int64)
    l2p = model.logical_to_physical_map.cpu().numpy()
    count = model.logical_replica_count.cpu().numpy()
    view = np.zeros(tuple(model.expert_load_view.shape), dtype=np.int64)
    for layer in range(load.shape[0]):
        for expert in range(load.shape[1]):
            replicas = l2p[layer, expert, :count[layer, expert]]
            share, extra = divmod(int(load[layer, expert]), len(replicas))
            for i, slot in enumerate(replicas):
                view[layer, slot] += share + (1 if i < extra else 0)
    model.expert_load_view += torch.from_numpy(view).to(model.expert_load_view.device)


class TaggedMoEModel:
    """A `MoEModel` whose expert weights say which expert they are.

    Slot weights are filled with ``tag(layer, expert, tensor)`` so a test can
    check, after any number of commits, that every slot holds the expert its
    map names. Two tensors per layer of different shapes and dtypes.
    """

    def __init__(self, rank: int, world_size: int, num_layers: int, num_logical: int,
                 num_redundant: int = 0, num_groups: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.num_moe_layers = num_layers
        self.num_logical_experts = num_logical
        self.num_redundant_experts = num_redundant
        self.num_physical_experts = num_logical + num_redundant
        if self.num_physical_experts % world_size:
            raise ValueError(f"{self.num_physical_experts} physical experts do not split over "
                             f"{world_size} ranks")
        self.num_local_physical_experts = self.num_physical_experts // world_size
        self.num_expert_groups = num_groups
        self.rank = rank
        first = rank * self.num_local_physical_experts
        experts = (np.arange(first, first + self.num_local_physical_experts)
                   % num_logical)  # vLLM's initial layout
        self.expert_weights = [
            [torch.stack([torch.full((4,), self.tag(layer, int(e), 0), dtype=torch.float32)
                          for e in experts]).to(device),
             torch.stack([torch.full((2, 3), self.tag(layer, int(e), 1), dtype=torch.int64)
                          for e in experts]).to(device)]
            for layer in range(num_layers)
        ]
        self.expert_load_view: torch.Tensor | None = None
        self.logical_to_physical_map: torch.Tensor | None = None
        self.logical_replica_count: torch.Tensor | None = None

    @staticmethod
    def tag(layer: int, expert: int, tensor: int) -> int:
        return layer * 10_000 + expert * 10 + tensor

    def set_eplb_state(self, expert_load_view: torch.Tensor,
                       logical_to_physical_map: torch.Tensor,
                       logical_replica_count: torch.Tensor) -> None:
        self.expert_load_view = expert_load_view
        self.logical_to_physical_map = logical_to_physical_map
        self.logical_replica_count = logical_replica_count

    def resize_ep(self, group: Any, rank: int, world_size: int) -> None:
        """The EP group changed (elastic EP): same slots per rank, new rank and count."""
        self.rank = rank
        self.num_physical_experts = world_size * self.num_local_physical_experts
        self.num_redundant_experts = self.num_physical_experts - self.num_logical_experts

    def feed(self, logical_load: npt.ArrayLike) -> None:
        """Add one pass of [L, E] logical load to the load view (see `feed_load`)."""
        feed_load(self, logical_load)

    def wrong_slots(self, physical_to_logical: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
        """(layer, local slot) pairs whose weights are not the mapped expert's."""
        wrong = []
        n = self.num_local_physical_experts
        for layer, tensors in enumerate(self.expert_weights):
            for slot in range(n):
                expert = int(physical_to_logical[layer, self.rank * n + slot])
                for i, tensor in enumerate(tensors):
                    if expert >= 0 and not bool(
                            (tensor[slot] == self.tag(layer, expert, i)).all()):
                        wrong.append((layer, slot))
                        break
        return wrong


class _Ledger:
    """Rounds keyed by launch index; a round is done when every rank contributed."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.launched = [0] * num_ranks
        self.sums: list[npt.NDArray[np.int64]] = []
        self.counts: list[int] = []
        self.silent: set[int] = set()
        self.paused = False


class _FakeRound:
    def __init__(self, ledger: _Ledger, index: int) -> None:
        self._ledger = ledger
        self._index = index

    def done(self) -> bool:
        ledger = self._ledger
        return not ledger.paused and ledger.counts[self._index] == ledger.num_ranks

    def result(self, timeout: float | None = None) -> npt.NDArray[np.int64]:
        if not self.done():
            raise TimeoutError("fake round incomplete: a rank never launched it")
        return self._ledger.sums[self._index].copy()


class _FakeAllReduce:
    def __init__(self, ledger: _Ledger, rank: int) -> None:
        self._ledger = ledger
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._ledger.num_ranks

    def launch(self, values: npt.NDArray[np.int64]) -> _FakeRound:
        ledger = self._ledger
        index = ledger.launched[self._rank]
        ledger.launched[self._rank] += 1
        if index == len(ledger.sums):
            ledger.sums.append(np.zeros_like(values, dtype=np.int64))
            ledger.counts.append(0)
        if ledger.sums[index].shape != values.shape:
            raise AssertionError(f"rank {self._rank} launched round {index} with shape "
                                 f"{values.shape}, others with {ledger.sums[index].shape}: "
                                 "ranks launched rounds in different orders")
        if self._rank not in ledger.silent:
            ledger.sums[index] += values
            ledger.counts[index] += 1
        return _FakeRound(ledger, index)


class _FakeStaged:
    def __init__(self, layers: tuple[int, ...], live: Sequence[Sequence[torch.Tensor]],
                 copies: list[tuple[int, int, list[torch.Tensor]]], received: int) -> None:
        self._layers = layers
        self._live = live
        self._copies = copies
        self._received = received

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    @property
    def bytes_received(self) -> int:
        return self._received

    def ready(self) -> bool:
        return True

    def commit(self) -> None:
        for layer, slot, tensors in self._copies:
            for live, staged in zip(self._live[layer], tensors, strict=True):
                live[slot].copy_(staged)
        self._copies = []

    def release(self) -> None:
        self._copies = []


class _FakeMover:
    def __init__(self, cluster: FakeCluster, rank: int) -> None:
        self._cluster = cluster
        self._rank = rank
        self.profiled: list[int] = []

    def prepare(self, old_physical_to_logical: npt.NDArray[np.int64],
                new_physical_to_logical: npt.NDArray[np.int64], layers: Sequence[int]) -> None:
        return None

    def profile(self, expert_weights: Sequence[Sequence[torch.Tensor]],
                layers_at_once: int = 1) -> int:
        """Peak staging bytes of `layers_at_once` layers (every slot replaced)."""
        self.profiled.append(layers_at_once)
        return sum(t.numel() * t.element_size() for layer in expert_weights[:layers_at_once]
                   for t in layer)

    def stage(self, old_physical_to_logical: npt.NDArray[np.int64],
              new_physical_to_logical: npt.NDArray[np.int64], layers: Sequence[int],
              expert_weights: Sequence[Sequence[torch.Tensor]],
              prepared: Any = None, tag: int = 0) -> _FakeStaged:
        peers = self._cluster._weights_of(expert_weights)
        n = len(expert_weights[0][0])
        copies, received = [], 0
        for layer in layers:
            old, new = old_physical_to_logical[layer], new_physical_to_logical[layer]
            for slot in range(n):
                g = self._rank * n + slot
                if new[g] < 0 or new[g] == old[g]:
                    continue
                holders = np.flatnonzero(old == new[g])
                local = [int(h) for h in holders if h // n == self._rank]
                src_rank, src_slot = divmod(local[0] if local else int(holders[0]), n)
                tensors = [t[src_slot].clone() for t in peers[src_rank][layer]]
                if src_rank != self._rank:
                    received += sum(t.numel() * t.element_size() for t in tensors)
                copies.append((int(layer), slot, tensors))
        return _FakeStaged(tuple(int(x) for x in layers), expert_weights, copies, received)


class _InlineExecutor(Executor):
    """Runs each task at submit: a rank has its plan at the step planning starts."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class FakeCluster:
    """N in-process ranks, each with a real `EplbRuntime` over fake transports.

    >>> cluster = FakeCluster(4, EplbConfig(step_interval=20, window_size=20,
    ...                                    num_redundant_experts=4))
    >>> cluster.add_model("main", num_layers=2, num_logical=8)
    >>> # asyncio: await cluster.run(60, load=lambda rank, step: my_load)
    """

    def __init__(self, num_ranks: int, config: EplbConfig, *,
                 threaded_planning: bool = False) -> None:
        """`threaded_planning=False` plans inline, so runs are step-for-step
        reproducible; True plans on each runtime's worker thread, as in production."""
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        self.num_ranks = num_ranks
        self.config = config
        self._ledger = _Ledger(num_ranks)
        self._faults = [Faults() for _ in range(num_ranks)]
        self.runtimes = [
            EplbRuntime.from_adapters(config, allreduce=_FakeAllReduce(self._ledger, r),
                                      mover=_FakeMover(self, r), faults=self._faults[r],
                                      planner=None if threaded_planning else _InlineExecutor())
            for r in range(num_ranks)
        ]
        self.models: dict[str, list[Any]] = {}

    # -- set-up -------------------------------------------------------------------------

    def add_model(self, name: str = "main", *, num_layers: int = 2, num_logical: int = 8,
                  factory: Callable[[int, int], Any] | None = None) -> list[Any]:
        """Add a model on every rank: ``factory(rank, world_size)``, or a `TaggedMoEModel`
        with the config's redundant experts."""
        def tagged(rank: int, world: int) -> TaggedMoEModel:
            return TaggedMoEModel(rank, world, num_layers, num_logical,
                                  self.config.num_redundant_experts)

        make = factory or tagged
        models = [make(r, self.num_ranks) for r in range(self.num_ranks)]
        for runtime, model in zip(self.runtimes, models, strict=True):
            runtime.add_model(model, name)
        self.models[name] = models
        return models

    def _weights_of(self, expert_weights: object) -> list[Any]:
        for models in self.models.values():
            if any(m.expert_weights is expert_weights for m in models):
                return [m.expert_weights for m in models]
        raise AssertionError("weights of an unknown model")

    # -- faults -------------------------------------------------------------------------

    def delay_readiness(self, rank: int, steps: int, phase: str = "*") -> None:
        """`rank` reports ready `steps` steps after it really is ("planning", "staging")."""
        self._faults[rank].delay[phase] = steps

    def never_ready(self, rank: int) -> None:
        """`rank` keeps answering rounds but never reports ready (peers time out)."""
        self._faults[rank].never_ready = True

    def silence(self, rank: int) -> None:
        """`rank`'s contributions are dropped: its peers' rounds never complete."""
        self._ledger.silent.add(rank)

    def pause_rounds(self) -> None:
        """Hold every round's completion (a slow network): steps that read one wait."""
        self._ledger.paused = True

    def resume_rounds(self) -> None:
        self._ledger.paused = False

    def raise_in(self, rank: int, point: str, error: BaseException) -> None:
        """Raise `error` on `rank` at `point`: "plan" (in the planning thread),
        "stage" (launching a transfer) or "commit"."""
        self._faults[rank].fail_at[point] = error

    def heal(self, rank: int) -> None:
        self._faults[rank] = Faults()
        inject_faults(self.runtimes[rank], self._faults[rank])
        self._ledger.silent.discard(rank)

    # -- driving ------------------------------------------------------------------------

    def feed(self, name: str, rank: int, logical_load: npt.ArrayLike) -> None:
        """Add one pass of [L, E] logical load on `rank`, spread over the replicas."""
        feed_load(self.models[name][rank], logical_load)

    async def step(self, *, is_dummy: bool = False) -> list[BaseException | None]:
        """One step on every rank, concurrently; returns each rank's exception or None."""
        results = await asyncio.gather(*(rt.step(is_dummy=is_dummy) for rt in self.runtimes),
                                       return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def run(self, steps: int,
                  load: Callable[[int, int], dict[str, npt.ArrayLike]] | None = None,
                  *, raise_errors: bool = True) -> list[list[BaseException | None]]:
        """`steps` steps; ``load(rank, step)`` gives each model's logical load per pass."""
        outcomes = []
        for _ in range(steps):
            if load is not None:
                for rank in range(self.num_ranks):
                    for name, logical in load(rank, self.runtimes[rank].step_count + 1).items():
                        self.feed(name, rank, logical)
            errors = await self.step()
            if raise_errors:
                for error in errors:
                    if error is not None:
                        raise error
            outcomes.append(errors)
        return outcomes

    # -- views --------------------------------------------------------------------------

    def phases(self, name: str = "main") -> list[str]:
        return [rt.phase(name) for rt in self.runtimes]

    def histories(self, name: str = "main") -> list[list[TransitionRecord]]:
        return [rt.history(name) for rt in self.runtimes]

    def wrong_slots(self, name: str = "main") -> dict[int, list[tuple[int, int]]]:
        """Per rank, slots whose weights disagree with that rank's map (tagged models)."""
        out = {}
        for rank, (rt, model) in enumerate(zip(self.runtimes, self.models[name], strict=True)):
            wrong = model.wrong_slots(rt.placement(name).physical_to_logical)
            if wrong:
                out[rank] = wrong
        return out
