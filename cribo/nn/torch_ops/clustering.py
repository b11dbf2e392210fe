"""Joint-space clustering in torch, on the tokens' device (docs/method.md §2).

The same computation as :func:`cribo.cluster` (C kernel csrc/cluster.c, read its
header comment), written with batched torch operations so that it runs where the
tokens live -- a GPU in training -- with no copy of tokens to the host and no
Python loop over images: every step below acts on all B images at once, each
image still clustered on its own (per-image min-max scaling, per-image Sinkhorn).

The kernel's steps and how they are batched here (J = 2N joint tokens):

* ``Zn`` = tokens L2-normalised, the squares and the scaling in float64, the
  result stored as float32 (as the kernel does).
* ``G = Zn Zn^T`` (B, J, J) float32.  The products are accumulated in float64
  and rounded once to float32: the kernel's float32 ``ssyrk`` has its own
  summation order, which no other library reproduces, and a float32 matmul on a
  GPU may silently use TF32 (``torch.backends.cuda.matmul.allow_tf32``); the
  float64 product is within float32 rounding of the kernel's on every device.
* Similarity of the first iteration: the seed rows of ``G``; afterwards
  ``Sim^T_kj = sum_{m in k} G_mj / sqrt(sum_{m, m' in k} G_mm')`` from a
  float64 one-hot product (B, K, J) x (B, J, J), as the kernel sums in double.
* Positional cost: the squared distances ``|P_n - P_m|^2`` (B, J, J) in
  float32 (computed once; zero distances set to +inf, so a token is never its
  own nearest member), then per cluster the minimum over its current members by
  one ``scatter_reduce(amin)`` along the member axis into (B, K + 1, J) (the
  extra row collects tokens not yet in a cluster).  Memory and work are
  O(J^2 + K J) per image: no (J, J, K) tensor.  Then the square root, the zeros
  replaced by the matrix mean (summed in float64), and the multiplication by
  the float32 reciprocal of the maximum, as in the kernel.
* Cost and logits ``S^T = -lambda * minmax(-Sim + alpha D)`` in float32 per
  image, the scale ``-lambda / range`` computed in float64 and rounded.
* Sinkhorn: for ``lambda <= 80`` the exponential-domain form (kernel
  ``exp(S - tokenmax)`` in float32, scaling vectors in float64), above it the
  log-domain form (log-sum-exp, sums in float64); the same threshold, the same
  iteration counts and the same marginals (``r = 1/J``; ``c = 1/K``, updated to
  ``(count + 0.01) / (J + 0.01 K)``) as the kernel.
* Assignment: ``argmax_k (S_kj + g_k)`` in float64, an exact tie to the lowest k
  (taken explicitly, not left to ``argmax``).

Every elementwise float32 step is a separate torch operation (no fused
multiply-add), as the kernel is built without FMA contraction.  The results
equal the kernel's up to float32 rounding: the labels are identical except
where two of a token's costs tie within that rounding
(tests/nn/torch_ops/test_clustering.py).

The only host work is the initial seed draw when ``init`` is not given: it uses
:func:`cribo.draw_init` (NumPy's generator, the same seeds and the same indices
as the C core) to draw the (B, K) indices on the host and moves them to the
device once; it does not depend on the tokens.  Nothing computed from the
tokens leaves the device.  Inputs are not checked for NaN or infinity (that
would cost a device-to-host synchronisation); non-finite tokens or positions
give unspecified labels.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch

from ... import _C
from ...ops.clustering import draw_init

__all__ = ["Clustering", "cluster", "EXP_DOMAIN_MAX_LAMBDA"]

#: Largest ``sinkhorn_lambda`` run in the exponential domain (csrc/cluster.c).
EXP_DOMAIN_MAX_LAMBDA = 80.0

_SEED_MAX = 2**63 - 1
_FN = "cluster"


@dataclass(frozen=True)
class Clustering:
    """The result of :func:`cluster` for B images and K clusters, on the tokens' device.

    Attributes:
        labels: (B, 2, N) int64, the cluster in [0, K) of each token of each view.
        valid: (B, K) bool, clusters present in both views.
        counts: (B, 2, K) int64, tokens of each cluster in each view.
        init: (B, K) int64, the joint token indices (view-1 tokens first) that
            seeded the clusters.
        plan: (B, 2N, K) float32, the transport plan of the last iteration, or
            None unless ``return_plan=True``.
    """

    labels: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    init: torch.Tensor
    plan: Optional[torch.Tensor] = None

    @property
    def n_valid(self) -> torch.Tensor:
        """(B,) int64, valid clusters per image."""
        return self.valid.sum(dim=1)


# ----------------------------------------------------------------- arguments

def _check_int(value: Any, name: str, lo: int, hi: int, what: str = "an integer") -> int:
    """``value`` as an int in [lo, hi], or the binding's error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise _C.ArgumentTypeError(f"{_FN}: {name} must be {what}, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise _C.ArgumentError(f"{_FN}: {name} must be in [{lo}, {hi}], got {v}")
    return v


