"""The sliding window of per-pass physical load, true across placement changes.

Each non-dummy pass copies the model's ``expert_load_view`` [L, P] into a
ring buffer on the model's device (one device copy, no host sync) and tags
the entry with the version of `physical_to_logical` in force during that
pass. When planning starts, entries are summed per version and each sum is
mapped to logical experts with *its* version's map: load recorded before a
layer was re-placed counts for the experts that were in those slots then.

Reading the window is split in two so that no step waits for the device:
`snapshot()` enqueues the sums and a non-blocking copy to host and records
an event; `HostLoad.logical()`, called ``readiness_lag`` steps later at an
agreed step, maps to logical and waits on the event only if the copy is
somehow not done yet (every rank must launch the load all-reduce at that
step, so postponing on one rank is not an option).

Bounds. The ring and its sums are int64 and the mapping to logical experts
adds in float64, exact below 2**53. `HostLoad.logical()` raises a
`ValueError` (never a wrapped or rounded sum, which planning would then
report as "negative" load) when this rank's window could exceed either:
the snapshot also reduces the ring to its largest magnitude, and
``largest * entries`` must stay below 2**63 and every layer's total below
`LOAD_LIMIT` = 2**53. Per rank below 2**53, the all-reduce over ranks cannot
wrap int64 below 1024 ranks. An engine counting tokens never comes near
either: 2**53 is ~9e15 tokens per layer in one window.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["LOAD_LIMIT", "HostLoad", "LoadWindow", "physical_to_logical_load"]

#: A rank's window load per layer must stay below this (float64's exact integers).
LOAD_LIMIT = 2**53
_INT64_LIMIT = 2**63


def physical_to_logical_load(
    physical: npt.NDArray[np.int64], p2l: npt.NDArray[np.int64], num_logical: int
) -> npt.NDArray[np.int64]:
    """[L, P] slot load -> [L, E] expert load under map `p2l` (empty slots dropped)."""
    num_layers = p2l.shape[0]
    key = np.where(p2l >= 0, p2l, num_logical) + (num_logical + 1) * np.arange(num_layers)[:, None]
    sums = np.bincount(key.ravel(), weights=physical.ravel().astype(np.float64),
                       minlength=num_layers * (num_logical + 1))
    return np.rint(sums).astype(np.int64).reshape(num_layers, num_logical + 1)[:, :num_logical]


class HostLoad:
    """Per-version load sums on their way to host memory."""

    def __init__(self, sums: torch.Tensor, versions: list[int],
                 maps: dict[int, npt.NDArray[np.int64]], num_logical: int,
                 extremes: torch.Tensor | None = None, entries: int = 0) -> None:
        """`extremes`: [min, max] of the ring the `sums` were taken over, `entries`
        its recorded entries (the overflow check of `logical`)."""
        self._versions = versions
        self._maps = maps
        self._num_logical = num_logical
        self._entries = entries
        self._event: torch.cuda.Event | None = None
        if extremes is None:
            extremes = torch.zeros(2, dtype=torch.int64, device=sums.device)
        if sums.is_cuda:
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host.copy_(sums, non_blocking=True)
            host_extremes = torch.empty(extremes.shape, dtype=extremes.dtype, pin_memory=True)
            host_extremes.copy_(extremes, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host, self._extremes = host, host_extremes
        else:
            self._host, self._extremes = sums, extremes

    def logical(self) -> npt.NDArray[np.int64]:
        """[L, E] logical load of the window. Waits for the copy if it is not done.

        Raises `ValueError` where the int64 sums over the window may have wrapped
        or a layer's total reaches `LOAD_LIMIT` (see the module's docs)."""
        if self._event is not None:
            self._event.synchronize()
        sums = self._host.numpy()
        self._check_bounds(sums)
        total: npt.NDArray[np.int64] | None = None
        for i, version in enumerate(self._versions):
            part = physical_to_logical_load(sums[i], self._maps[version], self._num_logical)
            total = part if total is None else total + part
        if total is None:
            num_layers = next(iter(self._maps.values())).shape[0]
            return np.zeros((num_layers, self._num_logical), dtype=np.int64)
        return total

    def _check_bounds(self, sums: npt.NDArray[np.int64]) -> None:
        """`sums` [versions, L, P] are exact iff no partial sum wrapped: each is a sum
        of at most `entries` values, none larger in magnitude than the ring's extreme."""
        low, high = (int(v) for v in self._extremes.tolist())
        largest = max(abs(low), abs(high))
        if largest * self._entries >= _INT64_LIMIT:
            raise ValueError(
                f"load overflow: the load window holds a count of {largest} for one slot "
                f"(one record of the model's expert_load_view); its {self._entries} "
                f"records could sum beyond int64 (2**63). expert_load_view must count "
                f"tokens per pass")
        if not sums.size:
            return
        # An upper bound of every partial sum's magnitude in the logical mapping,
        # in float64: below 2**53 every such sum is exact, at or above it this is too.
        per_layer = np.abs(sums).astype(np.float64).sum(axis=(0, 2))
        layer = int(np.argmax(per_layer))
        if per_layer[layer] >= LOAD_LIMIT:
            raise ValueError(
                f"load overflow: layer {layer}'s load in this rank's window sums to "
                f"{per_layer[layer]:.4g} tokens, at or above the limit 2**53 "
                f"({LOAD_LIMIT}): its int64 sum over the ranks could wrap and its float64 "
                f"mapping would round. expert_load_view must count tokens per pass")


