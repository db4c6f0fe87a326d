"""Load traces: which experts tokens go to, step by step, with skew under control.

The simulator routes tokens from a trace instead of learned routers, so that
skew, drift and sudden shifts are parameters of an experiment rather than
accidents of a checkpoint. Two kinds share one API (`LoadTrace`):

- `SyntheticTrace`: Zipf-like popularity per layer (each layer ranks its
  experts by its own random permutation), optional slow drift and sudden
  shifts of the hot set, all a pure function of ``(seed, step)``: any rank
  can compute any step, in any order, without talking to the others.
- `RecordedTrace`: replay of a recorded [steps, L, E] load file (the format
  `eplb-fsm plan` reads), normalised per layer into popularity.

Per step a trace gives ``popularity(step)`` [L, E] (each row sums to 1),
``load(step)`` [L, E] (token counts, for planning and for files) and sampled
routing: ``expert_ids(step, layer, num_tokens, top_k, rng)`` draws ``top_k``
distinct experts per token, and ``routing(step, rank, num_tokens, top_k)``
does it for every layer with the rank's own generator, seeded by
``(seed, step, rank)``, so every rank makes its own tokens deterministically.

Sampling is Plackett-Luce (Gumbel top-k): the first choice of a token follows
popularity exactly; since the k choices are distinct, an expert whose
popularity exceeds 1/k receives fewer than ``popularity * tokens * k``
assignments. `load` is the popularity scaled to a token count, not a sample.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._cli.files import LOAD_SUFFIXES, read_load

__all__ = ["LoadTrace", "RecordedTrace", "SyntheticTrace", "drift_load", "save_loads"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_TAG_ROUTING = 0
_TAG_LAYOUT = 1
_TAG_SHIFT = 2
_ZERO_LOG = -1e6  # key of a zero-popularity expert: chosen only when nothing else is left
_CACHE_SIZE = 64


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class LoadTrace(ABC):
    """Per-step expert popularity, and routing sampled from it (see module docstring)."""

    num_layers: int
    num_experts: int
    seed: int

    @property
    @abstractmethod
    def num_steps(self) -> int | None:
        """Steps the trace holds, or None if it is unbounded."""

    @abstractmethod
    def _popularity(self, step: int) -> FloatArray: ...

    @abstractmethod
    def _load(self, step: int) -> FloatArray: ...

    def _check_step(self, step: Any) -> int:
        step = _check_int("step", step, 0)
        if self.num_steps is not None and step >= self.num_steps:
            raise ValueError(f"step={step} is past the end of a trace of {self.num_steps} steps")
        return step

    def popularity(self, step: int) -> FloatArray:
        """[L, E] probability that an assignment of `step` picks each expert (rows sum to 1)."""
        return self._popularity(self._check_step(step)).copy()

    def load(self, step: int) -> FloatArray:
        """[L, E] token load of `step`: recorded counts, or popularity scaled to a count."""
        return self._load(self._check_step(step)).copy()

    def loads(self, num_steps: int | None = None) -> FloatArray:
        """[steps, L, E]: `load` of steps ``0 .. num_steps - 1`` (default: all)."""
        if num_steps is None:
            if self.num_steps is None:
                raise ValueError("num_steps is required for an unbounded trace")
            num_steps = self.num_steps
        num_steps = _check_int("num_steps", num_steps, 1)
        if self.num_steps is not None and num_steps > self.num_steps:
            raise ValueError(f"num_steps={num_steps} exceeds the trace's {self.num_steps} steps")
        return np.stack([self._load(s) for s in range(num_steps)])

    def save(self, path: str | Path, num_steps: int | None = None) -> None:
        """Write `loads(num_steps)` as a [steps, L, E] load file (.npy, .pt or .json)."""
        save_loads(path, self.loads(num_steps))

    def rng(self, step: int, rank: int) -> np.random.Generator:
        """The generator for `rank`'s tokens at `step`: a function of (seed, step, rank)."""
        step = _check_int("step", step, 0)
        rank = _check_int("rank", rank, 0)
        return np.random.default_rng([self.seed, _TAG_ROUTING, step, rank])

    def expert_ids(
        self, step: int, layer: int, num_tokens: int, top_k: int, rng: np.random.Generator
    ) -> IntArray:
        """[num_tokens, top_k] distinct experts per token, drawn from `popularity(step)`."""
        step = self._check_step(step)
        layer = _check_int("layer", layer, 0)
        if layer >= self.num_layers:
            raise ValueError(f"layer={layer} out of range for {self.num_layers} layers")
        num_tokens = _check_int("num_tokens", num_tokens, 0)
        top_k = _check_int("top_k", top_k, 1)
        if top_k > self.num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={self.num_experts}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        return self._sample(self._popularity(step)[layer], num_tokens, top_k, rng)

    def routing(self, step: int, rank: int, num_tokens: int, top_k: int) -> IntArray:
        """[L, num_tokens, top_k]: `rank`'s routing at `step`, layer by layer, from
        ``rng(step, rank)`` — ready for ``ReferenceMoE.forward(expert_ids=...)``."""
        rng = self.rng(step, rank)
        num_tokens = _check_int("num_tokens", num_tokens, 0)
        top_k = _check_int("top_k", top_k, 1)
        out = np.empty((self.num_layers, num_tokens, top_k), dtype=np.int64)
        for layer in range(self.num_layers):
            out[layer] = self.expert_ids(step, layer, num_tokens, top_k, rng)
        return out

    def _sample(self, p: FloatArray, num_tokens: int, top_k: int,
                rng: np.random.Generator) -> IntArray:
        log_p = np.full(p.shape, _ZERO_LOG)
        np.log(p, out=log_p, where=p > 0)
        keys = log_p + rng.gumbel(size=(num_tokens, self.num_experts))
        if top_k < self.num_experts:
            chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        else:
            chosen = np.broadcast_to(np.arange(self.num_experts), keys.shape)
        # Most preferred first: the order a router's top-k would report.
        order = np.argsort(-np.take_along_axis(keys, chosen, axis=1), axis=1, kind="stable")
        return np.take_along_axis(chosen, order, axis=1).astype(np.int64)