def _check_float(value: Any, name: str, lo: float, hi: float, lo_open: bool) -> float:
    """``value`` as a finite float in [lo, hi] (or (lo, hi])."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise _C.ArgumentTypeError(f"{_FN}: {name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        interval = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise _C.ArgumentError(f"{_FN}: {name} must be a finite number in {interval}, got {v}")
    return v


def _check_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` must be a real floating-point torch tensor."""
    if not isinstance(x, torch.Tensor):
        raise _C.ArgumentTypeError(
            f"{_FN}: {name} must be a torch.Tensor, got {type(x).__name__} "
            f"(cribo.cluster takes NumPy arrays)")
    if not x.dtype.is_floating_point:
        raise _C.ArgumentTypeError(
            f"{_FN}: {name} must be a real floating-point tensor, got dtype {x.dtype}")
    return x


def _init_indices(init: Any, seed: Any, B: int, N: int, K: int,
                  device: torch.device) -> torch.Tensor:
    """(B, K) int64 seed indices on ``device``: ``init`` checked, or drawn on the host.

    The draw is :func:`cribo.draw_init`, the C core's own; ``init`` and ``seed``
    are small and independent of the tokens, so checking them on the host is no
    round trip of token data (a device ``init`` is copied to the host to check).
    """
    if init is None:
        if isinstance(seed, torch.Tensor):
            seed = seed.detach().cpu().numpy()
        if np.ndim(seed) == 0:
            _check_int(seed, "seed", 0, _SEED_MAX)
        else:
            s = np.asarray(seed)
            if s.dtype.kind not in "iu":
                raise _C.ArgumentTypeError(
                    f"{_FN}: seed must be an integer or an integer array, got dtype {s.dtype}")
            if s.shape != (B,):
                raise _C.ArgumentError(
                    f"{_FN}: seed must be an integer or have shape ({B},) (one per image), "
                    f"got {s.shape}")
            if s.size and (s.min() < 0 or s.max() > _SEED_MAX):
                raise _C.ArgumentError(f"{_FN}: seed must be in [0, {_SEED_MAX}], got {s}")
        ix = draw_init(B, N, K, seed=seed)
    else:
        if isinstance(init, torch.Tensor):
            init = init.detach().cpu().numpy()
        ix = np.asarray(init)
        if ix.dtype.kind not in "iu":
            raise _C.ArgumentTypeError(f"{_FN}: init must be an integer array, got dtype {ix.dtype}")
        if ix.shape != (B, K):
            raise _C.ArgumentError(f"{_FN}: init must have shape ({B}, {K}) (B, n_clusters), "
                                   f"got {ix.shape}")
        if ix.size and (ix.min() < 0 or ix.max() >= 2 * N):
            raise _C.ArgumentError(f"{_FN}: init must hold joint token indices in [0, {2 * N}), "
                                   f"got values in [{ix.min()}, {ix.max()}]")
        for b in range(B):
            u, n = np.unique(ix[b], return_counts=True)
            if (n > 1).any():
                raise _C.ArgumentError(f"{_FN}: init must hold distinct token indices per image, "
                                       f"got {u[n > 1][0]} twice in image {b}")
    return torch.tensor(np.array(ix, dtype=np.int64), device=device)


# ----------------------------------------------------------------- steps

