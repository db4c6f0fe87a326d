"""The reference expert-parallel MoE model and the load traces the simulator uses.

A public home for what ``eplb-fsm simulate`` runs, so engine authors can run
the same model and traces against their own integration:

- `ReferenceMoE`: an EP MoE stack implementing `eplb_fsm.MoEModel`, whose
  outputs do not depend on the placement (bit-identical on CPU);
  `DenseMoE`: the single-process oracle over the same weights.
- `SyntheticTrace` (Zipf skew, drift, sudden shifts) and `RecordedTrace`
  (replay of a [steps, layers, experts] load file).
"""

from ._reference.moe import DenseMoE, MoEConfig, ReferenceMoE, expert_weights_for, sample_tokens
from ._reference.traces import LoadTrace, RecordedTrace, SyntheticTrace, drift_load, save_loads

__all__ = [
    "DenseMoE",
    "LoadTrace",
    "MoEConfig",
    "RecordedTrace",
    "ReferenceMoE",
    "SyntheticTrace",
    "drift_load",
    "expert_weights_for",
    "sample_tokens",
    "save_loads",
]
