"""Independent float64 NumPy reference of the CrIBo operators.

Written from ``docs/method.md`` alone (CrIBo, "Cross-Image Object-Level Bootstrapping",
Lebailly, Stegmueller et al., ICLR 2024). Slow and obvious on purpose: explicit
loops over images, iterations and clusters, ``einsum`` and explicit
log-sum-exp. It never imports ``cribo`` or ``cribo._C`` and shares no code with
the package; the C operators are tested against it.

Every function converts its float inputs to float64 and returns float64 (or
int64 / bool for indices and masks).  It is one file, longer than the modules of
the package, so that the whole reference can be read (and checked against
docs/method.md) without following imports.

Edge choices made explicit here (each also stated where it is coded):

- L2 normalisation of an exactly-zero vector gives the zero vector (so its
  cosine similarity with anything is 0).
- Positional cost: when every entry of ``D`` is 0 (no cluster has a member at
  non-zero distance from any token), ``D`` stays all zeros.
- Plain-domain Sinkhorn: NaN entries are replaced by 1e-8 once, after the
  iterations.
- Object queue: images pushed without ids get id -1; ``-1`` never excludes.
- ``queue_match``: the same-image exclusion applies to the searches that
  return queue entries; the cycle checks search the current batch without
  exclusion.
- ``update_center`` with zero teacher rows leaves the centre unchanged, and a
  mean over zero objects (``L_o`` with ``M = 0``) is 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
Bool = NDArray[np.bool_]

__all__ = [
    "l2_normalize",
    "logsumexp",
    "positional_cost",
    "positional_cost_members",
    "sinkhorn",
    "sinkhorn_log",
    "cluster",
    "pool",
    "pool_soft",
    "pool_backward",
    "pool_soft_backward",
    "topk_cosine",
    "RefQueue",
    "queue_match",
    "softmax",
    "log_softmax",
    "softmax_cross_entropy",
    "update_center",
    "cribo_losses",
]


# ============================================================================
# small helpers
# ============================================================================


def _f64(x: ArrayLike) -> F64:
    """A float64 copy of ``x`` (any shape)."""
    return np.array(x, dtype=np.float64, copy=True)


def _dot(a: F64, b: F64) -> float:
    """<a, b> as the correctly rounded sum of the float64 products (math.fsum): a
    function of the values alone, so equal rows tie exactly wherever they sit in
    memory (a BLAS ddot may sum in an order that depends on the alignment)."""
    return math.fsum((a * b).tolist())


def l2_normalize(x: ArrayLike) -> F64:
    """Rows of ``x`` divided by their L2 norm; an all-zero row stays zero.

    Args:
        x: (..., d) vectors.

    Returns:
        (..., d) float64, unit rows (zero rows for zero inputs).
    """
    x = _f64(x)
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    out = np.zeros_like(x)
    np.divide(x, norm, out=out, where=norm > 0)
    return out


def logsumexp(x: ArrayLike, axis: int | None = None) -> F64:
    """Explicit, max-shifted log-sum-exp.

    Args:
        x: array of finite values (or ``-inf``).
        axis: reduction axis; ``None`` reduces everything.

    Returns:
        float64 array with ``axis`` removed (a 0-d array for ``axis=None``).
        A slice that is all ``-inf`` gives ``-inf``.
    """
    x = _f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        s = np.log(np.sum(np.exp(x - m_safe), axis=axis, keepdims=True)) + m_safe
    if axis is None:
        return np.asarray(s.reshape(()))
    return np.squeeze(s, axis=axis)


def softmax(x: ArrayLike) -> F64:
    """Softmax over the last axis. x: (R, L) -> (R, L)."""
    x = _f64(x)
    return np.exp(x - logsumexp(x, axis=-1)[..., None])


def log_softmax(x: ArrayLike) -> F64:
    """Log-softmax over the last axis. x: (R, L) -> (R, L)."""
    x = _f64(x)
    return x - logsumexp(x, axis=-1)[..., None]


# ============================================================================
# docs/method.md §2: joint-space clustering
# ============================================================================


def positional_cost_members(P: ArrayLike, members: ArrayLike) -> F64:
    """Positional cost ``D`` of docs/method.md §2 step 3 for a 0/1 membership matrix.

    ``D(n,k)`` is the smallest Euclidean distance from ``P[n]`` to a member of
    cluster ``k``, ignoring members at distance exactly 0; where there is no
    member at non-zero distance, ``D(n,k) = 0``. Then every 0 entry becomes
    the mean of the whole ``D`` (taken before replacement, zeros included),
    and ``D`` is divided by its maximum. If the maximum is 0 (every entry was
    0), ``D`` stays all zeros (project choice; the published code would divide by zero).

    Args:
        P: (2N, 2) token positions.
        members: (2N, K) 0/1 (or bool) membership; a token may belong to
            several clusters (e.g. duplicated initial indices) or to none.

    Returns:
        D: (2N, K) float64 in [0, 1].
    """
    P = _f64(P)
    A = np.asarray(members).astype(bool)
    n_tok, K = A.shape
    assert P.shape == (n_tok, 2), (P.shape, A.shape)
    # (2N, 2N) pairwise Euclidean distances
    diff = P[:, None, :] - P[None, :, :]
    dist = np.sqrt(np.sum(diff * diff, axis=-1))
    D = np.zeros((n_tok, K))
    for k in range(K):
        cand = dist[:, A[:, k]]  # (2N, |members of k|)
        cand = np.where(cand > 0, cand, np.inf)  # ignore distance exactly 0
        if cand.shape[1] == 0:
            continue  # empty cluster: column stays 0
        best = np.min(cand, axis=1)
        D[:, k] = np.where(np.isfinite(best), best, 0.0)
    mean = D.mean()
    D = np.where(D == 0, mean, D)
    dmax = D.max() if D.size else 0.0
    if dmax > 0:
        D = D / dmax
    else:
        D = np.zeros_like(D)
    return D


def positional_cost(P: ArrayLike, members_labels: ArrayLike, K: int) -> F64:
    """Positional cost ``D`` of docs/method.md §2 for hard labels.

    Args:
        P: (2N, 2) token positions (view-1 tokens first).
        members_labels: (2N,) int in [-1, K); -1 = member of no cluster.
        K: number of clusters.

    Returns:
        D: (2N, K) float64; see :func:`positional_cost_members`.
    """
    labels = np.asarray(members_labels, dtype=np.int64)
    assert labels.ndim == 1
    assert np.all((labels >= -1) & (labels < K)), labels
    A = np.zeros((labels.shape[0], K), dtype=bool)
    for n, k in enumerate(labels):
        if k >= 0:
            A[n, k] = True
    return positional_cost_members(P, A)


def sinkhorn(M: ArrayLike, lam: float, n_iters: int, r: ArrayLike, c: ArrayLike) -> F64:
    """Plain exp-domain Sinkhorn-Knopp exactly as docs/method.md §2.

    ``T = exp(-lam * M)``, ``T /= sum(T)``, then ``n_iters`` times: scale rows
    to sum ``r``, then columns to sum ``c``. NaN entries (from rows or columns
    that underflowed to 0) become 1e-8, once, at the end. This is the version
    with the underflow defect; see :func:`sinkhorn_log`.

    Args:
        M: (R, K) cost.
        lam: entropic strength lambda (> 0).
        n_iters: number of row+column scalings.
        r: (R,) row marginals.
        c: (K,) column marginals.

    Returns:
        T: (R, K) float64 transport plan.
    """
    M, r, c = _f64(M), _f64(r), _f64(c)
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        T = np.exp(-lam * M)
        T = T / np.sum(T)
        for _ in range(n_iters):
            T = T * (r / np.sum(T, axis=1))[:, None]
            T = T * (c / np.sum(T, axis=0))[None, :]
    return np.where(np.isnan(T), 1e-8, T)


def sinkhorn_log(
    M: ArrayLike, lam: float, n_iters: int, r: ArrayLike, c: ArrayLike
) -> tuple[F64, F64]:
    """Log-domain Sinkhorn-Knopp: same result as :func:`sinkhorn` without underflow.

    ``logT = -lam*M - lse(-lam*M)``; then ``n_iters`` times
    ``logT += log r - lse_rows(logT)`` and ``logT += log c - lse_cols(logT)``.

    Args:
        M: (R, K) finite cost.
        lam: entropic strength lambda (> 0).
        n_iters: number of row+column scalings.
        r: (R,) positive row marginals.
        c: (K,) positive column marginals.

    Returns:
        T: (R, K) float64, ``exp(logT)``.
        logT: (R, K) float64, finite.
    """
    M, r, c = _f64(M), _f64(r), _f64(c)
    logT = -lam * M
    logT = logT - logsumexp(logT)
    log_r, log_c = np.log(r), np.log(c)
    for _ in range(n_iters):
        logT = logT + (log_r - logsumexp(logT, axis=1))[:, None]
        logT = logT + (log_c - logsumexp(logT, axis=0))[None, :]
    return np.exp(logT), logT


def _minmax(M: F64) -> F64:
    """Min-max normalise to [0, 1]; a constant matrix becomes all zeros."""
    lo, hi = M.min(), M.max()
    if hi > lo:
        return (M - lo) / (hi - lo)
    return np.zeros_like(M)


def _cluster_one_image(
    Z: F64,
    P: F64,
    K: int,
    init: I64,
    pos_weight: float,
    sinkhorn_lambda: float,
    sinkhorn_iters: int,
    n_iters: int,
    update_marginals: bool,
) -> tuple[I64, F64]:
    """docs/method.md §2 steps 1-3 for one image.

    Args:
        Z: (2N, d) joint tokens, view-1 tokens first.
        P: (2N, 2) joint positions.
        K: number of clusters.
        init: (K,) joint token indices of the initial centroids.

    Returns:
        labels: (2N,) int64 in [0, K), the hard assignment of the last iteration.
        plan: (2N, K) float64, the transport plan ``T`` of the last iteration.
    """
    n_tok = Z.shape[0]
    Zn = l2_normalize(Z)  # (2N, d)
    # step 2: initialisation
    mu = Zn[init].copy()  # (K, d)
    A = np.zeros((n_tok, K), dtype=bool)  # current hard assignment
    for k in range(K):
        A[init[k], k] = True
    r = np.full(n_tok, 1.0 / n_tok)
    c = np.full(K, 1.0 / K)
    labels = np.full(n_tok, -1, dtype=np.int64)
    plan = np.zeros((n_tok, K))
    # step 3
    for _ in range(n_iters):
        sim = Zn @ mu.T  # (2N, K)
        D = positional_cost_members(P, A)  # (2N, K)
        M = _minmax(-sim + pos_weight * D)
        plan, logT = sinkhorn_log(M, sinkhorn_lambda, sinkhorn_iters, r, c)
        # hard assignment: argmax over k, np.argmax takes the first (lowest k) on ties
        labels = np.argmax(logT, axis=1).astype(np.int64)
        A = np.zeros((n_tok, K), dtype=bool)
        A[np.arange(n_tok), labels] = True
        counts = A.sum(axis=0).astype(np.float64)  # (K,)
        if update_marginals:
            c = (counts + 0.01) / np.sum(counts + 0.01)
        mu = np.zeros((K, Zn.shape[1]))
        for k in range(K):
            mu[k] = Zn[A[:, k]].sum(axis=0)  # empty cluster: zero vector
        mu = l2_normalize(mu)
    return labels, plan


def cluster(
    tokens: ArrayLike,
    positions: ArrayLike,
    n_clusters: int,
    init: ArrayLike,
    *,
    pos_weight: float = 2.0,
    sinkhorn_lambda: float = 20.0,
    sinkhorn_iters: int = 5,
    n_iters: int = 5,
    update_marginals: bool = True,
) -> dict[str, Any]:
    """Joint-space clustering of docs/method.md §2, per image, independently.

    Per image: ``Zn`` = L2-normalised joint tokens; centroids start at
    ``Zn[init]``; ``n_iters`` times: ``Sim = Zn mu^T``, positional cost ``D``,
    ``M = minmax(-Sim + pos_weight * D)`` (per image; constant -> zeros),
    log-domain Sinkhorn, hard assignment by argmax of ``logT`` (ties -> lowest
    k), marginals ``c_k = (count_k + 0.01) / sum`` if ``update_marginals``,
    centroids = L2-normalised member sums (empty -> zero vector).

    Args:
        tokens: (B, 2, N, d) teacher tokens of view 1 and view 2.
        positions: (B, 2, N, 2) token positions in the original image frame.
        n_clusters: K.
        init: (B, K) int joint indices in [0, 2N) (joint index = view*N + n).
        pos_weight: alpha_pos.
        sinkhorn_lambda: lambda.
        sinkhorn_iters: Sinkhorn row/column scalings per outer iteration.
        n_iters: outer iterations (>= 1).
        update_marginals: update ``c`` from the cluster sizes.

    Returns:
        dict with ``labels`` (B, 2, N) int64 in [0, K); ``valid`` (B, K) bool
        (>= 1 token in each view); ``counts`` (B, 2, K) int64 tokens per view
        and cluster; ``plan`` (B, 2N, K) float64, ``T`` of the last iteration.
    """
    tok = _f64(tokens)
    pos = _f64(positions)
    init_a = np.asarray(init, dtype=np.int64)
    B, two, N, d = tok.shape
    K = int(n_clusters)
    assert two == 2 and pos.shape == (B, 2, N, 2), (tok.shape, pos.shape)
    assert init_a.shape == (B, K), init_a.shape
    assert np.all((init_a >= 0) & (init_a < 2 * N)), init_a
    if n_iters < 1:
        raise ValueError("cluster: n_iters must be >= 1")
    labels = np.zeros((B, 2, N), dtype=np.int64)
    counts = np.zeros((B, 2, K), dtype=np.int64)
    plan = np.zeros((B, 2 * N, K))
    for b in range(B):
        Z = tok[b].reshape(2 * N, d)  # view-1 rows first
        P = pos[b].reshape(2 * N, 2)
        lab, T = _cluster_one_image(
            Z, P, K, init_a[b], pos_weight, sinkhorn_lambda, sinkhorn_iters,
            n_iters, update_marginals,
        )
        labels[b] = lab.reshape(2, N)
        plan[b] = T
        for i in range(2):
            for n in range(N):
                counts[b, i, labels[b, i, n]] += 1
    valid = (counts[:, 0, :] > 0) & (counts[:, 1, :] > 0)
    return {"labels": labels, "valid": valid, "counts": counts, "plan": plan}


# ============================================================================
# docs/method.md §3: object pooling
# ============================================================================


def _labels_to_weights(labels: ArrayLike, K: int) -> F64:
    """Hard labels (B, 2, N) in [-1, K) -> 0/1 weights (B, 2, N, K)."""
    lab = np.asarray(labels, dtype=np.int64)
    assert np.all((lab >= -1) & (lab < K)), lab
    W = np.zeros(lab.shape + (K,))
    for idx in np.ndindex(lab.shape):
        if lab[idx] >= 0:
            W[idx + (int(lab[idx]),)] = 1.0
    return W


def _normalize_columns(weights: ArrayLike) -> F64:
    """L1-normalise each column (over N) within each view; zero column stays zero.

    weights: (B, 2, N, K) non-negative -> Qhat (B, 2, N, K).
    """
    W = _f64(weights)
    assert np.all(W >= 0), "weights must be non-negative"
    colsum = W.sum(axis=2, keepdims=True)  # (B, 2, 1, K)
    out = np.zeros_like(W)
    np.divide(W, colsum, out=out, where=colsum > 0)
    return out


def pool_soft(tokens: ArrayLike, weights: ArrayLike) -> F64:
    """Soft object pooling ``c_i^k = sum_n Qhat_i(n,k) z_i^n`` (docs/method.md §3).

    Args:
        tokens: (B, 2, N, d).
        weights: (B, 2, N, K) non-negative; columns are L1-normalised per view
            here (a zero column stays zero).

    Returns:
        (B, 2, K, d) float64.
    """
    Q = _normalize_columns(weights)
    return np.einsum("bink,bind->bikd", Q, _f64(tokens))


def pool(tokens: ArrayLike, labels: ArrayLike, K: int) -> F64:
    """Hard object pooling: per-view mean of each cluster's member tokens.

    Written as an explicit segment mean (not via :func:`pool_soft`).

    Args:
        tokens: (B, 2, N, d).
        labels: (B, 2, N) int in [-1, K) (-1: in no cluster).
        K: number of clusters.

    Returns:
        (B, 2, K, d) float64; zeros for a cluster with no member in that view.
    """
    tok = _f64(tokens)
    lab = np.asarray(labels, dtype=np.int64)
    B, _, N, d = tok.shape
    out = np.zeros((B, 2, K, d))
    for b in range(B):
        for i in range(2):
            for k in range(K):
                members = tok[b, i][lab[b, i] == k]
                if members.shape[0] > 0:
                    out[b, i, k] = members.sum(axis=0) / members.shape[0]
    return out


def pool_soft_backward(grad: ArrayLike, weights: ArrayLike) -> F64:
    """Gradient of :func:`pool_soft` w.r.t. the tokens.

    ``dz[b,i,n] = sum_k Qhat[b,i,n,k] grad[b,i,k]``.

    Args:
        grad: (B, 2, K, d) gradient w.r.t. the pooled objects.
        weights: (B, 2, N, K) non-negative weights (normalised here).

    Returns:
        (B, 2, N, d) float64.
    """
    Q = _normalize_columns(weights)
    return np.einsum("bink,bikd->bind", Q, _f64(grad))


def pool_backward(grad: ArrayLike, labels: ArrayLike, K: int) -> F64:
    """Gradient of :func:`pool` w.r.t. the tokens.

    ``dz[b,i,n] = grad[b,i,labels[b,i,n]] / count[b,i,labels[b,i,n]]`` (0 for -1).

    Args:
        grad: (B, 2, K, d) gradient w.r.t. the pooled objects.
        labels: (B, 2, N) int in [-1, K).
        K: number of clusters.

    Returns:
        (B, 2, N, d) float64.
    """
    g = _f64(grad)
    lab = np.asarray(labels, dtype=np.int64)
    B, _, N = lab.shape
    d = g.shape[-1]
    out = np.zeros((B, 2, N, d))
    for b in range(B):
        for i in range(2):
            for n in range(N):
                k = lab[b, i, n]
                if k >= 0:
                    out[b, i, n] = g[b, i, k] / np.sum(lab[b, i] == k)
    return out


# ============================================================================
# docs/method.md §4: nearest neighbours, object queue, cycle checks
# ============================================================================


def topk_cosine(
    queries: ArrayLike,
    bank: ArrayLike,
    k: int,
    query_ids: ArrayLike | None = None,
    bank_ids: ArrayLike | None = None,
) -> tuple[I64, F64]:
    """Brute-force top-k cosine search.

    Cosine similarity with a zero vector is 0. Results are sorted by similarity
    descending, ties to the lowest bank index. When ids are given, bank rows
    with the query's id are never returned. Missing results: index -1, sim -inf.

    Args:
        queries: (M, d).
        bank: (Nb, d).
        k: results per query, ``1 <= k <= Nb``.
        query_ids: (M,) int or None.
        bank_ids: (Nb,) int or None (both or neither).

    Returns:
        indices (M, k) int64 and similarities (M, k) float64.
    """
    q = l2_normalize(queries)
    bk = l2_normalize(bank)
    Mq, Nb = q.shape[0], bk.shape[0]
    if k > Nb or k < 1:
        raise ValueError(f"topk_cosine: k must be in [1, {Nb}], got {k}")
    if (query_ids is None) != (bank_ids is None):
        raise ValueError("topk_cosine: give both query_ids and bank_ids or neither")
    idx = np.full((Mq, k), -1, dtype=np.int64)
    sims = np.full((Mq, k), -np.inf)
    for m in range(Mq):
        cand: list[tuple[float, int]] = []
        for j in range(Nb):
            if query_ids is not None and bank_ids is not None:
                if int(np.asarray(query_ids)[m]) == int(np.asarray(bank_ids)[j]):
                    continue
            cand.append((-_dot(q[m], bk[j]), j))
        cand.sort()  # by -sim ascending, then by index ascending
        for t, (negsim, j) in enumerate(cand[:k]):
            idx[m, t] = j
            sims[m, t] = -negsim
    return idx, sims


class RefQueue:
    """List-of-images model of the object queue (docs/method.md §4).

    The queue is a Python list of images, newest first; each image holds its
    valid teacher objects for view 1 and view 2 (in cluster order) and its id.
    A push puts the batch in front as one block in image order, then drops
    images from the back until at most ``capacity`` remain (so a block larger
    than ``capacity`` keeps its first ``capacity`` images). An image with 0
    objects still takes a slot.

    Args:
        capacity: maximum number of images held (>= 1).
        dim: object width d.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        if capacity < 1:
            raise ValueError("RefQueue: capacity must be >= 1")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.images: list[tuple[F64, F64, int]] = []

    def push(
        self,
        objects1: ArrayLike,
        objects2: ArrayLike,
        counts: ArrayLike,
        image_ids: ArrayLike | None = None,
    ) -> None:
        """Push one batch.

        Args:
            objects1: (M, d) view-1 objects, image order, cluster order within.
            objects2: (M, d) view-2 objects, same order.
            counts: (B,) objects per image, sum M, zeros allowed.
            image_ids: (B,) int ids or None (stored as -1).
        """
        o1 = _f64(objects1).reshape(-1, self.dim)
        o2 = _f64(objects2).reshape(-1, self.dim)
        cnt = [int(x) for x in np.asarray(counts, dtype=np.int64).reshape(-1)]
        assert o1.shape == o2.shape and sum(cnt) == o1.shape[0], (o1.shape, cnt)
        ids = [-1] * len(cnt) if image_ids is None else [int(x) for x in np.asarray(image_ids).reshape(-1)]
        assert len(ids) == len(cnt)
        block: list[tuple[F64, F64, int]] = []
        start = 0
        for c, i in zip(cnt, ids):
            block.append((o1[start : start + c].copy(), o2[start : start + c].copy(), i))
            start += c
        self.images = block + self.images
        while len(self.images) > self.capacity:
            self.images.pop()  # drop from the back (oldest)

    def __len__(self) -> int:
        """Number of images held."""
        return len(self.images)

    @property
    def n_objects(self) -> int:
        """Number of objects held."""
        return sum(im[0].shape[0] for im in self.images)

    def arrays(self) -> tuple[F64, F64, I64]:
        """The queue in newest-first address order.

        Returns:
            q1 (Q, d), q2 (Q, d) float64 and ids (Q,) int64 (the image id of
            each object, -1 when pushed without ids).
        """
        q1 = [im[0] for im in self.images]
        q2 = [im[1] for im in self.images]
        ids = [np.full(im[0].shape[0], im[2], dtype=np.int64) for im in self.images]
        if not q1:
            return np.zeros((0, self.dim)), np.zeros((0, self.dim)), np.zeros(0, np.int64)
        return np.concatenate(q1), np.concatenate(q2), np.concatenate(ids)