class LoadWindow:
    def __init__(self, window_size: int, num_layers: int, num_physical: int,
                 num_logical: int, device: torch.device) -> None:
        """`window_size` entries (config.window_size / load_record_interval, rounded
        up) of [num_layers, num_physical] int64; `ValueError` naming the config
        fields if the ring cannot be allocated on `device`."""
        nbytes = window_size * num_layers * num_physical * 8
        try:
            self._buf = torch.zeros(window_size, num_layers, num_physical,
                                    dtype=torch.int64, device=device)
        except (RuntimeError, MemoryError) as exc:  # torch's OOM errors are RuntimeErrors
            raise ValueError(
                f"the load window cannot be allocated on {device}: {window_size} entries "
                f"x {num_layers} layers x {num_physical} slots x 8 bytes = {nbytes} bytes "
                f"({type(exc).__name__}); lower EplbConfig.window_size or raise "
                f"EplbConfig.load_record_interval") from None
        self._version = np.full(window_size, -1, dtype=np.int64)
        self._passes = np.zeros(window_size, dtype=np.int64)  # passes summed per entry
        self._next = 0
        self._num_logical = num_logical
        self._maps: dict[int, npt.NDArray[np.int64]] = {}
        self._current = -1
        if self._buf.is_cuda:
            # The snapshot's kernels and pinned buffer, once, here: the first
            # snapshot runs inside a serving step, and a kernel's first launch
            # blocks the host until every running kernel ends (CUDA's lazy
            # loading; benchmarks/diagnostics/stream_waits.py).
            # (The whole ring, not one entry: torch may turn a sum over one
            # entry into a copy, and then the reduction kernel would stay cold.)
            total = self._buf.sum(dim=0)
            HostLoad(torch.stack([total + total]), [], {}, num_logical,
                     self._extremes(), 0)

    def set_map(self, p2l: npt.NDArray[np.int64]) -> None:
        """Passes recorded from now on ran under `p2l`."""
        self._current += 1
        self._maps[self._current] = np.array(p2l, dtype=np.int64, copy=True)
        self._forget_unused_maps()

    def _forget_unused_maps(self) -> None:
        live = set(self._version[self._version >= 0].tolist()) | {self._current}
        for version in [v for v in self._maps if v not in live]:
            del self._maps[version]

    def record(self, load_view: torch.Tensor, passes: int = 1) -> None:
        self._buf[self._next].copy_(load_view)
        self._version[self._next] = self._current
        self._passes[self._next] = passes
        self._next = (self._next + 1) % len(self._version)

    def last(self) -> npt.NDArray[np.int64] | None:
        """The latest recorded pass (copied to host: a device sync, so only for logging)."""
        if self._version[(self._next - 1) % len(self._version)] < 0:
            return None
        return self._buf[(self._next - 1) % len(self._version)].cpu().numpy()

    @property
    def passes(self) -> int:
        """Passes the window holds (an entry may sum several, see load_record_interval)."""
        return int(self._passes[self._version >= 0].sum())

    def snapshot(self) -> HostLoad:
        self._forget_unused_maps()
        live = self._version >= 0
        versions = sorted(set(self._version[live].tolist()))
        if versions:
            sums = torch.stack([self._sum_of(v) for v in versions])
        else:
            sums = self._buf[:0].sum(dim=0, keepdim=True)[:0]
        return HostLoad(sums, versions, dict(self._maps), self._num_logical,
                        self._extremes(), int(live.sum()))

    def _extremes(self) -> torch.Tensor:
        """[min, max] over the whole ring, on its device (entries never recorded
        are zeros): one reduction, no host sync."""
        low, high = torch.aminmax(self._buf)
        return torch.stack([low, high])

    def _sum_of(self, version: int) -> torch.Tensor:
        """The sum of the entries recorded under `version`, by slices of the ring.

        Not by an index tensor: building one on the device is a pageable
        host-to-device copy, which waits for the stream, i.e. for the forward
        pass in flight. A version's entries were written one after another,
        so they are one run of the ring, or two where it wraps."""
        entries = np.flatnonzero(self._version == version)
        runs = np.split(entries, np.flatnonzero(np.diff(entries) != 1) + 1)
        total = self._buf[int(runs[0][0]):int(runs[0][-1]) + 1].sum(dim=0)
        for run in runs[1:]:
            total = total + self._buf[int(run[0]):int(run[-1]) + 1].sum(dim=0)
        return total
