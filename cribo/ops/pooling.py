"""Object pooling (docs/method.md §3; C kernel: csrc/pool.c).

``c_i^k = sum_n Qhat_i(n, k) z_i^n``: the representation of object k in view i is
the mean of its member tokens (hard labels) or the Qhat-weighted mean (soft
weights, columns L1-normalised per view).  Applied to the teacher's tokens and,
with gradients, to the student's.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import _C
from ._arrays import as_float32, as_int64

__all__ = ["pool", "pool_backward"]


def _assignment(assignment: Any, fn: str):
    a = np.asarray(assignment)
    if a.dtype.kind in "iu":
        return "hard", as_int64(a, fn, "labels")
    if a.dtype.kind == "f":
        return "soft", as_float32(a, fn, "weights")
    raise _C.ArgumentTypeError(f"{fn}: assignment must be integer labels (B, 2, N) or float weights "
                    f"(B, 2, N, K), got dtype {a.dtype}")


def pool(tokens: Any, assignment: Any, n_clusters: Optional[int] = None) -> np.ndarray:
    """Pool tokens into per-view object representations.

    Args:
        tokens: (B, 2, N, d) tokens of both views (any float dtype, converted to
            float32).
        assignment: either integer ``labels`` (B, 2, N) in [0, K) (-1: in no
            cluster), giving the per-view mean of each cluster's members (zeros
            for a cluster empty in that view); or non-negative float ``weights``
            (B, 2, N, K), whose columns are L1-normalised within each view here
            (a zero column stays zero), giving ``Qhat^T z`` through one sgemm per
            image and view.
        n_clusters: K; required with labels, optional (must match) with weights.

    Returns:
        (B, 2, K, d) float32 objects.
    """
    fn = "pool"
    tok = as_float32(tokens, fn, "tokens")
    kind, a = _assignment(assignment, fn)
    if kind == "hard":
        return _C.pool(tokens=tok, labels=a, n_clusters=n_clusters)
    return _C.pool_soft(tokens=tok, weights=a, n_clusters=n_clusters)


def pool_backward(grad_objects: Any, assignment: Any,
                  n_clusters: Optional[int] = None) -> np.ndarray:
    """Gradient of :func:`pool` w.r.t. the tokens.

    ``dz[b, i, n] = sum_k Qhat[b, i, n, k] * grad_objects[b, i, k]``; with labels
    that is ``grad_objects[b, i, labels[b, i, n]] / count`` (0 for label -1).

    Args:
        grad_objects: (B, 2, K, d) gradient w.r.t. the pooled objects.
        assignment: the labels (B, 2, N) or weights (B, 2, N, K) given to pool.
        n_clusters: K; required with labels.

    Returns:
        (B, 2, N, d) float32 gradient w.r.t. the tokens.
    """
    fn = "pool_backward"
    g = as_float32(grad_objects, fn, "grad_objects")
    kind, a = _assignment(assignment, fn)
    if kind == "hard":
        return _C.pool_backward(grad_objects=g, labels=a, n_clusters=n_clusters)
    return _C.pool_soft_backward(grad_objects=g, weights=a, n_clusters=n_clusters)
