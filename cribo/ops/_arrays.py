"""Argument conversion shared by the NumPy API.

The C binding accepts only native, aligned, C-contiguous float32/int64/bool arrays,
never casts, and owns every rule about shapes and values (csrc/binding/_C.c, its argument
spec tables).  These helpers are the one visible place where user input becomes
such arrays: any floating-point array (float16/32/64, any byte order or strides) is
converted to C-contiguous float32, any integer array to C-contiguous int64.
Other dtypes (bool, complex, object, strings, floats given as indices) raise the
binding's ``ArgumentTypeError`` (a TypeError) naming the function and the argument,
as the binding itself would: a broken rule is one kind of error wherever it is found.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import _C


def as_float32(x: Any, fn: str, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (copied only if needed)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise _C.ArgumentTypeError(
            f"{fn}: {name} must be a real floating-point array, got dtype {a.dtype}")
    if a.dtype.kind in "iu":
        raise _C.ArgumentTypeError(
            f"{fn}: {name} must be a real floating-point array, got dtype {a.dtype} "
            f"(convert explicitly with .astype(numpy.float32) if integers are meant)"
        )
    out = np.ascontiguousarray(a, dtype=np.float32)
    return out if out.flags.aligned else out.copy()  # the C binding needs alignment


def as_int64(x: Any, fn: str, name: str) -> np.ndarray:
    """``x`` as a C-contiguous int64 array (copied only if needed)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise _C.ArgumentTypeError(f"{fn}: {name} must be an integer array, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise _C.ArgumentError(f"{fn}: {name} holds values beyond the int64 range")
    out = np.ascontiguousarray(a, dtype=np.int64)
    return out if out.flags.aligned else out.copy()  # the C binding needs alignment


def as_bool(x: Any, fn: str, name: str) -> np.ndarray:
    """``x`` as a C-contiguous bool array (only bool arrays are accepted)."""
    a = np.asarray(x)
    if a.dtype != np.bool_:
        raise _C.ArgumentTypeError(f"{fn}: {name} must be a boolean array, got dtype {a.dtype}")
    return np.ascontiguousarray(a)
