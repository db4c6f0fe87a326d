"""Rank-side checks of the pull path, shared by the gloo and the GPU tests.

Runs inside spawned ranks (`run_ranks`). Weights identify themselves (see
`_transfer_checks`): a slot that pulled the wrong expert, a stale or a
half-committed one compares unequal, bitwise. On CPU the weights live in
shared memory (`shared_empty`), so same-host peers can pull them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _transfer_checks import (
    DEADLINE_S,
    LAYERS,
    LOCAL,
    Weights,
    _device,
    _poll,
    after,
    assert_weights,
    make_weights,
    random_p2l,
)

from eplb_fsm._adapters.pull import owned_segments
from eplb_fsm.transfer import TransferEngine, plan_layers, shared_empty


def to_shared(weights: Weights) -> Weights:
    """The same values and strides, in shared memory (CPU) -- or as they are (CUDA)."""
    out = []
    for layer in weights:
        row = []
        for w in layer:
            if w.device.type != "cpu":
                row.append(w)
                continue
            if w.is_contiguous():
                s = shared_empty(tuple(w.shape), w.dtype)
            else:  # the transposed tensor of make_weights: keep it non-contiguous
                s = shared_empty(tuple(reversed(w.shape)), w.dtype).t()
            s.copy_(w)
            row.append(s)
        out.append(row)
    return out


def weights_for(p2l: np.ndarray, rank: int, world: int, device: torch.device) -> Weights:
    return to_shared(make_weights(p2l, rank, world, device))


def all_pairs(ranks: list[int]) -> frozenset[tuple[int, int]]:
    return frozenset((s, d) for s in ranks for d in ranks if s != d)


def agreed_ready(handle: object) -> None:
    """The readiness round, reduced to its essence: every rank polls its own
    `ready()`, then all agree (a MIN all-reduce) before anyone commits."""
    _poll(handle, "agreed ready")
    flag = torch.ones(1, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    assert flag.item() == 1


def staged_round(engine: TransferEngine, old: np.ndarray, new: np.ndarray,
                 weights: Weights, layers: list[int]) -> int:
    """Stage, agree, commit -- then agree again before the caller stages the same
    layers anew: a later stage pulls what this commit wrote, so every rank's
    commit must be done first (in the runtime: the next rebalance's planning
    rounds; see docs/transfers.md)."""
    handle = engine.stage(old, new, layers, weights)
    agreed_ready(handle)
    handle.commit()
    if weights[0][0].device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return handle.bytes_received


def random_rounds(rank: int, world: int, seed: int, path: str, device: torch.device,
                  node_size: int | None = None) -> tuple[Weights, int, frozenset]:
    """Three random placements in a row (redundant replicas, empty slots), one
    layer per stage then all layers in one stage; returns the final weights."""
    rng = np.random.default_rng(seed)
    p = [random_p2l(rng, world, empty=0.3 if i % 2 else 0.0) for i in range(3)]
    engine = TransferEngine(path=path, node_size=node_size)
    weights = weights_for(p[0], rank, world, device)
    channels = engine.share_weights(weights)
    received = 0
    for layer in range(LAYERS):
        received += staged_round(engine, p[0], p[1], weights, [layer])
    assert_weights(weights, make_weights(after(p[0], p[1]), rank, world, device),
                   f"{path}: layer by layer")
    current = after(p[0], p[1])
    received += staged_round(engine, current, p[2], weights, list(range(LAYERS)))
    assert_weights(weights, make_weights(after(current, p[2]), rank, world, device),
                   f"{path}: all layers at once")
    want = (plan_layers(p[0], p[1], world).bytes_received(rank, 1)
            + plan_layers(current, p[2], world).bytes_received(rank, 1))
    assert received > 0 or want == 0
    return weights, received, channels.pulls


def check_gloo(rank: int, world: int, seed: int) -> dict[str, object]:
    """Every CPU scenario of one world size, on one spawn."""
    device = torch.device("cpu")
    out: dict[str, object] = {}
    _, out["pull_bytes"], pulls = random_rounds(rank, world, seed, "pull", device)
    assert pulls == all_pairs(list(range(world)))
    _, out["nccl_bytes"], pulls = random_rounds(rank, world, seed, "nccl", device)
    assert pulls == frozenset()
    if world == 4:  # two "nodes" of two ranks on one host: pull within, gloo across
        _, _, pulls = random_rounds(rank, world, seed, "auto", device, node_size=2)
        assert pulls == all_pairs([0, 1]) | all_pairs([2, 3])
        assert _layout_is_mixed(rank, world, seed)
    if world == 2:
        _not_shareable(rank, world, device)
        _reallocation(rank, world, device)
        _prepared_before_changes(rank, world, device)
        _two_models_one_engine(rank, world, device)
        _commit_ordering(rank, world, device)
        _hazard_without_agreement(rank, world, device)
        _rearrange_waits_for_pullers(rank, world, device)
    out["segments"] = owned_segments()
    return out


def _layout_is_mixed(rank: int, world: int, seed: int) -> bool:
    """With two nodes, a rank's layout pulls from its node-mate and receives the rest."""
    rng = np.random.default_rng(seed + 1)
    old, new = random_p2l(rng, world), random_p2l(rng, world)
    engine = TransferEngine(path="auto", node_size=2)
    weights = weights_for(old, rank, world, torch.device("cpu"))
    engine.share_weights(weights)
    handle = engine.stage(old, new, range(LAYERS), weights)
    agreed_ready(handle)
    handle.commit()
    assert_weights(weights, make_weights(after(old, new), rank, world, torch.device("cpu")),
                   "mixed routing")
    mate = rank ^ 1
    strides = dict.fromkeys(range(LAYERS), 1024)
    shared = engine._shared[0]
    layout = handle.schedule.layout(strides, 1, shared.channels)
    assert {src for _, src, _, _ in layout.pulls} <= {mate}
    assert all(peer != mate for piece in layout.recv_spans for peer, _, _ in piece)
    assert all(peer != mate for piece in layout.send_spans for peer, _, _ in piece)
    sched = handle.schedule
    return (mate not in sched.receives or bool(layout.pulls)) and \
        all(src in layout_peers(layout) for src in sched.receives if src != mate)


