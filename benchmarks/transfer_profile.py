"""Where a staged transfer's time goes on GPU (diagnostic for transfer_bench).

    python benchmarks/transfer_profile.py --gpus 2 --layers 4
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


def _rank(rank: int, world: int, layers: int) -> dict[str, Any]:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    rng = np.random.default_rng(0)
    old = tb.random_p2l(rng, layers, world, 9)
    new = tb.random_p2l(rng, layers, world, 9)
    weights = tb.make_weights(old, rank, world, tb.DEEPSEEK_SHAPES, device)
    eng = TransferEngine()
    ls = list(range(layers))
    prepared = eng.prepare(old, new, ls)
    out: dict[str, list[float]] = {"host_stage_ms": [], "to_ready_ms": [], "ops": []}
    prof = cProfile.Profile()
    for i in range(8):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if i >= 3:
            prof.enable()
        h = eng.stage(old, new, ls, weights, prepared)
        if i >= 3:
            prof.disable()
        t1 = time.perf_counter()
        while not h.ready():
            pass
        t2 = time.perf_counter()
        h.release()
        if i >= 3:
            out["host_stage_ms"].append((t1 - t0) * 1e3)
            out["to_ready_ms"].append((t2 - t0) * 1e3)
    recv = prepared.receives(rank)
    send = prepared.sends(rank)
    out["ops"] = [len(recv) * 3 + len(send) * 3]
    # The same op structure (one op per tensor per expert) on preallocated buffers.
    bufs_r = [torch.empty(a * b, dtype=torch.bfloat16, device=device)
              for _ in recv for a, b in tb.DEEPSEEK_SHAPES]
    bufs_s = [weights[t.layer][k][t.src_slot] for t in send for k in range(3)]
    peers_r = [t.src_rank for t in recv for _ in range(3)]
    peers_s = [t.dst_rank for t in send for _ in range(3)]
    times = []
    for i in range(8):
        ops = [dist.P2POp(dist.irecv, b, p) for b, p in zip(bufs_r, peers_r, strict=True)]
        ops += [dist.P2POp(dist.isend, b, p) for b, p in zip(bufs_s, peers_s, strict=True)]
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    out["per_tensor_ops_ms"] = times
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    return {k: (statistics.median(v) if k != "ops" else v[0]) for k, v in out.items()} | {
        "profile": s.getvalue() if rank == 0 else ""}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    res = run_ranks(_rank, a.gpus, a.layers, backend="nccl", timeout=300)
    for r, x in enumerate(res):
        print(r, {k: v for k, v in x.items() if k != "profile"})
    print(res[0]["profile"])


if __name__ == "__main__":
    main()