def _normalize(z: torch.Tensor) -> torch.Tensor:
    """(B, J, d) float32 -> rows L2-normalised (a zero row stays zero), in float64."""
    z64 = z.double()
    ss = (z64 * z64).sum(dim=-1, keepdim=True)
    inv = torch.where(ss > 0, 1.0 / torch.sqrt(ss), torch.zeros_like(ss))
    return (z64 * inv).float()


def _positional_sq(pos: torch.Tensor) -> torch.Tensor:
    """(B, J, 2) float32 positions -> (B, J, J) squared distances d2[b, m, n] =
    |P_n - P_m|^2 in float32, with zero distances set to +inf."""
    px, py = pos[..., 0], pos[..., 1]
    dx = px[:, None, :] - px[:, :, None]
    dy = py[:, None, :] - py[:, :, None]
    d2 = dx * dx + dy * dy
    return torch.where(d2 > 0, d2, torch.full_like(d2, math.inf))


def _positional_cost(d2: torch.Tensor, lab: torch.Tensor, K: int) -> torch.Tensor:
    """(B, K, J) float32 positional cost of the current members ``lab`` (B, J)
    (-1: in no cluster), from ``d2`` (B, J, J) of :func:`_positional_sq`."""
    B, J, _ = d2.shape
    bucket = torch.where(lab < 0, torch.full_like(lab, K), lab)  # (B, J), K = none
    best = torch.full((B, K + 1, J), math.inf, dtype=d2.dtype, device=d2.device)
    # best[b, k, n] = min over m with lab[b, m] == k of d2[b, m, n]
    best = best.scatter_reduce(1, bucket[:, :, None].expand(B, J, J), d2, reduce="amin",
                               include_self=True)[:, :K]
    dist = torch.where(torch.isinf(best), torch.zeros_like(best), torch.sqrt(best))
    # Zeros -> the mean of the whole (K, J) matrix (taken with them); / the maximum.
    mean = (dist.double().sum(dim=(1, 2)) / float(J * K)).float()[:, None, None]  # (B, 1, 1)
    mx = torch.maximum(dist.amax(dim=(1, 2), keepdim=True), mean)
    pos_mx = mx > 0
    inv = torch.where(pos_mx, 1.0 / torch.where(pos_mx, mx, torch.ones_like(mx)),
                      torch.ones_like(mx))
    dist = torch.where(dist == 0, mean.expand_as(dist), dist)
    return torch.where(pos_mx, dist * inv, dist)


def _cost_to_logits(sim: torch.Tensor, dist: Optional[torch.Tensor], alpha: float,
                    lam: float) -> torch.Tensor:
    """(B, K, J) float32 ``-lambda * minmax(-sim + alpha * dist)`` per image; a
    constant cost becomes 0."""
    m = -sim if dist is None else (-sim) + torch.tensor(alpha, dtype=torch.float32) * dist
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    rng = hi.double() - lo.double()
    pos_rng = rng > 0
    scale = torch.where(pos_rng, -lam / torch.where(pos_rng, rng, torch.ones_like(rng)),
                        torch.zeros_like(rng)).float()
    out = (m - lo) * scale
    return torch.where(pos_rng, out, torch.zeros_like(out))