def layout_peers(layout: object) -> set[int]:
    return {peer for piece in layout.recv_spans for peer, _, _ in piece}  # type: ignore[attr-defined]


def _swap() -> tuple[np.ndarray, np.ndarray]:
    """Rank 0's slot 0 and rank 1's slot 0 trade experts: each pulls the other's."""
    old = np.tile(np.arange(2 * LOCAL), (LAYERS, 1))
    new = old.copy()
    new[:, [0, LOCAL]] = new[:, [LOCAL, 0]]
    return old, new


def _swap_pulled(rank: int, world: int, device: torch.device,
                 ) -> tuple[np.ndarray, np.ndarray, Weights, TransferEngine]:
    """The `_swap` maps, this rank's shared-memory weights for the old one, and a
    pull-only engine that has shared them (a collective: every rank calls it)."""
    old, new = _swap()
    weights = weights_for(old, rank, world, device)
    engine = TransferEngine(path="pull")
    engine.share_weights(weights)
    return old, new, weights, engine


def _not_shareable(rank: int, world: int, device: torch.device) -> None:
    """Plain (not shared-memory) weights: 'auto' falls back to gloo and still moves
    the right weights; 'pull' refuses on every rank, before anything moves."""
    old, new = _swap()
    weights = make_weights(old, rank, world, device)
    engine = TransferEngine(path="auto")
    channels = engine.share_weights(weights)
    assert channels.pulls == frozenset()
    assert {(s, d) for s, d, _ in channels.fallbacks} == all_pairs([0, 1])
    assert all("shared memory" in why for _, _, why in channels.fallbacks)
    staged_round(engine, old, new, weights, list(range(LAYERS)))
    assert_weights(weights, make_weights(new, rank, world, device), "auto fallback")
    with pytest.raises(ValueError, match="transfer_path='pull' but 2 pair"):
        TransferEngine(path="pull").share_weights(weights)
    with pytest.raises(ValueError, match="needs share_weights"):
        TransferEngine(path="pull").stage(old, new, [0], weights)
    with pytest.raises(ValueError, match="path must be one of"):
        TransferEngine(path="nvlink")


