"""Rank-side checks of the transfer engine, shared by the gloo and the NCCL tests.

`check_all` runs inside each spawned rank (through `run_ranks`) and asserts
as it goes; a failed assertion comes back to the test as `RankFailed` with the
rank's traceback. All scenarios share one spawn because starting a rank costs
seconds and a collective costs microseconds.

Weights identify themselves: every value of slot weights encodes (layer,
expert, tensor index), so a slot holding the wrong expert, a stale copy, a
tensor mixed up with another or a misaligned byte range compares unequal.
Comparisons are bitwise (floats viewed as ints). Writes are logged with a
`TorchDispatchMode` that records every tensor an op mutates, so "unchanged
slots are never written" is checked on the addresses written, not inferred
from equal values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from eplb_fsm._adapters.transfer import TransferEngine
from eplb_fsm.transfer import plan_layers, rearrange_weights

LAYERS = 4
LOCAL = 3  # local physical slots per rank
EMPTY = 999  # the "expert" whose weights an empty (-1) slot holds
SLOT_BYTES = 3 * 5 * 4 + 4 * 2 + 2 * 3 * 8 + 7 * 4  # one slot of the four tensors below
DEADLINE_S = 30.0
SEED = 20240601

Weights = list[list[torch.Tensor]]


# -- weights that say what they are -------------------------------------------------------


def _slot_tensors(layer: int, expert: int) -> list[torch.Tensor]:
    e = EMPTY if expert < 0 else expert
    return [
        torch.arange(15, dtype=torch.float32).reshape(3, 5) / 8 + (layer * 1000 + e * 10),
        (torch.arange(4, dtype=torch.int16) + (layer * 4096 + e * 16 + 8)).view(torch.bfloat16),
        torch.arange(6, dtype=torch.int64).reshape(2, 3) + (layer * 10**6 + e * 10**3 + 200),
        torch.arange(7, dtype=torch.float32) - (layer * 1000 + e * 10 + 3),
    ]


def make_weights(p2l: np.ndarray, rank: int, world: int, device: torch.device) -> Weights:
    """This rank's expert_weights for placement `p2l`; tensor 3 is non-contiguous
    (a transposed buffer), as a model's weights sometimes are."""
    num_local = p2l.shape[1] // world
    weights = []
    for layer in range(p2l.shape[0]):
        ids = p2l[layer, rank * num_local:(rank + 1) * num_local].tolist()
        slots = [_slot_tensors(layer, e) for e in ids]
        tensors = [torch.stack([s[i] for s in slots]).to(device) for i in range(3)]
        strided = torch.empty(7, num_local, dtype=torch.float32, device=device).t()
        strided.copy_(torch.stack([s[3] for s in slots]))
        assert not strided.is_contiguous()
        weights.append([*tensors, strided])
    return weights


def _bits(t: torch.Tensor) -> torch.Tensor:
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(t.dtype)
    return (t.view(as_int) if as_int is not None else t).cpu()


def assert_weights(actual: Weights, expected: Weights, where: str,
                   layers: Sequence[int] | None = None) -> None:
    for layer in range(len(expected)) if layers is None else layers:
        for index, (a, b) in enumerate(zip(actual[layer], expected[layer], strict=True)):
            a_bits, b_bits = _bits(a), _bits(b)
            if not torch.equal(a_bits, b_bits):
                bad = [s for s in range(a.shape[0]) if not torch.equal(a_bits[s], b_bits[s])]
                raise AssertionError(f"{where}: layer {layer} tensor {index} "
                                     f"({a.dtype}) differs in local slots {bad}")


def snapshot(weights: Weights) -> Weights:
    return [[w.clone() for w in layer] for layer in weights]


