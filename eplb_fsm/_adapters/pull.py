"""Handles to peers' live expert weights, for the pull path of `TransferEngine`.

A receiver on the same node as a sender can copy an expert straight out of
the sender's live weights instead of receiving a message: on GPU through
CUDA IPC (copy engines, no SMs: see `_core.transfer_channels` for the
measurements), on CPU through shared memory (so the whole protocol runs in CI
on gloo processes). This module makes that possible:

- `shared_empty` allocates a CPU tensor in a named POSIX shared-memory block
  that peers can map by name. Blocks are unlinked at process exit (and
  `unlink_shared` does it earlier); a killed process's blocks are unlinked by
  Python's resource tracker.
- `export` turns one weight tensor into a picklable `TensorHandle` (the block
  name and offsets; or torch's CUDA IPC handle), `open_handle` maps a peer's
  handle into this process.
- `share_weights` is the collective: two ``all_gather_object`` rounds over a
  CPU group — first every rank's handles and node, then which peers each
  rank could map — after which every rank holds the same facts and computes
  the same `ChannelMap`. It runs once per set of weights (and again after
  they are reallocated), never per step, so a blocking object collective is
  fine here.

CUDA: torch's ``reduce_tensor`` gives the IPC handle of the weight's
allocation; the receiver opens it *on its own device* (``cudaIpcOpenMemHandle``
with lazy peer access, which torch uses, maps a peer GPU's memory into the
current device's address space). The mapped tensor then looks local to
torch, so a pull is one ``cudaMemcpyAsync`` on the receiver's side stream,
carried out by a copy engine, with none of torch's cross-device stream
barriers. Whether the peer GPU is reachable is checked first
(``can_device_access_peer``, matched by device UUID so differing
``CUDA_VISIBLE_DEVICES`` orders are harmless); any failure marks the pair
unpullable and ``auto`` falls back to NCCL for it.
"""

from __future__ import annotations

import atexit
import itertools
import mmap
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import torch
import torch.distributed as dist

from .._core.transfer_channels import ChannelMap, decide_channels
from .staged import SlotBytes

__all__ = ["SharedWeights", "TensorHandle", "export", "open_handle", "owned_segments",
           "share_weights", "shared_empty", "unlink_shared"]

SHM_DIR = "/dev/shm"
_PREFIX = f"eplb_{os.getpid()}_"
_lock = threading.Lock()
_counter = itertools.count()
_owned: dict[str, int] = {}  # name -> bytes, blocks this process created and not unlinked
_blocks: dict[int, tuple[str, int]] = {}  # base address -> (name, bytes), this process's maps
_maps: dict[str, torch.Tensor] = {}  # name -> uint8 tensor over the whole block


