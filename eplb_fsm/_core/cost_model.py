"""A slot's time as a function of its rows: what balancing should even out.

Why: an expert-parallel MoE layer ends when its slowest rank ends, and a
rank's time is the sum of its slots' expert-MLP times. Balancing tokens is a
proxy for balancing that time, and a poor one where GEMMs are memory-bound
(decode): a slot with 20 rows costs nearly what one with 200 costs (each reads
the expert's whole weights), so two ranks with equal rows can differ in time
by how those rows are split over their slots. A `CostModel` says what a slot
costs; `time` (see `time_policy`) packs slots by that cost.

The model is a piecewise-linear function ``seconds(rows)`` given by knots:

- ``rows[0] == 0`` and ``seconds[0] == 0``: an empty slot does no work (grouped
  kernels skip it). Between 0 and the next knot the cost ramps linearly, so a
  slot expected to see 0.3 rows per pass costs 0.3 of a one-row slot: the
  expected cost of a slot that is busy in 30% of the passes.
- knots strictly increasing in rows, seconds non-decreasing (more rows never
  take less time; a calibration makes its measurements so, see
  `CostModel.from_measurements`);
- beyond the last knot the cost grows linearly (large GEMMs are
  compute-bound), at the slope over the upper half of the knots' range.

Two sources: a calibration on the card (``eplb-fsm calibrate`` measures
the expert MLP at a grid of row counts and writes the JSON below), and an
analytic roofline from the card's memory bandwidth and FLOP/s
(`CostModel.roofline`), exact as a piecewise-linear function, used when no
calibration is given.

JSON document (``CostModel.to_json``; every key always present)::

    {"format": "eplb-fsm cost model", "version": 1,
     "source": "calibrated" | "roofline", "device": "NVIDIA H100 80GB HBM3",
     "expert": {"hidden": 7168, "intermediate": 2048, "dtype_bytes": 2},
     "rows": [0, 1, 16, ...], "seconds": [0.0, 2.9e-05, ...], "note": "..."}

`note` records how the figures were obtained (clocks, repeats, the
roofline's inputs). The core reads and writes this one small file itself
(`load`/`save`); nothing else here touches I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .balance import balancedness_per_layer, slot_load_from_logical
from .placement import Placement

__all__ = [
    "FORMAT",
    "CostModel",
    "layer_seconds",
    "rank_seconds_from_logical",
    "time_balancedness",
]

F64 = npt.NDArray[np.float64]

FORMAT = "eplb-fsm cost model"
VERSION = 1
#: DeepSeek-V3's routed expert: hidden 7168, intermediate 2048, bf16.
DEEPSEEK_V3_EXPERT = {"hidden": 7168, "intermediate": 2048, "dtype_bytes": 2}
#: H100 SXM datasheet figures: HBM3 bandwidth and dense bf16 FLOP/s.
H100_BANDWIDTH = 3.35e12
H100_FLOPS = 989e12
#: Per-slot fixed cost in the roofline (kernel launches and the gaps between
#: them on a busy stream), a few microseconds on Hopper.
SLOT_OVERHEAD_S = 4e-6


def _positive(name: str, value: Any, *, integer: bool = False) -> float:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if (isinstance(value, bool) or not isinstance(value, kinds)
            or not math.isfinite(float(value)) or value <= 0):
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} > 0, got {value!r}")
    return float(value)


def _knots(name: str, value: Any, least: int = 2) -> F64:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D list of numbers ({exc})") from None
    if arr.ndim != 1 or arr.size < least:
        raise ValueError(f"{name} must be 1-D with at least {least} "
                         f"{'knots' if least > 1 else 'value'}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return arr


@dataclass(frozen=True, eq=False)
class CostModel:
    """Seconds one slot takes for its rows, as a piecewise-linear function (module doc).

    Build one with `roofline`, `from_measurements` or `load`; the constructor
    checks the knots and raises `ValueError` naming the field and the rule.
    """

    rows: F64
    seconds: F64
    source: str = "roofline"
    device: str = "unknown"
    expert: Mapping[str, int] = field(default_factory=lambda: dict(DEEPSEEK_V3_EXPERT))
    note: str = ""

    def __post_init__(self) -> None:
        rows, secs = _knots("rows", self.rows), _knots("seconds", self.seconds)
        if rows.shape != secs.shape:
            raise ValueError(f"rows and seconds must have the same length, got {rows.size} "
                             f"and {secs.size}")
        if rows[0] != 0 or secs[0] != 0:
            raise ValueError(f"the first knot must be rows=0, seconds=0 (an empty slot does "
                             f"no work), got rows={rows[0]}, seconds={secs[0]}")
        if np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be strictly increasing")
        if np.any(np.diff(secs) < 0):
            raise ValueError("seconds must be non-decreasing in rows (more rows never take "
                             "less time; see CostModel.from_measurements)")
        if secs[-1] <= 0:
            raise ValueError("seconds must not all be 0 (a slot with rows takes time)")
        if self.source not in ("calibrated", "roofline"):
            raise ValueError(f"source must be 'calibrated' or 'roofline', got {self.source!r}")
        if not isinstance(self.expert, Mapping):
            raise ValueError(f"expert must be a mapping of hidden, intermediate, dtype_bytes, "
                             f"got {type(self.expert).__name__}")
        for key in ("hidden", "intermediate", "dtype_bytes"):
            _positive(f"expert[{key!r}]", self.expert.get(key), integer=True)
        rows.flags.writeable = False
        secs.flags.writeable = False
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "seconds", secs)
        object.__setattr__(self, "expert", {k: int(self.expert[k]) for k in DEEPSEEK_V3_EXPERT})

    # -- evaluation -------------------------------------------------------

    @property
    def tail_slope(self) -> float:
        """Seconds per row beyond the last knot: the secant over the upper half
        of the knots' range (from half the last knot's rows to it). Not the
        last segment's slope: measured GEMM times step with tile sizes, and
        two knots on one step would make every row beyond them free."""
        half = self.rows[-1] / 2.0
        return float((self.seconds[-1] - np.interp(half, self.rows, self.seconds)) / half)

    def slot_seconds(self, rows: npt.ArrayLike) -> F64:
        """Seconds of a slot with `rows` rows (any shape; float rows allowed, >= 0)."""
        arr = np.asarray(rows, dtype=np.float64)
        if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0):
            raise ValueError("rows must be finite and >= 0")
        out = np.interp(arr, self.rows, self.seconds)
        beyond = arr > self.rows[-1]
        if np.any(beyond):
            out = np.where(beyond, self.seconds[-1] + (arr - self.rows[-1]) * self.tail_slope,
                           out)
        return np.asarray(out, dtype=np.float64)

    def rank_seconds(self, slot_rows: npt.ArrayLike, num_ranks: int) -> F64:
        """[L, P] rows per slot -> [L, R] seconds per rank (slots are rank-contiguous)."""
        arr = np.asarray(slot_rows, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"slot_rows must be 2-D [layers, slots], got shape {arr.shape}")
        if (isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer))
                or num_ranks < 1 or arr.shape[1] % num_ranks):
            raise ValueError(f"num_ranks must be a positive int dividing the {arr.shape[1]} "
                             f"slots, got {num_ranks!r}")
        return self.slot_seconds(arr).reshape(arr.shape[0], int(num_ranks), -1).sum(axis=2)

    # -- construction -----------------------------------------------------

    @classmethod
    def roofline(
        cls,
        memory_bandwidth: float = H100_BANDWIDTH,
        flops: float = H100_FLOPS,
        *,
        hidden: int = 7168,
        intermediate: int = 2048,
        dtype_bytes: int = 2,
        slot_overhead: float = SLOT_OVERHEAD_S,
        device: str = "H100 SXM (datasheet)",
    ) -> CostModel:
        """The analytic fallback: ``overhead + max(bytes / bandwidth, flops / FLOP/s)``.

        One slot with ``n`` rows runs gate-up ``[n, h] x [h, 2i]``, the
        activation, and down ``[n, i] x [i, h]``: ``6 n h i`` FLOPs, and it
        moves its weights (``3 h i`` elements) plus ``n (2 h + 6 i)``
        activation elements. Both terms are linear in ``n``, so the model is
        exact with knots at 0, 1, the ridge point and twice it. Defaults: the
        H100 SXM datasheet (3.35 TB/s, 989 TFLOP/s dense bf16); real kernels
        reach less, which is why a calibration is better.
        """
        bw = _positive("memory_bandwidth", memory_bandwidth)
        fl = _positive("flops", flops)
        h = int(_positive("hidden", hidden, integer=True))
        i = int(_positive("intermediate", intermediate, integer=True))
        b = int(_positive("dtype_bytes", dtype_bytes, integer=True))
        if (isinstance(slot_overhead, bool) or not isinstance(slot_overhead, (int, float))
                or not math.isfinite(slot_overhead) or slot_overhead < 0):
            raise ValueError(f"slot_overhead must be a finite number >= 0, got {slot_overhead!r}")
        fixed = 3 * h * i * b / bw                      # weights, read once per slot
        per_row_mem = (2 * h + 6 * i) * b / bw          # activations per row
        per_row_flop = 6 * h * i / fl

        def seconds(n: float) -> float:
            return float(slot_overhead + max(fixed + n * per_row_mem, n * per_row_flop))

        if per_row_flop > per_row_mem:
            ridge = max(fixed / (per_row_flop - per_row_mem), 2.0)
            knots = [0.0, 1.0, ridge, 2.0 * ridge]
        else:  # memory-bound at every size
            knots = [0.0, 1.0, 2.0]
        note = (f"roofline: {bw / 1e12:.3g} TB/s, {fl / 1e12:.4g} TFLOP/s, "
                f"{slot_overhead * 1e6:.3g} us per slot")
        return cls(np.asarray(knots), np.asarray([0.0] + [seconds(n) for n in knots[1:]]),
                   "roofline", device, {"hidden": h, "intermediate": i, "dtype_bytes": b}, note)

    @classmethod
    def from_measurements(
        cls,
        rows: npt.ArrayLike,
        seconds: npt.ArrayLike,
        *,
        device: str,
        expert: Mapping[str, int],
        note: str = "",
    ) -> CostModel:
        """A calibrated model from measured ``(rows, seconds)`` pairs (rows >= 1).

        Measurements repeat with noise and a GEMM library may pick a slower
        kernel for a larger size; the planner needs more rows never to look
        cheaper, so each figure is raised to the largest one measured at
        fewer rows (a running maximum). The (0, 0) knot is added.
        """
        r, s = _knots("rows", rows, 1), _knots("seconds", seconds, 1)
        if r.shape != s.shape:
            raise ValueError(f"rows and seconds must have the same length, got {r.size} "
                             f"and {s.size}")
        if r.min() < 1:
            raise ValueError(f"measured rows must be >= 1 (the 0-row knot is implied), "
                             f"got {r.min()}")
        if s.min() <= 0:
            raise ValueError(f"measured seconds must be > 0, got {s.min()}")
        order = np.argsort(r, kind="stable")
        r, s = r[order], s[order]
        if np.any(np.diff(r) == 0):
            raise ValueError("measured rows must not repeat (take the median of repeats first)")
        s = np.maximum.accumulate(s)
        return cls(np.concatenate([[0.0], r]), np.concatenate([[0.0], s]), "calibrated",
                   device, dict(expert), note)

    # -- the file ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "source": self.source,
                "device": self.device, "expert": dict(self.expert),
                "rows": [float(x) for x in self.rows],
                "seconds": [float(x) for x in self.seconds], "note": self.note}

    @classmethod
    def from_dict(cls, doc: Any) -> CostModel:
        if not isinstance(doc, Mapping):
            raise ValueError(f"cost model must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise ValueError(f"cost model format must be {FORMAT!r}, got {doc.get('format')!r}")
        if doc.get("version") != VERSION:
            raise ValueError(f"cost model version must be {VERSION}, got {doc.get('version')!r}")
        missing = [k for k in ("source", "device", "expert", "rows", "seconds") if k not in doc]
        if missing:
            raise ValueError(f"cost model lacks key {missing[0]!r}")
        if not isinstance(doc["expert"], Mapping):
            raise ValueError("cost model 'expert' must be an object with hidden, "
                             "intermediate, dtype_bytes")
        return cls(doc["rows"], doc["seconds"], str(doc["source"]), str(doc["device"]),
                   dict(doc["expert"]), str(doc.get("note", "")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cost model is not valid JSON ({exc})") from None
        return cls.from_dict(doc)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read a file written by `save` (``eplb-fsm calibrate``)."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cost model file {str(path)!r} cannot be read ({exc})") from None
        return cls.from_json(text)

    def describe(self) -> str:
        """One line for reports: where the figures come from."""
        return (f"{self.source} ({self.device}): 1 row {self.slot_seconds(1.0) * 1e6:.1f} us, "
                f"256 rows {self.slot_seconds(256.0) * 1e6:.1f} us, "
                f"4096 rows {self.slot_seconds(4096.0) * 1e6:.1f} us per slot")


def rank_seconds_from_logical(
    model: CostModel, logical_load: npt.ArrayLike, placement: Placement, num_ranks: int
) -> F64:
    """[L, E] rows per expert per pass -> [L, R] modelled seconds per rank."""
    return model.rank_seconds(slot_load_from_logical(logical_load, placement), num_ranks)


def layer_seconds(rank_seconds: npt.ArrayLike) -> F64:
    """[L, R] -> [L] modelled layer time: the slowest rank's."""
    arr = np.asarray(rank_seconds, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"rank_seconds must be 2-D [layers, ranks], got shape {arr.shape}")
    return arr.max(axis=1)


def time_balancedness(rank_seconds: npt.ArrayLike) -> float:
    """Balancedness of time: mean over ranks / max over ranks per layer, averaged."""
    return float(balancedness_per_layer(rank_seconds).mean())
