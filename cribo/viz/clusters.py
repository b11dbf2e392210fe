"""The joint-space clusters of two views, drawn side by side (docs/method.md §2).

:func:`plot_clusters` tints each patch of both views with its cluster's colour
(:func:`cribo.viz.cluster_colors`, by cluster id, so one colour is one cluster in
both views), draws the boundaries between clusters, and greys and hatches the
clusters seen in one view only.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ._figure import (PathLike, _draw_boundaries, _figure, _finish, _label_grid, _no_ticks,
                      _numpy, _upsample, cluster_colors, to_rgb)

__all__ = ["plot_clusters"]

_GREY = np.array([0.62, 0.62, 0.62])


def _cells_path(cells: np.ndarray, H: float, W: float) -> Any:
    """One compound matplotlib Path of the True cells of a (h, w) grid."""
    from matplotlib.path import Path

    h, w = cells.shape
    sy, sx = H / h, W / w
    verts, codes = [], []
    for r, c in zip(*np.nonzero(cells)):
        x0, y0 = c * sx, r * sy
        verts += [(x0, y0), (x0 + sx, y0), (x0 + sx, y0 + sy), (x0, y0 + sy), (x0, y0)]
        codes += [Path.MOVETO, Path.LINETO, Path.LINETO, Path.LINETO, Path.CLOSEPOLY]
    return Path(np.asarray(verts, float), codes)


def _cluster_picture(rgb: np.ndarray, lab: np.ndarray, valid: np.ndarray,
                     colors: np.ndarray, alpha: float, gray_base: bool) -> np.ndarray:
    """The view tinted with its clusters' colours; invalid clusters greyed."""
    H, W = rgb.shape[:2]
    up = _upsample(lab, H, W)
    ok = valid[up]
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    gray = (0.25 + 0.75 * gray)[:, :, None]  # lifted, so dark images still show the tint
    base = np.repeat(gray, 3, axis=2) if gray_base else rgb
    tint = (1 - alpha) * base + alpha * colors[up]
    greyed = 0.45 * gray + 0.55 * _GREY
    # Float rounding of the blend can overshoot 1 by an ulp; imshow warns on that.
    return np.clip(np.where(ok[:, :, None], tint, greyed), 0.0, 1.0)


