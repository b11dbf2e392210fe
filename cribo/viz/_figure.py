"""What every picture of :mod:`cribo.viz` shares: matplotlib, figures, colours, grids.

matplotlib is imported by :func:`_mpl` on first use, never at import time, so
``import cribo.viz`` works without it.  A figure is made by :func:`_figure` on
the Agg canvas (pyplot is never used: nothing piles up in pyplot's figure list
and the caller's backend is left alone) and written by :func:`_finish` as a PNG
of exactly ``figsize * dpi`` pixels.  The public names here (:func:`cluster_colors`,
:func:`class_colors`, :func:`to_rgb`) are re-exported by :mod:`cribo.viz`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["cluster_colors", "class_colors", "to_rgb"]

PathLike = Union[str, "os.PathLike[str]"]


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
    """An empty Figure of ``width x height`` inches on its own Agg canvas."""
    Figure, Canvas = _mpl()
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    Canvas(fig)
    return fig


def _finish(fig: Any, path: Optional[PathLike]) -> Any:
    """Write ``fig`` as a PNG at ``path`` (folders created) if given; return it."""
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
    """:func:`to_rgb` as ``(H, W, 3)`` uint8."""
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


def _draw_boundaries(ax: Any, cells: np.ndarray, H: int, W: int, color: str = "white",
                     lw: float = 1.4) -> None:
    """Lines between the cells of different value of a (h, w) grid over H x W pixels."""
    from matplotlib.collections import LineCollection

    segs = _boundary_segments(cells, H, W)
    if len(segs):
        ax.add_collection(LineCollection(segs, colors=color, linewidths=lw,
                                         capstyle="projecting"))

