"""Pictures of what CrIBo does: clusters, neighbour matches, curves, predictions.

=============================  ==================================================
function                       draws
=============================  ==================================================
:func:`plot_clusters`          the joint-space clusters of two views (docs/method.md §2):
                               the same colour is the same cluster in both views
:func:`plot_matches`           neighbour matches (docs/method.md §4): a query object's
                               region next to the queue entry it retrieved,
                               framed green (cycle-consistent) or red
:func:`plot_curves`            every loss term and statistic of a ``log.jsonl``
:func:`plot_predictions`       dense-retrieval label maps next to the ground truth
=============================  ==================================================

Every function returns a :class:`matplotlib.figure.Figure` drawn on the Agg
canvas (pyplot is never used, so nothing piles up in pyplot's figure list and
the caller's backend is left alone) and, given ``path=``, also writes it as a
PNG of exactly ``figsize * dpi`` pixels.  matplotlib is imported on the first
call, so ``import cribo.viz`` works without it (``pip install cribo[plot]``).

Images are accepted as ``(H, W, 3)`` uint8, ``(H, W, 3)`` float in [0, 1], or a
network input ``(3, S, S)`` float normalised with the ImageNet mean and std (as
:class:`cribo.data.View` holds it); torch tensors are moved to NumPy.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "cluster_colors", "class_colors", "to_rgb",
    "plot_clusters",
    "MatchExample", "MatchBuffer", "locate_queue_entries", "match_examples", "plot_matches",
    "read_log", "plot_curves", "CURVE_PANELS",
    "plot_predictions",
]

PathLike = Union[str, "os.PathLike[str]"]

_GREEN = "#1a9850"
_RED = "#d73027"
_GREY = np.array([0.62, 0.62, 0.62])


# --------------------------------------------------------------------------- plumbing

def _mpl():
    """matplotlib's Figure and Agg canvas, imported on first use."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("cribo.viz needs matplotlib: pip install 'cribo[plot]' "
                          "(or pip install 'matplotlib>=3.5')") from e
    return Figure, FigureCanvasAgg


def _figure(width: float, height: float, dpi: int) -> Any:
    Figure, Canvas = _mpl()
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    Canvas(fig)
    return fig


def _finish(fig: Any, path: Optional[PathLike]) -> Any:
    if path is not None:
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        # No bbox_inches="tight": the PNG is exactly figsize * dpi pixels.
        fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return fig


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch itself is never imported here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _no_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- colours