def _reallocation(rank: int, world: int, device: torch.device) -> None:
    """Rank 1 reallocates a tensor after sharing: its stage still launches (peers
    stay matched) but its ready() raises naming it; a re-share makes it work."""
    old, new, weights, engine = _swap_pulled(rank, world, device)
    if rank == 1:
        fresh = shared_empty(tuple(weights[0][0].shape), weights[0][0].dtype)
        fresh.copy_(weights[0][0])
        weights[0][0] = fresh
    handle = engine.stage(old, new, [0], weights)
    if rank == 1:
        with pytest.raises(RuntimeError, match=r"rank 1: expert_weights\[0\]\[0\] is not the "
                                               r"memory shared"):
            _poll(handle, "reallocated")
    else:
        _poll(handle, "peer reallocated")
    handle.release()  # the agreed failure: nobody commits
    dist.barrier()
    assert_weights(weights, make_weights(old, rank, world, device), "after the failure")
    engine.share_weights(weights)  # collective re-share
    staged_round(engine, old, new, weights, list(range(LAYERS)))
    assert_weights(weights, make_weights(new, rank, world, device), "after re-sharing")


def _prepared_before_changes(rank: int, world: int, device: torch.device) -> None:
    """prepare() makes the launch ahead, for the weights shared then, and the agreed
    stage() skips re-validating weights that are still that memory. It must
    notice whatever changed since: a tensor of the wrong shape (ValueError before
    anything moves), a reallocation (ready() raises), a re-share (it launches by
    the new record and moves the right weights)."""
    old, new, weights, engine = _swap_pulled(rank, world, device)
    layers = list(range(LAYERS))
    prepared = engine.prepare(old, new, layers)
    assert prepared.launch is not None and prepared.launch.shared is engine._shared[-1]
    checked = []
    validate = engine.check_weights
    engine.check_weights = lambda *a, **k: checked.append(1) or validate(*a, **k)  # type: ignore[method-assign]
    handle = engine.stage(old, new, layers, weights, prepared)  # unchanged: the short path
    assert checked == [], "stage() re-validated the weights share_weights validated"
    _poll(handle, "short path")
    handle.release()
    dist.barrier()

    good = weights[0][1]
    weights[0][1] = shared_empty((LOCAL + 1, *good.shape[1:]), good.dtype)
    with pytest.raises(ValueError, match=r"expert_weights\[0\]\[1\] has first dimension"):
        engine.stage(old, new, layers, weights, prepared)
    assert checked, "a changed tensor must take the validating path"
    weights[0][1] = good

    if rank == 1:  # the same shape, other memory: peers would pull stale bytes
        moved = shared_empty(tuple(good.shape), good.dtype)
        moved.copy_(good)
        weights[0][1] = moved
    handle = engine.stage(old, new, layers, weights, prepared)
    if rank == 1:
        with pytest.raises(RuntimeError, match=r"expert_weights\[0\]\[1\] is not the memory"):
            _poll(handle, "reallocated after prepare()")
    else:
        _poll(handle, "peer reallocated after prepare()")
    handle.release()
    dist.barrier()

    fresh = weights_for(old, rank, world, device)
    engine.share_weights(fresh)  # collective: the launch prepared above is for the old record
    for layer in weights:  # pulling by that stale record would now fetch zeros
        for w in layer:
            w.zero_()
    dist.barrier()
    handle = engine.stage(old, new, layers, fresh, prepared)
    agreed_ready(handle)
    handle.commit()
    dist.barrier()
    assert_weights(fresh, make_weights(new, rank, world, device), "re-shared after prepare()")


