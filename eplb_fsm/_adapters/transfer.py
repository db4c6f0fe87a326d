"""The transfer engine: executes a `TransferPlan` on torch.distributed.

Why it is shaped this way:

- **Stage, then commit.** Live weights serve traffic until every rank has the
  new ones, so `stage()` writes only into a side *staging* buffer; `commit()`
  copies from it into the live slots at the step the runtime agreed on, and
  `release()` drops it on abort, leaving the live weights as they were. Local
  copies go through the staging buffer too: a slot may be overwritten by the
  same commit that reads it (two slots trading experts), so every source is
  read before anything is written.
- **One batch per stage.** All receives, sends and layers of one `stage()`
  call go into a single ``batch_isend_irecv`` (on NCCL: one grouped launch),
  because bandwidth grows with the amount in flight (see DESIGN.md: ~110-160
  GB/s per rank at 44 MB messages, ~330 GB/s at 704 MB on H200s). Each rank's
  receives land in one contiguous buffer, grouped by source rank.
- **Never block the serving loop.** On GPU the copies and the launch run on a
  side stream that first waits on the current one, the side stream then waits
  on the NCCL work, and an event is recorded; `ready()` only asks
  ``Event.query()`` and ``Work.is_completed()``. On CPU (gloo), local copies
  are plain memcpys done at stage time and the sends/receives run on gloo's
  threads; gloo's send/recv work only notices its own completion inside
  ``wait()``, so a daemon thread waits and `ready()` reads its flag.
- **NCCL's first-use rule.** ``batch_isend_irecv`` on NCCL requires every
  rank of the group to take part when it is the group's *first* collective
  (torch docs); later batches may involve a subset. A rank with nothing to
  send or receive cannot take part (torch rejects an empty op list), so the
  engine runs one tiny all-reduce on the group the first time it stages on
  NCCL (or when `warm_up()` is called), creating the communicator on every
  rank; afterwards idle ranks simply skip the batch.
- **Sends read the live weights directly** (no copy). That is safe because
  `ready()` covers this rank's sends as well as its receives, and the
  protocol commits only once every rank is ready, so no slot is overwritten
  while a peer still reads it. With ``coalesce=True`` a rank instead packs
  everything for one peer into one buffer and sends it as one message (more
  memory, fewer and larger messages); every rank must use the same setting.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from .._core.transfer_plan import RankPlan, Transfer, TransferPlan, check_maps, plan_layers

if TYPE_CHECKING:
    from .interfaces import StagedTransfer, WeightMover

__all__ = ["StagedLayers", "TransferEngine"]

_ALIGN = 256  # bytes; staging items start aligned so typed views and DMA stay fast
Weights = Sequence[Sequence[torch.Tensor]]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _slot_nbytes(weight: torch.Tensor) -> int:
    return math.prod(weight.shape[1:]) * weight.element_size()


def _typed_view(buffer: torch.Tensor, offset: int, nbytes: int,
                like: torch.Tensor) -> torch.Tensor:
    """The `nbytes` at `offset` of `buffer` seen as one slot of `like` (dtype, shape)."""
    return buffer[offset:offset + nbytes].view(like.dtype).view(like.shape[1:])


class _InFlight:
    """Launched work and what must stay alive until it is done (see `release`).

    On GPU, completion is ``Work.is_completed()`` plus the side stream's event.
    Gloo's send/recv work, however, reports ``is_completed() == False`` until
    someone calls ``wait()`` on it (measured with torch 2.13: the data had
    long arrived), has no future, and a ``wait(timeout)`` that expires closes
    the connection. So on CPU one daemon thread per stage calls ``wait()``
    (gloo releases the GIL there) and `done()` reads its flag.
    """

    def __init__(self, works: list[Any], event: torch.cuda.Event | None,
                 buffers: list[torch.Tensor]) -> None:
        self.works = works
        self.event = event
        self.buffers = buffers
        self.error: BaseException | None = None
        self._finished: threading.Event | None = None
        if event is None and works:
            self._finished = threading.Event()
            threading.Thread(target=self._wait_all, name="eplb-transfer-wait",
                             daemon=True).start()

    def _wait_all(self) -> None:
        assert self._finished is not None
        try:
            for work in self.works:
                work.wait()
        except BaseException as exc:  # reported to the caller by `StagedLayers.ready`
            self.error = exc
        finally:
            # The transfer is over: let go of its works and buffers now, not when
            # this thread object is finally collected (it may linger a while).
            self.works, self.buffers = [], []
            self._finished.set()

    def done(self) -> bool:
        if self._finished is not None:
            return self._finished.is_set()
        if not all(work.is_completed() for work in self.works):
            return False
        return self.event is None or bool(self.event.query())

    def block(self) -> None:
        if self._finished is not None:
            self._finished.wait()
        elif self.event is not None:
            self.event.synchronize()


class StagedLayers:
    """The `StagedTransfer` handle `TransferEngine.stage` returns.

    Holds the staging buffer of one or more layers. `commit` accepts an
    optional subset of layers, so several layers staged in one batch can be
    committed one per agreed step.
    """

    def __init__(self, engine: TransferEngine, plan: TransferPlan, expert_weights: Weights,
                 device: torch.device, inflight: _InFlight,
                 items: dict[tuple[int, int], list[torch.Tensor]],
                 bytes_received: int, staging_bytes: int) -> None:
        self._engine = engine
        self._plan = plan
        self._weights = expert_weights
        self._device = device
        self._inflight: _InFlight | None = inflight
        self._items = items  # (layer, expert) -> one staged view per weight tensor
        self._bytes_received = bytes_received
        self._staging_bytes = staging_bytes
        self._committed: set[int] = set()
        self._released = False
        self._completed = False

    # -- the StagedTransfer protocol -----------------------------------------------------

    @property
    def layers(self) -> tuple[int, ...]:
        return self._plan.layers

    @property
    def bytes_received(self) -> int:
        """Bytes this rank receives from peers for these layers (local copies excluded)."""
        return self._bytes_received

    def ready(self) -> bool:
        """True once this rank's receives, sends and local copies are complete.

        Never blocks: on GPU it polls ``Work.is_completed()`` and ``Event.query()``;
        on CPU it reads the flag of the thread waiting on gloo. Raises if the
        transfer failed (say, a peer died).
        """
        if self._released:
            raise RuntimeError("ready() after release(): this staged transfer was dropped")
        if self._completed:
            return True
        assert self._inflight is not None
        if not self._inflight.done():
            return False
        if self._inflight.error is not None:
            raise RuntimeError(f"the transfer of layers {self.layers} failed on rank "
                               f"{self._engine.rank}") from self._inflight.error
        self._completed = True
        return True

    def commit(self, layers: Iterable[int] | None = None) -> None:
        """Copy the staged slots of `layers` (default: all not yet committed) into the
        live weights. Call only once every rank is `ready()` for these layers.

        On GPU the copies run on the current stream after it waits on the
        staging event; the host does not wait. Only the slots the plan writes
        are touched; unchanged and vacated slots are not.
        """
        if self._released:
            raise RuntimeError("commit() after release(): the staging buffers are gone")
        chosen = self._pending() if layers is None else tuple(layers)
        if not chosen:
            return
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers {chosen} names a layer twice")
        for layer in chosen:
            if layer not in self._plan.layers:
                raise ValueError(f"layers holds {layer!r}, which was not staged "
                                 f"(staged: {self._plan.layers})")
            if layer in self._committed:
                raise ValueError(f"layer {layer} is already committed")
        if not self.ready():
            raise RuntimeError("commit() before ready(): the staged weights are incomplete")
        assert self._inflight is not None
        stream = None
        if self._device.type == "cuda":
            stream = torch.cuda.current_stream(self._device)
            if self._inflight.event is not None:
                stream.wait_event(self._inflight.event)
        rank = self._engine.rank
        with torch.no_grad():
            for layer in chosen:
                self._commit_layer(self._plan[layer].ranks[rank])
                self._committed.add(layer)
        if stream is not None:
            for buffer in self._inflight.buffers:
                buffer.record_stream(stream)  # reused only after these copies ran
        if not self._pending():
            self._drop()

    def release(self) -> None:
        """Drop the staging buffers without touching the live weights (abort path).

        If the transfers are still running, the engine keeps the buffers alive
        until they finish (peers will still write into them); nothing here waits.
        """
        if self._released:
            return
        self._released = True
        if self._inflight is not None and not self._completed and not self._inflight.done():
            self._engine._keep_until_done(self._inflight)
        self._drop()

    # -- helpers beyond the protocol -------------------------------------------------------

    @property
    def plan(self) -> TransferPlan:
        return self._plan

    @property
    def staging_bytes(self) -> int:
        """Bytes of staging memory this handle holds (receive and local-copy buffers)."""
        return self._staging_bytes

    async def wait(self, poll_interval: float = 0.0005) -> None:
        """Await `ready()` by polling it every `poll_interval` seconds (anyio)."""
        while not self.ready():
            await anyio.sleep(poll_interval)

    def wait_blocking(self) -> None:
        """Block the calling thread until `ready()` (the synchronous path only)."""
        if self._released:
            raise RuntimeError("wait_blocking() after release()")
        if self._inflight is not None and not self._completed:
            self._inflight.block()
        self.ready()

    def _pending(self) -> tuple[int, ...]:
        return tuple(layer for layer in self._plan.layers if layer not in self._committed)

    def _commit_layer(self, rank_plan: RankPlan) -> None:
        weights = self._weights[rank_plan.layer]
        fills = ([(c.dst_slot, c.expert) for c in rank_plan.local_copies]
                 + [(t.dst_slot, t.expert) for t in rank_plan.receives]
                 + [(d.dst_slot, d.expert) for d in rank_plan.duplicates])
        for slot, expert in fills:
            for weight, staged in zip(weights, self._items[(rank_plan.layer, expert)], strict=True):
                weight[slot].copy_(staged)

    def _drop(self) -> None:
        self._inflight = None
        self._items = {}


class TransferEngine:
    """Moves expert weights for a new placement over a torch.distributed group.

    Implements the `WeightMover` protocol. The backend follows the group and
    the weights' device: gloo with CPU tensors, NCCL with CUDA tensors (a
    group with both, ``"cpu:gloo,cuda:nccl"``, serves both). With NCCL, call
    ``torch.cuda.set_device`` first (torch requires it for batched P2P).

    `node_size` (ranks per node) makes the plan prefer same-node senders.
    `coalesce` packs each peer's sends into one message (see module docstring).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 device: torch.device | str | None = None, node_size: int | None = None,
                 coalesce: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TransferEngine needs an initialized torch.distributed "
                               "process group (dist.init_process_group)")
        if node_size is not None and (not isinstance(node_size, int) or node_size < 1):
            raise ValueError(f"node_size must be a positive int or None, got {node_size!r}")
        self._group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._device = torch.device(device) if device is not None else None
        self._node_size = node_size
        self._coalesce = bool(coalesce)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._warm = False
        self._draining: list[_InFlight] = []

    # -- the WeightMover protocol ----------------------------------------------------------

    def prepare(self, old_physical_to_logical: npt.NDArray[np.int64],
                new_physical_to_logical: npt.NDArray[np.int64],
                layers: Sequence[int]) -> TransferPlan:
        """The transfer plan of `layers`, for `stage(prepared=...)`.

        Pure and thread-safe: the runtime calls it in its planning thread, so
        the agreed staging step only launches work. Planning a DeepSeek-V3
        layer costs about 1 ms of Python, which would otherwise sit on the
        serving thread before every launch.
        """
        return plan_layers(old_physical_to_logical, new_physical_to_logical, self.world_size,
                           layers, node_size=self._node_size)  # validates the maps

    def stage(self, old_physical_to_logical: npt.NDArray[np.int64],
              new_physical_to_logical: npt.NDArray[np.int64], layers: Sequence[int],
              expert_weights: Weights, prepared: Any = None) -> StagedLayers:
        """Launch the transfers of `layers` into a staging buffer; returns at once.

        Collective: every rank of the group calls it at the same agreed step, with
        the same maps and layers and its own weights (same shapes on every rank).
        `prepared` is what `prepare` returned for the same maps and layers.
        """
        if prepared is None:
            plan = self.prepare(old_physical_to_logical, new_physical_to_logical, layers)
        elif isinstance(prepared, TransferPlan) and prepared.layers == tuple(layers) \
                and prepared.num_ranks == self.world_size:
            plan = prepared
        else:
            raise ValueError(f"prepared must be this engine's plan of layers {tuple(layers)}")
        device = self.check_weights(expert_weights, np.shape(old_physical_to_logical),
                                    plan.layers)
        self._prune()
        with torch.no_grad():
            return self._launch(plan, expert_weights, device)

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
            # peer's read: no barrier is needed before committing.
            handle.commit()
            received += handle.bytes_received
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # blocking means done
        return received

    def profile(self, expert_weights: Weights, layers_at_once: int = 1) -> int:
        """Allocate, then free, the largest staging memory `stage` can need for
        `layers_at_once` layers; transfer nothing. Returns those bytes.

        Worst case per layer: every local slot changes to a distinct expert
        (duplicates need no staging). With ``coalesce=True`` add the send
        buffer: each other rank may want each local expert. On GPU the memory
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
        per_layer = sorted((num_local * sum(_aligned(_slot_nbytes(w)) for w in layer)
                            for layer in expert_weights), reverse=True)
        receive = sum(per_layer[:layers_at_once])
        send = receive * (self.world_size - 1) if self._coalesce else 0
        with self._on_side_stream(device):
            buffers = [torch.empty(n, dtype=torch.uint8, device=device)
                       for n in (receive, send) if n]
            del buffers
        return receive + send

    def warm_up(self, device: torch.device | str | None = None) -> None:
        """Collective: make sure the NCCL communicator exists on every rank, so that
        later batches may involve a subset of ranks (a no-op on gloo)."""
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
        self._warm = True

    # -- internals ---------------------------------------------------------------------------

    def _backend_for(self, device: torch.device) -> str:
        name = str(dist.get_backend(self._group))
        if ":" in name:  # "cpu:gloo,cuda:nccl"
            mapping = dict(part.split(":", 1) for part in name.split(","))
            return mapping.get(device.type, "")
        return name

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

    def _on_side_stream(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if device.type != "cuda":
            return contextlib.nullcontext()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(stream)

    def _keep_until_done(self, inflight: _InFlight) -> None:
        self._draining.append(inflight)

    def _prune(self) -> None:
        self._draining = [f for f in self._draining if not f.done()]

    def _launch(self, plan: TransferPlan, expert_weights: Weights,
                device: torch.device) -> StagedLayers:
        rank = self.rank
        # Receives grouped by source rank; a stable sort keeps the plan's (layer,
        # dst slot) order within each source, the order the sender uses too.
        receives = sorted(plan.receives(rank), key=lambda t: t.src_rank)
        sends = sorted(plan.sends(rank), key=lambda t: t.dst_rank)
        copies: list[tuple[int, int, int]] = []  # (layer, expert, src slot), once per expert
        for rank_plan in plan.rank_plans(rank):
            seen: set[int] = set()
            for c in rank_plan.local_copies:
                if c.expert not in seen:
                    seen.add(c.expert)
                    copies.append((rank_plan.layer, c.expert, c.src_slot))

        # Bytes of one slot of each tensor, and of one expert (aligned), per layer.
        nbytes = {layer: [_slot_nbytes(w) for w in expert_weights[layer]]
                  for layer in plan.layers}
        stride = {layer: sum(_aligned(n) for n in sizes) for layer, sizes in nbytes.items()}

        # Layout of the staging buffer: receives by source, then local copies.
        offsets: list[tuple[int, int, int]] = []  # (layer, expert, offset)
        cursor = 0
        peer_spans: dict[int, list[int]] = {}
        for t in receives:
            span = peer_spans.setdefault(t.src_rank, [cursor, cursor])
            offsets.append((t.layer, t.expert, cursor))
            cursor += stride[t.layer]
            span[1] = cursor
        received = sum(sum(nbytes[t.layer]) for t in receives)
        for layer, expert, _ in copies:
            offsets.append((layer, expert, cursor))
            cursor += stride[layer]
        staging_bytes = cursor

        with self._on_side_stream(device):
            if device.type == "cuda":
                self.warm_up(device)
            staging = torch.empty(staging_bytes, dtype=torch.uint8, device=device)
            items: dict[tuple[int, int], list[torch.Tensor]] = {}
            for layer, expert, offset in offsets:
                views, at = [], offset
                for weight, n in zip(expert_weights[layer], nbytes[layer], strict=True):
                    views.append(_typed_view(staging, at, n, weight))
                    at += _aligned(n)
                items[(layer, expert)] = views
            for layer, expert, src_slot in copies:
                for weight, view in zip(expert_weights[layer], items[(layer, expert)], strict=True):
                    view.copy_(weight[src_slot], non_blocking=True)

            ops: list[dist.P2POp] = []
            buffers = [staging]
            if self._coalesce:
                for src, (begin, end) in peer_spans.items():
                    if end > begin:
                        ops.append(self._op(dist.irecv, staging[begin:end], src))
                packed = self._pack(sends, expert_weights, nbytes, stride, device)
                buffers.extend(packed.values())
                for dst, buffer in packed.items():
                    ops.append(self._op(dist.isend, buffer, dst))
            else:
                for t in receives:
                    for view in items[(t.layer, t.expert)]:
                        if view.numel():
                            ops.append(self._op(dist.irecv, view, t.src_rank))
                for t in sends:
                    for weight in expert_weights[t.layer]:
                        source = weight[t.src_slot]
                        if source.numel():
                            if not source.is_contiguous():
                                source = source.contiguous()
                                buffers.append(source)  # alive until the send is done
                            ops.append(self._op(dist.isend, source, t.dst_rank))
            # torch rejects an empty list; an idle rank simply has no work to wait for.
            works = list(dist.batch_isend_irecv(ops)) if ops else []
            event = None
            if device.type == "cuda":
                for work in works:
                    work.wait()  # the side stream waits for NCCL; the host does not
                event = torch.cuda.Event()
                event.record()
        inflight = _InFlight(works, event, buffers)
        return StagedLayers(self, plan, expert_weights, device, inflight, items, received,
                            staging_bytes)

    def _op(self, op: Any, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(op, tensor, self._peer(peer), group=self._group)

    def _pack(self, sends: Sequence[Transfer], expert_weights: Weights,
              nbytes: dict[int, list[int]], stride: dict[int, int],
              device: torch.device) -> dict[int, torch.Tensor]:
        """One buffer per destination, laid out exactly as the receiver's span."""
        sizes: dict[int, int] = {}
        for t in sends:
            sizes[t.dst_rank] = sizes.get(t.dst_rank, 0) + stride[t.layer]
        packed = {dst: torch.empty(n, dtype=torch.uint8, device=device)
                  for dst, n in sizes.items() if n}
        cursor: dict[int, int] = dict.fromkeys(packed, 0)
        for t in sends:
            if t.dst_rank not in packed:
                continue
            at = cursor[t.dst_rank]
            for weight, n in zip(expert_weights[t.layer], nbytes[t.layer], strict=True):
                _typed_view(packed[t.dst_rank], at, n, weight).copy_(weight[t.src_slot],
                                                                     non_blocking=True)
                at += _aligned(n)
            cursor[t.dst_rank] = at
        return packed


if TYPE_CHECKING:  # mypy proves the classes satisfy the runtime's protocols

    def _is_weight_mover(engine: TransferEngine) -> WeightMover:
        return engine

    def _is_staged_transfer(handle: StagedLayers) -> StagedTransfer:
        return handle
