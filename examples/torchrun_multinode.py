"""The balancer under torchrun, one node or several: the launch lines a cluster uses.

torchrun starts one process per GPU (or per CPU worker) and sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous; this script
joins the group (NCCL when CUDA is present, else gloo), serves the reference
expert-parallel MoE model with ``await rt.step()`` after every pass, and
rank 0 prints a summary. The runtime creates its own gloo group over the
same ranks for the readiness all-reduces, and learns the node layout from
``EplbConfig(num_nodes=..., ranks_per_node=...)`` so that transfers prefer
a same-node source.

One node (CPU: 2 gloo processes; GPU: one process per GPU)::

    torchrun --standalone --nproc-per-node 2 examples/torchrun_multinode.py
    torchrun --standalone --nproc-per-node 8 examples/torchrun_multinode.py

Two nodes of 8 GPUs, elastic (c10d) rendezvous: run the same line on every
node; HOST is any one of them, reachable from the others::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id eplb-demo examples/torchrun_multinode.py

Two nodes, static rendezvous: the same, but each node names its rank::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST \\
        --master-port 29500 examples/torchrun_multinode.py       # on HOST
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 8 --master-addr HOST \\
        --master-port 29500 examples/torchrun_multinode.py       # on the other node

(``python -m torch.distributed.run`` is the same launcher as ``torchrun``.)
Sizes are small so that CI runs it on CPU in seconds; tested on CPU/gloo
only, the NCCL path is the same code with ``device="cuda"``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from eplb_fsm import EplbConfig, EplbRuntime, balancedness, rank_load_from_physical
from eplb_fsm.reference import MoEConfig, ReferenceMoE, SyntheticTrace, sample_tokens

EXPERTS, TOP_K, TOKENS = 16, 2, 32


async def serve(steps: int) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = max(world // local_world, 1)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    # At least two slots per rank and a quarter of the experts spare, rounded up to
    # a whole number of slots on every rank.
    local = max(2, math.ceil(EXPERTS * 1.25 / world))
    redundant = local * world - EXPERTS
    # One expert group: the global policy, which balances across nodes too. A model
    # with group-limited routing (DeepSeek-V3: num_expert_groups=8) gets the
    # hierarchical policy when its groups divide over the nodes; it packs whole
    # groups per node, so a hot group limits how balanced the nodes can get.
    config = MoEConfig(num_layers=4, num_logical_experts=EXPERTS, hidden_size=16,
                       intermediate_size=32, top_k=TOP_K)
    model = ReferenceMoE(config, num_physical_experts=EXPERTS + redundant, device=device)
    rt = EplbRuntime(EplbConfig(window_size=20, step_interval=steps // 3,
                                num_redundant_experts=redundant, num_nodes=nodes,
                                ranks_per_node=local_world), device=device)
    rt.add_model(model, "main")
    trace = SyntheticTrace(4, EXPERTS, exponent=1.4, shift_steps=(steps // 2,), seed=0)
    per_pass: list[float] = []
    for step in range(1, steps + 1):
        hidden = sample_tokens(config, TOKENS, step=step, rank=rank).to(device)
        routing = trace.routing(step, rank, TOKENS, TOP_K)
        out = model(hidden, routing)
        load = model.expert_load_view.clone()  # for the printout only: one extra all-reduce
        dist.all_reduce(load)
        per_pass.append(balancedness(rank_load_from_physical(load.cpu().numpy(), world)))
        await rt.step()
    dense = model.dense_reference()(hidden, routing)
    same = torch.equal(out, dense) if device.type == "cpu" else \
        torch.allclose(out, dense, rtol=1e-5, atol=1e-6)
    stats = rt.stats()["models"]["main"]
    placement = rt.placement().physical_to_logical.tolist()
    rt.close()
    return {"nodes": nodes, "redundant": redundant, "balancedness": per_pass,
            "rebalances": stats["rebalances"], "bytes": stats["bytes_moved"], "same": same,
            "placement": placement, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="forward passes (>= 60)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run me under torchrun, e.g. "
                     "torchrun --standalone --nproc-per-node 2 examples/torchrun_multinode.py")
    if args.steps < 60:
        parser.error("--steps must be >= 60")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    result = asyncio.run(serve(args.steps))
    results: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        window, rebalances = 20, result["rebalances"]
        print(f"torchrun: {len(results)} ranks on {result['nodes']} node(s), backend "
              f"{dist.get_backend()}, device {result['device']}, {args.steps} passes, "
              f"{EXPERTS} experts + {result['redundant']} redundant slots")
        print(f"balancedness (measured, mean/max per-rank load per layer, averaged over "
              f"layers): first {window} passes "
              f"{sum(result['balancedness'][:window]) / window:.4f}, last {window} passes "
              f"{sum(result['balancedness'][-window:]) / window:.4f}")
        print(f"rebalances: done {rebalances['done']}, dropped {rebalances['dropped']}, "
              f"failed {rebalances['failed']}; bytes received "
              f"{sum(r['bytes'] for r in results)} (all ranks)")
        print(f"same placement on every rank: "
              f"{'yes' if all(r['placement'] == result['placement'] for r in results) else 'NO'}")
        print(f"outputs equal the dense model after rebalancing: "
              f"{'yes' if all(r['same'] for r in results) else 'NO'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
