"""Plain NumPy implementations of the CrIBo operators (docs/method.md §2-§5).

The "NumPy equivalent" of the benchmark (and the reference cribo's output is
validated against before it is timed): float32 throughout, like cribo, and
written the obvious way --

* clustering: a Python loop over images, each image vectorised (its 2N x 2N
  distance matrix, the positional cost by a segmented minimum over the
  members of each cluster, Sinkhorn on the 2N x K plan);
* pooling: one-hot assignment with L1-normalised columns and batched matmul;
* queue: the whole queue normalised on every look-up and the full
  queries x queue similarity matrix, one view at a time, then argmax and the
  two cycle checks;
* losses: two-pass (max, then exp-sum) softmax / log-softmax and the explicit
  gradient formula dH/ds = (softmax(s/tau_s) - p_t) / tau_s.

Shapes follow the cribo API (README.md, cribo.ops): tokens (B, 2, N, d),
positions (B, 2, N, 2), labels (B, 2, N), objects (B, 2, K, d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common import CriboLosses, Match

F32 = np.float32


# ============================================================================
# Clustering (docs/method.md §2), per image
# ============================================================================


@dataclass
class Clustering:
    labels: np.ndarray  # (B, 2, N) int64
    valid: np.ndarray  # (B, K) bool
    counts: np.ndarray  # (B, 2, K) int64
    init: np.ndarray  # (B, K) int64
    plan: np.ndarray  # (B, 2N, K) float32, transport plan of the last outer iteration


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(||row||, 1e-12) (torch's F.normalize); zero stays zero."""
    n = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=F32))
    return x / np.maximum(n, F32(1e-12))[:, None]


