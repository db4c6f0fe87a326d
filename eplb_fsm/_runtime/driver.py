"""One model's rebalance, driven step by step: the thin I/O shell around `Lifecycle`.

Every decision that changes the state happens at an agreed step ``due`` and
depends only on shared facts (a round's result, the deterministic plan), so
all ranks fire the same triggers at the same steps. Between agreed steps a
step costs a comparison (``step < due``): no collective, no device sync.

Timeline of an asynchronous rebalance (``lag`` = ``readiness_lag``)::

    s            interval reached: window sums copied to host (non-blocking)
    s + lag      load all-reduce launched
    s + 2 lag    reduced load read; planning starts in a worker thread
    s + 3 lag    readiness round launched, read lag steps later, repeated
                 until every rank has the plan; then the first layer batch's
                 transfer is launched (staging)
    + lag        readiness round launched (awaiting_all_ranks)
    + lag        all ready: commit on every rank, next batch launched;
                 not yet: another round
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .._adapters.collectives import RoundAbandoned
from .._adapters.interfaces import (
    AllReduce,
    FaultHook,
    MoEModel,
    ReadinessRound,
    WeightMover,
)
from .._adapters.liveness import Heartbeat
from .._core import lifecycle as lc
from .._core.balance import balancedness_per_layer, rank_load_from_logical
from .._core.placement import Placement
from .._core.planning import plan
from .balance_log import BalancednessLog
from .config import EplbConfig
from .hooks import Hooks, LifecycleEvent
from .job import Job, Planned, RebalanceFailed
from .load_window import LoadWindow
from .rounds import (
    POLL_S,
    PeerTimeout,
    RoundOutcome,
    encode_flags,
    maps_digest,
    maps_disagreement,
    pause,
    split_digests,
    split_header,
    wait_round,
    with_digest,
    with_header,
)
from .stats import ModelStats

__all__ = ["ModelDriver", "RebalanceFailed"]

log = logging.getLogger("eplb_fsm")


class ModelDriver:
    def __init__(self, name: str, model: MoEModel, placement: Placement, config: EplbConfig,
                 *, num_groups: int, allreduce: AllReduce, mover: WeightMover,
                 device: torch.device, executor: Executor, faults: FaultHook | None,
                 hooks: Hooks | None = None, liveness: Heartbeat | None = None,
                 index: int = 0) -> None:
        self.name = name
        self.index = index  # the model's place in the runtime: part of its transfers' tags
        # Failures so far: the same on every rank, since every rank fails a
        # rebalance at the same step; carried in every round (rounds.Header).
        self.epoch = 0
        self._tagged = "tag" in inspect.signature(mover.stage).parameters
        self.model = model
        self.config = config
        self._num_groups = num_groups
        self._allreduce = allreduce
        self._mover = mover
        self._executor = executor
        self._faults = faults
        self._hooks = hooks or Hooks()
        self._liveness = liveness
        self._rank = allreduce.rank
        self._world = allreduce.world_size
        self.placement = placement
        self._p2l = placement.physical_to_logical.copy()  # mixed while layers commit
        maps = placement.to_torch(device)
        self._load_view = torch.zeros(placement.num_layers, placement.num_physical,
                                      dtype=torch.int64, device=device)
        self._l2p = maps.logical_to_physical
        self._rc = maps.replica_count
        if device.type == "cuda":
            # A commit's map copies, once, before serving (the values are the ones
            # there), so that their pinned buffers exist: CUDA counts a page-locked
            # host allocation among the operations that synchronise implicitly.
            for layers in ([0], list(range(placement.num_layers))):
                _copy_rows(self._l2p, placement.logical_to_physical, layers)
                _copy_rows(self._rc, placement.replica_count, layers)
        model.set_eplb_state(self._load_view, self._l2p, self._rc)
        every = config.load_record_interval or (8 if device.type == "cuda" else 1)
        self._record_every = every
        self._pending = 0  # passes in the load view not yet in the window
        self._window = LoadWindow(-(-config.window_size // every), placement.num_layers,
                                  placement.num_physical, placement.num_logical, device)
        self._window.set_map(self._p2l)
        self.lifecycle = lc.Lifecycle()
        self.stats = ModelStats()
        self._job: Job | None = None
        self._synchronous = False  # inside rearrange_now: waits allow for peers' deadlines
        # Plans given up on that still run, and the executor each occupies.
        self._held: list[tuple[Future[Planned], Executor]] = []
        self._spare: Executor | None = None
        self._balance_log = (BalancednessLog(name, config, allreduce, placement.num_layers,
                                             placement.num_physical)
                             if config.log_balancedness else None)
        self._entered = (0, time.monotonic())

    # -- public views -------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.lifecycle.state

    @property
    def busy(self) -> bool:
        return self._job is not None

    # -- the step -----------------------------------------------------------------------

    def _record(self) -> None:
        """Move the passes accumulated in the load view into the window."""
        self._window.record(self._load_view, self._pending)
        self._load_view.zero_()
        self._pending = 0

    def record_pass(self, step: int, is_dummy: bool) -> bool:
        """The synchronous part of a step: account for the pass's load.

        Returns whether this step has agreed work, i.e. whether the runtime
        must await `advance`. Most steps have none; answering without a
        coroutine keeps an idle step to a few microseconds (a cache-cold
        coroutine and context manager cost more than the work itself).
        """
        if not is_dummy:
            self._pending += 1
            if self._pending >= self._record_every:
                self._record()
        elif self._pending == 0:
            self._load_view.zero_()  # drop the dummy pass's load exactly
        job = self._job
        interval_reached = step % self.config.step_interval == 0
        if job is not None and interval_reached:
            self.stats.skipped += 1  # an interval came while the last rebalance runs
        return (self._balance_log is not None or self.state == lc.FAILED
                or (job is None and interval_reached)
                or (job is not None and step >= job.due))

    async def advance(self, step: int, is_dummy: bool) -> None:
        """The agreed work of `step`, after `record_pass` returned True for it."""
        if self._balance_log is not None:
            try:
                per_layer = await self._balance_log.step(step, is_dummy, self._window)
            except Exception as exc:  # its round was abandoned (the same on every rank)
                log.error("eplb balancedness log: model=%s step=%d: round failed, pending "
                          "figures dropped: %s", self.name, step, exc)
                self._balance_log.drop()
                per_layer = None
            if per_layer is not None:
                self.stats.measured_balancedness = per_layer
        if self.state == lc.FAILED:
            self._fire("recover", step)
        job = self._job
        if job is None:
            if step % self.config.step_interval == 0:
                if self.config.use_async:
                    self._begin(step)
                else:
                    await self.rearrange_now(step)
            return
        if step < job.due:
            return
        try:
            await self._advance(job, step)
        except RebalanceFailed:
            raise
        except Exception as exc:  # a collective broke or a peer never answered
            self._fail_locally(job, step, exc)

    def _begin(self, step: int) -> None:
        if self._pending:
            self._record()  # the plan must see every pass so far
        lag = self.config.readiness_lag
        self._job = Job(step, time.monotonic() + self.config.peer_timeout_s, "reduce",
                         step + lag, host_load=self._window.snapshot(),
                         bytes_at_start=self.stats.bytes_moved)
        self.stats.started += 1
        self._fire("interval_reached", step)

    async def _advance(self, job: Job, step: int) -> None:
        lag = self.config.readiness_lag
        if job.phase == "reduce":
            assert job.host_load is not None
            job.load_round = self._launch_load(job.host_load.logical(), step)
            job.phase, job.due = "plan", step + lag
        elif job.phase == "plan":
            assert job.load_round is not None
            values = await wait_round(job.load_round, self.config.peer_timeout_s,
                                      self._who(step))
            job.reduced_load = self._read_load(values, step)
            if job.reduced_load is None:
                return
            job.planner = self._planner()
            job.plan_future = job.planner.submit(self._plan, job.reduced_load,
                                                 self._p2l.copy(), step)
            job.phase, job.due = "plan_round", step + lag
            job.round = None
        elif job.phase == "plan_round":
            if job.round is not None:
                outcome = await self._outcome(job.round, step)
                if self._check_outcome(job, step, outcome):
                    return
                if outcome.all_ready:
                    self._agree_on_plan(job, step)
                    return
            job.round = self._launch_round(job, step, "planning", self._plan_ready(job))
            job.due = step + lag
        elif job.phase == "transfer_launch":
            ready = self._transfer_ready(job)
            job.round = self._launch_round(job, step, "staging", ready)
            self._fire("round_launched", step)
            job.phase, job.due = "transfer_round", step + lag
        elif job.phase == "transfer_round":
            assert job.round is not None
            outcome = await self._outcome(job.round, step)
            if self._check_outcome(job, step, outcome):
                return
            self._fire("round_resolved", step, lc.Facts(all_ready=outcome.all_ready))
            if outcome.all_ready:
                self._commit(job, step)
            else:
                job.round = self._launch_round(job, step, "staging", self._transfer_ready(job))
                self._fire("round_launched", step)
                job.due = step + lag

    # -- planning -----------------------------------------------------------------------

    def _planner(self) -> Executor:
        """Where to plan: the runtime's planning thread, unless a plan given up on
        (slower than the timeout) still occupies it; the next must not queue
        behind it, or it would time out too."""
        self._held = [(f, e) for f, e in self._held if not f.done()]
        busy = [e for _, e in self._held]
        if self._executor not in busy:
            return self._executor
        if self._spare is None or self._spare in busy:
            self._spare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-plan")
        return self._spare

    def _plan(self, load: npt.NDArray[np.int64], old: npt.NDArray[np.int64],
              step: int) -> Planned:
        """Runs in the planning thread: everything deterministic, nothing collective."""
        if self._faults is not None:
            self._faults.inject(self.name, "plan", step, ())
        new = plan(load, self.placement.num_physical, self._num_groups, self.config.num_nodes,
                   self._world, policy=self.config.policy, old_placement=self.placement,
                   minimize_moves=self.config.minimize_moves,
                   policy_options=self.config.policy_options)
        changed = [int(layer) for layer in np.flatnonzero(
            (new.physical_to_logical != old).any(axis=1))]
        size = self.config.layers_per_transfer
        batches = tuple(tuple(changed[i:i + size]) for i in range(0, len(changed), size))
        prepared = tuple(self._mover.prepare(old, new.physical_to_logical, batch)
                         for batch in batches)
        return Planned(new, batches, prepared, self._predicted(load, self.placement),
                       self._predicted(load, new))

    def _plan_ready(self, job: Job) -> bool:
        future = job.plan_future
        if future is None or not future.done():
            return False
        error = future.exception()
        if error is not None:
            job.local_error = error
            return False
        # Peers may pull from this rank's live weights: its earlier commits
        # must have run on the device first (TransferEngine.settled).
        settled = getattr(self._mover, "settled", None)
        return settled is None or bool(settled())

    def _agree_on_plan(self, job: Job, step: int) -> None:
        assert job.plan_future is not None and job.reduced_load is not None
        planned = job.plan_future.result()
        job.plan = planned.placement
        before, after = planned.before, planned.after
        self.stats.record_plan(before, after)
        gain = float(after.mean() - before.mean())
        worth = bool(planned.batches) and gain >= self.config.min_balancedness_gain
        self._fire("plan_agreed", step, lc.Facts(worth_moving=worth))
        if not worth:
            self.stats.dropped += 1
            changed = sum(len(b) for b in planned.batches)
            reason = ("no layer changed" if not changed else
                      f"predicted gain below min_balancedness_gain="
                      f"{self.config.min_balancedness_gain:g}")
            log.info("eplb rebalance dropped: model=%s rank=%d step=%d duration_s=%.3f "
                     "balancedness_before=%.4f balancedness_after=%.4f layers_changed=%d (%s)",
                     self.name, self._rank, step, time.monotonic() - job.started_at,
                     before.mean(), after.mean(), changed, reason)
            self._job = None
            self._emit("rebalance", step, "dropped")
            return
        job.batches = list(zip(planned.batches, planned.prepared, strict=True))
        self._stage_next(job, step)

    def _predicted(self, load: npt.NDArray[np.int64], placement: Placement) -> npt.NDArray[Any]:
        return balancedness_per_layer(rank_load_from_logical(load, placement, self._world))

    # -- transfer and commit ------------------------------------------------------------

    def _stage_next(self, job: Job, step: int) -> None:
        assert job.plan is not None
        job.layers, prepared = job.batches.pop(0)
        job.deadline = time.monotonic() + self.config.peer_timeout_s
        job.staged, job.local_error = None, None
        try:
            if self._faults is not None:
                self._faults.inject(self.name, "stage", step, job.layers)
            weights = self.model.expert_weights
            job.weights = _identity(weights, job.layers)
            extra = {"tag": self._tag(step)} if self._tagged else {}
            job.staged = self._mover.stage(self._p2l, job.plan.physical_to_logical,
                                           job.layers, weights, prepared, **extra)
        except Exception as exc:  # reported through the next round, so all ranks fail together
            job.local_error = exc
        job.phase, job.due = "transfer_launch", step + self.config.readiness_lag

    def _tag(self, step: int) -> int:
        """This model's transfer at `step`: a tag no other transfer of the last 2**24
        steps shares (`TransferEngine.stage`)."""
        return 1 + (step * 64 + self.index % 64) % (2 ** 30)

    def _reallocated(self, job: Job) -> str | None:
        """What changed, if the staged layers' weight tensors are no longer the
        ones staged (an engine that reallocates its weights): committing would
        write into memory the model no longer reads, or pull stale bytes."""
        if job.weights is None or _identity(self.model.expert_weights, job.layers) == \
                job.weights:
            return None
        return (f"rank {self._rank}: model {self.name!r}'s expert weights of layer(s) "
                f"{list(job.layers)} were reallocated while staged; nothing of them is "
                "committed (call EplbRuntime.share_weights() on every rank after "
                "reallocating)")

    def _transfer_ready(self, job: Job) -> bool:
        if job.staged is None or job.local_error is not None:
            return False
        moved = self._reallocated(job)
        if moved is not None:
            job.local_error = RuntimeError(moved)
            return False
        try:
            return job.staged.ready()
        except Exception as exc:
            job.local_error = exc
            return False

    def _commit(self, job: Job, step: int) -> None:
        assert job.staged is not None and job.plan is not None
        layers = list(job.layers)
        try:
            moved = self._reallocated(job)
            if moved is not None:  # between the last round and now: write nothing
                raise RuntimeError(moved)
            for attempt in (1, 2):
                try:
                    if self._faults is not None:
                        self._faults.inject(self.name, "commit", step, job.layers)
                    job.staged.commit()
                    break
                except Exception as exc:
                    # Every peer commits these layers now: a transient error (an
                    # allocation, say) must not leave this rank's slots behind its
                    # maps. The staged rows are intact; layers already committed
                    # are skipped, so try once more before giving up.
                    if attempt == 2:
                        raise
                    log.warning("eplb commit of layer(s) %s failed on rank %d (%s: %s); "
                                "retrying once", list(job.layers), self._rank,
                                type(exc).__name__, exc)
        except Exception as exc:
            # Every peer commits these layers at this step; this rank could not.
            # Its maps keep the old rows, its weights may be partly written. It
            # stays in lockstep and reports the error in the next round, so all
            # ranks leave the rebalance together; it raises now to tell its engine.
            job.fatal_error = exc
            layers = []
        new = job.plan
        if layers:
            self._commit_maps(layers, new)
        self.stats.bytes_moved += job.staged.bytes_received
        self.stats.layers_committed += len(layers)
        committed = tuple(layers)
        job.staged = None
        done = not job.batches
        self._emit("commit", step, "layers_committed", layers=committed)
        self._fire("layers_committed", step, lc.Facts(all_layers_done=done))
        error = self._commit_failure(job, step) if job.fatal_error is not None else None
        if done:
            self._job = None
            if error is None:
                self.stats.done += 1
                self._log_done(job, step)
                self._emit("rebalance", step, "done")
        else:
            self._stage_next(job, step)
        if error is not None and self.config.on_failure == "raise":
            raise error

    def _log_done(self, job: Job, step: int) -> None:
        before, after = self.stats.balancedness_before, self.stats.balancedness_after
        assert before is not None and after is not None
        log.info("eplb rebalance done: model=%s rank=%d step=%d steps=%d duration_s=%.3f "
                 "balancedness_before=%.4f balancedness_after=%.4f bytes_received=%d "
                 "(balancedness: mean/max per-rank load per layer, averaged; predicted "
                 "from the all-reduced window)", self.name, self._rank, step,
                 step - job.started_step,
                 time.monotonic() - job.started_at, before.mean(), after.mean(),
                 self.stats.bytes_moved - job.bytes_at_start)

    def _commit_maps(self, layers: list[int], new: Placement) -> None:
        if self._pending:
            self._record()  # passes so far ran under the old maps
        self._p2l[layers] = new.physical_to_logical[layers]
        _copy_rows(self._l2p, new.logical_to_physical, layers)
        _copy_rows(self._rc, new.replica_count, layers)
        self.placement = self.placement.with_layers(layers, new)
        self._window.set_map(self._p2l)

    def _commit_failure(self, job: Job, step: int) -> RebalanceFailed:
        exc = job.fatal_error
        message = (f"model {self.name!r}: commit of layer(s) {list(job.layers)} failed on rank "
                   f"{self._rank} after every rank agreed; this rank kept its old maps for "
                   f"them and its weights may be partly written ({type(exc).__name__}: {exc})")
        self.stats.failed += 1
        self.stats.last_error = message
        self._emit("failure", step, "commit_failed", layers=job.layers, error=message)
        log.error("%s (step %d)", message, step)
        error = RebalanceFailed(message, model=self.name, layers=job.layers,
                                ranks=(self._rank,))
        error.__cause__ = exc
        return error

    # -- rounds and failure -------------------------------------------------------------

    def _launch_round(self, job: Job, step: int, phase: str, ready: bool) -> ReadinessRound:
        if self._faults is not None:
            ready = self._faults.report_ready(self.name, phase, job.layers, step, ready)
        flags = encode_flags(self._rank, self._world, ready=ready,
                             errored=job.local_error is not None or job.fatal_error is not None,
                             timed_out=time.monotonic() > job.deadline, step=step,
                             epoch=self.epoch)
        return self._allreduce.launch(flags)

    async def _outcome(self, round_: ReadinessRound, step: int) -> RoundOutcome:
        timeout = self.config.peer_timeout_s
        job = self._job
        if self._synchronous and job is not None:
            # In one synchronous step a peer launches its round only once its own
            # transfer is done or its phase deadline passed: wait for that, and a
            # timeout more, or a rank that launched at once gives up just as its
            # peers answer, and the failure loses its cause.
            timeout += max(0.0, job.deadline - time.monotonic())
        values = await wait_round(round_, timeout, self._who(step))
        return RoundOutcome.decode(values, self._world)

    def _who(self, step: int) -> str:
        return f"rank {self._rank} (model {self.name!r}, step {step})"

    def _launch_load(self, load: npt.NDArray[np.int64], step: int) -> ReadinessRound:
        """The load round: this rank's window, a digest of its maps, its step and epoch."""
        return self._allreduce.launch(with_header(
            with_digest(load.ravel(), self._rank, self._world, maps_digest(self._p2l)),
            self._rank, self._world, step, self.epoch))

    def _read_load(self, values: npt.NDArray[np.int64],
                   step: int) -> npt.NDArray[np.int64] | None:
        """The summed load [L, E] of a load round, or None (the rebalance failed on
        every rank alike) if the ranks disagree on the step, epoch or maps.

        Maps differ after a commit that failed on one rank once every rank had
        agreed to it (its peers committed, it could not). Planning from
        different maps would give each rank another transfer plan: sends and
        receives of other sizes, which gloo answers by aborting the process."""
        if self._check_header(values, step):
            return None
        body = split_header(values, self._world)[0]
        load, digests = split_digests(body, self._world)
        differ = maps_disagreement(digests)
        if differ is not None:
            self._fail(step, f"model {self.name!r}: planning failed: {differ} (a commit "
                       "failed there after every rank agreed to it); planning from different "
                       "maps would move other bytes on every rank, so nothing is moved",
                       ranks=_named_ranks(differ))
            return None
        return load.reshape(self.placement.num_layers, -1)

    def _check_header(self, values: npt.NDArray[np.int64], step: int) -> bool:
        """Fail on every rank alike if the ranks disagree on the step or epoch."""
        disagreement = split_header(values, self._world)[1].disagreement()
        if disagreement is None:
            return False
        job = self._job
        self._fail(step, f"model {self.name!r}: {self._where(job) if job else 'planning'} "
                   f"failed: {disagreement}; a rank whose step counter drifted would commit "
                   "a pass early or late, so nothing more is committed")
        return True

    def _check_outcome(self, job: Job, step: int, outcome: RoundOutcome) -> bool:
        """Fail the rebalance if the round says so (on every rank alike); True if failed."""
        disagreement = outcome.header.disagreement() if outcome.header is not None else None
        if disagreement is not None:
            self._fail(step, f"model {self.name!r}: {self._where(job)} failed: "
                       f"{disagreement}; a rank whose step counter drifted would commit a "
                       "pass early or late, so nothing more is committed")
            return True
        if not outcome.failed:
            return False
        where = self._where(job)
        if outcome.errored_ranks:
            cause = job.fatal_error or job.local_error
            detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
            self._fail(step, f"model {self.name!r}: {where} failed: rank(s) "
                       f"{list(outcome.errored_ranks)} reported an error{detail}",
                       cause=cause, ranks=outcome.errored_ranks)
        else:
            self._fail(step, f"model {self.name!r}: {where} timed out after "
                       f"{self.config.peer_timeout_s:g} s waiting for rank(s) "
                       f"{list(outcome.not_ready_ranks)}", ranks=outcome.not_ready_ranks)
        return True

    def _fail_locally(self, job: Job, step: int, exc: BaseException) -> None:
        """A collective broke or never answered: no agreement is possible any more.

        The heartbeats name the peers that went quiet (a died or wedged rank).
        """
        if isinstance(exc, (PeerTimeout, RoundAbandoned)):
            # The round's verdict, the same words on every rank (rounds.wait_round).
            silent = self._liveness.silent_ranks(wait=0) if self._liveness is not None else None
            dead = f"; rank(s) {list(silent)} stopped answering (no heartbeat)" if silent else ""
            self._fail(step, f"model {self.name!r}: {self._where(job)} failed{dead}: {exc}",
                       cause=exc, ranks=tuple(silent or ()) or _named_ranks(str(exc)))
            return
        silent = self._liveness.silent_ranks() if self._liveness is not None else None
        if silent:
            who = f"; rank(s) {list(silent)} stopped answering (no heartbeat)"
        elif silent is None and self._liveness is not None:
            who = "; the store host (rank 0) is unreachable, so it may be the missing rank"
        else:
            who = ""
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        self._fail(step, f"model {self.name!r}: {self._where(job)} failed on rank "
                   f"{self._rank}{who} ({detail})", cause=exc, ranks=tuple(silent or ()))

    def _where(self, job: Job) -> str:
        return f"layer(s) {list(job.layers)}" if job.layers else "planning"

    def _fail(self, step: int, message: str, *, cause: BaseException | None = None,
              ranks: tuple[int, ...] = ()) -> None:
        job = self._job
        layers = job.layers if job is not None else ()
        if job is not None and job.staged is not None:
            job.staged.release()
        if job is not None and job.plan_future is not None and job.planner is not None \
                and not job.plan_future.done():
            self._held.append((job.plan_future, job.planner))
        self._job = None
        self.epoch += 1
        if self.lifecycle.may_fire("fail"):
            self._fire("fail", step)
        self.stats.failed += 1
        self.stats.last_error = message
        self._emit("failure", step, "fail", layers=layers, error=message)
        log.error("%s (step %d; committed layers stay committed, the rest keep their old "
                  "placement)", message, step)
        if self.config.on_failure == "raise":
            raise RebalanceFailed(message, model=self.name, layers=layers, ranks=ranks) from cause

    def report_error(self, exc: BaseException) -> None:
        """Have the next readiness round report `exc` from this rank, so every rank
        leaves the rebalance in flight together (no-op when none is)."""
        if self._job is not None:
            self._job.local_error = exc

    def abort(self, step: int, reason: str) -> None:
        """Leave an in-flight rebalance locally (used when the runtime is closed)."""
        if self._job is not None:
            job, self._job = self._job, None
            if job.staged is not None:
                job.staged.release()
            self._fire("fail", step)
            self.stats.failed += 1
            self.stats.last_error = f"model {self.name!r}: aborted: {reason}"

    def _fire(self, trigger: str, step: int, facts: lc.Facts | None = None) -> None:
        source = self.state
        dest = self.lifecycle.fire(trigger, step, facts)
        entered_step, entered_at = self._entered
        now = time.monotonic()
        self.stats.add_time(source, step - entered_step, now - entered_at)
        self._entered = (step, now)
        log.debug("eplb transition: model=%s rank=%d step=%d %s -> %s trigger=%s "
                  "seconds_in_source=%.6f", self.name, self._rank, step, source, dest, trigger,
                  now - entered_at)
        self._hooks.emit(LifecycleEvent("transition", self.name, step, source, dest, trigger,
                                        seconds_in_source=now - entered_at))

    def _emit(self, kind: str, step: int, trigger: str, *, layers: tuple[int, ...] = (),
              error: str | None = None) -> None:
        state = self.state
        self._hooks.emit(LifecycleEvent(kind, self.name, step, state, state, trigger,
                                        layers, error))

    # -- elastic resizing (the protocol is in _runtime/elastic.py) ---------------------------

    def transition(self, trigger: str, step: int, facts: lc.Facts | None = None) -> None:
        """Fire `trigger` at `step` (logged, timed and emitted like every transition)."""
        self._fire(trigger, step, facts)

    @property
    def window(self) -> LoadWindow:
        return self._window

    @property
    def num_groups(self) -> int:
        return self._num_groups

    def resize(self, placement: Placement, *, allreduce: AllReduce, mover: WeightMover,
               liveness: Heartbeat | None,
               carried: npt.NDArray[np.int64] | None = None, carried_passes: int = 0) -> None:
        """Serve `placement`, planned for a new rank count, over new transports.

        The weights are already in place (the reconfiguration committed them).
        The maps and the load view change shape with the slot count, so they are
        new tensors, handed to the model with `set_eplb_state` again. The window
        restarts under the new map; `carried` (physical load [L, P'] under
        `placement`) seeds it with the load recorded before the change, so the
        next plan still sees it.
        """
        device = self._load_view.device
        self._allreduce, self._mover, self._liveness = allreduce, mover, liveness
        self._rank, self._world = allreduce.rank, allreduce.world_size
        self.placement = placement
        self._p2l = placement.physical_to_logical.copy()
        maps = placement.to_torch(device)
        self._load_view = torch.zeros(placement.num_layers, placement.num_physical,
                                      dtype=torch.int64, device=device)
        self._l2p, self._rc = maps.logical_to_physical, maps.replica_count
        self._pending = 0
        self._window = LoadWindow(-(-self.config.window_size // self._record_every),
                                  placement.num_layers, placement.num_physical,
                                  placement.num_logical, device)
        self._window.set_map(self._p2l)
        if carried is not None:
            self._window.record(torch.from_numpy(np.ascontiguousarray(carried)).to(device),
                                max(int(carried_passes), 1))
        if self._balance_log is not None:
            self._balance_log = BalancednessLog(self.name, self.config, allreduce,
                                                placement.num_layers, placement.num_physical)
        self.model.set_eplb_state(self._load_view, self._l2p, self._rc)

    # -- the synchronous path -----------------------------------------------------------

    async def rearrange_now(self, step: int, load: npt.NDArray[np.int64] | None = None) -> None:
        """The whole rebalance inside this step (``use_async=False``, `rearrange()`).

        Goes through the same states and records the same transitions, all at
        `step`; waits happen here instead of being spread over later steps.
        """
        if self._job is not None:
            raise RuntimeError(f"model {self.name!r}: a rebalance is already in flight")
        self._begin(step)
        job = self._job
        assert job is not None
        self._synchronous = True
        try:
            local = self._window.snapshot().logical() if load is None else load
            values = await wait_round(self._launch_load(np.asarray(local), step),
                                      self.config.peer_timeout_s, self._who(step))
            job.reduced_load = self._read_load(values, step)
            if job.reduced_load is None:
                return
            future: Future[Planned] = Future()
            try:
                future.set_result(self._plan(job.reduced_load, self._p2l.copy(), step))
            except Exception as exc:
                future.set_exception(exc)
            job.plan_future = future
            outcome = await self._outcome(
                self._launch_round(job, step, "planning", self._plan_ready(job)), step)
            if self._check_outcome(job, step, outcome):
                return
            self._agree_on_plan(job, step)
            while self._job is not None:
                if self.state == lc.STAGING:
                    await self._until(lambda: self._transfer_ready(job) or
                                      job.local_error is not None, job)
                    job.round = self._launch_round(job, step, "staging",
                                                   self._transfer_ready(job))
                    self._fire("round_launched", step)
                # else a round was relaunched after a not-ready answer: read it now
                job.phase, job.due = "transfer_round", step
                await self._advance(job, step)
        except RebalanceFailed:
            raise
        except Exception as exc:
            if self._job is not None:
                self._fail_locally(self._job, step, exc)
            else:
                raise
        finally:
            self._synchronous = False

    async def _until(self, condition: Callable[[], bool], job: Job) -> None:
        while not condition():
            if time.monotonic() > job.deadline:
                return  # the round reports timed_out; every rank fails together
            await pause(POLL_S)


def _copy_rows(target: torch.Tensor, rows: npt.NDArray[np.int64], layers: list[int]) -> None:
    """``target[layer] = rows[layer]`` for `layers`, queued on the current stream
    without a host wait: from pinned memory, row by row. A pageable
    host-to-device copy waits for the stream first, and so does indexing a
    CUDA tensor with a list (torch copies the index over): the host would wait
    for the forward pass in flight (`test_step_never_waits_for_the_pass_in_flight`
    saw steps held ~0.2 s behind a 0.2 s kernel on 2 H200s)."""
    source = torch.from_numpy(np.ascontiguousarray(rows[layers]))
    cuda = target.is_cuda
    if cuda:
        source = source.pin_memory()  # the caching host allocator keeps it until copied
    for i, layer in enumerate(layers):
        target[layer].copy_(source[i], non_blocking=cuda)


def _identity(weights: Any, layers: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Which memory `layers`' weight tensors are: reallocation changes it."""
    return tuple((id(t), t.data_ptr()) for layer in layers for t in weights[layer])


def _named_ranks(verdict: str) -> tuple[int, ...]:
    """The ranks a round's verdict names as late ("rank(s) [2, 3] had not launched")."""
    marker = "rank(s) ["
    start = verdict.find(marker)
    if start < 0:
        return ()
    inner = verdict[start + len(marker):verdict.find("]", start)]
    return tuple(int(r) for r in inner.split(",") if r.strip().isdigit())