def _two_models_one_engine(rank: int, world: int, device: torch.device) -> None:
    """One engine, two shared models of different shapes (a main and a draft model,
    as a speculative-decoding server has; the draft has fewer layers and other
    tensors, so other slot sizes): prepare() finds each model's own sharing
    record by the maps' shape and lays out with its sizes, so both take the
    short path, and each ends with its own right weights."""
    rng = np.random.default_rng(7)
    old, new = random_p2l(rng, world), random_p2l(rng, world)

    def draft(weights: Weights) -> Weights:
        return [layer[1:3] for layer in weights]

    models = [(old, new, lambda w: w), (old[:2], new[:2], draft)]
    weights = [pick(weights_for(o, rank, world, device)) for o, _, pick in models]
    engine = TransferEngine(path="pull")
    for w in weights:
        engine.share_weights(w)
    checked = []
    validate = engine.check_weights
    engine.check_weights = lambda *a, **k: checked.append(1) or validate(*a, **k)  # type: ignore[method-assign]
    for (o, n, pick), w in zip(models, weights, strict=True):
        layers = list(range(o.shape[0]))
        handle = engine.stage(o, n, layers, w, engine.prepare(o, n, layers))
        agreed_ready(handle)
        handle.commit()
        dist.barrier()
        assert_weights(w, pick(make_weights(after(o, n), rank, world, device)),
                       f"model of {o.shape[0]} layers")
    assert checked == [], "a model other than the last shared took the validating path"


def _commit_ordering(rank: int, world: int, device: torch.device) -> None:
    """Rank 1 pulls late (it stages 0.3 s after rank 0). Rank 0's own transfer is
    ready at once, but it commits only after every rank agrees it is ready, so
    rank 1 still pulls rank 0's *old* slot 0 and both end correct."""
    old, new, weights, engine = _swap_pulled(rank, world, device)
    if rank == 1:
        time.sleep(0.3)
    handle = engine.stage(old, new, [0], weights)
    start = time.monotonic()
    agreed_ready(handle)
    if rank == 0:
        assert time.monotonic() - start > 0.2, "rank 0 did not wait for rank 1's pulls"
    handle.commit()
    assert_weights(weights, make_weights(after(old, np.where(np.arange(LAYERS)[:, None] == 0,
                                                             new, old)), rank, world, device),
                   "commit after agreement", layers=[0])


def _hazard_without_agreement(rank: int, world: int, device: torch.device) -> None:
    """The negative control: the same swap, but rank 0 commits on its own ready()
    before rank 1 pulls. Rank 1 then pulls rank 0's *new* slot 0 -- its own old
    expert -- and ends up with the wrong weights: the corruption the all-ready
    agreement prevents."""
    old, new, weights, engine = _swap_pulled(rank, world, device)
    if rank == 0:
        handle = engine.stage(old, new, [0], weights)
        _poll(handle, "hazard")
        handle.commit()  # too early: rank 1 has not pulled yet
        dist.barrier()
    else:
        dist.barrier()  # wait until rank 0 has committed
        handle = engine.stage(old, new, [0], weights)
        _poll(handle, "hazard")
        handle.commit()
        wrong = make_weights(old, rank, world, device)  # slot 0 holds its old expert again
        assert_weights(weights, wrong, "rank 1 pulled the half-committed slot", layers=[0])
        with pytest.raises(AssertionError):
            assert_weights(weights, make_weights(new, rank, world, device), "", layers=[0])
    dist.barrier()


def _rearrange_waits_for_pullers(rank: int, world: int, device: torch.device) -> None:
    """Blocking `rearrange` with pulls: rank 1 joins 0.3 s late; rank 0 must not
    commit before rank 1's pulls are done (it waits on a barrier there)."""
    old, new, weights, engine = _swap_pulled(rank, world, device)
    if rank == 1:
        time.sleep(0.3)
    engine.rearrange(old, new, weights)
    assert_weights(weights, make_weights(new, rank, world, device), "rearrange with pulls")


# -- GPU: the pull path against NCCL ----------------------------------------------------------


