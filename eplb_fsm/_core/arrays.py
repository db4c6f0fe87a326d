"""Turning caller input into the core's arrays, with one set of rules and messages.

Everything that enters the core as "expert ids" or "load" passes through
here, so `Placement`, `plan` and the transfer plan reject the same inputs
the same way: a `ValueError` naming the argument, never a `TypeError`,
an overflow or a numpy warning from a cast.

- Accepted numbers: signed/unsigned integers, floats, bools (load only), as
  numpy arrays, nested lists or torch tensors (any dtype torch can widen,
  bfloat16 included). Rejected: complex, datetime/timedelta, objects, strings,
  sparse tensors.
- Ids must have an integer dtype (a float map is a caller's bug, not a
  rounding question), be >= -1 and below `MAX_ID` (2**31): far above any
  expert count, and small enough that keys built from them cannot overflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_ID", "as_id_array", "as_real_array", "check_count"]

MAX_ID = 2**31


def _to_numpy(name: str, value: Any) -> npt.NDArray[Any]:
    if hasattr(value, "detach"):  # a torch tensor; the core does not import torch
        tensor = value.detach()
        if getattr(tensor, "layout", None) is not None and str(tensor.layout) != "torch.strided":
            raise ValueError(f"{name} must be a dense tensor, got layout {tensor.layout}")
        if tensor.is_complex():
            raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
        tensor = tensor.cpu()
        if tensor.is_floating_point():
            tensor = tensor.double()  # bfloat16 has no numpy dtype; float64 holds it
        value = tensor.numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name} must be a rectangular array of numbers ({exc})") from None
    return arr


def as_id_array(name: str, value: Any, ndim: int) -> npt.NDArray[np.int64]:
    """Expert ids as int64 with `ndim` dims; -1 marks an empty slot."""
    arr = _to_numpy(name, value)
    if arr.ndim != ndim:
        shape = "[slots]" if ndim == 1 else "[layers, slots]"
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {arr.shape}")
    # An empty nested list arrives as float64: let the caller's shape check speak.
    if arr.dtype.kind not in "iu" and (arr.size or arr.dtype.kind != "f"):
        raise ValueError(f"{name} must hold integer expert ids, got dtype {arr.dtype}")
    if arr.size:
        # Compared in the input's own dtype, before any cast can wrap or warn.
        if arr.max() >= MAX_ID:
            raise ValueError(f"{name} holds id {arr.max()}; ids must be below {MAX_ID}")
        if arr.dtype.kind != "u" and arr.min() < -1:
            raise ValueError(f"{name} holds id {arr.min()}; ids must be >= -1 "
                             "(-1 marks an empty slot)")
    return arr.astype(np.int64)


def as_real_array(name: str, value: Any) -> npt.NDArray[np.float64]:
    """A load as float64 (any real dtype); shape and sign are the caller's to check."""
    arr = _to_numpy(name, value)
    if arr.dtype.kind not in "iufb":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    with np.errstate(over="raise", invalid="raise"):
        try:
            return arr.astype(np.float64)
        except FloatingPointError as exc:
            raise ValueError(f"{name} holds a value beyond float64 range ({exc})") from None


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """A count: an int (numpy ints too, not bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
