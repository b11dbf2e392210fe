"""Joint-space clustering of two views (docs/method.md §2; C kernel: csrc/cluster.c).

CrIBo clusters the teacher's tokens of both views of an image together, so that
cluster ``k`` of view 1 and cluster ``k`` of view 2 are the same object seen
twice (Lebailly, Stegmüller et al., "Self-Supervised Learning via Cross-Image
Object-Level Bootstrapping", ICLR 2024, §3.1; clustering from Stegmüller et al.,
CVPR 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import _C
from ._arrays import as_float32, as_int64

__all__ = ["Clustering", "cluster", "draw_init"]


@dataclass(frozen=True)
class Clustering:
    """The result of :func:`cluster` for a batch of B images, K clusters.

    Attributes:
        labels: (B, 2, N) int64, the cluster in [0, K) of each token of each view.
        valid: (B, K) bool, clusters present in both views (the only ones that
            enter the losses).
        counts: (B, 2, K) int64, tokens of each cluster in each view.
        init: (B, K) int64, the joint token indices (view-1 tokens first) that
            seeded the clusters.
        plan: (B, 2N, K) float32, the transport plan T of the last iteration, or
            None unless ``return_plan=True``.
    """

    labels: np.ndarray
    valid: np.ndarray
    counts: np.ndarray
    init: np.ndarray
    plan: Optional[np.ndarray] = None

    @property
    def n_valid(self) -> np.ndarray:
        """(B,) int64, valid clusters per image."""
        return self.valid.sum(axis=1)


def _seed(seed: Any, fn: str) -> Any:
    """An integer seed as given, or the (B,) seeds as int64 (the binding checks both)."""
    return seed if np.ndim(seed) == 0 else as_int64(seed, fn, "seed")


def _draw(n_images: int, n_tokens: int, n_clusters: int, seed: Any) -> np.ndarray:
    """The draw itself, called by the binding once its arguments pass (csrc/binding/_C.c)."""
    J = 2 * n_tokens
    if np.ndim(seed) == 0:
        row = np.random.default_rng(int(seed)).choice(J, n_clusters, replace=False)
        return np.ascontiguousarray(np.broadcast_to(row, (n_images, n_clusters)), dtype=np.int64)
    out = np.empty((n_images, n_clusters), np.int64)
    for b, s in enumerate(seed):
        out[b] = np.random.default_rng(int(s)).choice(J, n_clusters, replace=False)
    return out


def draw_init(n_images: int, n_tokens: int, n_clusters: int, seed: Any = 0) -> np.ndarray:
    """Random initial cluster seeds: (B, K) distinct indices in [0, 2N) per image.

    Image ``b`` draws ``numpy.random.default_rng(seed_b).choice(2N, K,
    replace=False)``.  An integer ``seed`` is used for every image, so an image's
    draw never depends on its batch-mates or its position in the batch; pass one
    seed per image (B,) (e.g. from image ids and the training step) for
    independent draws.  Requires 1 <= K <= 2N and seeds in [0, 2^63).
    """
    return _C.draw_init(n_images=n_images, n_tokens=n_tokens, n_clusters=n_clusters,
                        seed=_seed(seed, "draw_init"), draw=_draw)


def cluster(tokens: Any, positions: Any, n_clusters: int, *, pos_weight: float = 2.0,
            sinkhorn_lambda: float = 20.0, sinkhorn_iters: int = 5, n_iters: int = 5,
            update_marginals: bool = True, seed: Any = 0, init: Any = None,
            return_plan: bool = False) -> Clustering:
    """Cluster the 2N tokens of each image's two views jointly (docs/method.md §2).

    Per image, independently of the rest of the batch: tokens are L2-normalised;
    K seed tokens start the clusters; then ``n_iters`` times the cost
    ``-cos(token, centroid) + pos_weight * D`` (D: distance to the nearest other
    member of the cluster, normalised) is min-max normalised, a log-domain
    Sinkhorn-Knopp with ``sinkhorn_iters`` row/column scalings turns
    ``exp(-sinkhorn_lambda * cost)`` into a transport plan with uniform token and
    (optionally updated) cluster marginals, every token takes the cluster of its
    largest plan entry (ties: lowest k), and the centroids become the normalised
    means of their members.  Cost O(N^2 + N K d) per iteration and image.

    Args:
        tokens: (B, 2, N, d) teacher tokens of view 1 and view 2 (any float dtype;
            converted to C-contiguous float32).
        positions: (B, 2, N, 2) (x, y) of each token in the original image frame.
        n_clusters: K, 1 <= K <= 2N.
        pos_weight: weight of the positional cost (``alpha_pos``), >= 0.
        sinkhorn_lambda: inverse entropic regularisation, > 0 (stable for any
            value: the Sinkhorn runs in the log domain).
        sinkhorn_iters: row/column scaling rounds per iteration, >= 0.
        n_iters: clustering iterations, >= 1.
        update_marginals: after each assignment set the cluster marginals to
            ``count + 0.01`` (normalised), as the reference does.
        seed: int, or (B,) ints, for the random initialisation (see
            :func:`draw_init`); ignored when ``init`` is given.
        init: optional (B, K) int distinct joint indices in [0, 2N) (view-1
            tokens are 0..N-1) that seed the clusters.
        return_plan: also return the (B, 2N, K) plan of the last iteration.

    Returns:
        A :class:`Clustering` with ``labels`` (B, 2, N), ``valid`` (B, K),
        ``counts`` (B, 2, K), ``init`` (B, K) and ``plan``.

    Example:
        >>> c = cribo.cluster(tokens, positions, 8)
        >>> objects = cribo.pool(tokens, c.labels, 8)[c.valid[:, None].repeat(2, 1)]
    """
    fn = "cluster"
    labels, counts, plan, ix = _C.cluster(
        tokens=as_float32(tokens, fn, "tokens"), positions=as_float32(positions, fn, "positions"),
        n_clusters=n_clusters, pos_weight=pos_weight, sinkhorn_lambda=sinkhorn_lambda,
        sinkhorn_iters=sinkhorn_iters, n_iters=n_iters, update_marginals=update_marginals,
        seed=_seed(seed, fn), init=None if init is None else as_int64(init, fn, "init"),
        return_plan=return_plan, draw=_draw)
    valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
    return Clustering(labels=labels, valid=valid, counts=counts, init=ix, plan=plan)
