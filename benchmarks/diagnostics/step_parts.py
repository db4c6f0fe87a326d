"""What an idle `step()` costs, part by part, on one device (diagnostic).

    python benchmarks/diagnostics/step_parts.py [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import torch

from eplb_fsm import EplbConfig, EplbRuntime
from eplb_fsm.testing import TaggedMoEModel
from eplb_fsm.testing._fake_cluster import FakeCluster, _FakeAllReduce, _FakeMover


def _us(fn: Callable[[], object], n: int = 3000) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--record-every", type=int, default=None,
                        help="load_record_interval (default: 1 on CPU, 8 on CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cluster = FakeCluster(1, EplbConfig(window_size=100, step_interval=10**9,
                                        num_redundant_experts=16,
                                        load_record_interval=args.record_every))
    cfg = cluster.config
    rt = EplbRuntime.from_adapters(cfg, allreduce=_FakeAllReduce(cluster._ledger, 0),
                                   mover=_FakeMover(cluster, 0), device=device)
    model = TaggedMoEModel(0, 1, 8, 64, 16, device=device)
    rt.add_model(model, "main")
    loop = asyncio.new_event_loop()
    buf = torch.zeros(100, 8, 80, dtype=torch.int64, device=device)
    view = model.expert_load_view
    async def many(n: int) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await rt.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    rows = [
        ("idle step, awaited in a loop", loop.run_until_complete(many(5000))),
        ("idle await rt.step()", _us(lambda: loop.run_until_complete(rt.step()))),
        ("run_until_complete(noop)", _us(lambda: loop.run_until_complete(asyncio.sleep(0)))),
        ("buf[i].copy_(view)", _us(lambda: buf[5].copy_(view))),
        ("view.zero_()", _us(lambda: view.zero_())),
        ("buf[i] (index only)", _us(lambda: buf[5])),
    ]
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}; median of 3000, microseconds")
    for name, us in rows:
        print(f"{name:<28} {us:8.2f}")


if __name__ == "__main__":
    main()
