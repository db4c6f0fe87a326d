"""Where `TransferEngine.stage()`'s host time goes on GPU (a diagnostic, one table).

For 1 and 4 layers (DeepSeek-V3-like experts as in transfer_bench.py) it
prints, per rank 0, medians over repeats:

- ``stage() host ms`` for the send/recv path and the pull path;
- ``batch_isend_irecv host ms`` for the same per-peer messages, prebuilt,
  launched (a) on an idle stream and (b) right after ~300 MB of device
  copies were queued on the same stream: if (b) >> (a), torch's coalesced
  P2P launch waits for queued work on the host;
- the top functions of a cProfile of `stage()` (send/recv path).

    python benchmarks/diagnostics/stage_profile.py            # 2 GPUs
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import transfer_bench as tb

from eplb_fsm.testing import run_ranks
from eplb_fsm.transfer import TransferEngine


def _stage_ms(engine: TransferEngine, old: np.ndarray, new: np.ndarray, layers: list[int],
              weights: list[list[torch.Tensor]], repeats: int,
              prof: cProfile.Profile | None = None) -> float:
    prepared = engine.prepare(old, new, layers)
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        if prof is not None and i >= 2:
            prof.enable()
        handle = engine.stage(old, new, layers, weights, prepared)
        if prof is not None and i >= 2:
            prof.disable()
        if i >= 2:
            times.append(time.perf_counter() - start)
        handle.wait_blocking()
        handle.release()
    return statistics.median(times) * 1e3


def _launch_ms(peer_bytes: int, rank: int, world: int, busy: bool, repeats: int) -> float:
    send = {p: torch.empty(peer_bytes, dtype=torch.uint8, device="cuda")
            for p in range(world) if p != rank}
    recv = {p: torch.empty(peer_bytes, dtype=torch.uint8, device="cuda")
            for p in range(world) if p != rank}
    filler = torch.empty(300 * 2**20, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(filler)
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        torch.cuda.synchronize()
        if busy:
            for _ in range(4):
                other.copy_(filler, non_blocking=True)
        ops = [dist.P2POp(dist.isend, t, p) for p, t in send.items()]
        ops += [dist.P2POp(dist.irecv, t, p) for p, t in recv.items()]
        start = time.perf_counter()
        works = dist.batch_isend_irecv(ops)
        took = time.perf_counter() - start
        for work in works:
            work.wait()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(took)
    return statistics.median(times) * 1e3


def rank_fn(rank: int, world: int, repeats: int) -> dict[str, Any]:
    _, old, new, weights = tb.gpu_setup(rank, world)
    out: dict[str, Any] = {"rows": []}
    nccl = TransferEngine(path="nccl")
    pull = TransferEngine(path="pull")
    pull.share_weights(weights)
    for count in (1, 4):
        layers = list(range(count))
        prof = cProfile.Profile()
        send_ms = _stage_ms(nccl, old, new, layers, weights, repeats, prof)
        pull_ms = _stage_ms(pull, old, new, layers, weights, repeats)
        # One size for every pair, the same on every rank (a send and its receive
        # must match): the plan's mean bytes per ordered pair of ranks.
        slot_bytes = sum(a * b for a, b in tb.DEEPSEEK_SHAPES) * 2
        moved = tb.plan_layers(old, new, world, layers).bytes_moved(slot_bytes)
        peer = max(int(moved / (world * (world - 1))), 1)
        idle_ms = _launch_ms(peer, rank, world, False, repeats)
        busy_ms = _launch_ms(peer, rank, world, True, repeats)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(10)
        out["rows"].append((count, send_ms, pull_ms, idle_ms, busy_ms))
        out[f"profile_{count}"] = text.getvalue()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    ns = parser.parse_args()
    results = run_ranks(rank_fn, ns.gpus, ns.repeats, backend="nccl", timeout=300)
    r0 = results[0]
    print(f"stage_profile: {ns.gpus} x {torch.cuda.get_device_name(0)}, torch "
          f"{torch.__version__}; rank 0, medians of {ns.repeats}")
    print(f"{'layers':>6} {'stage() send/recv ms':>21} {'stage() pull ms':>16} "
          f"{'batch launch idle ms':>21} {'after queued copies ms':>23}")
    for count, send_ms, pull_ms, idle_ms, busy_ms in r0["rows"]:
        print(f"{count:>6} {send_ms:21.3f} {pull_ms:16.3f} {idle_ms:21.3f} {busy_ms:23.3f}")
    for count in (1, 4):
        print(f"\ncProfile of stage() (send/recv), {count} layer(s), rank 0:")
        print("\n".join(r0[f"profile_{count}"].splitlines()[:22]))


if __name__ == "__main__":
    main()
