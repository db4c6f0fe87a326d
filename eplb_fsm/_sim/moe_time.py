"""What balancing bought in time: the modelled MoE layer time of every pass.

Balancedness is a proxy; an expert-parallel MoE layer ends when its slowest
rank ends, and that is what users pay for. On every pass the simulator has
each slot's rows (all-reduced over the EP group) under the placement that
served it, and, from the same routing, the rows each slot would have had
under the initial layout (`Placement.initial`, what ``--mode off`` serves;
`route_to_slots` applies the model's own replica rule). A `CostModel` turns
rows into seconds: a rank takes the sum of its slots' modelled times, a layer
its slowest rank's, a pass the sum over layers. Both figures come from one
run on one trace, so their ratio is what balancing bought, not two runs'
noise. Under ``--mode off`` the two placements are one and the ratio is 1.

The cost model is the H100 roofline of a DeepSeek-V3 expert
(`CostModel.roofline`) unless ``--cost-model FILE`` (written by ``eplb-fsm
calibrate``) is given: each slot is modelled as that expert on that card,
at the rows this run routed to it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core.cost_model import CostModel, layer_seconds

__all__ = ["cost_model_for", "model_label", "moe_time_report", "pass_moe_us", "speedup_line"]

_DTYPE_NAMES = {1: "1-byte", 2: "bf16", 4: "fp32"}


@functools.lru_cache(maxsize=4)
def cost_model_for(path: str | None) -> CostModel:
    """The run's cost model: the file's (``eplb-fsm calibrate``), else the H100 roofline."""
    return CostModel.roofline() if path is None else CostModel.load(path)


def model_label(model: CostModel) -> str:
    """A short name for summaries: source, card and expert shape."""
    e = model.expert
    weights = _DTYPE_NAMES.get(e["dtype_bytes"], f"{e['dtype_bytes']}-byte")
    return f"{model.source}, {model.device}, {e['hidden']}x{e['intermediate']} {weights} experts"


def pass_moe_us(model: CostModel, slot_rows: npt.ArrayLike, num_ranks: int) -> float:
    """[L, P] rows per slot of one pass -> its MoE layers' modelled time, microseconds."""
    return float(layer_seconds(model.rank_seconds(slot_rows, num_ranks)).sum() * 1e6)


def moe_time_report(per_step: dict[int, tuple[float, float]], steps: int,
                    cost_model: str | None) -> dict[str, Any]:
    """report.json's ``moe_time`` from every pass's (serving, initial layout) microseconds."""
    model = cost_model_for(cost_model)
    serving = np.asarray([per_step[step][0] for step in range(1, steps + 1)])
    initial = np.asarray([per_step[step][1] for step in range(1, steps + 1)])
    serving_median, initial_median = float(np.median(serving)), float(np.median(initial))
    return {
        "definition": "modelled time of one pass's MoE layers: per layer the slowest rank, "
                      "a rank the sum of its slots' modelled times at that pass's rows; "
                      "summed over layers",
        "model": model_label(model),
        "cost_model": {"file": cost_model, **model.to_dict()},
        "serving_us": {"median": serving_median, "per_step": serving.tolist()},
        "initial_us": {"median": initial_median, "per_step": initial.tolist()},
        "speedup": initial_median / serving_median,
    }


def speedup_line(moe_time: dict[str, Any]) -> str:
    """The summary's one line on what balancing bought."""
    return (f"balancing made the MoE layers {moe_time['speedup']:.2f}x faster "
            f"(modelled: {moe_time['model']}, median over passes)")