def check_pull_vs_nccl(rank: int, world: int, seed: int) -> dict[str, object]:
    """Random placements, several layers and dtypes: the pull path and the NCCL
    path must leave bitwise identical weights (and the expected ones)."""
    device = _device(rank, "cuda")
    start = time.monotonic()
    pulled, pull_bytes, pulls = random_rounds(rank, world, seed, "pull", device)
    assert pulls == all_pairs(list(range(world))), pulls
    sent, nccl_bytes, none = random_rounds(rank, world, seed, "nccl", device)
    assert none == frozenset()
    torch.cuda.synchronize()
    assert_weights(pulled, sent, "pull vs nccl")
    assert pull_bytes == nccl_bytes
    # On the legacy default stream and on a side stream alike: the same weights.
    old, new = _swap_n(world)
    for where in ("default stream", "side stream"):
        engine = TransferEngine(path="pull")
        weights = make_weights(old, rank, world, device)
        engine.share_weights(weights)
        stream = torch.cuda.Stream() if where == "side stream" else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            staged_round(engine, old, new, weights, list(range(LAYERS)))
            torch.cuda.synchronize()
        assert_weights(weights, make_weights(new, rank, world, device), where)
    _pulls_pass_queued_compute(rank, world, device)
    assert time.monotonic() - start < 4 * DEADLINE_S
    return {"bytes": pull_bytes}


def _pulls_pass_queued_compute(rank: int, world: int, device: torch.device) -> None:
    """A stage that only pulls does not wait for the work queued on the current
    stream (the serving compute, legacy default stream or not); one that packs
    for NCCL does, since a commit queued there may still be writing the live
    slots it reads. Before 0605265 pulls waited too: on 2 H200s, with the
    GEMMs on the stream current at stage(), they moved 20% of the pull bound
    instead of 84-89% (docs/integration.md). And work queued on the legacy
    default stream after a stage does not wait for the stage's side stream."""
    old, new = _swap_n(world)
    for path, waits in (("pull", False), ("nccl", True)):
        engine = TransferEngine(path=path)
        weights = make_weights(old, rank, world, device)
        engine.share_weights(weights)
        prepared = engine.prepare(old, new, [0])
        dist.barrier()
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of one busy kernel on the current stream
        busy = torch.cuda.Event()
        busy.record()
        handle = engine.stage(old, new, [0], weights, prepared)
        _poll(handle, f"{path} stage behind queued compute")
        assert bool(busy.query()) == waits, (
            f"{path}: ready() {'before' if not busy.query() else 'after'} the compute "
            f"queued on the current stream finished (expected it to "
            f"{'wait' if waits else 'pass'})")
        handle.release()
        torch.cuda.synchronize()
        dist.barrier()
    # The other way round: work queued on the legacy default stream after a stage
    # does not wait for the stage's side stream (torch's streams are non-blocking),
    # so a forward pass launched next never waits for pulls still running.
    engine = TransferEngine(path="pull")
    weights = make_weights(old, rank, world, device)
    engine.share_weights(weights)
    # Launched once first: a kernel's first launch in a process waits for every
    # running kernel whatever the stream (CUDA's lazy module loading;
    # benchmarks/diagnostics/stream_waits.py), which is not what this checks.
    torch.ones(1, device=device).add_(1)
    torch.cuda.synchronize()
    handle = engine.stage(old, new, [0], weights)
    side, _ = engine._side(device)
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # stands for ~1 s of pulls
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.ones(1, device=device).add_(1)
    after = torch.cuda.Event()
    after.record()
    deadline = time.monotonic() + DEADLINE_S
    while not after.query():
        assert time.monotonic() < deadline, f"default-stream work not done in {DEADLINE_S} s"
        time.sleep(0.0005)
    assert not side.query(), ("default-stream work queued after the stage completed only "
                              "once the side stream's kernel had ended: it waited for it")
    torch.cuda.synchronize()
    agreed_ready(handle)
    handle.release()
    dist.barrier()


def _swap_n(world: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's slot 0 moves one rank up (a ring of pulls)."""
    old = np.tile(np.arange(world * LOCAL), (LAYERS, 1))
    new = old.copy()
    new[:, [r * LOCAL for r in range(world)]] = old[:, [((r - 1) % world) * LOCAL
                                                        for r in range(world)]]
    return old, new
