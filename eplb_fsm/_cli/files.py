"""Load files and placement files, with errors that name the file and the rule.

Load files hold token counts, [L, E] for one planning window or
[steps, L, E] for a recorded trace, as ``.npy``, ``.pt`` (a tensor) or
``.json`` (a nested list, or an object with a ``"load"`` key).
Placement files hold ``physical_to_logical`` and ``num_logical_experts``,
as ``.npz`` or ``.json``; the other maps are derived on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core.arrays import as_real_array
from .._core.placement import Placement

__all__ = ["LOAD_SUFFIXES", "PLACEMENT_SUFFIXES", "check_suffix", "read_load", "read_placement",
           "write_placement"]

LOAD_SUFFIXES = (".npy", ".pt", ".json")
PLACEMENT_SUFFIXES = (".npz", ".json")


def check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    """`path`'s lower-cased suffix, if `allowed`; else a ValueError naming `what`."""
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"{what} {path}: unknown suffix {suffix!r}; use one of "
                         f"{', '.join(allowed)}")
    return suffix



def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None


_JSON_LOAD_FORMAT = ('a nested list of token counts ([layers][experts], or '
                     '[steps][layers][experts]), or an object {"load": <that list>}')


def _json_load(path: Path, data: Any) -> Any:
    """The load array of a JSON load file, or a ValueError saying the expected format."""
    if isinstance(data, dict):
        if "load" not in data:
            keys = ", ".join(repr(k) for k in list(data)[:5]) or "none"
            raise ValueError(f"{path}: a JSON object needs a \"load\" key (keys found: "
                             f"{keys}); expected {_JSON_LOAD_FORMAT}")
        data = data["load"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: got a JSON {type(data).__name__}; expected "
                         f"{_JSON_LOAD_FORMAT}")
    try:
        np.asarray(data, dtype=np.float64)
    except OverflowError:
        raise ValueError(f"{path}: a number is beyond float range") from None
    except (ValueError, TypeError, RecursionError):
        raise ValueError(f"{path}: not a rectangular array of numbers (rows of unequal "
                         f"length, or entries that are not numbers); expected "
                         f"{_JSON_LOAD_FORMAT}") from None
    return data


def read_load(path: str | Path, ndim: int = 2) -> npt.NDArray[np.float64]:
    """Read a load file; `ndim` is 2 ([L, E]) or 3 ([steps, L, E])."""
    path = Path(path)
    suffix = check_suffix(path, LOAD_SUFFIXES, "load file")
    if not path.is_file():
        raise ValueError(f"load file {path} does not exist")
    if suffix == ".json":
        raw = _json_load(path, _read_json(path))
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
        if suffix == ".pt" and not hasattr(raw, "detach"):
            raise ValueError(f"{path}: expected a saved tensor, got {type(raw).__name__}")
    try:
        arr = as_real_array("load", raw)  # the core's rules: real, dense, in range
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
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
    suffix = check_suffix(path, PLACEMENT_SUFFIXES, "placement file")
    if not path.is_file():
        raise ValueError(f"placement file {path} does not exist")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                p2l = data["physical_to_logical"]
                count = data["num_logical_experts"]
        except KeyError as exc:
            raise ValueError(f"{path}: a placement file needs 'physical_to_logical' and "
                             f"'num_logical_experts' ({exc})") from exc
        except Exception as exc:  # corrupt zips raise zlib, zipfile, OS and numpy errors
            raise ValueError(f"{path}: cannot read placement file ({type(exc).__name__}: "
                             f"{exc})") from exc
        if count.shape != () or count.dtype.kind not in "iu":
            raise ValueError(f"{path}: num_logical_experts must be one integer, got "
                             f"{count.dtype} of shape {count.shape}")
        num_logical = int(count)
    else:
        data = _read_json(path)
        if not isinstance(data, dict) or not {"physical_to_logical",
                                              "num_logical_experts"} <= data.keys():
            raise ValueError(f"{path}: a placement file needs 'physical_to_logical' and "
                             "'num_logical_experts'")
        count = data["num_logical_experts"]
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"{path}: num_logical_experts must be an integer, got {count!r}")
        num_logical = count
        p2l = data["physical_to_logical"]
    try:
        return Placement(p2l, num_logical)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def write_placement(path: str | Path, placement: Placement) -> None:
    path = Path(path)
    suffix = check_suffix(path, PLACEMENT_SUFFIXES, "placement file")
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