def _sinkhorn_exp(s: torch.Tensor, c: torch.Tensor,
                  iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exponential-domain Sinkhorn on logits ``s`` (B, K, J) float32 with column
    marginals ``c`` (B, K) float64; returns f (B, J), g (B, K) float64 with
    ``log T = s + f + g``."""
    B, K, J = s.shape
    fj = s.amax(dim=1)  # (B, J) float32 per-token maxima
    E = torch.exp(s - fj[:, None, :]).double()  # (B, K, J)
    v = torch.ones((B, K), dtype=torch.float64, device=s.device)
    if iters == 0:
        m = fj.amax(dim=1, keepdim=True)  # (B, 1)
        scale = torch.exp(fj.double() - m.double())  # (B, J)
        u = E.sum(dim=1)
        tot = (scale * u).sum(dim=1, keepdim=True)
        u = scale / tot
    else:
        r = 1.0 / J
        for _ in range(iters):
            u = r / torch.bmm(v[:, None, :], E)[:, 0]  # (B, J)
            v = c / torch.bmm(E, u[:, :, None])[..., 0]  # (B, K)
    return torch.log(u) - fj.double(), torch.log(v)


def _exp_sum(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """sum over ``dim`` of float32 exp(x - m), accumulated in float64."""
    return torch.exp(x - m).double().sum(dim=dim)


def _sinkhorn_log(s: torch.Tensor, c: torch.Tensor,
                  iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn on ``s`` (B, K, J) float32, column marginals ``c``
    (B, K) float64; returns f (B, J), g (B, K) float64 with ``log T = s + f + g``."""
    B, K, J = s.shape
    g = torch.zeros((B, K), dtype=torch.float64, device=s.device)
    if iters == 0:
        m = s.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1) float32
        tot = _exp_sum(s, m, dim=2).sum(dim=1)  # (B,)
        f = -(m[:, 0].double() + torch.log(tot)[:, None])
        return f.expand(B, J), g
    log_r = -math.log(J)
    log_c = torch.log(c)
    for _ in range(iters):
        x = s + g.float()[:, :, None]  # (B, K, J) float32
        fj = x.amax(dim=1, keepdim=True)  # (B, 1, J)
        f = log_r - (fj[:, 0].double() + torch.log(_exp_sum(x, fj, dim=1)))  # (B, J)
        t = s + f.float()[:, None, :]  # (B, K, J)
        m = t.amax(dim=2, keepdim=True)  # (B, K, 1)
        g = log_c - (m[..., 0].double() + torch.log(_exp_sum(t, m, dim=2)))
    return f, g


