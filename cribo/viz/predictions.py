"""Dense predictions next to the ground truth and the image (docs/method.md §7)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from ._figure import PathLike, _figure, _finish, _no_ticks, _numpy, class_colors, to_rgb

__all__ = ["plot_predictions"]


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
                  (_label_rgb(pr, colors, ignore_index, fn), f"prediction · acc {acc:.1%}"))
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