def _argmax_cos(query_hat: F64, bank_hat: F64, allowed: Bool) -> tuple[int, float]:
    """Lowest index of the largest <query_hat, bank_hat[j]> over allowed j; (-1, -inf) if none."""
    best_j, best_s = -1, -np.inf
    for j in range(bank_hat.shape[0]):
        if not allowed[j]:
            continue
        s = _dot(query_hat, bank_hat[j])
        if best_j < 0 or s > best_s:  # strict: an equal later entry never wins
            best_j, best_s = j, s
    return best_j, best_s


def queue_match(
    q1: ArrayLike,
    q2: ArrayLike,
    q_ids: ArrayLike | None,
    t1: ArrayLike,
    t2: ArrayLike,
    image_ids: ArrayLike | None = None,
    exclude_same_image: bool = True,
) -> dict[str, Any]:
    """Cross-image nearest neighbours with both cycle checks (docs/method.md §4).

    For each batch object j: ``a(j) = argmax_q <t1^_j, q1^_q>`` and
    ``b(j) = argmax_q <t2^_j, q2^_q>`` over queue entries (ties -> lowest
    address; entries with the query's image id skipped when ``image_ids`` is
    given and ``exclude_same_image``). Cycle check 1 keeps pair 1 iff
    ``argmax_j'' <q2^_a(j), t2^_j''> == j``; cycle check 2 keeps pair 2 iff
    ``argmax_j'' <q1^_b(j), t1^_j''> == j`` (over the whole batch, ties ->
    lowest j'', no exclusion). Targets are the unnormalised queue entries.

    Args:
        q1, q2: (Q, d) queue view-1 / view-2 entries, newest-first order.
        q_ids: (Q,) int image ids of the entries (-1 = unknown) or None.
        t1, t2: (M, d) the batch's valid teacher objects, view 1 / view 2.
        image_ids: (M,) int source image id of each batch object, or None.
        exclude_same_image: skip entries from the query's own image.

    Returns:
        dict with ``index1``, ``index2`` (M,) int64 (-1 = none); ``mask1``,
        ``mask2`` (M,) bool; ``targets1``, ``targets2`` (M, d) float64 (zeros
        where the index is -1); ``similarity1``, ``similarity2`` (M,) float64
        cosine of the match (-inf where the index is -1).
    """
    Q1, Q2, T1, T2 = _f64(q1), _f64(q2), _f64(t1), _f64(t2)
    Q, d = Q1.shape[0], T1.shape[1]
    Mb = T1.shape[0]
    Q1h, Q2h, T1h, T2h = (l2_normalize(x) for x in (Q1, Q2, T1, T2))
    qid = None if q_ids is None else np.asarray(q_ids, dtype=np.int64).reshape(Q)
    jid = None if image_ids is None else np.asarray(image_ids, dtype=np.int64).reshape(Mb)
    out: dict[str, Any] = {
        "index1": np.full(Mb, -1, dtype=np.int64),
        "index2": np.full(Mb, -1, dtype=np.int64),
        "mask1": np.zeros(Mb, dtype=bool),
        "mask2": np.zeros(Mb, dtype=bool),
        "targets1": np.zeros((Mb, d)),
        "targets2": np.zeros((Mb, d)),
        "similarity1": np.full(Mb, -np.inf),
        "similarity2": np.full(Mb, -np.inf),
    }
    all_batch = np.ones(Mb, dtype=bool)
    for j in range(Mb):
        allowed = np.ones(Q, dtype=bool)
        if exclude_same_image and jid is not None and qid is not None and jid[j] != -1:
            allowed = qid != jid[j]
        a, sa = _argmax_cos(T1h[j], Q1h, allowed)
        b, sb = _argmax_cos(T2h[j], Q2h, allowed)
        if a >= 0:
            out["index1"][j], out["similarity1"][j] = a, sa
            out["targets1"][j] = Q1[a]
            back, _ = _argmax_cos(Q2h[a], T2h, all_batch)  # cycle check 1
            out["mask1"][j] = back == j
        if b >= 0:
            out["index2"][j], out["similarity2"][j] = b, sb
            out["targets2"][j] = Q2[b]
            back, _ = _argmax_cos(Q1h[b], T1h, all_batch)  # cycle check 2
            out["mask2"][j] = back == j
    return out


