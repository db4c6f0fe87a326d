"""`EplbRuntime`: one step counter, one lifecycle per model, an awaitable `step()`.

A serving engine calls ``await rt.step()`` once per forward pass on every
rank. The runtime owns the step counter shared by all its models (main and
draft), so their agreed steps line up across ranks. Each model's lifecycle
is driven by a `ModelDriver`; this class only validates, dispatches and
reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch

from .._adapters.elastic_groups import ElasticGroups
from .._adapters.interfaces import AllReduce, FaultHook, MoEModel, WeightMover
from .._adapters.liveness import Heartbeat
from .._core.lifecycle import TransitionRecord
from .._core.placement import Placement
from .._core.planning import available_policies, check_policy_options
from .config import EplbConfig
from .driver import ModelDriver
from .elastic import ExpertsLost, Reconfiguration, Reconfigured, make_transports
from .hooks import Hooks, LifecycleEvent
from .job import RebalanceFailed
from .model_checks import agree_on_weights, check_model, check_weights
from .rounds import deferred_cancellation
from .step_rest import Rest, nothing, raised

__all__ = ["EplbRuntime"]

log = logging.getLogger("eplb_fsm")

class EplbRuntime:
    """Drives every model's rebalance lifecycle from the serving loop.

    ``EplbRuntime(config, group=None, cpu_group=None, device=None)`` uses
    torch.distributed: `group` (default: WORLD) carries the weight transfers
    (NCCL on GPU, gloo on CPU); `cpu_group` (default: a new gloo group over
    the same ranks, created collectively here) carries the readiness and load
    all-reduces. For custom transports and for tests, see `from_adapters`
    and `eplb_fsm.testing.FakeCluster`.
    """

    _liveness: Heartbeat | None
    _cpu_group: Any

    def __init__(self, config: EplbConfig, group: Any = None, cpu_group: Any = None,
                 device: torch.device | str | None = None) -> None:
        import torch.distributed as dist

        if not isinstance(config, EplbConfig):
            raise ValueError(f"config must be an EplbConfig, got {type(config).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("EplbRuntime needs torch.distributed initialised "
                             "(init_process_group); for tests use eplb_fsm.testing.FakeCluster")
        group = group if group is not None else dist.group.WORLD
        if cpu_group is None:
            cpu_group = dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo")
        if device is None:
            on_gpu = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu"
        device = torch.device(device)
        allreduce, mover = make_transports(group, cpu_group, device, config)
        if device.type == "cuda":
            # NCCL builds its communicator on first use (tens of ms), and a first
            # launch of its send/recv kernels blocks the host behind every running
            # kernel (lazy loading: ~1 s behind a 1 s kernel, measured); pay both
            # here, not inside a serving step.
            mover.warm_up(device)
        self._setup(config, allreduce, mover, device, None, None)
        self._cpu_group = cpu_group
        self._liveness = Heartbeat.for_default_group(dist.get_rank(group),
                                                     dist.get_world_size(group),
                                                     dist.get_process_group_ranks(group))

    @classmethod
    def from_adapters(cls, config: EplbConfig, *, allreduce: AllReduce, mover: WeightMover,
                      device: torch.device | str = "cpu", faults: FaultHook | None = None,
                      planner: Executor | None = None) -> EplbRuntime:
        """A runtime over your own transports (see `eplb_fsm.MoEModel` and friends).

        `planner` runs the planning; the default is one worker thread, so planning
        never blocks the event loop. A test may pass an executor that runs
        inline, making the step at which each rank has its plan deterministic.
        """
        if not isinstance(config, EplbConfig):
            raise ValueError(f"config must be an EplbConfig, got {type(config).__name__}")
        runtime = cls.__new__(cls)
        runtime._setup(config, allreduce, mover, torch.device(device), faults, planner)
        return runtime

    def _setup(self, config: EplbConfig, allreduce: AllReduce, mover: WeightMover,
               device: torch.device, faults: FaultHook | None,
               planner: Executor | None) -> None:
        if config.policy not in available_policies():
            raise ValueError(f"EplbConfig.policy {config.policy!r} is unknown; known policies: "
                             f"{', '.join(available_policies())}")
        try:
            check_policy_options(config.policy, config.policy_options)
        except ValueError as exc:
            raise ValueError(f"EplbConfig.policy_options: {exc}") from exc
        self.config = config
        self._allreduce = allreduce
        self._mover = mover
        self._device = device
        self._faults = faults
        self._drivers: dict[str, ModelDriver] = {}
        self._hooks = Hooks()
        self._liveness = None
        self._cpu_group = None  # set when built on torch.distributed (add_model agrees on it)
        self._step = 0
        self._rest: Rest | None = None
        self._released = False
        self.last_reconfiguration: Reconfigured | None = None
        # One worker: plans are rare, and one at a time keeps memory flat.
        self._executor = planner or ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="eplb-plan")

    # -- models -------------------------------------------------------------------------

    def add_model(self, model: MoEModel, name: str = "main",
                  placement: Placement | None = None) -> None:
        """Balance `model` from the next step on; call on every rank in the same order.

        `placement` is the layout its weights are in now (default: vLLM's
        initial layout, slot i holding expert i % E).
        """
        self._add_model(model, name, placement, share=True)

    def _add_model(self, model: MoEModel, name: str, placement: Placement | None, *,
                   share: bool) -> None:
        """`add_model`; `share=False` skips the weight-sharing collective (a joining
        rank's model: its peers share only once the new group exists)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if name in self._drivers:
            raise ValueError(f"a model named {name!r} was already added")
        if any(d.busy for d in self._drivers.values()):
            raise ValueError("add_model while a rebalance is in flight would break the agreed "
                             "step order; add models before serving or between rebalances")
        groups = check_model(model, self.config, self._allreduce.world_size)
        if placement is None:
            placement = Placement.initial(model.num_moe_layers, model.num_logical_experts,
                                          model.num_physical_experts)
        elif (placement.num_layers, placement.num_logical, placement.num_physical) != (
                model.num_moe_layers, model.num_logical_experts, model.num_physical_experts):
            raise ValueError("placement shape disagrees with the model's layers and experts")
        driver = ModelDriver(
            name, model, placement, self.config, num_groups=groups, allreduce=self._allreduce,
            mover=self._mover, device=self._device, executor=self._executor,
            faults=self._faults, hooks=self._hooks, liveness=self._liveness,
            index=len(self._drivers))
        # After set_eplb_state (the driver called it): vLLM's models fill
        # expert_weights there, so checking them earlier would refuse them.
        check_weights(model)
        if share and self._cpu_group is not None:
            agree_on_weights(model, name, self.config, self._cpu_group)
        share_weights = getattr(self._mover, "share_weights", None)
        if share and share_weights is not None and self.config.transfer_path != "nccl":
            # Collective, like add_model itself: peers map these weights for pulls.
            share_weights(model.expert_weights)
        self._drivers[name] = driver

    def share_weights(self) -> None:
        """Tell the transfer engine where every model's expert weights are now.

        Call on every rank at the same step, between passes and while no
        rebalance is in flight (`busy` is False), after the engine reallocated
        expert weights (a CUDA-graph recapture, a weight reload into new
        tensors). Until then, a rebalance whose staged layers' weights were
        reallocated fails on every rank before anything is written, and the
        pull path refuses weights other than the ones shared. Collective on
        the CPU group: every rank re-checks with its peers that the weights'
        layers, shapes and dtypes agree.
        """
        if self.busy:
            raise ValueError("share_weights() while a rebalance is in flight would change "
                             "the weights under a staged transfer; call it when busy is False")
        share = getattr(self._mover, "share_weights", None)
        for name, driver in self._drivers.items():
            check_weights(driver.model)
            if self._cpu_group is not None:
                agree_on_weights(driver.model, name, self.config, self._cpu_group)
            if share is not None and self.config.transfer_path != "nccl":
                share(driver.model.expert_weights)

    def off(self, kind: str, callback: Callable[[LifecycleEvent], Any]) -> None:
        """Stop calling `callback` for `kind` (events already queued still arrive)."""
        self._hooks.remove(kind, callback)

    def drain_hooks(self, timeout: float = 5.0) -> None:
        """Wait (up to `timeout` s) until queued sync callbacks have run."""
        self._hooks.drain(timeout)

    def on(self, kind: str, callback: Callable[[LifecycleEvent], Any]) -> None:
        """Call `callback(event)` on every lifecycle event of `kind` ("transition",
        "commit", "failure", "rebalance"), sync or async. Callbacks run off the
        step (a worker thread, or a task); a slow or failing one cannot stall or
        break the lifecycle (see `eplb_fsm._runtime.hooks`)."""
        self._hooks.add(kind, callback)

    # -- the hook -----------------------------------------------------------------------

    def step(self, is_dummy: bool = False,
             is_profile: bool = False) -> Coroutine[Any, Any, None]:
        """Call once per forward pass on every rank, after the pass, and await the result.

        ``is_dummy``: the pass served no real tokens (records no load, still
        counts). ``is_profile``: allocate the transfer engine's peak buffers once
        so the engine's memory profiling sees them; does not count as a step.
        The awaitable raises `RebalanceFailed` (with ``on_failure="raise"``)
        after every model has taken this step, so models stay in step.

        The pass is counted, and the step's agreed work done, when `step()` is
        *called*, not when its result is awaited: the step counter must be the
        same on every rank (each round checks it), and a task cancelled before
        it ever ran (``asyncio.wait_for(rt.step(), 0)``) would otherwise drop a
        pass on one rank and shift its every later commit. The awaitable holds
        only what had to wait (a round not yet complete, which is rare).
        Cancelling the task that awaits it is safe: a step that has started
        finishes its agreed work first (its waits are bounded by
        ``peer_timeout_s``), then the cancellation is raised. If that rest is
        never awaited at all, the next `step()` finishes it first; if that
        committed layers, they came a pass late on this rank, and the model's
        rebalance is reported failed on every rank.
        """
        if is_profile:
            self.profile()
            return nothing()
        if self._released:
            raise RuntimeError("this rank left the deployment (EplbRuntime.reconfigure "
                               "released it); it has nothing left to balance")
        if self._rest is not None:
            self._finish_rest()
        self._step += 1
        step = self._step
        due = [d for d in self._drivers.values() if d.record_pass(step, is_dummy)]
        if not due:
            return nothing()  # nothing agreed at this step: no await, nothing to cancel
        work = self._agreed(step, due, is_dummy)
        try:
            first = work.send(None)
        except StopIteration:
            return nothing()
        except BaseException as exc:
            return raised(exc)
        rest = self._rest = Rest(work, first, step)
        return self._await_rest(rest)

    async def _agreed(self, step: int, due: list[ModelDriver], is_dummy: bool) -> None:
        errors: list[RebalanceFailed] = []
        with deferred_cancellation() as cancelled:
            for driver in due:
                try:
                    await driver.advance(step, is_dummy)
                except RebalanceFailed as exc:
                    errors.append(exc)
        if cancelled:
            raise cancelled[0]
        if errors:
            raise errors[0]

    async def _await_rest(self, rest: Rest) -> None:
        try:
            await rest
        finally:
            if self._rest is rest:
                self._rest = None

    def _finish_rest(self) -> None:
        """The last step's agreed work waited, and its awaitable was never awaited (or
        is still suspended: two `step()` calls at once). Finish it here, blocking,
        and fail the rebalances it belonged to: it ran a pass late."""
        rest, self._rest = self._rest, None
        assert rest is not None
        if rest.started:
            self._rest = rest
            raise RuntimeError("step() called again while the previous step's agreed work "
                               "is still running; await each step() before the next")
        before = {name: d.stats.layers_committed for name, d in self._drivers.items()}
        rest.run_blocking()
        message = (f"the agreed work of step {rest.step} ran late on rank "
                   f"{self._allreduce.rank}: the task awaiting step() was cancelled before it "
                   "started, so this rank committed a pass after its peers")
        for name, driver in self._drivers.items():
            # Launches and reads may run late harmlessly (they pair by order and
            # tag); a late commit routed one pass with the old maps here.
            if driver.stats.layers_committed != before[name]:
                log.error("eplb model=%s %s", name, message)
                driver.report_error(RuntimeError(message))

    def profile(self) -> None:
        profile = getattr(self._mover, "profile", None)
        for driver in self._drivers.values():
            if profile is not None:
                profile(driver.model.expert_weights, self.config.layers_per_transfer)

    async def rearrange_async(self) -> None:
        """A full rebalance of every model inside this call (all ranks call it together)."""
        with deferred_cancellation() as cancelled:
            for driver in self._drivers.values():
                await driver.rearrange_now(self._step)
        if cancelled:
            raise cancelled[0]

    def rearrange(self) -> None:
        """Blocking full rebalance now, the synchronous path; all ranks call it together.

        Raises RuntimeError while a rebalance is in flight (`busy`), and inside a
        running event loop (use `rearrange_async` there)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.rearrange_async())
            return
        raise RuntimeError("rearrange() blocks; inside an event loop use "
                           "`await rt.rearrange_async()`")

    # -- elastic expert parallelism (see _runtime/elastic.py, docs/elastic.md) ------------

    @property
    def busy(self) -> bool:
        """A rebalance is in flight (the same answer on every rank at the same step)."""
        return any(d.busy for d in self._drivers.values())

    async def reconfigure(self, groups: ElasticGroups,
                          rank_mapping: Sequence[int] | None = None) -> Reconfigured:
        """Move this deployment to the rank set `groups.new_ranks`; all ranks call it together.

        Every old rank (staying or leaving) calls it, and every joining rank
        calls `join`, at the same step, between forward passes, while no
        rebalance is in flight (`busy` is False). `rank_mapping` (old rank ->
        new rank, -1 leaves; vLLM's form) is optional and checked against the
        groups. Afterwards a staying rank serves with the new placement over
        `groups.new_group`; a leaving rank is released (its `step()` raises).

        Raises `ExpertsLost` (with ``on_failure="raise"``) when a leaving rank
        died before handing off experts no one else held; the new placement is
        in force, and the report names the experts and slots to reload.
        """
        if self._released:
            raise RuntimeError("this rank already left the deployment")
        work = Reconfiguration(self.config, self._drivers, groups, self._step, self._device,
                               self._faults, rank_mapping)
        return await self._reconfigure(work, groups)

    @classmethod
    async def join(cls, config: EplbConfig, groups: ElasticGroups,
                   models: Mapping[str, MoEModel], *, device: torch.device | str | None = None,
                   rank_mapping: Sequence[int] | None = None) -> EplbRuntime:
        """A runtime for a joining rank: call while the old ranks call `reconfigure`.

        `models` (name -> model, in the deployment's order) are built for the
        new EP group (``groups.new_group``); their expert weights are filled by
        the transfer, not loaded. The step counter, placements and histories
        come from a staying rank. The report is in `last_reconfiguration`.
        """
        if not isinstance(models, Mapping) or not models:
            raise ValueError("models must be a non-empty mapping of name -> model")
        # The deployment's config, with the new rank count's redundant slots; the
        # node count is derived during the reconfiguration (docs/elastic.md).
        first = next(iter(models.values()))
        runtime = cls(dataclasses.replace(
            config, num_nodes=1,
            num_redundant_experts=getattr(first, "num_redundant_experts", 0)),
            group=groups.new_group, cpu_group=groups.new_cpu_group, device=device)
        for name, model in models.items():
            # No sharing yet: every new rank shares once, after the resize.
            runtime._add_model(model, name, None, share=False)
        work = Reconfiguration(config, runtime._drivers, groups, 0, runtime._device,
                               runtime._faults, rank_mapping)
        # On ExpertsLost the new placement is in force and the loss is in the report
        # (logged, counted): the joiner serves like every new rank and reloads it.
        with contextlib.suppress(ExpertsLost):
            await runtime._reconfigure(work, groups)
        return runtime

    async def _reconfigure(self, work: Reconfiguration, groups: ElasticGroups) -> Reconfigured:
        with deferred_cancellation() as cancelled:
            try:
                report = await work.run()
            except Exception as exc:
                self._reconfiguration_failed(work, exc)
        self.last_reconfiguration = report
        self._step = report.step
        if work.role == "leaves":
            self._released = True
            self.close()
        else:
            assert work.new is not None
            self._allreduce, self._mover = work.new
            self.config = work.new_config
            if self._liveness is not None:
                self._liveness.close()
            self._liveness = work.liveness
        if cancelled:
            raise cancelled[0]
        if report.lost:
            lost = "; ".join(f"model {m!r} layer {layer}: expert(s) {list(e)}"
                             for m, layers in report.lost.items() for layer, e in layers.items())
            message = (f"reconfiguration at step {report.step} lost experts with no surviving "
                       f"copy (old rank(s) {list(report.unavailable_ranks)} could not hand "
                       f"off): {lost}; reload them into slots {dict(report.reload_slots)}")
            log.error("%s", message)
            for driver in self._drivers.values():
                driver.stats.failed += 1
                driver.stats.last_error = message
            if self.config.on_failure == "raise":
                raise ExpertsLost(message, report=report)
        return report

    def _reconfiguration_failed(self, work: Reconfiguration, exc: Exception) -> None:
        """End a reconfiguration that raised in a state the lifecycle allows: every
        model `failed` (then `collecting` at the next step, on the old rank set),
        and the cause in a `RebalanceFailed`."""
        for driver in self._drivers.values():
            if driver.lifecycle.may_fire("fail"):
                driver.transition("fail", work.step)
            driver.stats.failed += 1
            driver.stats.last_error = f"reconfiguration failed: {exc}"
        if isinstance(exc, RebalanceFailed):
            raise exc
        first = next(iter(self._drivers), "main")
        message = (f"reconfiguration at step {work.step} failed on global rank "
                   f"{work.global_rank} ({work.role}): {type(exc).__name__}: {exc}")
        log.error("eplb %s", message)
        raise RebalanceFailed(message, model=first) from exc

    # -- views --------------------------------------------------------------------------

    def _driver(self, name: str) -> ModelDriver:
        if name not in self._drivers:
            raise ValueError(f"no model named {name!r}; models: {', '.join(self._drivers)}")
        return self._drivers[name]

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def models(self) -> Sequence[str]:
        return tuple(self._drivers)

    def phase(self, name: str = "main") -> str:
        return self._driver(name).state

    def history(self, name: str = "main") -> list[TransitionRecord]:
        return list(self._driver(name).lifecycle.history)

    def placement(self, name: str = "main") -> Placement:
        return self._driver(name).placement

    def stats(self) -> dict[str, Any]:
        return {"step": self._step,
                "hooks": {"delivered": self._hooks.delivered, "errors": self._hooks.errors},
                "models": {name: {"phase": d.state, **d.stats.as_dict()}
                           for name, d in self._drivers.items()}}

    def close(self) -> None:
        """Abort in-flight rebalances locally and stop the planning thread."""
        for driver in self._drivers.values():
            driver.abort(self._step, "runtime closed")
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._hooks.close()
        if self._liveness is not None:
            self._liveness.close()