def _positional_cost(dist_nz: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    """D (2N, K): min distance to a member of each cluster at non-zero distance.

    ``dist_nz`` is the (2N, 2N) distance matrix with zeros replaced by +inf;
    ``labels`` (2N,) the cluster of each token, -1 for none. A cluster with no
    member at non-zero distance gets 0, then zeros become the mean of D
    (zeros included) and D is divided by its maximum (docs/method.md §2 step 3).
    """
    n = dist_nz.shape[0]
    members = np.flatnonzero(labels >= 0)
    order = members[np.argsort(labels[members], kind="stable")]
    D = np.full((n, K), np.inf, F32)
    if order.size:
        ks, starts = np.unique(labels[order], return_index=True)
        D[:, ks] = np.minimum.reduceat(dist_nz[:, order], starts, axis=1)
    D[np.isinf(D)] = 0.0
    mean = D.mean(dtype=F32)
    D[D == 0.0] = mean
    mx = D.max()
    if mx > 0:
        D /= mx
    return D


def _sinkhorn(M: np.ndarray, r: float, c: np.ndarray, lam: float, iters: int) -> np.ndarray:
    """Plain-domain Sinkhorn-Knopp on a (2N, K) cost in [0, 1] (no underflow at lam <= ~80)."""
    T = np.exp(F32(-lam) * M)
    T /= T.sum(dtype=F32)
    for _ in range(iters):
        T *= r / T.sum(axis=1, keepdims=True, dtype=F32)
        T *= c[None, :] / T.sum(axis=0, keepdims=True, dtype=F32)
    T[np.isnan(T)] = 1e-8
    return T


def _cluster_one(Z: np.ndarray, P: np.ndarray, init: np.ndarray, K: int, pos_weight: float,
                 lam: float, sinkhorn_iters: int, n_iters: int, update_marginals: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    n = Z.shape[0]
    Zn = _l2_normalise(Z)
    diff = P[:, None, :] - P[None, :, :]
    dist = np.sqrt((diff * diff).sum(-1, dtype=F32))
    dist_nz = np.where(dist > 0, dist, F32(np.inf)).astype(F32)
    labels = np.full(n, -1, np.int64)
    labels[init] = np.arange(K)
    mu = Zn[init]
    r = F32(1.0 / n)
    c = np.full(K, 1.0 / K, F32)
    T = np.zeros((n, K), F32)
    for _ in range(n_iters):
        sim = Zn @ mu.T
        D = _positional_cost(dist_nz, labels, K)
        M = F32(pos_weight) * D - sim
        lo, hi = M.min(), M.max()
        M = (M - lo) / (hi - lo) if hi > lo else np.zeros_like(M)
        T = _sinkhorn(M, r, c, lam, sinkhorn_iters)
        labels = T.argmax(axis=1)  # first maximum: ties to the lowest k
        counts = np.bincount(labels, minlength=K)
        if update_marginals:
            c = (counts + 0.01).astype(F32)
            c /= c.sum(dtype=F32)
        A = (labels[:, None] == np.arange(K)[None, :]).astype(F32)
        mu = _l2_normalise(A.T @ Zn)
    return labels, T


def cluster(tokens: np.ndarray, positions: np.ndarray, n_clusters: int, *, init: np.ndarray,
            pos_weight: float = 2.0, sinkhorn_lambda: float = 20.0, sinkhorn_iters: int = 5,
            n_iters: int = 5, update_marginals: bool = True) -> Clustering:
    """Joint-space clustering of each image's 2N tokens (docs/method.md §2).

    Args:
        tokens: (B, 2, N, d) token features.
        positions: (B, 2, N, 2) patch centres in the original image frame.
        n_clusters: K.
        init: (B, K) int indices into the 2N joint tokens (view * N + n).
    """
    tokens = np.ascontiguousarray(tokens, F32)
    positions = np.ascontiguousarray(positions, F32)
    B, _, N, d = tokens.shape
    K = n_clusters
    labels = np.empty((B, 2 * N), np.int64)
    plan = np.empty((B, 2 * N, K), F32)
    for b in range(B):
        labels[b], plan[b] = _cluster_one(tokens[b].reshape(2 * N, d), positions[b].reshape(2 * N, 2),
                                          np.asarray(init[b], np.int64), K, pos_weight,
                                          sinkhorn_lambda, sinkhorn_iters, n_iters, update_marginals)
    labels = labels.reshape(B, 2, N)
    counts = np.zeros((B, 2, K), np.int64)
    for b in range(B):
        for v in range(2):
            counts[b, v] = np.bincount(labels[b, v], minlength=K)
    valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
    return Clustering(labels=labels, valid=valid, counts=counts,
                      init=np.asarray(init, np.int64), plan=plan)


# ============================================================================
# Pooling (docs/method.md §3), hard assignment
# ============================================================================


def _normalised_onehot(labels: np.ndarray, K: int) -> np.ndarray:
    """(B, 2, N) labels -> (B, 2, N, K) one-hot with columns L1-normalised per view."""
    A = (labels[..., None] == np.arange(K)).astype(F32)
    A /= np.maximum(A.sum(axis=2, keepdims=True), F32(1.0))
    return A


def pool(tokens: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Per-view mean of member tokens: (B, 2, N, d), (B, 2, N) -> (B, 2, K, d)."""
    A = _normalised_onehot(labels, n_clusters)
    return np.matmul(A.transpose(0, 1, 3, 2), tokens)


def pool_backward(grad_objects: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """dz[b,i,n] = sum_k Qhat[b,i,n,k] grad[b,i,k]: (B, 2, K, d) -> (B, 2, N, d)."""
    A = _normalised_onehot(labels, n_clusters)
    return np.matmul(A, grad_objects)


# ============================================================================
# Object queue (docs/method.md §4)
# ============================================================================


class ObjectQueue:
    """Newest-first list of images' objects, kept as two (R, d) arrays.

    A push concatenates the new block in front of the old entries and drops
    whole images from the back (a copy of the whole queue, as the reference
    does with ``torch.cat``).
    """

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = capacity
        self.dim = dim
        self.q1 = np.zeros((0, dim), F32)
        self.q2 = np.zeros((0, dim), F32)
        self.counts = np.zeros(0, np.int64)

    def push(self, objects1: np.ndarray, objects2: np.ndarray, counts: np.ndarray) -> None:
        counts = np.asarray(counts, np.int64)
        new_counts = np.concatenate([counts, self.counts])[: self.capacity]
        rows = int(new_counts.sum())
        self.q1 = np.concatenate([np.asarray(objects1, F32), self.q1])[:rows]
        self.q2 = np.concatenate([np.asarray(objects2, F32), self.q2])[:rows]
        self.counts = new_counts

    def __len__(self) -> int:
        return len(self.counts)

    def match(self, objects1: np.ndarray, objects2: np.ndarray) -> Match:
        t1n = _l2_normalise(np.asarray(objects1, F32))
        t2n = _l2_normalise(np.asarray(objects2, F32))
        M = t1n.shape[0]
        ar = np.arange(M)
        # view 1: whole queue normalised, full (M, R) similarity, argmax
        qn1 = _l2_normalise(self.q1)
        s = t1n @ qn1.T
        a = s.argmax(axis=1)
        sim1 = s[ar, a]
        del s
        # view 2
        qn2 = _l2_normalise(self.q2)
        s = t2n @ qn2.T
        b = s.argmax(axis=1)
        sim2 = s[ar, b]
        del s
        # cycle checks against the current batch
        mask1 = (qn2[a] @ t2n.T).argmax(axis=1) == ar
        mask2 = (qn1[b] @ t1n.T).argmax(axis=1) == ar
        return Match(index1=a.astype(np.int64), index2=b.astype(np.int64), mask1=mask1, mask2=mask2,
                     targets1=self.q1[a], targets2=self.q2[b],
                     similarity1=sim1.astype(F32), similarity2=sim2.astype(F32))


# ============================================================================
# Losses (docs/method.md §5)
# ============================================================================


def _log_softmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass row log-softmax and softmax of a (..., L) array."""
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    e = np.exp(z)
    s = e.sum(axis=-1, keepdims=True, dtype=F32)
    return z - np.log(s), e / s


def softmax_cross_entropy(student_logits: np.ndarray, teacher_logits: np.ndarray, *,
                          center: np.ndarray | None = None, student_temp: float = 0.1,
                          teacher_temp: float = 0.07) -> tuple[np.ndarray, np.ndarray]:
    """H(p_t, p_s) per row and its gradient w.r.t. the student logits."""
    t = teacher_logits if center is None else teacher_logits - center
    _, pt = _log_softmax(t / F32(teacher_temp))
    ls, qs = _log_softmax(student_logits / F32(student_temp))
    return -(pt * ls).sum(-1, dtype=F32), (qs - pt) / F32(student_temp)


def cribo_losses(student_global: np.ndarray, teacher_global: np.ndarray,
                 student_objects: np.ndarray, teacher_objects: np.ndarray,
                 teacher_neighbours: np.ndarray, mask1: np.ndarray, mask2: np.ndarray, *,
                 center_global: np.ndarray, center_objects: np.ndarray,
                 student_temp: float, teacher_temp: float,
                 teacher_temp_objects: float | None,
                 weights: tuple[float, float, float],
                 center_momentum: float) -> CriboLosses:
    """L_g + L_o + L_nn with gradients w.r.t. the student logits and the
    updated centres (docs/method.md §5, the paper's Z1/Z2 normalisation).
    The hyper-parameters have no defaults: run.py passes common.LOSS_HPARAMS."""
    tt_o = teacher_temp if teacher_temp_objects is None else teacher_temp_objects
    ts = F32(student_temp)
    wg, wo, wn = weights
    B = student_global.shape[1]
    M = student_objects.shape[1]
    m1 = np.asarray(mask1, bool)
    m2 = np.asarray(mask2, bool)
    Z1, Z2 = int(m1.sum()), int(m2.sum())

    _, ptg = _log_softmax((teacher_global - center_global) / F32(teacher_temp))
    lsg, qsg = _log_softmax(student_global / ts)
    Hg = -(ptg[0] * lsg[1]).sum(-1, dtype=F32) - (ptg[1] * lsg[0]).sum(-1, dtype=F32)
    L_g = float(Hg.mean(dtype=np.float64))
    grad_global = np.empty_like(qsg)
    grad_global[1] = (F32(wg / B) / ts) * (qsg[1] - ptg[0])
    grad_global[0] = (F32(wg / B) / ts) * (qsg[0] - ptg[1])
    del ptg, lsg, qsg

    lso, qso = _log_softmax(student_objects / ts)
    _, pto = _log_softmax((teacher_objects - center_objects) / F32(tt_o))
    Ho = -(pto[0] * lso[1]).sum(-1, dtype=F32) - (pto[1] * lso[0]).sum(-1, dtype=F32)
    L_o = float(Ho.mean(dtype=np.float64)) if M else 0.0
    grad_objects = np.empty_like(qso)
    if M:
        grad_objects[1] = (F32(wo / M) / ts) * (qso[1] - pto[0])
        grad_objects[0] = (F32(wo / M) / ts) * (qso[0] - pto[1])
    else:
        grad_objects[:] = 0
    del pto

    _, ptn = _log_softmax((teacher_neighbours - center_objects) / F32(tt_o))
    L_nn = 0.0
    if Z1:
        h1 = -(ptn[0] * lso[1]).sum(-1, dtype=F32)
        L_nn += float(h1[m1].sum(dtype=np.float64)) / Z1
        grad_objects[1, m1] += (F32(wn / Z1) / ts) * (qso[1, m1] - ptn[0, m1])
    if Z2:
        h2 = -(ptn[1] * lso[0]).sum(-1, dtype=F32)
        L_nn += float(h2[m2].sum(dtype=np.float64)) / Z2
        grad_objects[0, m2] += (F32(wn / Z2) / ts) * (qso[0, m2] - ptn[1, m2])
    del ptn, lso, qso

    mom = F32(center_momentum)
    L = teacher_global.shape[-1]
    cg = mom * center_global + (1 - mom) * teacher_global.reshape(-1, L).mean(0, dtype=np.float64).astype(F32)
    if M:
        co = mom * center_objects + (1 - mom) * teacher_objects.reshape(-1, L).mean(0, dtype=np.float64).astype(F32)
    else:
        co = center_objects.copy()
    total = wg * L_g + wo * L_o + wn * L_nn
    return CriboLosses(total=total, global_=L_g, objects=L_o, neighbours=L_nn,
                       grad_global=grad_global, grad_objects=grad_objects,
                       center_global=cg.astype(F32), center_objects=co.astype(F32))


def describe() -> dict[str, Any]:
    return {"clustering": "per-image Python loop, vectorised within an image "
                          "(segmented min via np.minimum.reduceat), float32",
            "pool": "one-hot with L1-normalised columns, batched np.matmul (fwd and bwd)",
            "queue": "whole queue L2-normalised per look-up, full (M, R) similarity one "
                     "view at a time, argmax, cycle checks; push = concatenate (full copy)",
            "loss": "two-pass softmax/log-softmax, explicit gradient, float32"}