def plot_clusters(view1_image: Any, view2_image: Any, labels1: Any, labels2: Any,
                  grid: Any = None, valid: Any = None, *, alpha: float = 0.6,
                  gray_base: bool = True, boundaries: bool = True, show_views: bool = False,
                  titles: Sequence[str] = ("view 1", "view 2"),
                  title: Optional[str] = None, panel_size: float = 3.0, dpi: int = 100,
                  path: Optional[PathLike] = None) -> Any:
    """The joint-space clusters drawn on both views, side by side (docs/method.md §2).

    CrIBo clusters the patches of both views of an image together, so cluster k
    of view 1 and cluster k of view 2 are one object seen twice.  Each patch is
    tinted with its cluster's colour (:func:`cluster_colors`, indexed by the
    cluster id, so the same colour in both views), boundaries between clusters
    are drawn white, and clusters seen in one view only (not valid: they enter
    no loss) are greyed and hatched.

    Args:
        view1_image, view2_image: one view each, in any layout
            :func:`cribo.viz.to_rgb` takes, or a batch of B (leading axis) drawn
            as B rows.
        labels1, labels2: cluster ids of the patches, (N,) row-major over the
            patch grid or (gh, gw); with a batch (B, N) or (B, gh, gw).  From
            :func:`cribo.cluster`: ``c.labels[b, 0]`` and ``c.labels[b, 1]``.
        grid: the patch grid, ``g`` or ``(gh, gw)`` (default: square, from N).
        valid: (K,) bool (``c.valid[b]``), or (B, K); default: the clusters that
            occur in both views, which is how :func:`cribo.cluster` defines it.
        alpha: opacity of the tint.
        gray_base: tint a grey copy of the view (the colours then read the same
            in both views whatever the image's own colours); False tints the
            colour image.
        boundaries: draw cluster boundaries.
        show_views: also draw both views untinted, in two columns left of the
            clusters (so the objects can be seen under the colours).
        titles: the two column titles.
        title: figure title (default: a one-line key to the picture).
        panel_size: side of one panel in inches.
        dpi: resolution; the figure is ``2 * panel_size`` wide (4 with ``show_views``).
        path: also write a PNG here.

    Returns:
        The Figure (``fig.axes[c*b + v]`` is row b, view v+1, with c = 2 columns;
        with ``show_views`` c = 4 and the clusters are at ``v + 2``).
    """
    fn = "plot_clusters"
    v1, v2 = _numpy(view1_image), _numpy(view2_image)
    batched = v1.ndim == 4
    if batched:
        B = v1.shape[0]
        if v2.ndim != 4 or v2.shape[0] != B:
            raise ValueError(f"{fn}: view images must both be batches of {B}, got "
                             f"{v1.shape} and {v2.shape}")
        l1, l2 = _numpy(labels1), _numpy(labels2)
        if l1.shape[0] != B or l2.shape[0] != B:
            raise ValueError(f"{fn}: labels must hold {B} images, got {l1.shape}, {l2.shape}")
        va = None if valid is None else _numpy(valid)
        rows = [(v1[b], v2[b], l1[b], l2[b], None if va is None else va[b]) for b in range(B)]
    else:
        rows = [(v1, v2, labels1, labels2, valid)]

    n_cols = 4 if show_views else 2
    fig = _figure(n_cols * panel_size, len(rows) * panel_size + 0.45, dpi)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    c0 = n_cols - 2  # first column of the cluster panels
    n_valid_total = n_total = 0
    for b, (im1, im2, lab1, lab2, val) in enumerate(rows):
        g1 = _label_grid(lab1, grid, fn)
        g2 = _label_grid(lab2, grid, fn)
        if g1.min() < 0 or g2.min() < 0:
            raise ValueError(f"{fn}: cluster labels must be non-negative")
        K = int(max(g1.max(), g2.max())) + 1
        if val is None:
            ok = np.zeros(K, bool)
            ok[np.intersect1d(g1, g2)] = True
        else:
            ok = _numpy(val).astype(bool).ravel()
            if ok.size < K:
                raise ValueError(f"{fn}: valid has {ok.size} clusters but labels use {K}")
            K = ok.size
        colors = cluster_colors(K)
        present = np.union1d(g1, g2)
        n_total += present.size
        n_valid_total += int(ok[present].sum())
        for v, (im, lab) in enumerate(((im1, g1), (im2, g2))):
            ax = axes[b, c0 + v]
            rgb = to_rgb(im)
            H, W = rgb.shape[:2]
            if show_views:
                axes[b, v].imshow(rgb, extent=(0, W, H, 0), interpolation="nearest")
                _no_ticks(axes[b, v])
                if b == 0:
                    axes[b, v].set_title(titles[v], fontsize=9)
            ax.imshow(_cluster_picture(rgb, lab, ok, colors, alpha, gray_base), extent=(0, W, H, 0),
                      interpolation="nearest")
            bad = ~ok[lab]
            if bad.any():
                from matplotlib.patches import PathPatch

                ax.add_patch(PathPatch(_cells_path(bad, H, W), facecolor="none",
                                       edgecolor=(0.25, 0.25, 0.25, 0.8), hatch="///",
                                       linewidth=0))
            if boundaries:
                _draw_boundaries(ax, lab, H, W)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            _no_ticks(ax)
            n_here = np.unique(lab).size
            head = (f"{titles[v]}, clusters" if show_views else titles[v]) if b == 0 else ""
            ax.set_title(f"{head}{' · ' if head else ''}{n_here} clusters", fontsize=9)
        if batched:
            axes[b, 0].set_ylabel(f"image {b}", fontsize=9)
    if title is None:
        title = (f"Joint clusters: one colour = one cluster in both views\n"
                 f"{n_valid_total} of {n_total} seen in both (hatched grey: one view only)")
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)
