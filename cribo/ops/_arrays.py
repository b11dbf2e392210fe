"""Argument conversion shared by the NumPy API.

The C binding accepts only native, aligned, C-contiguous float32/int64 arrays and
never casts.  These helpers are the one visible place where user input becomes
that: any floating-point array (float16/32/64, any byte order or strides) is
converted to C-contiguous float32, any integer array to C-contiguous int64.
Other dtypes (bool, complex, object, strings, floats given as indices) raise a
TypeError that names the function and the argument.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def as_float32(x: Any, fn: str, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (copied only if needed)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError(f"{fn}: {name} must be a real floating-point array, got dtype {a.dtype}")
    if a.dtype.kind in "iu":
        raise TypeError(
            f"{fn}: {name} must be a real floating-point array, got dtype {a.dtype} "
            f"(convert explicitly with .astype(numpy.float32) if integers are meant)"
        )
    out = np.ascontiguousarray(a, dtype=np.float32)
    return out if out.flags.aligned else out.copy()  # the C binding needs alignment


def as_int64(x: Any, fn: str, name: str) -> np.ndarray:
    """``x`` as a C-contiguous int64 array (copied only if needed)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{fn}: {name} must be an integer array, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{fn}: {name} holds values beyond the int64 range")
    out = np.ascontiguousarray(a, dtype=np.int64)
    return out if out.flags.aligned else out.copy()  # the C binding needs alignment


def as_bool(x: Any, fn: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as a C-contiguous bool array of the given shape."""
    a = np.asarray(x)
    if a.dtype != np.bool_:
        raise TypeError(f"{fn}: {name} must be a boolean array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a)


def check_int(value: Any, fn: str, name: str, lo: int, hi: int) -> int:
    """``value`` as a Python int in [lo, hi], or a ValueError/TypeError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be an integer, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {v}")
    return v


def check_float(value: Any, fn: str, name: str, lo: float, hi: float,
                lo_open: bool = False) -> float:
    """``value`` as a finite Python float in [lo, hi] (or (lo, hi])."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                    np.floating)):
        raise TypeError(f"{fn}: {name} must be a number, got {value!r}")
    v = float(value)
    ok = (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{fn}: {name} must be a finite number in {bracket}{lo}, {hi}], got {v}")
    return v
