"""Object pooling in torch, on the tensors' device (docs/method.md §3).

The torch twin of :func:`cribo.pool` (C kernel csrc/pool.c): object ``k`` of
view ``i`` is ``c_i^k = sum_n A_i(n, k) z_i^n``, the per-view mean of the
cluster's member tokens (hard labels) or the Qhat-weighted mean (soft weights,
columns L1-normalised within each view).  Written with ``index_add`` and
``matmul`` so that autograd differentiates it natively: the gradient w.r.t. the
tokens is :func:`cribo.pool_backward`'s (each token gets its cluster's gradient
divided by the cluster's member count in that view), with no custom backward.

Precision, against the C core:

- hard labels: member sums in float32 (``index_add``), the C core sums in
  double; both divide by the member count.  Equal to float32 rounding of an
  N-term sum (``tests/nn/torch_ops/test_pooling.py``).  On a GPU ``index_add``
  adds with atomics, so the last bit of a sum may vary from run to run unless
  ``torch.use_deterministic_algorithms(True)`` is set.
- soft weights: column sums and the normalisation in float64, exactly as the C
  core does, before one float32 matrix product; so weights of any finite
  magnitude pool to a convex combination of the tokens (docs/guarantees.md,
  "Soft pooling takes weights of any finite magnitude").  A matrix product
  follows torch's own settings: with TF32 enabled for matmuls on a GPU it is a
  TF32 product.

Host round trips: none on the computation.  The value checks (finite tokens,
labels in range, finite non-negative weights) need one device-to-host read, so
they run by default only for CPU tensors (``check_values``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["pool"]

_FN = "pool"


def _tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _float32(x: torch.Tensor, name: str) -> torch.Tensor:
    """float32 view of a floating tensor (bf16/fp16/fp64 converted, autograd kept)."""
    if not x.is_floating_point():
        raise TypeError(f"{_FN}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    return x if x.dtype == torch.float32 else x.float()


def _resolve_check(check_values: Optional[bool], device: torch.device) -> bool:
    return device.type == "cpu" if check_values is None else bool(check_values)


def _n_clusters(n_clusters: object, required: bool) -> Optional[int]:
    if n_clusters is None:
        if required:
            raise TypeError(f"{_FN}: n_clusters must be an integer >= 1 (required with integer "
                            "labels), got None")
        return None
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int):
        raise TypeError(f"{_FN}: n_clusters must be an integer, got {n_clusters!r}")
    if n_clusters < 1:
        raise ValueError(f"{_FN}: n_clusters must be at least 1, got {n_clusters}")
    return n_clusters


def _check_tokens(tokens: object) -> Tuple[torch.Tensor, int, int, int]:
    tok = _tensor(tokens, "tokens")
    if tok.dim() != 4 or tok.shape[1] != 2:
        raise ValueError(f"{_FN}: tokens must have shape (B, 2, N, d), got {tuple(tok.shape)}")
    B, _, N, d = tok.shape
    for doc, v in (("the batch size B", B), ("the number of tokens per view N", N),
                   ("the token width d", d)):
        if v < 1:
            raise ValueError(f"{_FN}: {doc} must be at least 1, got {v} (tokens of shape "
                             f"{tuple(tok.shape)})")
    return tok, B, N, d


def pool(tokens: torch.Tensor, labels_or_weights: torch.Tensor,
         n_clusters: Optional[int] = None, *,
         check_values: Optional[bool] = None) -> torch.Tensor:
    """Pool tokens into per-view object representations, on the tokens' device.

    Equal to :func:`cribo.pool` (and, through autograd, to
    :func:`cribo.pool_backward`) within float32 rounding.

    Args:
        tokens: (B, 2, N, d) tokens of both views, floating point (bf16, fp16 and
            fp64 are converted to float32; gradients flow back through the
            conversion).
        labels_or_weights: either integer ``labels`` (B, 2, N) in [-1, K), giving
            the per-view mean of each cluster's members (zeros for a cluster empty
            in that view; -1: in no cluster); or non-negative float ``weights``
            (B, 2, N, K), whose columns are L1-normalised within each view (in
            float64; a zero column stays zero), giving ``Qhat^T z`` with one
            batched matrix product.  On the tokens' device.  No gradient flows to
            the weights (they are the teacher's assignment, as in the C core).
        n_clusters: K; required with labels, optional (must match) with weights.
        check_values: check that the tokens are finite, the labels in [-1, K)
            and the weights finite and non-negative (one device-to-host read).
            None (default): only for CPU tensors.  Unchecked, a label outside
            [-1, K) is ignored like -1, and non-finite values propagate.

    Returns:
        (B, 2, K, d) float32 objects, differentiable w.r.t. ``tokens``.

    Raises:
        TypeError: a non-tensor or a tensor of the wrong dtype, or n_clusters
            missing with labels.
        ValueError: shapes that do not match, tensors on different devices, or
            (when checked) values out of range.
    """
    tok, B, N, d = _check_tokens(tokens)
    a = _tensor(labels_or_weights, "labels_or_weights")
    if a.device != tok.device:
        raise ValueError(f"{_FN}: labels_or_weights must be on the tokens' device "
                         f"{tok.device}, got {a.device}")
    check = _resolve_check(check_values, tok.device)
    if a.is_floating_point():
        return _pool_soft(tok, a, n_clusters, B, N, d, check)
    if a.dtype == torch.bool or a.is_complex():
        raise TypeError(f"{_FN}: labels_or_weights must be integer labels (B, 2, N) or float "
                        f"weights (B, 2, N, K), got dtype {a.dtype}")
    return _pool_hard(tok, a, _n_clusters(n_clusters, True), B, N, d, check)


def _raise_if(flag: torch.Tensor, message: str) -> None:
    """Raises ValueError(message) if the 0-d bool ``flag`` is set (a host read)."""
    if bool(flag):
        raise ValueError(message)


def _pool_hard(tok: torch.Tensor, labels: torch.Tensor, K: int, B: int, N: int, d: int,
               check: bool) -> torch.Tensor:
    if tuple(labels.shape) != (B, 2, N):
        raise ValueError(f"{_FN}: labels must have shape (B, 2, N) = {(B, 2, N)} to match "
                         f"tokens {tuple(tok.shape)}, got {tuple(labels.shape)}")
    z = _float32(tok, "tokens")
    lab = labels.to(torch.int64)
    if check:
        _raise_if(~torch.isfinite(z.detach()).all(),
                  f"{_FN}: tokens must be finite, got NaN or infinity")
        _raise_if(((lab < -1) | (lab >= K)).any(),
                  f"{_FN}: labels must be in [-1, n_clusters) = [-1, {K}), got values outside")
    V = 2 * B
    lab = lab.reshape(V, N)
    # Row of the (V * K + 1, d) sum table: view v's cluster k -> v * K + k; tokens in
    # no cluster go to the last row, which is dropped.
    offsets = torch.arange(V, device=lab.device, dtype=torch.int64).unsqueeze(1) * K
    member = (lab >= 0) & (lab < K)
    rows = torch.where(member, lab + offsets, torch.full_like(lab, V * K)).reshape(-1)
    sums = z.new_zeros(V * K + 1, d).index_add(0, rows, z.reshape(V * N, d))
    counts = z.new_zeros(V * K + 1).index_add(0, rows, z.new_ones(V * N))
    # Empty clusters: 0 / 1 = 0.  Counts are exact in float32 (N < 2^24).
    means = sums[: V * K] / counts[: V * K].clamp(min=1.0).unsqueeze(1)
    return means.reshape(B, 2, K, d)


def _pool_soft(tok: torch.Tensor, weights: torch.Tensor, n_clusters: Optional[int], B: int,
               N: int, d: int, check: bool) -> torch.Tensor:
    if weights.dim() != 4 or tuple(weights.shape[:3]) != (B, 2, N):
        raise ValueError(f"{_FN}: weights must have shape (B, 2, N, K) with (B, 2, N) = "
                         f"{(B, 2, N)} to match tokens {tuple(tok.shape)}, got "
                         f"{tuple(weights.shape)}")
    K = weights.shape[3]
    if K < 1:
        raise ValueError(f"{_FN}: the number of clusters K must be at least 1, got {K}")
    k = _n_clusters(n_clusters, False)
    if k is not None and k != K:
        raise ValueError(f"{_FN}: n_clusters must match the weights' K = {K}, got {k}")
    z = _float32(tok, "tokens")
    w = _float32(weights.detach(), "weights")
    if check:
        _raise_if(~torch.isfinite(z.detach()).all(),
                  f"{_FN}: tokens must be finite, got NaN or infinity")
        _raise_if(~torch.isfinite(w).all(), f"{_FN}: weights must be finite, got NaN or infinity")
        _raise_if((w < 0).any(), f"{_FN}: weights must be non-negative, got negative values")
    V = 2 * B
    w64 = w.reshape(V, N, K).double()
    colsum = w64.sum(dim=1, keepdim=True)  # (V, 1, K)
    positive = colsum > 0
    colinv = torch.where(positive, 1.0 / torch.where(positive, colsum, 1.0),
                         torch.zeros_like(colsum))
    qhat = (w64 * colinv).float()  # (V, N, K), columns summing to 1 (or 0)
    out = torch.matmul(qhat.transpose(1, 2), z.reshape(V, N, d))
    return out.reshape(B, 2, K, d)