def cluster_colors(n: int) -> np.ndarray:
    """The fixed qualitative colour of each cluster (or class) id 0..n-1.

    Id k always gets the same colour whatever n: the ten hues of matplotlib's
    ``tab20`` first, then their light variants, then golden-ratio hues.

    Returns:
        (n, 3) float in [0, 1].
    """
    _mpl()  # a clear message if matplotlib is missing
    from matplotlib import colormaps

    tab = np.asarray(colormaps["tab20"].colors)[:, :3]
    base = np.concatenate([tab[0::2], tab[1::2]])  # 10 strong hues, then 10 light
    if n <= len(base):
        return base[:n].copy()
    from matplotlib.colors import hsv_to_rgb

    k = np.arange(len(base), n)
    hsv = np.stack([(k * 0.6180339887) % 1.0, np.where(k % 2, 0.5, 0.8),
                    np.where((k // 2) % 2, 0.75, 0.95)], axis=1)
    return np.concatenate([base, hsv_to_rgb(hsv)])


def class_colors(class_names: Sequence[str]) -> np.ndarray:
    """Colours of segmentation classes: :func:`cluster_colors`, except that a
    class named ``"background"`` is light grey (ignore pixels are black).

    Returns:
        (C, 3) float in [0, 1].
    """
    colors = cluster_colors(len(class_names))
    for k, name in enumerate(class_names):
        if str(name).lower() in ("background", "bg", "_background_"):
            colors[k] = (0.85, 0.85, 0.85)
    return colors


def to_rgb(image: Any, mean: Optional[Sequence[float]] = None,
           std: Optional[Sequence[float]] = None) -> np.ndarray:
    """An image as ``(H, W, 3)`` float in [0, 1], for drawing.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` uint8 (divided by 255); ``(H, W, 3)``
            float in [0, 1]; or ``(3, H, W)`` float, a network input, which is
            de-normalised with ``mean`` and ``std``.
        mean, std: the normalisation of a ``(3, H, W)`` input (default: ImageNet's,
            as :class:`cribo.data.TwoViewTransform` applies it); pass
            ``mean=(0, 0, 0), std=(1, 1, 1)`` for an un-normalised one.
    """
    x = _numpy(image)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    if x.ndim != 3:
        raise ValueError(f"to_rgb: image must be (H, W, 3), (H, W) or (3, H, W), got {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[2] != 3:
            raise ValueError(f"to_rgb: a uint8 image must be (H, W, 3), got {x.shape}")
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.shape[0] == 3 and x.shape[2] != 3:  # (3, H, W), normalised
        from ..data.views import IMAGENET_MEAN, IMAGENET_STD

        m = np.asarray(IMAGENET_MEAN if mean is None else mean, np.float32)
        s = np.asarray(IMAGENET_STD if std is None else std, np.float32)
        x = x.transpose(1, 2, 0) * s + m
    elif x.shape[2] != 3:
        raise ValueError(f"to_rgb: image must be (H, W, 3) or (3, H, W), got {x.shape}")
    return np.clip(x, 0.0, 1.0)


def _to_uint8(image: Any) -> np.ndarray:
    return np.round(to_rgb(image) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- grids

def _grid_shape(grid: Any, n: int, fn: str) -> Tuple[int, int]:
    if grid is None:
        g = int(round(math.sqrt(n)))
        if g * g != n:
            raise ValueError(f"{fn}: {n} labels are not a square grid; pass grid=(rows, cols)")
        return g, g
    if np.ndim(grid) == 0:
        gh = gw = int(grid)
    else:
        gh, gw = (int(v) for v in grid)
    if gh * gw != n:
        raise ValueError(f"{fn}: grid {gh}x{gw} does not hold {n} labels")
    return gh, gw


def _label_grid(labels: Any, grid: Any, fn: str) -> np.ndarray:
    lab = _numpy(labels)
    if lab.ndim == 2 and grid is None:
        return lab.astype(np.int64)
    gh, gw = _grid_shape(grid, lab.size, fn)
    return lab.reshape(gh, gw).astype(np.int64)


def _upsample(cells: np.ndarray, H: int, W: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a (h, w) cell grid onto (H, W) pixels."""
    h, w = cells.shape[:2]
    rows = (np.arange(H) * h) // H
    cols = (np.arange(W) * w) // W
    return cells[rows][:, cols]


def _boundary_segments(cells: np.ndarray, H: float, W: float) -> np.ndarray:
    """The edges between neighbouring cells of different value, in pixel coordinates.

    Args:
        cells: (h, w) grid laid over an image of H x W pixels.

    Returns:
        (E, 2, 2) float: segment e runs from ``[e, 0]`` to ``[e, 1]``, points (x, y).
    """
    h, w = cells.shape
    sy, sx = H / h, W / w
    r, c = np.nonzero(cells[:, 1:] != cells[:, :-1])  # vertical edge right of (r, c)
    x = (c + 1) * sx
    vert = np.stack([np.stack([x, r * sy], 1), np.stack([x, (r + 1) * sy], 1)], 1)
    r, c = np.nonzero(cells[1:, :] != cells[:-1, :])  # horizontal edge below (r, c)
    y = (r + 1) * sy
    horiz = np.stack([np.stack([c * sx, y], 1), np.stack([(c + 1) * sx, y], 1)], 1)
    return np.concatenate([vert, horiz]).reshape(-1, 2, 2).astype(np.float64)


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


def _draw_boundaries(ax: Any, cells: np.ndarray, H: int, W: int, color: str = "white",
                     lw: float = 1.4) -> None:
    from matplotlib.collections import LineCollection

    segs = _boundary_segments(cells, H, W)
    if len(segs):
        ax.add_collection(LineCollection(segs, colors=color, linewidths=lw,
                                         capstyle="projecting"))


# --------------------------------------------------------------------------- clusters

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
        view1_image, view2_image: one view each (module docstring for the
            layouts), or a batch of B (leading axis) drawn as B rows.
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


# --------------------------------------------------------------------------- matches

@dataclass(frozen=True)
class MatchExample:
    """One neighbour match, ready to draw.

    Attributes:
        query_image, neighbour_image: images in any layout :func:`to_rgb` takes.
        query_mask, neighbour_mask: (h, w) bool, the object's region, at patch
            (or pixel) resolution; laid over the whole image.
        consistent: the pair passed its cycle check.
        similarity: cosine similarity of the pair, or None.
        caption: a short note (where each side came from).
    """
    query_image: Any
    query_mask: np.ndarray
    neighbour_image: Any
    neighbour_mask: np.ndarray
    consistent: bool
    similarity: Optional[float] = None
    caption: str = ""


def locate_queue_entries(addresses: Any, image_counts: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Which queued image, and which of its objects, each queue address is.

    :class:`cribo.ObjectQueue` stores objects newest first, one contiguous run
    per image, in the order of ``queue.image_counts``: image slot ``s`` holds
    addresses ``[sum(counts[:s]), sum(counts[:s+1]))``.  Each ``push`` puts its
    batch in front, in batch order, so with a constant batch size B and a queue
    that has not wrapped, slot ``s`` is image ``s % B`` of the batch pushed
    ``s // B + 1`` steps before the look-up, and the object of rank ``r`` is
    that image's r-th valid cluster: ``np.flatnonzero(valid[b])[r]``.
    :class:`MatchBuffer` does this bookkeeping for any batch sizes.

    Args:
        addresses: (M,) int, e.g. ``match.index1`` (-1 for no match).
        image_counts: (I,) int, the queue's ``image_counts`` at look-up time
            (before the batch itself was pushed).

    Returns:
        ``(slot, rank)``: (M,) int64 each, -1 where the address is -1 or outside
        the images given.
    """
    a = _numpy(addresses).astype(np.int64).ravel()
    counts = _numpy(image_counts).astype(np.int64).ravel()
    ends = np.cumsum(counts)
    total = int(ends[-1]) if ends.size else 0
    ok = (a >= 0) & (a < total)
    slot = np.full(a.shape, -1, np.int64)
    rank = np.full(a.shape, -1, np.int64)
    s = np.searchsorted(ends, a[ok], side="right")  # empty images are skipped
    slot[ok] = s
    rank[ok] = a[ok] - (ends[s] - counts[s])
    return slot, rank


class MatchBuffer:
    """The last few batches (views, cluster labels, valid), in the queue's order.

    A training loop keeps one and, after each objective step, pushes the batch it
    just pushed to the queue; :func:`match_examples` then turns the next step's
    queue addresses back into images and regions.  Images are stored as uint8,
    so a batch costs ``B * 2 * S * S * 3`` bytes::

        buffer = MatchBuffer(max_batches=4)
        for step, batch in enumerate(loader):
            out = objective(...)                       # looks up, then pushes
            if step % 500 == 0 and len(buffer):
                ex = match_examples(buffer, images, out.labels, out.valid,
                                    out.extra["match"])
                plot_matches(ex, path=f"matches_{step}.png")
            buffer.push(images, out.labels, out.valid)  # after match_examples

    Only addresses that fall into the buffered batches are resolved (the first
    ``sum`` of their object counts).  Single-process only: with several processes
    the queue holds every process's batch, and so must the buffer.

    Args:
        max_batches: batches kept (older ones are dropped).
    """

    def __init__(self, max_batches: int = 4) -> None:
        if int(max_batches) < 1:
            raise ValueError(f"MatchBuffer: max_batches must be >= 1, got {max_batches}")
        self.max_batches = int(max_batches)
        self._batches: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # newest first

    def __len__(self) -> int:
        return len(self._batches)

    def __repr__(self) -> str:
        return f"MatchBuffer(max_batches={self.max_batches}, batches={len(self)})"

    def push(self, images: Any, labels: Any, valid: Any) -> None:
        """Keep a batch (the one just pushed to the queue).

        Args:
            images: (B, 2, 3, S, S) normalised views (the training input), or
                (B, 2, H, W, 3) uint8.
            labels: (B, 2, N) cluster labels (``out.labels``).
            valid: (B, K) bool (``out.valid``).
        """
        im, lab, val = _numpy(images), _numpy(labels), _numpy(valid).astype(bool)
        B = im.shape[0]
        if im.ndim != 5 or im.shape[1] != 2 or lab.shape[:2] != (B, 2) or val.shape[0] != B:
            raise ValueError(f"MatchBuffer.push: need images (B, 2, ...), labels (B, 2, N), "
                             f"valid (B, K); got {im.shape}, {lab.shape}, {val.shape}")
        rgb = np.stack([np.stack([_to_uint8(im[b, v]) for v in range(2)]) for b in range(B)])
        self._batches.insert(0, (rgb, lab.astype(np.int64).copy(), val.copy()))
        del self._batches[self.max_batches:]

    @property
    def image_counts(self) -> np.ndarray:
        """(I,) valid objects of each buffered image, in the queue's order; equal to
        the first I entries of ``queue.image_counts`` when the buffer is in step."""
        if not self._batches:
            return np.zeros(0, np.int64)
        return np.concatenate([v.sum(1) for _, _, v in self._batches]).astype(np.int64)

    def lookup(self, addresses: Any, image_counts: Any = None
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queue addresses -> (batch age, image in that batch, cluster id).

        Args:
            addresses: (M,) queue addresses (``match.index1`` / ``index2``).
            image_counts: optional, the queue's ``image_counts`` at look-up time:
                checked against the buffer (a ValueError if out of step).

        Returns:
            (M,) int64 each: age 0 is the newest buffered batch; -1 where the
            address is not held.
        """
        counts = self.image_counts
        if image_counts is not None:
            qc = _numpy(image_counts).astype(np.int64).ravel()
            n = min(qc.size, counts.size)
            if not np.array_equal(qc[:n], counts[:n]):
                raise ValueError("MatchBuffer.lookup: the buffer is out of step with the "
                                 "queue (push every batch, after the objective step)")
        slot, rank = locate_queue_entries(addresses, counts)
        sizes = np.array([v.shape[0] for _, _, v in self._batches], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        age = np.full(slot.shape, -1, np.int64)
        img = np.full(slot.shape, -1, np.int64)
        cl = np.full(slot.shape, -1, np.int64)
        for j in np.flatnonzero(slot >= 0):
            a = int(np.searchsorted(starts, slot[j], side="right") - 1)
            b = int(slot[j] - starts[a])
            age[j], img[j] = a, b
            cl[j] = np.flatnonzero(self._batches[a][2][b])[rank[j]]
        return age, img, cl

    def get(self, age: int, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(views (2, H, W, 3) uint8, labels (2, N))`` of one buffered image."""
        rgb, lab, _ = self._batches[age]
        return rgb[index], lab[index]


def _spread(idx: np.ndarray, n: int) -> np.ndarray:
    if len(idx) <= n:
        return idx
    return idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]


def match_examples(buffer: MatchBuffer, images: Any, labels: Any, valid: Any, match: Any, *,
                   view: int = 1, max_examples: int = 8, grid: Any = None,
                   image_counts: Any = None) -> List[MatchExample]:
    """Neighbour matches of the current batch, as :class:`MatchExample`\\ s.

    Object j of the batch is the j-th valid cluster, image by image (the order
    of ``t1 = objects[:, 0][valid]``).  Its view-``view`` representation
    retrieved the queue entry ``match.index<view>[j]``; the picture shows the
    object in that view of its image and the retrieved object in the same view
    of the retrieved image.  Up to ``max_examples`` matches are chosen evenly
    over the batch, half cycle-consistent and half not where both exist.

    Args:
        buffer: the previous batches (not yet the current one).
        images: (B, 2, 3, S, S) normalised views, or (B, 2, H, W, 3) uint8.
        labels: (B, 2, N) cluster labels; valid: (B, K) bool.
        match: a :class:`cribo.Match` (``out.extra["match"]``).
        view: 1 or 2, which look-up to show.
        max_examples: at most this many.
        grid: the patch grid (default: square).
        image_counts: the queue's ``image_counts`` at look-up time, to check the
            buffer against (optional).
    """
    if view not in (1, 2):
        raise ValueError(f"match_examples: view must be 1 or 2, got {view}")
    im, lab, val = _numpy(images), _numpy(labels), _numpy(valid).astype(bool)
    index = _numpy(getattr(match, f"index{view}")).astype(np.int64)
    mask = _numpy(getattr(match, f"mask{view}")).astype(bool)
    sim = getattr(match, f"similarity{view}", None)
    sim = None if sim is None else _numpy(sim)
    counts = val.sum(1)
    if index.shape[0] != counts.sum():
        raise ValueError(f"match_examples: the match has {index.shape[0]} objects but valid "
                         f"marks {counts.sum()}")
    age, nb_img, nb_cl = buffer.lookup(index, image_counts)
    held = np.flatnonzero(age >= 0)
    n_ok = (max_examples + 1) // 2
    good, bad = held[mask[held]], held[~mask[held]]
    n_good = min(len(good), max(n_ok, max_examples - len(bad)))
    chosen = np.concatenate([_spread(good, n_good), _spread(bad, max_examples - n_good)])
    ends = np.cumsum(counts)
    v = view - 1
    out = []
    for j in sorted(int(x) for x in chosen):
        b = int(np.searchsorted(ends, j, side="right"))
        k = int(np.flatnonzero(val[b])[j - (ends[b] - counts[b])])
        qlab = _label_grid(lab[b, v], grid, "match_examples")
        nviews, nlab = buffer.get(int(age[j]), int(nb_img[j]))
        nl = _label_grid(nlab[v], grid, "match_examples")
        out.append(MatchExample(
            query_image=_to_uint8(im[b, v]), query_mask=qlab == k,
            neighbour_image=nviews[v], neighbour_mask=nl == nb_cl[j],
            consistent=bool(mask[j]),
            similarity=None if sim is None else float(sim[j]),
            caption=(f"query: image {b}, cluster {k}\nretrieved: {int(age[j]) + 1} step(s) "
                     f"back, image {int(nb_img[j])}, cluster {int(nb_cl[j])}")))
    return out


def _draw_region(ax: Any, image: Any, mask: Any, color: str) -> None:
    rgb = to_rgb(image)
    H, W = rgb.shape[:2]
    m = _numpy(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"plot_matches: a mask must be (h, w), got {m.shape}")
    inside = _upsample(m, H, W)[:, :, None]
    ax.imshow(np.where(inside, rgb, 0.3 * rgb + 0.08), extent=(0, W, H, 0),
              interpolation="nearest")
    _draw_boundaries(ax, m.astype(np.int8), H, W, color="white", lw=1.6)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    _no_ticks(ax)
    for s in ax.spines.values():
        s.set_edgecolor(color)
        s.set_linewidth(3)


def plot_matches(examples: Sequence[MatchExample], *, ncols: int = 2,
                 title: Optional[str] = None, panel_size: float = 2.0, dpi: int = 100,
                 path: Optional[PathLike] = None) -> Any:
    """Neighbour matches: each object's region next to the queue entry it retrieved.

    Each pair is framed green if it passed the cycle check (the retrieved
    entry's other view points back to the query object; docs/method.md §4) and red if not;
    outside the regions the images are darkened.

    Args:
        examples: the matches (:func:`match_examples` builds them from a
            training step; any image/mask pairs will do).
        ncols: pairs per row.
        title: figure title (default: counts of consistent pairs).
        panel_size: side of one image in inches.
        dpi: resolution.
        path: also write a PNG here.

    Returns:
        The Figure; one subfigure per pair, with axes (query, neighbour).
    """
    if len(examples) == 0:
        raise ValueError("plot_matches: no examples to draw")
    ncols = max(1, min(int(ncols), len(examples)))
    nrows = math.ceil(len(examples) / ncols)
    fig = _figure(ncols * (2 * panel_size + 0.3), nrows * (panel_size + 0.55) + 0.4, dpi)
    subs = np.atleast_1d(fig.subfigures(nrows, ncols, squeeze=False).ravel())
    for sf, ex in zip(subs, examples):
        color = _GREEN if ex.consistent else _RED
        ax_q, ax_n = sf.subplots(1, 2)
        _draw_region(ax_q, ex.query_image, ex.query_mask, color)
        _draw_region(ax_n, ex.neighbour_image, ex.neighbour_mask, color)
        ax_q.set_title("query object", fontsize=8)
        ax_n.set_title("retrieved entry", fontsize=8)
        word = "cycle-consistent" if ex.consistent else "not consistent"
        sim = "" if ex.similarity is None else f" · cos {ex.similarity:.2f}"
        sf.suptitle(f"{'✓' if ex.consistent else '✗'} {word}{sim}", fontsize=9, color=color,
                    fontweight="bold")
        if ex.caption:
            sf.supxlabel(ex.caption, fontsize=7, color="0.35")
    for sf in subs[len(examples):]:
        sf.set_visible(False)
    if title is None:
        n_ok = sum(bool(e.consistent) for e in examples)
        title = (f"Nearest queue entries of {len(examples)} objects: "
                 f"{n_ok} cycle-consistent (green), {len(examples) - n_ok} not (red)")
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


# --------------------------------------------------------------------------- curves

#: (log key, panel title, y-axis scale) of each panel of :func:`plot_curves`.
CURVE_PANELS: Tuple[Tuple[str, str, str], ...] = (
    ("loss_total", "total loss", "linear"),
    ("loss_global", "global loss (image)", "linear"),
    ("loss_objects", "object loss (same image)", "linear"),
    ("loss_neighbours", "neighbour loss (cross-image)", "linear"),
    ("objects_per_image", "objects per image", "linear"),
    ("consistent", "cycle-consistent fraction", "linear"),
    ("lr", "learning rate", "linear"),
    ("teacher_temp", "teacher temperature", "linear"),
)


def read_log(path: PathLike) -> List[Dict[str, Any]]:
    """The records of a ``log.jsonl`` (or of ``<dir>/log.jsonl``).

    A line that does not parse (a run killed mid-write) is skipped with a warning.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "log.jsonl")
    records = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"read_log: {p}:{n} is not JSON; skipped", stacklevel=2)
    return records


def _iter_series(log: Any) -> Tuple[np.ndarray, List[Dict[str, Any]], np.ndarray]:
    """(iterations, records, epoch-start iterations) of one run's iteration records.

    A resumed run logs some iterations twice; the last record of each wins."""
    records = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    by_iter: Dict[int, Dict[str, Any]] = {}
    for n, r in enumerate(rec for rec in records if rec.get("type", "iter") == "iter"):
        by_iter[int(r.get("iter", n))] = r
    its = np.array(sorted(by_iter), np.int64)
    recs = [by_iter[i] for i in its]
    epochs = np.array([r.get("epoch", 0) for r in recs])
    starts = its[1:][np.diff(epochs) != 0] if len(its) > 1 else its[:0]
    return its, recs, starts


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that ignores NaN (shorter at the ends)."""
    ok = np.isfinite(y)
    k = np.ones(window)
    num = np.convolve(np.where(ok, y, 0.0), k, mode="same")
    den = np.convolve(ok.astype(float), k, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def plot_curves(log_path_or_records: Any, path: Optional[PathLike] = None, *,
                panels: Sequence[Tuple[str, str, str]] = CURVE_PANELS, ncols: int = 4,
                title: Optional[str] = "Training curves",
                panel_size: Tuple[float, float] = (2.6, 2.0),
                dpi: int = 100) -> Any:
    """Every loss term and statistic of a training log against iterations.

    One small panel per quantity (:data:`CURVE_PANELS`: the total, global,
    object and neighbour losses, objects per image, the cycle-consistent
    fraction, learning rate, teacher temperature); dotted lines mark epoch
    starts.  Beyond 60 points the raw values are drawn faint with a moving
    average on top.

    Args:
        log_path_or_records: a ``log.jsonl`` path (or its run folder), a list of
            its records, or ``{name: log}`` to overlay several runs (ablations).
        path: also write a PNG here.
        panels: ``(key, title, "linear" | "log")`` of each panel.
        ncols: panels per row.
        title: figure title (None for none).
        panel_size: (width, height) of a panel in inches.
        dpi: resolution.

    Returns:
        The Figure; a key never logged gives an empty panel saying so.
    """
    if isinstance(log_path_or_records, Mapping):
        runs = {str(k): _iter_series(v) for k, v in log_path_or_records.items()}
    else:
        runs = {"": _iter_series(log_path_or_records)}
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(ncols * panel_size[0], nrows * panel_size[1] + (0.35 if title else 0), dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
    from matplotlib.ticker import MaxNLocator

    for ax, (key, name, scale) in zip(axes, panels):
        drawn = False
        for ci, (run, (its, recs, starts)) in enumerate(runs.items()):
            y = np.array([float(r[key]) if r.get(key) is not None else np.nan for r in recs])
            if not np.isfinite(y).any():
                continue
            color = f"C{ci}"
            if len(y) > 60:
                ax.plot(its, y, color=color, lw=0.6, alpha=0.3)
                ax.plot(its, _smooth(y, max(3, len(y) // 30)), color=color, lw=1.4,
                        label=run or None)
            else:
                ax.plot(its, y, color=color, lw=1.3, marker="." if len(y) < 25 else None,
                        ms=3, label=run or None)
            if ci == 0:
                for s in starts:
                    ax.axvline(s, color="0.75", lw=0.7, ls=":", zorder=0)
            drawn = True
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.25, lw=0.5)
        if drawn:
            if scale == "log":
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
            ax.yaxis.get_offset_text().set_fontsize(7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", color="0.5",
                    fontsize=8, transform=ax.transAxes)
            ax.set_yticks([])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(panels) - ncols):len(panels)]:  # the lowest panel of each column
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("iteration", fontsize=8)
    if len(runs) > 1:
        axes[0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


# --------------------------------------------------------------------------- predictions

def _label_rgb(labels: np.ndarray, colors: np.ndarray, ignore_index: int, fn: str) -> np.ndarray:
    lab = _numpy(labels).astype(np.int64)
    if lab.ndim != 2:
        raise ValueError(f"{fn}: label maps must be (H, W), got {lab.shape}")
    C = colors.shape[0]
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= C))
    if bad.any():
        raise ValueError(f"{fn}: labels must be in 0..{C - 1} or {ignore_index} (ignore), "
                         f"got {np.unique(lab[bad])[:5]}")
    lut = np.concatenate([colors, np.zeros((1, 3))])  # the last row: ignore, black
    return lut[np.where(lab == ignore_index, C, lab)]


def plot_predictions(images: Any, ground_truths: Any, predictions: Any,
                     class_names: Sequence[str], *, ignore_index: int = 255,
                     colors: Any = None, title: Optional[str] = "Dense retrieval: predictions",
                     panel_size: float = 2.2, dpi: int = 100,
                     path: Optional[PathLike] = None) -> Any:
    """Dense predictions next to the ground truth and the image, one row per image.

    Args:
        images: n images (list or leading axis), any layout :func:`to_rgb` takes.
        ground_truths: n (H, W) integer label maps; ``ignore_index`` is drawn black.
        predictions: n (H, W) integer label maps (same size as the ground truth).
        class_names: C names; label k is ``class_names[k]``.
        ignore_index: the ignore label (VOC: 255).
        colors: optional (C, 3) colours in [0, 1] (default: :func:`class_colors`).
        title: figure title (None for none).
        panel_size: side of one panel in inches.
        dpi: resolution.
        path: also write a PNG here.

    Returns:
        The Figure; row i holds axes ``3i`` (image), ``3i+1`` (ground truth),
        ``3i+2`` (prediction, titled with its pixel accuracy over non-ignored
        pixels); a legend of the class colours is at the bottom.
    """
    fn = "plot_predictions"
    ims, gts, prs = list(images), list(ground_truths), list(predictions)
    if not (len(ims) == len(gts) == len(prs)) or not ims:
        raise ValueError(f"{fn}: need as many images, ground truths and predictions (>= 1), "
                         f"got {len(ims)}, {len(gts)}, {len(prs)}")
    names = [str(c) for c in class_names]
    colors = class_colors(names) if colors is None else np.asarray(colors, float)[:, :3]
    if colors.shape[0] != len(names):
        raise ValueError(f"{fn}: {len(names)} class names but {colors.shape[0]} colours")
    n = len(ims)
    legend_cols = 4
    legend_h = 0.22 * math.ceil((len(names) + 1) / legend_cols) + 0.15
    head = 0.35 if title else 0.0
    fig = _figure(3 * panel_size, n * panel_size + legend_h + head, dpi)
    gs = fig.add_gridspec(n + 1, 3, height_ratios=[panel_size] * n + [legend_h])
    any_ignore = False
    for i, (im, gt, pr) in enumerate(zip(ims, gts, prs)):
        gt, pr = _numpy(gt), _numpy(pr)
        if gt.shape != pr.shape:
            raise ValueError(f"{fn}: ground truth {gt.shape} and prediction {pr.shape} of "
                             f"image {i} differ in size")
        H, W = gt.shape
        keep = gt != ignore_index
        any_ignore |= bool((~keep).any() or (pr == ignore_index).any())
        acc = float((gt[keep] == pr[keep]).mean()) if keep.any() else float("nan")
        panels = ((to_rgb(im), "image"), (_label_rgb(gt, colors, ignore_index, fn), "ground truth"),
                  (_label_rgb(pr, colors, ignore_index, fn), f"prediction · acc {acc:.0%}"))
        for j, (rgb, name) in enumerate(panels):
            ax = fig.add_subplot(gs[i, j])
            ax.imshow(rgb, extent=(0, W, H, 0), interpolation="nearest")
            _no_ticks(ax)
            if i == 0 or j == 2:
                ax.set_title(name, fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="0.4", lw=0.5, label=nm)
               for c, nm in zip(colors, names)]
    if any_ignore:
        handles.append(Patch(facecolor="black", edgecolor="0.4", lw=0.5,
                             label=f"ignore ({ignore_index})"))
    lax = fig.add_subplot(gs[n, :])
    lax.axis("off")
    lax.legend(handles=handles, loc="center", ncol=min(legend_cols, len(handles)),
               fontsize=7, frameon=False, handlelength=1.2, columnspacing=1.0)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)