def _map(name: str, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the whole block `name`, mapped once per process.

    Opened through its /dev/shm path rather than ``SharedMemory(name)``: in
    Python < 3.13 attaching registers the block with the resource tracker,
    which spawned ranks share with their parent, and the tracker would then
    unlink (or warn about) blocks it does not own.
    """
    with _lock:
        cached = _maps.get(name)
        if cached is not None:
            return cached
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            if os.fstat(fd).st_size < nbytes:
                raise ValueError(f"shared block {name} holds fewer than {nbytes} bytes")
            mapped = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        # frombuffer keeps the mmap alive (and unclosable) as long as the tensor lives.
        tensor = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes)
        _maps[name] = tensor
        _blocks[tensor.data_ptr()] = (name, nbytes)
        return tensor


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in a named shared-memory block, pullable by peers.

    Allocate expert weights with it (or copy them into it) on CPU ranks to
    let same-host peers pull from them; `TransferEngine.share_weights` finds
    the block behind each tensor and its views.
    """
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    dims = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ValueError(f"shape must be a sequence of ints >= 0, got {shape!r}")
    if not os.path.isdir(SHM_DIR):
        raise RuntimeError(f"shared_empty needs POSIX shared memory at {SHM_DIR} (Linux)")
    numel = 1
    for d in dims:
        numel *= d
    used = numel * torch.empty((), dtype=dtype).element_size()
    nbytes = max(used, 1)  # a block cannot be empty
    name = f"{_PREFIX}{next(_counter)}"
    # SharedMemory creates the block and registers it with the resource tracker
    # (the safety net if this process is killed); the mapping is ours.
    block = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
    block.close()
    with _lock:
        _owned[name] = nbytes
    return _map(name, nbytes)[:used].view(dtype).view(dims)


def unlink_shared() -> None:
    """Remove the names of every block this process created (idempotent).

    Memory stays mapped wherever it is in use; only new attaches fail. Runs
    at exit; call it earlier once every peer has mapped the weights.
    """
    with _lock:
        names = list(_owned)
        _owned.clear()
    for name in names:
        try:
            block = shared_memory.SharedMemory(name=name, create=False)
        except FileNotFoundError:
            continue
        block.close()
        block.unlink()  # also unregisters it from the resource tracker


def owned_segments() -> tuple[str, ...]:
    """Names of the blocks this process created and has not unlinked yet."""
    with _lock:
        return tuple(_owned)


atexit.register(unlink_shared)


# -- handles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorHandle:
    """What a peer needs to map one weight tensor: picklable, a few hundred bytes.

    ``kind`` is ``"shm"`` (payload: block name, block bytes, byte offset of
    the tensor's storage in the block) or ``"cuda"`` (payload: torch's
    ``reduce_tensor`` arguments and the device UUID).
    """

    kind: str
    payload: tuple[Any, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dtype: torch.dtype
    storage_nbytes: int


def _block_of(tensor: torch.Tensor) -> tuple[str, int, int] | None:
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    with _lock:
        for base, (name, nbytes) in _blocks.items():
            if base <= start and end <= base + nbytes:
                return name, nbytes, start - base
    return None


def export(tensor: torch.Tensor) -> tuple[TensorHandle | None, str]:
    """(handle, "") for a shareable tensor, else (None, why not)."""
    meta = (tuple(tensor.shape), tuple(tensor.stride()), int(tensor.storage_offset()),
            tensor.dtype, int(tensor.untyped_storage().nbytes()))
    if tensor.device.type == "cpu":
        found = _block_of(tensor)
        if found is None:
            return None, "weights are not in shared memory (allocate them with shared_empty)"
        return TensorHandle("shm", found, *meta), ""
    if tensor.device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        try:
            _, args = reduce_tensor(tensor)
        except Exception as exc:  # e.g. memory not from the caching allocator
            return None, f"CUDA IPC export failed: {exc}"
        uuid = str(torch.cuda.get_device_properties(tensor.device).uuid)
        return TensorHandle("cuda", (args, uuid), *meta), ""
    return None, f"no pull path for {tensor.device.type} tensors"


def _cuda_index(uuid: str) -> int | None:
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    return None


def open_handle(handle: TensorHandle, device: torch.device) -> torch.Tensor:
    """Map a peer's `handle` into this process, as a tensor on `device`'s side.

    Raises (any exception) if it cannot: the caller marks the pair unpullable.
    """
    if handle.kind == "shm":
        if device.type != "cpu":
            raise ValueError("a shared-memory handle can only be pulled by a CPU rank")
        name, nbytes, offset = handle.payload
        block = _map(name, nbytes)
        storage = block[offset:offset + handle.storage_nbytes].view(handle.dtype)
        return storage.as_strided(handle.shape, handle.stride, handle.storage_offset)
    if handle.kind == "cuda":
        if device.type != "cuda":
            raise ValueError("a CUDA IPC handle can only be pulled by a CUDA rank")
        args, uuid = handle.payload
        local = device.index if device.index is not None else torch.cuda.current_device()
        peer = _cuda_index(uuid)
        if peer is None:
            raise RuntimeError(f"the peer's GPU {uuid} is not visible to this process")
        if peer != local and not torch.cuda.can_device_access_peer(local, peer):
            raise RuntimeError(f"cuda:{local} has no peer access to cuda:{peer}")
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        patched = list(args)
        patched[6] = local  # open on our device: the mapping is then local to torch
        with torch.cuda.device(local):
            return rebuild_cuda_tensor(*patched)
    raise ValueError(f"unknown handle kind {handle.kind!r}")


# -- the collective --------------------------------------------------------------------------


def _fingerprint(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
            tensor.device)


@dataclass(eq=False)
class SharedWeights:
    """One `share_weights` result on one rank: what it shared, what it mapped,
    and the agreed channels."""

    weights: Sequence[Sequence[torch.Tensor]]
    rank: int
    channels: ChannelMap
    peers: dict[int, list[list[torch.Tensor]]] = field(repr=False)  # src -> [layer][tensor]
    fingerprints: list[list[tuple[Any, ...]]] = field(repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_local: int = 0  # slots per rank: every weight's first dimension, as validated
    # The mapped peers' tensors and this rank's own as byte rows, made once here,
    # not per stage or commit (each select costs the serving thread a few us).
    peer_slots: dict[int, list[list[SlotBytes]]] = field(init=False, repr=False)
    own_slots: list[list[SlotBytes]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.peer_slots = {src: [[SlotBytes(w, per_slot=True) for w in layer] for layer in layers]
                           for src, layers in self.peers.items()}
        self.own_slots = [[SlotBytes(w, per_slot=True) for w in layer] for layer in self.weights]

    def matches(self, weights: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Whether `weights` are the tensors shared (same objects or same memory)."""
        if weights is self.weights:
            return True
        return len(weights) == len(self.fingerprints) and all(
            len(layer) == len(prints) and all(_fingerprint(w) == p
                                              for w, p in zip(layer, prints, strict=True))
            for layer, prints in zip(weights, self.fingerprints, strict=True))

    def reallocated(self, weights: Sequence[Sequence[torch.Tensor]],
                    layers: Sequence[int]) -> str | None:
        """Where `weights` of `layers` no longer are the memory peers mapped, or None.

        Equal fingerprints also mean equal shapes, dtypes and devices, which
        `TransferEngine.share_weights` validated: its `stage` relies on that."""
        for layer in layers:
            tensors, prints = weights[layer], self.fingerprints[layer]
            if len(tensors) != len(prints):
                return f"expert_weights[{layer}] (now {len(tensors)} tensors, {len(prints)} shared)"
            for index, weight in enumerate(tensors):
                if _fingerprint(weight) != prints[index]:
                    return f"expert_weights[{layer}][{index}]"
        return None


def share_weights(weights: Sequence[Sequence[torch.Tensor]], group: Any, mode: str,
                  device: torch.device, node_size: int | None = None) -> SharedWeights:
    """Collective over `group` (a CPU group; every rank calls it together):
    exchange handles to `weights`, map the same-node peers' ones, agree on
    the channels. Raises ValueError on every rank alike when ``mode="pull"``
    and some pair cannot pull.

    A rank's node is its hostname, refined by ``rank // node_size`` when
    `node_size` is given (so one host can stand for several nodes in tests).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    node = (socket.gethostname(), rank // node_size if node_size else 0)
    handles: list[list[TensorHandle]] | None = None
    why = ""
    if mode != "nccl":
        handles = []
        for layer in weights:
            row = []
            for weight in layer:
                handle, why = export(weight)
                if handle is None:
                    break
                row.append(handle)
            if why:
                handles = None
                break
            handles.append(row)
    offers: list[Any] = [None] * world
    dist.all_gather_object(offers, (node, handles, why), group=group)
    nodes = [offer[0] for offer in offers]
    peers: dict[int, list[list[torch.Tensor]]] = {}
    mapped = [False] * world
    reasons: list[str] = [""] * world
    for src, (src_node, src_handles, src_why) in enumerate(offers):
        if src == rank or mode == "nccl" or src_node != node:
            continue
        if src_handles is None:
            reasons[src] = src_why
            continue
        try:
            peers[src] = [[open_handle(h, device) for h in row] for row in src_handles]
            mapped[src] = True
        except Exception as exc:  # IPC refused, no peer access, block gone: fall back
            reasons[src] = f"{type(exc).__name__}: {exc}"
    verdicts: list[Any] = [None] * world
    dist.all_gather_object(verdicts, (mapped, reasons), group=group)
    pullable = [verdict[0] for verdict in verdicts]
    channels = decide_channels(mode, nodes, pullable)
    if channels.fallbacks:  # name the cause, not only "could not map"
        detailed = tuple(
            (src, dst, f"{why}: {verdicts[dst][1][src]}" if verdicts[dst][1][src] else why)
            for src, dst, why in channels.fallbacks)
        channels = ChannelMap(channels.num_ranks, channels.pulls, detailed)
    pulled_from = channels.pulled_from(rank)
    peers = {src: tensors for src, tensors in peers.items() if src in pulled_from}
    prints = [[_fingerprint(w) for w in layer] for layer in weights]
    num_local = int(weights[0][0].shape[0]) if weights and weights[0] else 0
    return SharedWeights(weights, rank, channels, peers, prints, device, num_local)
