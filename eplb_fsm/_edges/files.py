"""Load files and placement files, with errors that name the file and the rule.

Load files hold token counts, [L, E] for one planning window or
[steps, L, E] for a recorded trace, as ``.npy``, ``.pt`` (a tensor) or
``.json`` (a nested list, or an object with a ``"load"`` key).
Placement files hold ``physical_to_logical`` and ``num_logical_experts``,
as ``.npz`` or ``.json``; the other maps are derived on load.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core.placement import Placement

__all__ = ["read_load", "read_placement", "write_placement"]

LOAD_SUFFIXES = (".npy", ".pt", ".json")
PLACEMENT_SUFFIXES = (".npz", ".json")


def _suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"{what} file {path}: unknown suffix {suffix!r}; use one of "
                         f"{', '.join(allowed)}")
    return suffix


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def read_load(path: str | Path, ndim: int = 2) -> npt.NDArray[np.float64]:
    """Read a load file; `ndim` is 2 ([L, E]) or 3 ([steps, L, E])."""
    path = Path(path)
    suffix = _suffix(path, LOAD_SUFFIXES, "load")
    if not path.is_file():
        raise ValueError(f"load file {path} does not exist")
    if suffix == ".json":
        data = _read_json(path)
        raw = data["load"] if isinstance(data, dict) and "load" in data else data
    else:
        try:
            if suffix == ".npy":
                raw = np.load(path, allow_pickle=False)
            else:
                import torch

                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or corrupt files raise many types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"{path}: cannot read load file ({type(exc).__name__}: {first_line})"
            ) from exc
        if suffix == ".pt":
            if not hasattr(raw, "detach"):
                raise ValueError(f"{path}: expected a saved tensor, got {type(raw).__name__}")
            raw = raw.detach().double().numpy()
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: load must be a rectangular array of numbers ({exc})") from exc
    if arr.ndim != ndim:
        want = "[layers, experts]" if ndim == 2 else "[steps, layers, experts]"
        raise ValueError(f"{path}: load must be {ndim}-D {want}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: load must be finite (found NaN or inf)")
    if np.any(arr < 0):
        raise ValueError(f"{path}: load must be non-negative")
    return arr


def read_placement(path: str | Path) -> Placement:
    path = Path(path)
    suffix = _suffix(path, PLACEMENT_SUFFIXES, "placement")
    if not path.is_file():
        raise ValueError(f"placement file {path} does not exist")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                p2l = data["physical_to_logical"]
                num_logical = int(data["num_logical_experts"])
        else:
            data = _read_json(path)
            p2l = np.asarray(data["physical_to_logical"])
            num_logical = int(data["num_logical_experts"])
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{path}: a placement file needs 'physical_to_logical' and "
                         f"'num_logical_experts' ({exc})") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: cannot read placement file ({exc})") from exc
    try:
        return Placement(p2l, num_logical)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def write_placement(path: str | Path, placement: Placement) -> None:
    path = Path(path)
    suffix = _suffix(path, PLACEMENT_SUFFIXES, "placement")
    if suffix == ".npz":
        np.savez(
            path,
            physical_to_logical=placement.physical_to_logical,
            logical_to_physical=placement.logical_to_physical,
            replica_count=placement.replica_count,
            num_logical_experts=np.int64(placement.num_logical),
        )
    else:
        path.write_text(json.dumps({
            "num_logical_experts": placement.num_logical,
            "physical_to_logical": placement.physical_to_logical.tolist(),
            "replica_count": placement.replica_count.tolist(),
        }))