def _assign(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, J) int64 ``argmax_k (s_kj + g_k)`` in float64, an exact tie to the lowest k."""
    K = s.shape[1]
    x = s.double() + g[:, :, None]  # (B, K, J)
    top = x.amax(dim=1, keepdim=True)
    ks = torch.arange(K, device=s.device)[None, :, None].expand_as(x)
    return torch.where(x == top, ks, torch.full_like(ks, K)).amin(dim=1)


# ----------------------------------------------------------------- entry point

def cluster(tokens: torch.Tensor, positions: Any, n_clusters: int, *, pos_weight: float = 2.0,
            sinkhorn_lambda: float = 20.0, sinkhorn_iters: int = 5, n_iters: int = 5,
            update_marginals: bool = True, seed: Any = 0, init: Any = None,
            return_plan: bool = False) -> Clustering:
    """Cluster the 2N tokens of each image's two views jointly, on the tokens' device.

    Equal to :func:`cribo.cluster` (docs/method.md §2) up to float32 rounding;
    see the module docstring for how each step is computed.  No gradient flows.

    Args:
        tokens: (B, 2, N, d) torch tensor, any floating dtype (rounded to
            float32 first, as :func:`cribo.cluster` does), on any device.
        positions: (B, 2, N, 2) (x, y) of each token in the original image frame:
            a tensor (moved to the tokens' device) or an array.
        n_clusters: K, 1 <= K <= 2N.
        pos_weight: weight of the positional cost, in [0, 1e6].
        sinkhorn_lambda: inverse entropic regularisation, in (0, 1e6].
        sinkhorn_iters: row/column scaling rounds per iteration, >= 0.
        n_iters: clustering iterations, >= 1.
        update_marginals: set the cluster marginals to ``count + 0.01``
            (normalised) after each assignment.
        seed: int, or (B,) ints, drawn from as :func:`cribo.draw_init` does (on
            the host, then moved to the device); ignored when ``init`` is given.
        init: optional (B, K) distinct joint indices in [0, 2N) seeding the clusters.
        return_plan: also return the (B, 2N, K) float32 plan of the last iteration.

    Returns:
        A :class:`Clustering` on the tokens' device: ``labels`` (B, 2, N)
        int64, ``valid`` (B, K) bool, ``counts`` (B, 2, K) int64, ``init``
        (B, K) int64 and ``plan`` (B, 2N, K) float32 or None.

    Raises:
        cribo.ArgumentTypeError: (a TypeError) a wrong type or dtype.
        cribo.ArgumentError: (a ValueError) a wrong shape, K > 2N, a value out
            of range, or an ``init`` that is not distinct per image.
    """
    tokens = _check_tensor(tokens, "tokens")
    if tokens.dim() != 4 or tokens.shape[1] != 2:
        raise _C.ArgumentError(f"{_FN}: tokens must have shape (B, 2, N, d), got "
                               f"{tuple(tokens.shape)}")
    B, _, N, d = (int(x) for x in tokens.shape)
    for size, what in ((B, "the batch size B"), (N, "the number of tokens per view N"),
                       (d, "the token width d")):
        if size == 0:
            raise _C.ArgumentError(f"{_FN}: tokens must have {what} >= 1, got shape "
                                   f"{tuple(tokens.shape)}")
    device = tokens.device
    if not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(np.asarray(positions))
    positions = _check_tensor(positions, "positions")
    if tuple(positions.shape) != (B, 2, N, 2):
        raise _C.ArgumentError(f"{_FN}: positions must have shape ({B}, 2, {N}, 2) to match "
                               f"tokens, got {tuple(positions.shape)}")
    K = _check_int(n_clusters, "n_clusters", 1, _SEED_MAX, "an integer")
    if K > 2 * N:
        raise _C.ArgumentError(f"{_FN}: n_clusters must be at most 2N = {2 * N} (the joint "
                               f"tokens of one image), got {K}")
    alpha = _check_float(pos_weight, "pos_weight", 0.0, 1e6, lo_open=False)
    lam = _check_float(sinkhorn_lambda, "sinkhorn_lambda", 0.0, 1e6, lo_open=True)
    s_iters = _check_int(sinkhorn_iters, "sinkhorn_iters", 0, 100000)
    iters = _check_int(n_iters, "n_iters", 1, 100000)
    update = bool(update_marginals)
    ix = _init_indices(init, seed, B, N, K, device)

    J = 2 * N
    with torch.no_grad():
        z = tokens.detach().reshape(B, J, d).to(torch.float32)
        pos = positions.detach().to(device=device, dtype=torch.float32).reshape(B, J, 2)
        zn = _normalize(z)
        z64 = zn.double()
        gram = torch.bmm(z64, z64.transpose(1, 2))  # (B, J, J) float64
        ks = torch.arange(K, device=device)
        # First centroids: the seed tokens, so Sim^T_k = G[init_k].
        gram32 = gram.float()
        s = torch.gather(gram32, 1, ix[:, :, None].expand(B, K, J))  # (B, K, J)
        lab = torch.full((B, J), -1, dtype=torch.int64, device=device)
        lab = lab.scatter(1, ix, ks[None, :].expand(B, K).contiguous())
        c = torch.full((B, K), 1.0 / K, dtype=torch.float64, device=device)
        gram = gram32.double()  # G as the kernel holds it (float32), widened for the sums
        d2 = _positional_sq(pos) if alpha != 0.0 else None
        sinkhorn = _sinkhorn_exp if lam <= EXP_DOMAIN_MAX_LAMBDA else _sinkhorn_log
        f = g = None
        for it in range(iters):
            if it > 0:
                onehot = (lab[:, None, :] == ks[None, :, None]).double()  # (B, K, J)
                acc = torch.bmm(onehot, gram)  # (B, K, J): sum_{m in k} G_m.
                nrm = (onehot * acc).sum(dim=2, keepdim=True)  # (B, K, 1)
                inv = torch.where(nrm > 0, 1.0 / torch.sqrt(torch.where(nrm > 0, nrm, 1.0)),
                                  torch.zeros_like(nrm))
                s = (acc * inv).float()
            dist = _positional_cost(d2, lab, K) if d2 is not None else None
            s = _cost_to_logits(s, dist, alpha, lam)
            f, g = sinkhorn(s, c, s_iters)
            lab = _assign(s, g)
            if update:
                cnt = (lab[:, None, :] == ks[None, :, None]).sum(dim=2)  # (B, K)
                c = (cnt.double() + 0.01) / (float(J) + 0.01 * float(K))

        labels = lab.reshape(B, 2, N)
        counts = (labels[:, :, None, :] == ks[None, None, :, None]).sum(dim=3)  # (B, 2, K)
        valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
        plan = None
        if return_plan:
            plan = torch.exp(s.double() + f[:, None, :] + g[:, :, None]).float()
            plan = plan.transpose(1, 2).contiguous()  # (B, J, K)
    return Clustering(labels=labels, valid=valid, counts=counts, init=ix, plan=plan)