class SyntheticTrace(LoadTrace):
    """Zipf-like popularity per layer, with slow drift and sudden shifts of the hot set.

    - `exponent`: expert of popularity rank r (0 = hottest) gets weight
      ``(r + 1) ** -exponent``; 0 is uniform, ~1 is typical of real MoE traffic,
      2 puts most traffic on a handful of experts. Each layer ranks its experts
      by its own random permutation.
    - `drift`: at most this fraction of the popularity mass moves between experts
      per step (total-variation distance between consecutive steps). The trace
      glides linearly between random Zipf layouts ("keyframes") ``ceil(1/drift)``
      steps apart; 0 means no drift.
    - `shift_steps`: at each of these steps the hot set is replaced: the coldest
      half of the experts (by the previous step's popularity) become the hottest,
      in a fresh random order, and drift starts again from there.
    - `load_per_step`: the (token, k) assignments per layer that `load` and
      `save` scale popularity to.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        exponent: float = 1.0,
        drift: float = 0.0,
        shift_steps: Sequence[int] = (),
        seed: int = 0,
        load_per_step: float = 4096.0,
    ) -> None:
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.num_experts = _check_int("num_experts", num_experts, 1)
        self.seed = _check_int("seed", seed, 0)
        if not isinstance(exponent, (int, float)) or not math.isfinite(exponent) or exponent < 0:
            raise ValueError(f"exponent must be a finite number >= 0, got {exponent!r}")
        if not isinstance(drift, (int, float)) or not 0 <= drift <= 1:
            raise ValueError(f"drift must be a number in [0, 1], got {drift!r}")
        if (not isinstance(load_per_step, (int, float)) or not math.isfinite(load_per_step)
                or load_per_step <= 0):
            raise ValueError(f"load_per_step must be a finite number > 0, got {load_per_step!r}")
        if isinstance(shift_steps, (str, bytes)) or not isinstance(shift_steps, Sequence):
            raise ValueError(f"shift_steps must be a sequence of ints, got {shift_steps!r}")
        shifts = [_check_int("shift_steps", s, 1) for s in shift_steps]
        if any(b <= a for a, b in itertools.pairwise(shifts)):
            raise ValueError(f"shift_steps must be strictly increasing, got {list(shift_steps)}")
        self.exponent = float(exponent)
        self.drift = float(drift)
        self.shift_steps = tuple(shifts)
        self.load_per_step = float(load_per_step)
        ranks = np.arange(1, self.num_experts + 1, dtype=np.float64)
        weights = ranks ** -self.exponent
        self._weights = weights / weights.sum()
        self._period = math.ceil(1 / self.drift) if self.drift > 0 else 0
        self._starts = (0, *self.shift_steps)
        self._layouts: OrderedDict[tuple[int, int], IntArray] = OrderedDict()

    @property
    def num_steps(self) -> None:
        return None

    def __repr__(self) -> str:
        return (f"SyntheticTrace(layers={self.num_layers}, experts={self.num_experts}, "
                f"exponent={self.exponent}, drift={self.drift}, "
                f"shift_steps={list(self.shift_steps)}, seed={self.seed})")

    def _layout(self, epoch: int, keyframe: int) -> IntArray:
        """[L, E] popularity rank of each expert at one keyframe of one epoch."""
        key = (epoch, keyframe)
        cached = self._layouts.get(key)
        if cached is not None:
            self._layouts.move_to_end(key)
            return cached
        num_experts = self.num_experts
        rank_of = np.empty((self.num_layers, num_experts), dtype=np.int64)
        if epoch > 0 and keyframe == 0:
            before = self._popularity(self._starts[epoch] - 1)
            for layer in range(self.num_layers):
                order = np.argsort(-before[layer], kind="stable")  # hottest first
                hot, cold = order[:num_experts // 2], order[num_experts // 2:]
                rng = np.random.default_rng([self.seed, _TAG_SHIFT, epoch, layer])
                new_order = np.concatenate([rng.permutation(cold), rng.permutation(hot)])
                rank_of[layer, new_order] = np.arange(num_experts)
        else:
            for layer in range(self.num_layers):
                rng = np.random.default_rng([self.seed, _TAG_LAYOUT, epoch, keyframe, layer])
                rank_of[layer] = rng.permutation(num_experts)
        rank_of.setflags(write=False)
        self._layouts[key] = rank_of
        if len(self._layouts) > _CACHE_SIZE:
            self._layouts.popitem(last=False)
        return rank_of

    def _popularity(self, step: int) -> FloatArray:
        epoch = bisect.bisect_right(self._starts, step) - 1
        offset = step - self._starts[epoch]
        if not self._period:
            return self._weights[self._layout(epoch, 0)]
        keyframe, into = divmod(offset, self._period)
        start = self._weights[self._layout(epoch, keyframe)]
        if not into:
            return start
        end = self._weights[self._layout(epoch, keyframe + 1)]
        frac = into / self._period
        blended: FloatArray = (1 - frac) * start + frac * end
        return blended

    def _load(self, step: int) -> FloatArray:
        return self._popularity(step) * self.load_per_step


class RecordedTrace(LoadTrace):
    """Replay of recorded loads [steps, L, E]; each step's rows normalised to popularity.

    A layer with no load at a step is uniform. With ``wrap=True`` step ``s`` replays
    recorded step ``s % num_recorded`` and the trace is unbounded.
    """

    def __init__(self, loads: npt.ArrayLike, *, seed: int = 0, wrap: bool = False) -> None:
        arr = np.array(loads, dtype=np.float64)
        if arr.ndim != 3 or 0 in arr.shape:
            raise ValueError(f"loads must be a non-empty [steps, layers, experts] array, "
                             f"got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("loads must be finite and non-negative")
        self.seed = _check_int("seed", seed, 0)
        self.wrap = bool(wrap)
        self.num_recorded = int(arr.shape[0])
        self.num_layers, self.num_experts = int(arr.shape[1]), int(arr.shape[2])
        arr.setflags(write=False)
        self._loads = arr
        totals = arr.sum(axis=2, keepdims=True)
        uniform = np.full_like(arr, 1.0 / self.num_experts)
        popularity = np.divide(arr, totals, out=uniform, where=totals > 0)
        popularity.setflags(write=False)
        self._pop = popularity

    @classmethod
    def from_file(cls, path: str | Path, *, seed: int = 0, wrap: bool = False) -> RecordedTrace:
        """Read a [steps, L, E] load file (.npy, .pt or .json; see `files.read_load`)."""
        return cls(read_load(path, ndim=3), seed=seed, wrap=wrap)

    @property
    def num_steps(self) -> int | None:
        return None if self.wrap else self.num_recorded

    def __repr__(self) -> str:
        return (f"RecordedTrace(steps={self.num_recorded}, layers={self.num_layers}, "
                f"experts={self.num_experts}, wrap={self.wrap})")

    def _popularity(self, step: int) -> FloatArray:
        return self._pop[step % self.num_recorded]

    def _load(self, step: int) -> FloatArray:
        return self._loads[step % self.num_recorded]


def save_loads(path: str | Path, loads: npt.ArrayLike) -> None:
    """Write [steps, L, E] loads in a format `read_load(path, ndim=3)` reads back exactly."""
    path = Path(path)
    arr = np.asarray(loads, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"loads must be 3-D [steps, layers, experts], got shape {arr.shape}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, arr, allow_pickle=False)
    elif suffix == ".pt":
        import torch

        torch.save(torch.from_numpy(arr.copy()), path)
    elif suffix == ".json":
        path.write_text(json.dumps({"load": arr.tolist()}))
    else:
        raise ValueError(f"load file {path}: unknown suffix {suffix!r}; use one of "
                         f"{', '.join(LOAD_SUFFIXES)}")


def drift_load(load: npt.ArrayLike, rng: np.random.Generator,
               moved: float = 0.05) -> FloatArray:
    """`load` [L, E] after a slow drift: every expert's load times exp(sigma z),
    sigma chosen per layer (by bisection) so that `moved` of each layer's load
    changes experts (total variation distance); layer totals are kept."""
    arr = np.asarray(load, dtype=np.float64)
    if arr.ndim != 2 or np.any(arr.sum(axis=1) <= 0):
        raise ValueError("load must be 2-D [layers, experts] with a positive total per layer")
    if not 0 <= moved <= 1:
        raise ValueError(f"moved must be in [0, 1], got {moved!r}")
    p = arr / arr.sum(axis=1, keepdims=True)
    z = rng.standard_normal(p.shape)
    lo, hi = np.zeros((p.shape[0], 1)), np.full((p.shape[0], 1), 4.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        q = p * np.exp(mid * z)
        q /= q.sum(axis=1, keepdims=True)
        small = 0.5 * np.abs(q - p).sum(axis=1, keepdims=True) < moved
        lo, hi = np.where(small, mid, lo), np.where(small, hi, mid)
    q = p * np.exp(hi * z)
    out: FloatArray = q / q.sum(axis=1, keepdims=True) * arr.sum(axis=1, keepdims=True)
    return out