# ============================================================================
# docs/method.md §5: losses and centres
# ============================================================================


def softmax_cross_entropy(
    s: ArrayLike,
    t: ArrayLike,
    center: ArrayLike | None = None,
    student_temp: float = 0.1,
    teacher_temp: float = 0.07,
) -> tuple[F64, F64]:
    """Per-row ``H(p_t, p_s)`` and its gradient w.r.t. the student logits.

    ``p_t = softmax((t - C) / tau_t)``, ``log p_s = log_softmax(s / tau_s)``,
    ``H = -sum_l p_t log p_s``, ``dH/ds = (softmax(s / tau_s) - p_t) / tau_s``.

    Args:
        s: (R, L) student logits.
        t: (R, L) teacher logits.
        center: (L,) centre C or None (zero).
        student_temp: tau_s.
        teacher_temp: tau_t.

    Returns:
        losses (R,) float64 and grad (R, L) float64 (of each row's own loss).
    """
    S, T = _f64(s), _f64(t)
    C = np.zeros(T.shape[-1]) if center is None else _f64(center)
    p_t = softmax((T - C[None, :]) / teacher_temp)
    log_ps = log_softmax(S / student_temp)
    losses = -np.sum(p_t * log_ps, axis=1)
    grad = (np.exp(log_ps) - p_t) / student_temp
    return losses, grad


