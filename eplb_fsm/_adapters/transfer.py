"""The transfer engine: executes a `TransferPlan` on torch.distributed.

Why it is shaped this way:

- **Stage, then commit.** Live weights serve traffic until every rank has the
  new ones, so `stage()` writes only into a side *staging* buffer; `commit()`
  copies from it into the live slots at the step the runtime agreed on, and
  `release()` drops it on abort, leaving the live weights as they were. A
  rank's local moves (an expert it already holds, into another slot) are not
  staged: the commit copies them slot to slot, ordered so that no slot is
  read after it was overwritten (`_core.commit_order`).
- **One message per peer, packed.** Everything a rank sends to one peer is
  packed into one send buffer and goes as one message, received straight
  into the peer's staging buffer (layout: `_core.transfer_schedule`). NCCL
  pays a fixed cost per operation (84 per-tensor messages: 5.5 ms, one per
  pair: 3.5 ms, H200s), and bandwidth grows with the amount in flight
  (DESIGN.md: ~110-160 GB/s per rank at 44 MB, ~330 GB/s at 704 MB). The
  pack is a device copy at HBM speed, about a tenth of the NVLink time.
- **The agreed step only launches.** The schedule (who sends what, in which
  order, at which offset) and the `Launch` (byte layout, each pull's source)
  are computed by `prepare()` in the runtime's planning thread; for weights
  that are still the memory `share_weights` validated, `stage()` checks no
  more than that before its first copy. `stage()` allocates, packs,
  launches, then queues the pulls *behind* the launch so they overlap the
  network, not delay it. With ``pieces > 1`` packing piece k+1 also overlaps
  sending piece k.
- **Never block the serving loop, and pay nothing per byte on it.** `stage()`
  validates (cheap, and where every rank raises alike), hands the launch to
  the engine's one long-lived worker thread (`launcher.Launcher`) and
  returns: the serving thread's share of a launching step is a hand-off and,
  later, polls of a flag, whatever the bytes. The worker allocates, packs,
  posts the sends and receives and queues the pulls, in the order transfers
  were staged (NCCL pairs point-to-point work in issue order), and never
  waits for a transfer. On GPU its copies and the launch run on a side
  stream that first waits on the serving thread's current stream as it was
  at the agreed step (an event recorded by `stage()`, when it packs live
  slots; a stage that only pulls has nothing to wait for), the side stream
  then waits on the NCCL work, and an event is recorded; `ready()` only asks
  ``Event.query()`` and ``Work.is_completed()``. On CPU (gloo), copies are
  plain memcpys on the worker, into buffers reused from earlier transfers
  (`launcher.BufferPool`: a fresh buffer's page faults cost more than the
  copy), and the sends/receives run on gloo's threads; gloo's send/recv work
  only notices its own completion inside ``wait()``, so a daemon thread
  waits and `ready()` reads its flag. A worker that raises makes the
  handle's `ready()` raise, as a failed transfer does. One exception keeps
  the launch on the serving thread (``launch="auto"``): an NCCL transfer
  group that is WORLD, which the forward pass may use too -- two threads
  issuing NCCL work on one communicator would order it differently on
  different ranks (docs/design.md).
- **NCCL's first-use rule.** ``batch_isend_irecv`` on NCCL requires every
  rank of the group to take part when it is the group's *first* collective
  (torch docs); later batches may involve a subset. A rank with nothing to
  send or receive cannot take part (torch rejects an empty op list), so the
  engine runs one tiny all-reduce on the group the first time it stages on
  NCCL (or when `warm_up()` is called), creating the communicator on every
  rank; afterwards idle ranks simply skip the batch. `warm_up()` also sends
  one element around a ring, so that NCCL's send/recv kernels load at
  start-up: their first launch blocks the host behind every running kernel.
- **Sends are safe to read until every rank is ready.** `ready()` covers this
  rank's sends as well as its receives, and the protocol commits only once
  every rank is ready, so no live slot is overwritten while it is packed.
- **Within a node, receivers pull** (``path="auto"``, the default). NCCL's
  kernels occupy SMs and slowed a concurrent GEMM stream by 27-40% on H200s;
  a copy-engine copy out of a peer's memory slowed it by 5-9% at higher
  bandwidth. After `share_weights` (a collective, once per set of weights),
  a receiver copies each expert it needs from a same-node sender straight
  out of the sender's *live* weights into its staging row, on its side
  stream, after the network launch; the sender does nothing for that pair.
  No sender-side staging is needed because a sender overwrites its live
  slots only at commit, and no rank commits before every rank -- each
  rank's `ready()` covering its own pulls -- has reported ready (docs/transfers.md).
  Pairs on different nodes, or that could not map each other's weights,
  keep send/recv; every rank derives the same per-pair choice from facts the
  sharing collective made common (`_core.transfer_channels`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from .._core.transfer_channels import ChannelMap, TransferPath, check_path
from .._core.transfer_plan import check_maps, plan_layers
from .._core.transfer_schedule import Layout, RankSchedule, aligned, expert_stride, schedule
from .launcher import BufferPool, Launcher
from .prepared import Launch, PreparedTransfer, make_launch
from .pull import SharedWeights
from .pull import share_weights as _share_weights
from .staged import (
    InFlight,
    SlotBytes,
    StagedLayers,
    Waiter,
    Weights,
    current_slots,
    slot_nbytes,
)

if TYPE_CHECKING:
    from .interfaces import StagedTransfer, WeightMover

__all__ = ["PreparedTransfer", "StagedLayers", "TransferEngine"]

log = logging.getLogger("eplb_fsm")
_unshared_told = False


def _tell_unshared() -> None:
    global _unshared_told
    _unshared_told = True
    log.info("transfer_path='auto': expert weights were not shared "
             "(TransferEngine.share_weights), so every pair uses send/recv")


class TransferEngine:
    """Moves expert weights for a new placement over a torch.distributed group.

    Implements the `WeightMover` protocol. The backend follows the group and
    the weights' device: gloo with CPU tensors, NCCL with CUDA tensors (a
    group with both, ``"cpu:gloo,cuda:nccl"``, serves both). With NCCL, call
    ``torch.cuda.set_device`` first (torch requires it for batched P2P).

    `node_size` (ranks per node) makes the plan prefer same-node senders,
    and splits a host into nodes of that many ranks for the pull path.
    `pieces` splits each peer's message into that many launches so that
    packing overlaps sending; ``"auto"`` (the default) uses 2 for large
    stages and 1 otherwise (see `_core.transfer_schedule`).

    `path` picks the channel per pair of ranks once `share_weights` has run:
    ``"auto"`` pulls within a node where the pair could map each other's
    weights and sends across nodes (falling back to send/recv, logged once,
    where it cannot pull); ``"nccl"`` always sends; ``"pull"`` pulls every
    pair and raises where it cannot. `cpu_group` (default: `group`) carries
    the handle-sharing collective. Every rank of the group must use the same
    settings.

    `launch` says which thread launches transfers: ``"worker"`` (the engine's
    launch worker: `stage()` costs the serving thread O(1) in bytes),
    ``"inline"`` (the caller, inside `stage()`), or ``"auto"`` (the default):
    the worker, except on an NCCL group that is WORLD with peers, which the
    forward pass may share (NCCL work on one communicator must be issued in
    one order on every rank, so only one thread may issue it). Give the
    runtime its own NCCL group to have the worker launch there too.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 device: torch.device | str | None = None, node_size: int | None = None,
                 pieces: int | Literal["auto"] = "auto", path: str = "auto",
                 cpu_group: dist.ProcessGroup | None = None,
                 launch: Literal["auto", "worker", "inline"] = "auto") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TransferEngine needs an initialized torch.distributed "
                               "process group (dist.init_process_group)")
        if node_size is not None and (not isinstance(node_size, int) or node_size < 1):
            raise ValueError(f"node_size must be a positive int or None, got {node_size!r}")
        if pieces != "auto" and (not isinstance(pieces, int) or isinstance(pieces, bool)
                                 or pieces < 1):
            raise ValueError(f"pieces must be a positive int or 'auto', got {pieces!r}")
        if launch not in ("auto", "worker", "inline"):
            raise ValueError(f"launch must be 'auto', 'worker' or 'inline', got {launch!r}")
        self.path: TransferPath = check_path(path, "path")
        self._launch_mode = launch
        self._on_worker: dict[str, bool] = {}  # device type -> whether the worker launches
        self._cpu_group = cpu_group
        self._shared: list[SharedWeights] = []
        self._said: set[str] = set()  # log lines already written (each once per engine)
        self._group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._device = torch.device(device) if device is not None else None
        self._node_size = node_size
        self._pieces = pieces
        # device -> (side stream, the event it waits on): one event, recorded again
        # per stage, instead of a new one each time.
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Event]] = {}
        self._warm = False
        self._backends: dict[str, str] = {}  # device type -> the group's backend for it
        self._draining: list[InFlight] = []
        self._commits: list[torch.cuda.Event] = []  # queued commits not yet run
        self._waiter = Waiter()
        self._pool = BufferPool()  # CPU staging and send buffers, reused
        self._side_lock = threading.Lock()
        # Started now, not at the first stage (a thread start costs the caller ~1.6 ms
        # on a loaded 2-core host); it ends when the engine is closed or collected.
        self._launcher = Launcher() if launch != "inline" else None
        if self._launcher is not None:
            weakref.finalize(self, self._launcher.close)
        # layer -> one slot's bytes per tensor, as last staged: written by the
        # serving thread, read by prepare() in the planning thread when no
        # shared weights fit its maps (several models may share one engine).
        self._nbytes: dict[int, tuple[int, ...]] = {}

    # -- the WeightMover protocol ----------------------------------------------------------

    def prepare(self, old_physical_to_logical: npt.NDArray[np.int64],
                new_physical_to_logical: npt.NDArray[np.int64],
                layers: Sequence[int]) -> PreparedTransfer:
        """The transfer plan of `layers` and this rank's schedule, for
        `stage(prepared=...)`.

        Pure and thread-safe: the runtime calls it in its planning thread, so
        the agreed staging step only launches work. Planning a DeepSeek-V3
        layer costs about 1 ms of Python, which would otherwise sit on the
        serving thread before every launch.
        """
        plan = plan_layers(old_physical_to_logical, new_physical_to_logical, self.world_size,
                           layers, node_size=self._node_size)  # validates the maps
        sched = schedule(plan, self.rank)
        rows, cols = np.shape(old_physical_to_logical)  # 2-D: plan_layers checked
        maps_shape = (int(rows), int(cols))
        # The byte layout needs the weights' sizes, which only stage() sees. Lay
        # out for the weights these maps are for: the latest shared ones of their
        # shape (a server may share a main and a draft model with one engine),
        # with their sizes; else with the sizes last staged. stage() uses this
        # launch if it still holds (or makes another).
        shared = next((s for s in reversed(self._shared)
                       if (len(s.fingerprints), s.num_local * self.world_size) == maps_shape),
                      None)
        known: Mapping[int, tuple[int, ...]] = (
            {layer: tuple(t.nbytes for t in shared.own_slots[layer]) for layer in sched.layers}
            if shared is not None else self._nbytes)
        launch = None
        if all(layer in known for layer in sched.layers):
            launch = make_launch(sched, {layer: known[layer] for layer in sched.layers}, shared,
                                 self._pieces)
        return PreparedTransfer(plan, sched, maps_shape, launch)

    def stage(self, old_physical_to_logical: npt.NDArray[np.int64],
              new_physical_to_logical: npt.NDArray[np.int64], layers: Sequence[int],
              expert_weights: Weights, prepared: Any = None, tag: int = 0) -> StagedLayers:
        """Launch the transfers of `layers` into a staging buffer; returns at once.

        Collective: every rank of the group calls it at the same agreed step, with
        the same maps and layers and its own weights (same shapes on every rank).
        `prepared` is what `prepare` returned for the same maps and layers.

        `tag` (gloo; every rank passes the same one) keeps this transfer's
        messages apart from any other's: a message a failed rank never matched
        stays posted, and on the default tag it would pair with the next
        transfer's message between the same ranks, whose size differs, and
        gloo aborts the process. The runtime tags each transfer by its agreed
        step and model. NCCL has no tags (docs/design.md, failure domains).
        """
        if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < 2 ** 31:
            raise ValueError(f"tag must be an int in [0, 2**31), got {tag!r}")
        if prepared is None:
            prepared = self.prepare(old_physical_to_logical, new_physical_to_logical, layers)
        elif not (isinstance(prepared, PreparedTransfer) and prepared.layers == tuple(layers)
                  and prepared.plan.num_ranks == self.world_size
                  and prepared.schedule.rank == self.rank):
            raise ValueError(f"prepared must be this engine's prepare() of layers "
                             f"{tuple(layers)}")
        launch = prepared.launch
        shared = launch.shared if launch is not None else None
        if (shared is not None and any(s is shared for s in self._shared)
                and np.shape(old_physical_to_logical) == prepared.maps_shape
                and len(expert_weights) == prepared.maps_shape[0]
                and shared.reallocated(expert_weights, prepared.layers) is None):
            # The common case, kept short because it delays the first copy: the
            # staged layers' tensors are the memory shared under a record still
            # current, so their shapes, dtypes and device are the ones
            # check_weights passed then, and prepare() made the launch for them
            # (its maps matched those weights' shape).
            assert launch is not None
            device, problem = shared.device, ""
            nbytes = launch.nbytes
        else:
            device = self.check_weights(expert_weights, np.shape(old_physical_to_logical),
                                        prepared.layers)
            shared, problem = self._shared_for(expert_weights, prepared.layers)
            nbytes = {layer: tuple(slot_nbytes(w) for w in expert_weights[layer])
                      for layer in prepared.layers}
            self._nbytes.update(nbytes)
            if launch is None or launch.shared is not shared or launch.nbytes != nbytes:
                launch = None  # laid out by the worker: O(slots)
        self._prune()
        return self._hand_off(prepared.schedule, expert_weights, device, launch, shared, nbytes,
                              problem, tag)

    def close(self) -> None:
        """End the launch worker once the transfers already staged are launched, and
        drop pooled buffers. Later `stage()` calls raise."""
        if self._launcher is not None:
            self._launcher.close()
        self._pool.clear()

    @property
    def launcher(self) -> Launcher | None:
        """The launch worker (None with ``launch="inline"``)."""
        return self._launcher

    @property
    def pool(self) -> BufferPool:
        """CPU buffers kept for reuse between transfers."""
        return self._pool

    def share_weights(self, expert_weights: Weights) -> ChannelMap:
        """Collective: share handles to `expert_weights` with same-node peers and
        agree on every pair's channel; returns the agreed `ChannelMap`.

        All ranks call it together (on the CPU group), once per set of weights
        -- at warm-up, when a model is added -- and again whenever the tensors
        are reallocated: a `stage()` whose weights no longer are the memory
        shared still launches (so peers' messages stay matched) but its
        `ready()` raises, naming this rank, which the runtime turns into an
        agreed failure; nothing is committed from stale memory. CPU weights
        are pullable only when they live in shared memory
        (`eplb_fsm.transfer.shared_empty`). With ``path="pull"`` it raises
        ValueError on every rank when some pair cannot pull.
        """
        if not expert_weights or not expert_weights[0]:
            raise ValueError("expert_weights must hold at least one layer of tensors")
        num_local = expert_weights[0][0].shape[0]
        device = self.check_weights(expert_weights,
                                    (len(expert_weights), num_local * self.world_size))
        group = self._cpu_group if self._cpu_group is not None else self._group
        shared = _share_weights(expert_weights, group, self.path, device, self._node_size)
        # One record per set of weights: a re-share replaces the old one.
        self._shared = [s for s in self._shared if not s.matches(expert_weights)
                        and s.weights is not expert_weights] + [shared]
        if shared.channels.fallbacks:
            mine = [f for f in shared.channels.fallbacks if self.rank in f[:2]]
            # On GPU a failed pull is news (peer access or IPC refused): WARNING. On
            # CPU, weights outside shared memory are the ordinary case: INFO.
            level = logging.WARNING if device.type == "cuda" else logging.INFO
            self._say("fallback", "transfer_path=%r: %d pair(s) of ranks cannot pull and use "
                      "send/recv instead; this rank's: %s", self.path,
                      len(shared.channels.fallbacks),
                      "; ".join(f"{s}->{d} ({why})" for s, d, why in mine) or "none",
                      level=level)
        return shared.channels

    def settled(self) -> bool:
        """Non-blocking: have this rank's committed copies run on the device?

        A commit only queues copies on the current stream. A peer that later
        *pulls* from this rank's live weights reads them from another process,
        outside this rank's stream order, so the runtime starts a new
        transfer only once every rank reports its earlier commits settled
        (the planning round carries this flag; see docs/transfers.md).
        """
        self._commits = [e for e in self._commits if not e.query()]
        return not self._commits

    # -- the rest of the public surface ------------------------------------------------------

    def check_weights(self, expert_weights: Weights, maps_shape: tuple[int, ...],
                      layers: Iterable[int] | None = None) -> torch.device:
        """Validate `expert_weights` against [L, P] maps; return the weights' device."""
        num_layers, num_physical = int(maps_shape[0]), int(maps_shape[1])
        num_local = num_physical // self.world_size
        if len(expert_weights) != num_layers:
            raise ValueError(f"expert_weights has {len(expert_weights)} layers but the maps "
                             f"have {num_layers}; one sequence of tensors per MoE layer")
        device = self._device
        for layer in range(num_layers) if layers is None else layers:
            for index, weight in enumerate(expert_weights[layer]):
                where = f"expert_weights[{layer}][{index}]"
                if not isinstance(weight, torch.Tensor) or weight.dim() < 1:
                    raise ValueError(f"{where} must be a tensor with the local slot as "
                                     "first dimension")
                if weight.shape[0] != num_local:
                    raise ValueError(
                        f"{where} has first dimension {weight.shape[0]}, expected "
                        f"{num_local} = {num_physical} slots / {self.world_size} ranks"
                    )
                if device is None:
                    device = weight.device
                elif weight.device != device:
                    raise ValueError(f"{where} is on {weight.device}, expected {device}: "
                                     "all expert weights must be on one device")
        device = device or torch.device("cpu")
        backend = self._backend_for(device)
        if backend == "gloo" and device.type != "cpu":
            raise ValueError(f"expert_weights are on {device}, but the group's backend for "
                             "them is gloo; use an NCCL group for CUDA tensors")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"expert_weights are on {device}, but the group's backend is "
                             "NCCL, which moves CUDA tensors only; use a gloo group")
        return device

    def rearrange(self, old_physical_to_logical: Any, new_physical_to_logical: Any,
                  expert_weights: Weights, *, layers_at_once: int = 1) -> int:
        """Blocking: stage, wait and commit every layer, `layers_at_once` per batch.

        Everything is validated before the first byte moves. Returns the bytes
        this rank received. All ranks call it together.
        """
        if not isinstance(layers_at_once, int) or layers_at_once < 1:
            raise ValueError(f"layers_at_once must be a positive int, got {layers_at_once!r}")
        old, new = check_maps(old_physical_to_logical, new_physical_to_logical,
                              self.world_size)
        device = self.check_weights(expert_weights, old.shape)
        received = 0
        for start in range(0, old.shape[0], layers_at_once):
            chunk = range(start, min(start + layers_at_once, old.shape[0]))
            handle = self.stage(old, new, chunk, expert_weights)
            handle.wait_blocking()
            # This rank's sends are done too, so overwriting its slots cannot race a
            # peer's send. A peer's *pull* from them is covered only by that peer's
            # ready(): with pulls, wait for every rank before committing.
            if handle.pulls:
                dist.barrier(group=self._cpu_group if self._cpu_group is not None
                             else self._group)
            handle.commit()
            received += handle.bytes_received
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # blocking means done
        return received

    def profile(self, expert_weights: Weights, layers_at_once: int = 1) -> int:
        """Allocate, then free, the largest staging memory `stage` can need for
        `layers_at_once` layers; transfer nothing. Returns those bytes.

        Worst case per layer: every local slot changes to a distinct expert
        (duplicates need no staging), and the send buffer holds one packed
        copy per slot of every other rank (each may be filled from this
        rank: a hot expert replicated everywhere). On GPU the memory
        is allocated on the side stream `stage` uses, so the caching allocator
        keeps it reserved for it. Local, not collective.
        """
        if not isinstance(layers_at_once, int) or layers_at_once < 1:
            raise ValueError(f"layers_at_once must be a positive int, got {layers_at_once!r}")
        if not expert_weights:
            return 0
        num_local = expert_weights[0][0].shape[0] if expert_weights[0] else 0
        self.check_weights(expert_weights, (len(expert_weights), num_local * self.world_size))
        device = self._resolve_device(expert_weights)
        per_layer = sorted((num_local * expert_stride(map(slot_nbytes, layer))
                            for layer in expert_weights), reverse=True)
        receive = sum(per_layer[:layers_at_once])
        send = receive * (self.world_size - 1)
        with self._on_side_stream(device):
            buffers = [torch.empty(n, dtype=torch.uint8, device=device)
                       for n in (receive, send) if n]
            del buffers
        return receive + send

    def warm_up(self, device: torch.device | str | None = None) -> None:
        """Collective: make sure the NCCL communicator exists on every rank, so that
        later batches may involve a subset of ranks, and that this process has
        launched NCCL's send/recv kernels once (a no-op on gloo).

        Why the send/recv: a kernel's first launch in a process blocks the host
        until every kernel running on the GPU has ended (CUDA loads modules
        lazily). Measured on 2 H200s, a process's first NCCL stage held the
        serving thread ~1 s behind a 1 s kernel; launched here, at start-up,
        it costs nothing later (docs/integration.md)."""
        if device is not None:
            target = torch.device(device)
        elif self._device is not None:
            target = self._device
        elif torch.cuda.is_available():
            target = torch.device("cuda", torch.cuda.current_device())
        else:
            return  # no CUDA device, so no NCCL communicator to create
        if self._warm or self._backend_for(target) != "nccl":
            return
        probe = torch.zeros(1, device=target)
        dist.all_reduce(probe, group=self._group)
        if self.world_size > 1:
            # A one-element ring on the side stream, which later stages use. The
            # stream waits for it; the host does not (inside a first stage, a host
            # wait would be the very stall this avoids).
            stream, _ = self._side(target)
            with torch.cuda.stream(stream):
                send = torch.zeros(1, device=target)
                back = torch.empty_like(send)
                ring = [self._op(dist.isend, send, (self.rank + 1) % self.world_size),
                        self._op(dist.irecv, back, (self.rank - 1) % self.world_size)]
                for work in dist.batch_isend_irecv(ring):
                    work.wait()
        self._warm = True

    # -- internals ---------------------------------------------------------------------------

    def _say(self, key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        """Log `message` once per engine and `key` (a fallback is news once, not per step)."""
        if key not in self._said:
            self._said.add(key)
            log.log(level, message, *args)

    def _shared_for(self, expert_weights: Weights,
                    layers: Sequence[int]) -> tuple[SharedWeights | None, str]:
        """The sharing record for `expert_weights`, and what is wrong with it ("" if
        nothing). Raises only where every rank raises alike (never shared + "pull")."""
        if not self._shared:
            if self.path == "pull" and self.world_size > 1:
                raise ValueError("transfer_path='pull' needs share_weights(expert_weights) "
                                 "on every rank before the first stage()")
            if self.path == "auto" and self.world_size > 1 and not _unshared_told:
                # Not a fault (send/recv is the documented default without sharing),
                # so INFO, once per process: rearrange_weights makes an engine per call.
                _tell_unshared()
            return None, ""
        for shared in self._shared:
            if shared.weights is expert_weights or shared.matches(expert_weights):
                where = shared.reallocated(expert_weights, layers)
                return shared, "" if where is None else where
        if len(self._shared) == 1:
            # Peers still route by the one agreement there is: launch by it, and fail.
            return self._shared[0], "expert_weights (not the tensors shared)"
        raise ValueError(f"rank {self.rank}: expert_weights are none of the weights passed "
                         "to share_weights(); call share_weights() on every rank again")

    def _backend_for(self, device: torch.device) -> str:
        backend = self._backends.get(device.type)
        if backend is None:  # a group's backends never change: ask once per device type
            name = str(dist.get_backend(self._group))
            backend = name
            if ":" in name:  # "cpu:gloo,cuda:nccl"
                mapping = dict(part.split(":", 1) for part in name.split(","))
                backend = mapping.get(device.type, "")
            self._backends[device.type] = backend
        return backend

    def _resolve_device(self, expert_weights: Weights) -> torch.device:
        if self._device is not None:
            return self._device
        for layer in expert_weights:
            for weight in layer:
                return weight.device
        return torch.device("cpu")

    def _peer(self, group_rank: int) -> int:
        return group_rank if self._group is None else dist.get_global_rank(self._group,
                                                                           group_rank)

    def _side(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Event]:
        side = self._streams.get(device)
        if side is None:
            with self._side_lock:  # the worker and the caller (profile, warm_up) both ask
                side = self._streams.get(device)
                if side is None:
                    side = self._streams[device] = (torch.cuda.Stream(device=device),
                                                    torch.cuda.Event())
        return side

    def _on_side_stream(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if device.type != "cuda":
            return contextlib.nullcontext()
        stream, _ = self._side(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(stream)

    def _keep_until_done(self, inflight: InFlight) -> None:
        self._draining.append(inflight)

    def _prune(self) -> None:
        if self._draining:
            self._draining = [f for f in self._draining if not f.done()]

    def _uses_worker(self, device: torch.device) -> bool:
        """Whether the worker launches transfers of `device`'s tensors (see `launch`)."""
        chosen = self._on_worker.get(device.type)
        if chosen is None:
            chosen = self._launcher is not None and (
                self._launch_mode == "worker" or self.world_size == 1
                or self._backend_for(device) != "nccl"
                or self._group not in (None, dist.group.WORLD))
            if not chosen and self._launcher is not None:
                self._say("inline", "transfers launch on the serving thread: the transfer group "
                          "is NCCL's WORLD, which the forward pass may share; give the runtime "
                          "its own group (EplbRuntime(group=dist.new_group(...))) to launch "
                          "them from the engine's worker", level=logging.INFO)
            self._on_worker[device.type] = chosen
        return chosen

    def _hand_off(self, sched: RankSchedule, expert_weights: Weights, device: torch.device,
                  launch: Launch | None, shared: SharedWeights | None,
                  nbytes: Mapping[int, tuple[int, ...]], problem: str,
                  tag: int) -> StagedLayers:
        """The serving thread's share of a launch: O(1) in bytes and slots. A fence on
        the current stream (GPU, when live slots may be packed), the handle, and the
        launch queued on the worker (or run here, ``launch="inline"``). `launch` is
        None when prepare() could not lay it out: the worker does."""
        cuda = device.type == "cuda"
        fence = None
        if cuda and (launch is None or launch.network):
            # Packing reads live slots that work queued on the current stream (a
            # commit) may still be writing: the side stream waits for the stream as
            # it is now. Pulls need no such wait: they write a fresh buffer and read
            # peers' slots, whose commits the protocol orders (settled(),
            # docs/transfers.md).
            fence = torch.cuda.Event()
            fence.record(torch.cuda.current_stream(device))
        error = None
        if problem:
            error = RuntimeError(
                f"rank {self.rank}: {problem} is not the memory shared with peers by "
                "share_weights() (reallocated?), so peers pulled stale weights from it; "
                "call share_weights() on every rank again")
        inflight = InFlight(self._waiter, cpu=not cuda, error=error)
        inflight.launch = launch
        handle = StagedLayers(sched, expert_weights, device, inflight, self._keep_until_done,
                              pulls=shared is not None and bool(shared.channels.pulls),
                              note_commit=self._commits.append,
                              own=shared.own_slots if shared is not None else None,
                              give_back=None if cuda else self._pool.give)
        job = functools.partial(self._launch, inflight, sched, expert_weights, device, nbytes,
                                shared, tag, fence)
        if self._launcher is not None and self._uses_worker(device):
            self._launcher.submit(job)
        else:
            job(inline=True)
            if inflight.launch_error is not None:
                # On the caller's thread a launch error raises, as it always did.
                self._keep_until_done(inflight)
                raise inflight.launch_error
        return handle

    def _launch(self, inflight: InFlight, sched: RankSchedule, expert_weights: Weights,
                device: torch.device, nbytes: Mapping[int, tuple[int, ...]],
                shared: SharedWeights | None, tag: int, fence: torch.cuda.Event | None,
                inline: bool = False) -> None:
        """Lay out (if prepare() could not), allocate, pack, post, queue the pulls: on
        the worker (or inline). Reports to `inflight`, never raises: a failure is the
        handle's error."""
        cuda = device.type == "cuda"
        works: list[Any] = []
        restore, caller_device = None, None
        try:
            launch: Launch = inflight.launch
            if launch is None:
                launch = inflight.launch = make_launch(sched, nbytes, shared, self._pieces)
            layout = launch.layout
            with torch.no_grad():
                if cuda:
                    stream, _ = self._side(device)
                    if inline:
                        restore = torch.cuda.current_stream(device)
                        caller_device = torch.cuda.current_device()
                    if fence is not None:
                        stream.wait_event(fence)
                    torch.cuda.set_stream(stream)  # also makes `device` current
                    if not self._warm:
                        self.warm_up(device)
                    staging = torch.empty(layout.staging_bytes, dtype=torch.uint8,
                                          device=device)
                else:
                    staging = self._pool.take(layout.staging_bytes)
                inflight.staging = staging
                if launch.network:
                    self._send_and_receive(layout, expert_weights, launch.shared, staging,
                                           inflight.buffers, tag, works)
                # Behind the launch, so the copy engines' reads of peers' memory
                # overlap the network.
                for tensor, slot, offset in launch.pulls:
                    tensor.to_buffer(staging, offset, slot)
                event = None
                if cuda:
                    for work in works:
                        work.wait()  # the side stream waits for NCCL; the host does not
                    event = torch.cuda.Event()
                    event.record(stream)
        except BaseException as exc:  # the handle's error: ready() raises it
            inflight.launch_failed(exc, works)
            return
        finally:
            if restore is not None:
                torch.cuda.set_stream(restore)
                if caller_device != restore.device_index:
                    torch.cuda.set_device(caller_device)
        inflight.launched(works, event)

    def _send_and_receive(self, layout: Layout, expert_weights: Weights,
                          shared: SharedWeights | None, staging: torch.Tensor,
                          buffers: list[torch.Tensor], tag: int,
                          works: list[Any]) -> None:
        """Pack and launch this rank's messages, piece by piece, appending the works
        to `works` as they are posted (so a failure midway still waits for them).
        The send buffer goes into `buffers` (kept alive until the sends are done)."""
        own = shared.own_slots if shared is not None else None
        mine = {layer: current_slots(expert_weights, layer, own)
                for layer in {layer for _, layer, _ in layout.packed}}
        packed = staging[:0]
        if layout.send_bytes:
            packed = (self._pool.take(layout.send_bytes) if staging.device.type == "cpu"
                      else torch.empty(layout.send_bytes, dtype=torch.uint8,
                                       device=staging.device))
            buffers.append(packed)
        done = 0
        for piece, upto in enumerate(layout.packed_per_piece):
            for offset, layer, src_slot in layout.packed[done:upto]:
                self._copy_slot(packed, offset, mine[layer], src_slot)
            done = upto
            ops = [self._op(dist.irecv, staging[begin:end], src, tag)
                   for src, begin, end in layout.recv_spans[piece]]
            ops += [self._op(dist.isend, packed[begin:end], dst, tag)
                    for dst, begin, end in layout.send_spans[piece]]
            # torch rejects an empty list; an idle rank simply has nothing to wait for.
            if ops:
                works.extend(dist.batch_isend_irecv(ops))

    @staticmethod
    def _copy_slot(buffer: torch.Tensor, offset: int, tensors: Sequence[SlotBytes],
                   slot: int) -> None:
        """Copy `slot` of every tensor of one layer into `buffer` at `offset`."""
        for t in tensors:
            t.to_buffer(buffer, offset, slot)
            offset += aligned(t.nbytes)

    def _op(self, op: Any, tensor: torch.Tensor, peer: int, tag: int = 0) -> dist.P2POp:
        return dist.P2POp(op, tensor, self._peer(peer), group=self._group, tag=tag)


if TYPE_CHECKING:  # mypy proves the classes satisfy the runtime's protocols

    def _is_weight_mover(engine: TransferEngine) -> WeightMover:
        return engine

    def _is_staged_transfer(handle: StagedLayers) -> StagedTransfer:
        return handle
