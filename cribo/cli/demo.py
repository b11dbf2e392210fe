"""A self-contained tour of the C operators on a procedurally drawn scene.

Draws a small image with a few coloured shapes on a striped background, takes two
random crops (with a flip) as CrIBo's two views, uses each 8x8 patch's pixels as
its token, and runs the whole object-level pipeline: joint-space clustering,
pooling, queue look-up with cycle checks, and the three losses with random
heads.  The cluster maps of both views are printed side by side: the same letter
is the same cluster, which is the point of clustering the views jointly.
"""
from __future__ import annotations

import time
from typing import Tuple

import numpy as np

from ..ops.queue import ObjectQueue
from ..ops.clustering import cluster
from ..ops.losses import cribo_losses
from ..ops.threads import get_num_threads
from ..ops.pooling import pool

PATCH = 8


def draw_scene(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float image in [0, 1]: stripes plus a disc, a square, a bar."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = 0.25 + 0.1 * np.sin(xx / 3.0)[..., None]
    colours = rng.permutation(np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.3, 0.9]]))
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.18 * size) ** 2] = colours[0]
    x0, y0 = rng.uniform(0.05, 0.5, 2) * size
    img[(xx > x0) & (xx < x0 + 0.3 * size) & (yy > y0) & (yy < y0 + 0.3 * size)] = colours[1]
    img[(yy > 0.8 * size) & (yy < 0.9 * size) & (xx > 0.1 * size)] = colours[2]
    return img + rng.normal(0, 0.02, img.shape).astype(np.float32)


def crop_view(img: np.ndarray, out: int, rng: np.random.Generator
              ) -> Tuple[np.ndarray, np.ndarray]:
    """A random crop resized to out x out (nearest), maybe flipped.

    Returns the view (out, out, 3) and each patch centre's (x, y) in the original
    image frame, (N, 2) with N = (out / PATCH)^2 -- computed analytically.
    """
    H = img.shape[0]
    side = int(rng.uniform(0.55, 0.9) * H)
    top, left = rng.integers(0, H - side + 1, 2)
    flip = rng.random() < 0.5
    scale = side / out
    src = (np.arange(out) + 0.5) * scale - 0.5
    idx = np.clip(np.round(src).astype(int), 0, side - 1)
    view = img[top + idx][:, left + idx]
    g = out // PATCH
    centre = (np.arange(g) * PATCH + PATCH / 2) * scale  # in crop pixels, from the edge
    cx = left + (side - centre if flip else centre)
    cy = top + centre
    if flip:
        view = view[:, ::-1]
    pos = np.stack(np.meshgrid(cx, cy), -1).reshape(-1, 2)
    return view, pos.astype(np.float32)


def patch_tokens(view: np.ndarray) -> np.ndarray:
    """(N, PATCH*PATCH*3) tokens: each patch's centred pixels."""
    g = view.shape[0] // PATCH
    t = view.reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)
    return t - t.mean(0, keepdims=True)


def run(seed: int = 0, n_clusters: int = 6) -> dict:
    """Runs the tour, prints it, and returns its numbers."""
    rng = np.random.default_rng(seed)
    img = draw_scene(96, rng)
    (v1, p1), (v2, p2) = crop_view(img, 64, rng), crop_view(img, 64, rng)
    tokens = np.stack([patch_tokens(v1), patch_tokens(v2)])[None]  # (1, 2, 64, 192)
    positions = np.stack([p1, p2])[None]                           # (1, 2, 64, 2)
    c = cluster(tokens, positions, n_clusters, seed=seed)
    g = v1.shape[0] // PATCH
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    print(f"Joint-space clusters (K={n_clusters}) of two views of one scene; "
          "the same letter is the same cluster:\n")
    print("  view 1" + " " * (2 * g - 4) + "view 2")
    for r in range(g):
        row1 = " ".join(letters[c.labels[0, 0].reshape(g, g)[r] % 26])
        row2 = " ".join(letters[c.labels[0, 1].reshape(g, g)[r] % 26])
        print(f"  {row1}    {row2}")
    n_valid = int(c.valid.sum())
    print(f"\n{n_valid} of {n_clusters} clusters are seen in both views (valid objects).")

    # The rest of one training step, with random 'heads' standing in for the network.
    objects = pool(tokens, c.labels, n_clusters)                # (1, 2, K, d)
    t1, t2 = objects[0, 0][c.valid[0]], objects[0, 1][c.valid[0]]
    queue = ObjectQueue(capacity=8, dim=tokens.shape[-1])
    for past in range(8):  # fill the queue with objects of other scenes
        o = _scene_objects(np.random.default_rng(seed + 100 + past), n_clusters)
        queue.push(o[0], o[1], [len(o[0])])
    match = queue.match(t1, t2)
    L = 256
    head = np.random.default_rng(seed).standard_normal((tokens.shape[-1], L)).astype(np.float32)
    h = lambda x: x @ head  # noqa: E731
    cls = tokens.mean(2)                                         # (1, 2, d)
    out = cribo_losses(
        np.stack([h(cls[:, 0]), h(cls[:, 1])]) * 0.9, np.stack([h(cls[:, 0]), h(cls[:, 1])]),
        np.stack([h(t1), h(t2)]) * 0.9, np.stack([h(t1), h(t2)]),
        np.stack([h(match.targets1), h(match.targets2)]), match.mask1, match.mask2,
        center_global=np.zeros(L, np.float32), center_objects=np.zeros(L, np.float32))
    print(f"Queue of {len(queue)} past scenes ({queue.n_objects} objects): "
          f"{match.consistent_fraction:.0%} of the look-ups pass the cycle check.")
    print(f"Losses: global {out.global_:.3f}  objects {out.objects:.3f}  "
          f"cross-image {out.neighbours:.3f}  total {out.total:.3f}")

    # Speed at the reference size (ViT-S/16 at 224 px: N=196, d=384; K=64).
    big = np.random.default_rng(seed).standard_normal((32, 2, 196, 384)).astype(np.float32)
    gp = np.stack(np.meshgrid(np.arange(14), np.arange(14)), -1).reshape(-1, 2) * 16.0 + 8
    big_pos = np.broadcast_to(gp, (32, 2, 196, 2)).astype(np.float32)
    cluster(big, big_pos, 64)
    t0 = time.perf_counter()
    cluster(big, big_pos, 64)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"\nClustering a batch of 32 images (2 x 196 tokens, d=384, K=64, 5 x 5 "
          f"iterations): {ms:.0f} ms on {get_num_threads()} thread(s).")
    return {"n_valid": n_valid, "consistent": match.consistent_fraction,
            "total": out.total, "cluster_ms": ms, "labels": c.labels}


def _scene_objects(rng: np.random.Generator, n_clusters: int) -> np.ndarray:
    img = draw_scene(96, rng)
    (v1, p1), (v2, p2) = crop_view(img, 64, rng), crop_view(img, 64, rng)
    tokens = np.stack([patch_tokens(v1), patch_tokens(v2)])[None]
    c = cluster(tokens, np.stack([p1, p2])[None], n_clusters)
    objects = pool(tokens, c.labels, n_clusters)[0]
    return objects[:, c.valid[0]]