def update_center(center: ArrayLike, teacher_rows: ArrayLike, momentum: float = 0.9) -> F64:
    """``C = momentum * C + (1 - momentum) * mean(teacher_rows)``.

    Args:
        center: (L,).
        teacher_rows: (R, L); with R = 0 the centre is returned unchanged.
        momentum: m.

    Returns:
        (L,) float64.
    """
    C = _f64(center)
    rows = _f64(teacher_rows).reshape(-1, C.shape[0])
    if rows.shape[0] == 0:
        return C
    return momentum * C + (1.0 - momentum) * rows.mean(axis=0)


def cribo_losses(
    student_global: ArrayLike,
    teacher_global: ArrayLike,
    student_objects: ArrayLike,
    teacher_objects: ArrayLike,
    teacher_neighbours: ArrayLike | None = None,
    mask1: ArrayLike | None = None,
    mask2: ArrayLike | None = None,
    *,
    center_global: ArrayLike,
    center_objects: ArrayLike,
    student_temp: float = 0.1,
    teacher_temp: float = 0.07,
    teacher_temp_objects: float | None = None,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    center_momentum: float = 0.9,
) -> dict[str, Any]:
    """The CrIBo objective (docs/method.md §5) and its gradients.

    ``L_g = mean_b [H(pt1,ps2) + H(pt2,ps1)]`` (centre C_g, ``teacher_temp``);
    ``L_o = mean_j [H(pt1_j,ps2_j) + H(pt2_j,ps1_j)]`` (centre C_o,
    ``teacher_temp_objects``, default ``teacher_temp``; 0 when M = 0);
    ``L_nn = (1/Z1) sum_j m1_j H(pnn1_j,ps2_j) + (1/Z2) sum_j m2_j H(pnn2_j,ps1_j)``
    (centre C_o, object temperature; a part with Z = 0 is 0);
    ``total = w_g L_g + w_o L_o + w_nn L_nn``.

    Args:
        student_global, teacher_global: (2, B, L) [view1, view2] CLS head outputs.
        student_objects, teacher_objects: (2, M, L) object head outputs.
        teacher_neighbours: (2, M, L) teacher outputs of nn1 (row 0) and nn2
            (row 1), or None (then ``L_nn = 0``).
        mask1, mask2: (M,) bool cycle masks; None = all True.
        center_global, center_objects: (L,) centres before this step.
        student_temp: tau_s (both branches).
        teacher_temp: tau_t of the global branch.
        teacher_temp_objects: tau_t of the object branch (None: ``teacher_temp``).
        weights: (w_g, w_o, w_nn).
        center_momentum: m of the centre update.

    Returns:
        dict with floats ``total``, ``global_``, ``objects``, ``neighbours``;
        ``grad_global`` (2, B, L) and ``grad_objects`` (2, M, L) = d total /
        d student logits; ``center_global``, ``center_objects`` (L,) the
        updated centres (global over both views' CLS rows, objects over both
        views' object rows, never the neighbours).
    """
    sg, tg = _f64(student_global), _f64(teacher_global)
    so, to = _f64(student_objects), _f64(teacher_objects)
    Cg, Co = _f64(center_global), _f64(center_objects)
    tau_o = teacher_temp if teacher_temp_objects is None else teacher_temp_objects
    w_g, w_o, w_nn = (float(w) for w in weights)
    B, L = sg.shape[1], sg.shape[2]
    M = so.shape[1]
    grad_g = np.zeros_like(sg)
    grad_o = np.zeros_like(so)

    def H(s_: F64, t_: F64, C: F64, tau_t: float) -> tuple[F64, F64]:
        """Per-row loss (R,) and gradient (R, L) with the student temperature."""
        return softmax_cross_entropy(s_, t_, C, student_temp, tau_t)

    # global: teacher view 1 -> student view 2 and teacher view 2 -> student view 1
    h12, g12 = H(sg[1], tg[0], Cg, teacher_temp)
    h21, g21 = H(sg[0], tg[1], Cg, teacher_temp)
    loss_g = float(np.mean(h12 + h21)) if B > 0 else 0.0
    if B > 0:
        grad_g[1] += w_g * g12 / B
        grad_g[0] += w_g * g21 / B

    # cross-view objects
    loss_o = 0.0
    if M > 0:
        o12, go12 = H(so[1], to[0], Co, tau_o)
        o21, go21 = H(so[0], to[1], Co, tau_o)
        loss_o = float(np.mean(o12 + o21))
        grad_o[1] += w_o * go12 / M
        grad_o[0] += w_o * go21 / M

    # cross-image objects
    loss_nn = 0.0
    if teacher_neighbours is not None and M > 0:
        tn = _f64(teacher_neighbours)
        m1 = np.ones(M) if mask1 is None else np.asarray(mask1, dtype=bool).astype(np.float64)
        m2 = np.ones(M) if mask2 is None else np.asarray(mask2, dtype=bool).astype(np.float64)
        z1, z2 = m1.sum(), m2.sum()
        n1, gn1 = H(so[1], tn[0], Co, tau_o)  # nn1 (view 1 match) teaches student view 2
        n2, gn2 = H(so[0], tn[1], Co, tau_o)  # nn2 (view 2 match) teaches student view 1
        if z1 > 0:
            loss_nn += float(np.sum(m1 * n1) / z1)
            grad_o[1] += w_nn * (m1 / z1)[:, None] * gn1
        if z2 > 0:
            loss_nn += float(np.sum(m2 * n2) / z2)
            grad_o[0] += w_nn * (m2 / z2)[:, None] * gn2

    total = w_g * loss_g + w_o * loss_o + w_nn * loss_nn
    return {
        "total": float(total),
        "global_": loss_g,
        "objects": loss_o,
        "neighbours": loss_nn,
        "grad_global": grad_g,
        "grad_objects": grad_o,
        "center_global": update_center(Cg, tg.reshape(-1, L), center_momentum),
        "center_objects": update_center(Co, to.reshape(-1, L), center_momentum),
    }