def after(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The placement the weights show after rearranging: vacated slots keep old weights."""
    return np.where(new >= 0, new, old)


# -- placements ---------------------------------------------------------------------------


def random_p2l(rng: np.random.Generator, world: int, empty: float = 0.0) -> np.ndarray:
    """[LAYERS, world * LOCAL] with every expert present and `world` redundant slots,
    a fraction `empty` of those left empty (-1)."""
    num_physical = world * LOCAL
    num_logical = num_physical - world
    rows = []
    for _ in range(LAYERS):
        extra = rng.integers(0, num_logical, world)
        extra[rng.random(world) < empty] = -1
        rows.append(rng.permutation(np.concatenate([np.arange(num_logical), extra])))
    return np.stack(rows).astype(np.int64)


def expected_totals(world: int, seed: int = SEED) -> dict[str, int]:
    """Bytes all ranks together receive in each scenario of `check_all`, from the
    plan alone (the parent process checks the ranks' counts against these)."""
    rng = np.random.default_rng(seed)
    p = [random_p2l(rng, world, empty=0.3 if i % 2 else 0.0) for i in range(6)]
    pairs = {"blocking": (p[0], p[1]), "blocking_chunks": (p[1], p[2]),
             "staged": (p[2], p[3]), "batched": (p[3], p[4])}
    moved = {name: plan_layers(a, b, world).bytes_moved(SLOT_BYTES)
             for name, (a, b) in pairs.items()}
    return {"idle": 2 * SLOT_BYTES, "local_only": 0, "identical": 0, **moved}


# -- the write log ------------------------------------------------------------------------


def _addresses(t: torch.Tensor) -> tuple[int, set[int]]:
    """(storage address, byte offsets of every element's first byte) of a view."""
    index = np.array(t.storage_offset(), dtype=np.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        index = np.add.outer(index, np.arange(size, dtype=np.int64) * stride)
    return t.untyped_storage().data_ptr(), set((index.ravel() * t.element_size()).tolist())


class WriteLog(TorchDispatchMode):
    """Records the addresses of every tensor an operator writes (mutable args)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, set[int]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor) and t.numel():
                    self.writes.append(_addresses(t))
        return func(*args, **kwargs)

    def touched(self, t: torch.Tensor) -> bool:
        storage, addresses = _addresses(t)
        return any(s == storage and not addresses.isdisjoint(a) for s, a in self.writes)


@contextmanager
def logging_writes() -> Iterator[WriteLog]:
    log = WriteLog()
    with log:
        yield log


def assert_untouched(log: WriteLog, weights: Weights, old: np.ndarray, new: np.ndarray,
                     rank: int, world: int, where: str) -> int:
    """No write hit a slot whose expert stays (or that is vacated); every changed
    slot was written. Returns how many slots were written."""
    num_local = old.shape[1] // world
    written = 0
    for layer in range(old.shape[0]):
        for slot in range(num_local):
            g = rank * num_local + slot
            keep = new[layer, g] == old[layer, g] or new[layer, g] < 0
            for index, w in enumerate(weights[layer]):
                hit = log.touched(w[slot])
                if keep:
                    assert not hit, f"{where}: kept slot {slot} of layer {layer} was written " \
                                    f"(tensor {index})"
                else:
                    assert hit, f"{where}: changed slot {slot} of layer {layer} not written"
            written += not keep
    return written


# -- helpers --------------------------------------------------------------------------------


def _device(rank: int, kind: str) -> torch.device:
    if kind == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _poll(handle: Any, where: str) -> int:
    """Poll `ready()` until true; returns how many polls said 'not yet'."""
    start, misses = time.monotonic(), 0
    while not handle.ready():
        misses += 1
        assert time.monotonic() - start < DEADLINE_S, f"{where}: not ready in {DEADLINE_S} s"
        time.sleep(0.001)
    return misses


def _expected_bytes(old: np.ndarray, new: np.ndarray, world: int, rank: int) -> int:
    return plan_layers(old, new, world).bytes_received(rank, SLOT_BYTES)


# -- the scenarios ----------------------------------------------------------------------------


def check_all(rank: int, world: int, seed: int, kind: str) -> dict[str, int]:
    """Every scenario on one group; returns this rank's received bytes per scenario."""
    device = _device(rank, kind)
    rng = np.random.default_rng(seed)
    got: dict[str, int] = {}
    got["idle"] = _idle_ranks_first(rank, world, device)
    got["local_only"] = _local_only(rank, world, device)
    _ready_never_blocks(rank, world, device)
    p = [random_p2l(rng, world, empty=0.3 if i % 2 else 0.0) for i in range(6)]
    got["blocking"] = _blocking(rank, world, device, p[0], p[1], layers_at_once=1)
    got["blocking_chunks"] = _blocking(rank, world, device, p[1], p[2], layers_at_once=3,
                                       node_size=2 if world >= 4 else None)
    got["identical"] = _identical(rank, world, device, p[2])
    got["staged"] = _staged_layer_by_layer(rank, world, device, p[2], p[3])
    got["batched"] = _batched_in_pieces(rank, world, device, p[3], p[4])
    _release(rank, world, device, p[4], p[5])
    _bad_input(rank, world, device, p[0], p[1])
    return got


def _idle_ranks_first(rank: int, world: int, device: torch.device) -> int:
    """The group's first transfer: ranks 0 and 1 trade one expert, everyone else idles
    (on NCCL this is the case that needs the communicator to exist first)."""
    old = np.tile(np.arange(world * LOCAL), (LAYERS, 1))
    new = old.copy()
    new[0, [0, LOCAL]] = new[0, [LOCAL, 0]]
    weights = make_weights(old, rank, world, device)
    received = rearrange_weights(old, new, weights)
    assert_weights(weights, make_weights(new, rank, world, device), "idle ranks")
    assert received == (SLOT_BYTES if rank < 2 else 0)
    return received


def _ready_never_blocks(rank: int, world: int, device: torch.device) -> None:
    """Rank 0 stages at once and polls while rank 1, its sender, sleeps before staging:
    every ready() returns at once, and says 'not yet' until the peer joins."""
    old = np.tile(np.arange(world * LOCAL), (LAYERS, 1))
    new = old.copy()
    new[0, [0, LOCAL]] = new[0, [LOCAL, 0]]
    weights = make_weights(old, rank, world, device)
    engine = TransferEngine()
    if rank != 0:
        time.sleep(0.5)
    handle = engine.stage(old, new, [0], weights)
    start, slowest, misses = time.monotonic(), 0.0, 0
    while True:
        begin = time.perf_counter()
        done = handle.ready()
        slowest = max(slowest, time.perf_counter() - begin)
        if done:
            break
        misses += 1
        assert time.monotonic() - start < DEADLINE_S, "ready() never became true"
        time.sleep(0.0005)
    if rank == 0:
        assert time.monotonic() - start > 0.3 and misses > 10, (misses, slowest)
        assert slowest < 0.05, f"one ready() call took {slowest * 1e3:.1f} ms"
    dist.barrier()
    handle.commit()
    assert_weights(weights, make_weights(new, rank, world, device), "ready never blocks")


def _local_only(rank: int, world: int, device: torch.device) -> int:
    """Every rank permutes its own slots: local copies only, no network, and slots
    trading experts read each other's *old* weights."""
    old = np.tile(np.arange(world * LOCAL), (LAYERS, 1))
    new = old.copy()
    for r in range(world):
        base = r * LOCAL
        new[:, base:base + LOCAL] = np.roll(old[:, base:base + LOCAL], 1, axis=1)
    weights = make_weights(old, rank, world, device)
    received = rearrange_weights(old, new, weights, layers_at_once=2)
    assert_weights(weights, make_weights(new, rank, world, device), "local copies")
    assert received == 0
    return received


def _blocking(rank: int, world: int, device: torch.device, old: np.ndarray, new: np.ndarray,
              layers_at_once: int, node_size: int | None = None) -> int:
    weights = make_weights(old, rank, world, device)
    with logging_writes() as log:
        received = rearrange_weights(old, new, weights, layers_at_once=layers_at_once,
                                     node_size=node_size)
    where = f"rearrange_weights(layers_at_once={layers_at_once})"
    assert_weights(weights, make_weights(after(old, new), rank, world, device), where)
    assert_untouched(log, weights, old, new, rank, world, where)
    assert received == _expected_bytes(old, new, world, rank)
    return received


def _identical(rank: int, world: int, device: torch.device, p2l: np.ndarray) -> int:
    weights = make_weights(p2l, rank, world, device)
    with logging_writes() as log:
        received = rearrange_weights(p2l, torch.from_numpy(p2l), weights)
    assert received == 0
    assert not any(log.touched(w) for layer in weights for w in layer), \
        "identical placements wrote into the weights"
    assert_weights(weights, make_weights(p2l, rank, world, device), "identical")
    return received


def _staged_layer_by_layer(rank: int, world: int, device: torch.device, old: np.ndarray,
                           new: np.ndarray) -> int:
    """stage, poll ready(), commit, one layer at a time; live weights stay old until
    their layer's commit, and only that layer changes."""
    engine = TransferEngine()
    weights = make_weights(old, rank, world, device)
    before = make_weights(old, rank, world, device)
    want = make_weights(after(old, new), rank, world, device)
    received, largest_staging = 0, 0
    for layer in range(LAYERS):
        handle = engine.stage(old, new, [layer], weights)
        assert handle.layers == (layer,)
        _poll(handle, f"staged layer {layer}")
        assert_weights(weights, before, f"before commit of layer {layer}", layers=[layer])
        dist.barrier()  # every rank is ready: the runtime's readiness round
        with logging_writes() as log:
            handle.commit()
        one_layer = np.full_like(new, -1)
        one_layer[layer] = new[layer]
        assert_untouched(log, weights, old, one_layer, rank, world, f"commit of layer {layer}")
        assert_weights(weights, want, f"after commit of layer {layer}", layers=[layer])
        assert_weights(weights, before, f"layers after {layer}", layers=range(layer + 1, LAYERS))
        received += handle.bytes_received
        largest_staging = max(largest_staging, handle.staging_bytes)
    assert received == _expected_bytes(old, new, world, rank)
    # The profile reserves at least what any one-layer stage used: every slot changing.
    profiled = engine.profile(weights, layers_at_once=1)
    assert profiled >= largest_staging
    # Staging for every local slot, plus a send buffer for every other rank's slots.
    assert profiled == world * LOCAL * sum(-(-b // 256) * 256 for b in (60, 8, 48, 28))
    assert engine.profile(weights, layers_at_once=2) == 2 * profiled
    return received


def _batched_in_pieces(rank: int, world: int, device: torch.device, old: np.ndarray,
                       new: np.ndarray) -> int:
    """Three layers in one stage, each peer's message launched in two pieces,
    awaited with anyio, committed one layer per 'step' in a different order;
    then the last one."""
    engine = TransferEngine(pieces=2)
    weights = make_weights(old, rank, world, device)
    before = make_weights(old, rank, world, device)
    want = make_weights(after(old, new), rank, world, device)
    handle = engine.stage(old, new, [0, 2, 3], weights)
    anyio.run(handle.wait)
    assert handle.ready()
    assert_weights(weights, before, "batched, before commit")
    dist.barrier()
    done: list[int] = []
    for layer in (2, 0, 3):
        handle.commit([layer])
        done.append(layer)
        assert_weights(weights, want, f"batched, layer {layer} committed", layers=done)
        assert_weights(weights, before, "batched, not yet committed",
                       layers=[x for x in range(LAYERS) if x not in done])
    with pytest.raises(ValueError, match="already committed"):
        handle.commit([0])
    received = handle.bytes_received
    assert received == plan_layers(old, new, world, [0, 2, 3]).bytes_received(rank, SLOT_BYTES)
    rest = engine.stage(old, new, [1], weights)
    _poll(rest, "batched, layer 1")
    dist.barrier()
    rest.commit()
    assert_weights(weights, want, "batched, all committed")
    return received + rest.bytes_received


def _release(rank: int, world: int, device: torch.device, old: np.ndarray,
             new: np.ndarray) -> None:
    """release() leaves live weights as they were: once ready, and while transfers
    are still in flight (the engine keeps the buffers until they finish)."""
    engine = TransferEngine()
    weights = make_weights(old, rank, world, device)
    before = make_weights(old, rank, world, device)
    with logging_writes() as log:
        handle = engine.stage(old, new, range(LAYERS), weights)
        _poll(handle, "release after ready")
        handle.release()
        in_flight = engine.stage(old, new, [0, 1], weights)
        in_flight.release()
    assert not any(log.touched(w) for layer in weights for w in layer)
    assert_weights(weights, before, "after release")
    with pytest.raises(RuntimeError, match="after release"):
        handle.ready()
    with pytest.raises(RuntimeError, match="after release"):
        handle.commit()
    # The group is still consistent: a full transfer on the same engine works.
    dist.barrier()
    final = engine.stage(old, new, range(LAYERS), weights)
    _poll(final, "after release")
    dist.barrier()
    final.commit()
    assert_weights(weights, make_weights(after(old, new), rank, world, device), "after release")


def _bad_input(rank: int, world: int, device: torch.device, old: np.ndarray,
               new: np.ndarray) -> None:
    """Each rule has its own ValueError, raised before any weight changes."""
    weights = make_weights(old, rank, world, device)
    before = snapshot(weights)
    more_slots = np.tile(np.arange(world * (LOCAL + 1)), (LAYERS, 1))
    odd = np.tile(np.arange(world * LOCAL + 1), (LAYERS, 1))
    negative = new.copy()
    negative[1, 0] = -3
    unknown = new.copy()
    unknown[2, 0] = 10**6
    cases = [
        ((old, new[:, :-1], weights), r"old_physical_to_logical has shape .* but "
                                      r"new_physical_to_logical"),
        ((odd, odd, weights), rf"{world * LOCAL + 1} slots .* num_ranks={world}"),
        ((old, new, weights[:-1]), rf"expert_weights has {LAYERS - 1} layers .* {LAYERS}"),
        ((more_slots, more_slots, weights), rf"expert_weights\[0\]\[0\] has first dimension "
                                            rf"{LOCAL}, expected {LOCAL + 1}"),
        ((old, negative, weights), r"new_physical_to_logical holds id -3"),
        ((old, unknown, weights), r"places expert 1000000 in layer 2"),
        ((old[0], new[0], weights), r"old_physical_to_logical must be 2-D"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            rearrange_weights(*args)
    with pytest.raises(ValueError, match="layers_at_once must be a positive int"):
        rearrange_weights(old, new, weights, layers_at_once=0)
    bad_last = [list(layer) for layer in weights]
    bad_last[-1][0] = bad_last[-1][0][:1]  # only the last layer is wrong
    with pytest.raises(ValueError, match=rf"expert_weights\[{LAYERS - 1}\]\[0\]"):
        rearrange_weights(old, new, bad_last)
    assert_weights(weights, before, "after rejected input")


# -- GPU: a serving process's first stages -----------------------------------------------------


def check_first_stages_never_block(rank: int, world: int) -> dict[str, float]:
    """A fresh process, as a serving process after start-up (the runtime has
    called `warm_up()`, the model has run): its first NCCL stage and its first
    pull stage return at once while ~1 s of kernel (a queued forward pass)
    runs on the current stream. A kernel's first launch in a process blocks
    the host until every running kernel ends (CUDA's lazy module loading,
    docs/integration.md), so this is where a first launch inside `stage()`
    would show. Returns each stage's host seconds."""
    device = _device(rank, "cuda")
    old = np.tile(np.arange(world * LOCAL), (LAYERS, 1))
    new = old.copy()
    new[0, [0, LOCAL]] = new[0, [LOCAL, 0]]  # ranks 0 and 1 trade one expert
    took: dict[str, float] = {}
    for path in ("nccl", "pull"):
        weights = make_weights(old, rank, world, device)
        engine = TransferEngine(path=path)
        engine.warm_up(device)
        if path == "pull":
            engine.share_weights(weights)
        prepared = engine.prepare(old, new, [0])
        torch.cuda._sleep(1000)  # the spin kernel's own first launch, while nothing runs
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda._sleep(2_000_000_000)
        start = time.perf_counter()
        handle = engine.stage(old, new, [0], weights, prepared)
        took[path] = time.perf_counter() - start
        _poll(handle, f"first {path} stage")
        dist.barrier()  # every rank ready (pulls read peers' live slots) before commit
        handle.commit()
        torch.cuda.synchronize()
        assert_weights(weights, make_weights(new, rank, world, device), f"first {path} stage")
        assert took[path] < 0.25, (f"the process's first {path} stage held the host "
                                   f"{took[path] * 1e3:.0f} ms behind a running kernel")
    return took
