"""Segmentation scores from confusion matrices, and a paired bootstrap over images.

Conventions (used by every dense evaluation in :mod:`cribo.evaluation`):

* A confusion matrix ``conf`` is ``(C, C)`` int64 with ``conf[g, p]`` the number
  of pixels of ground-truth class ``g`` predicted as ``p``; class 0 is the
  background, ``1..C-1`` the object classes.  Pixels labelled ``ignore_index``
  (255) are never counted.
* ``IoU_c = conf[c, c] / (row_c + col_c - conf[c, c])``; a class absent from both
  the ground truth and the predictions (union 0) has IoU NaN and is left out of
  the mean: **mIoU** is the mean IoU over the classes with a non-empty union.
* **Pixel accuracy**: ``trace(conf) / sum(conf)``.
* **Foreground IoU** (class-agnostic): the confusion collapsed to background
  (class 0) vs foreground (any class >= 1); the IoU of the foreground.  At CPU
  scale it moves with training when the many-class mIoU does not (issue 4).

:func:`paired_bootstrap` compares two models evaluated on the same images: it
resamples the images with replacement, sums each model's per-image confusions
over the same resample and takes the difference of the scores -- a percentile
confidence interval for ``score(a) - score(b)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..viz.report import percent

__all__ = [
    "IGNORE_INDEX", "confusion_matrix", "iou_per_class", "scores_from_confusion",
    "SegmentationScores", "Interval", "PairedBootstrap", "paired_bootstrap",
]

#: The label of pixels that no score counts (VOC's boundaries and "difficult" regions).
IGNORE_INDEX = 255


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Counts of (ground truth, prediction) pairs over the non-ignored pixels.

    Args:
        gt: (H, W) (or any shape) integer ground truth, values in ``0..C-1`` or
            ``ignore_index``.
        pred: integer predictions of the same shape, values in ``0..C-1``.
        n_classes: C, background included.
        ignore_index: ground-truth value that is not counted.

    Returns:
        (C, C) int64, ``conf[g, p]``.

    Raises:
        ValueError: shapes differ, or a label is out of range.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"confusion_matrix: gt {gt.shape} and pred {pred.shape} differ in shape")
    C = int(n_classes)
    keep = gt != ignore_index
    g = gt[keep].astype(np.int64, copy=False)
    p = pred[keep].astype(np.int64, copy=False)
    if g.size and (g.min() < 0 or g.max() >= C):
        bad = np.unique(g[(g < 0) | (g >= C)])[:5]
        raise ValueError(f"confusion_matrix: ground-truth labels {bad.tolist()} are outside "
                         f"0..{C - 1} (and not the ignore label {ignore_index})")
    if p.size and (p.min() < 0 or p.max() >= C):
        raise ValueError(f"confusion_matrix: predictions must be in 0..{C - 1}")
    return np.bincount(g * C + p, minlength=C * C).reshape(C, C).astype(np.int64)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class from ``(..., C, C)`` confusions; NaN where the union is 0.

    Returns:
        (..., C) float64.
    """
    conf = np.asarray(conf, np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def _summary(conf: np.ndarray) -> Dict[str, np.ndarray]:
    """mIoU, foreground IoU and pixel accuracy of ``(..., C, C)`` confusions (each (...))."""
    conf = np.asarray(conf, np.float64)
    iou = iou_per_class(conf)
    present = ~np.isnan(iou)
    n = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = np.where(n > 0, np.where(present, iou, 0).sum(-1) / np.maximum(n, 1), np.nan)
        total = conf.sum((-2, -1))
        acc = np.where(total > 0, np.trace(conf, axis1=-2, axis2=-1) / np.maximum(total, 1),
                       np.nan)
        fg_tp = conf[..., 1:, 1:].sum((-2, -1))           # object predicted as some object
        fg_union = total - conf[..., 0, 0]                 # everything not (bg, bg)
        fg = np.where(fg_union > 0, fg_tp / np.maximum(fg_union, 1), np.nan)
        bg_tp = conf[..., 0, 0]
        bg_union = conf[..., 0, :].sum(-1) + conf[..., :, 0].sum(-1) - bg_tp
        bg = np.where(bg_union > 0, bg_tp / np.maximum(bg_union, 1), np.nan)
    return {"miou": miou, "fg_iou": fg, "bg_iou": bg, "pixel_acc": acc}


def scores_from_confusion(conf: np.ndarray,
                          class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """All scores of one confusion matrix (see the module docstring).

    Args:
        conf: (C, C) confusion, rows ground truth.
        class_names: C names (default ``"0".."C-1"``).

    Returns:
        dict with ``miou``, ``fg_iou``, ``bg_iou``, ``pixel_acc`` (floats in
        [0, 1], NaN when undefined) and ``per_class_iou`` (name -> float, NaN
        for a class absent from ground truth and predictions).
    """
    conf = np.asarray(conf)
    C = conf.shape[0]
    names = [str(i) for i in range(C)] if class_names is None else list(class_names)
    if len(names) != C:
        raise ValueError(f"scores_from_confusion: {len(names)} class names for {C} classes")
    out = {k: float(v) for k, v in _summary(conf).items()}
    out["per_class_iou"] = dict(zip(names, (float(v) for v in iou_per_class(conf))))
    return out


@dataclass
class SegmentationScores:
    """Scores of one dense evaluation (a model on a validation set).

    Attributes:
        miou: mean IoU over the classes present (in ground truth or predictions), [0, 1].
        per_class_iou: class name -> IoU (NaN: class absent from both).
        fg_iou: class-agnostic foreground IoU (background vs any object class).
        bg_iou: IoU of the background class.
        pixel_acc: fraction of non-ignored pixels predicted correctly.
        confusion: (C, C) int64 over all validation pixels, rows ground truth.
        per_image_confusion: (n_val, C, C) int64, one per validation image
            (what :func:`paired_bootstrap` resamples).
        class_names: the C names, index 0 the background.
        image_indices: (n_val,) int64, the validation items scored, in order.
        predictions: validation index -> (H, W) int64 predicted labels at the
            mask's resolution, for the first few images (for pictures).
    """

    miou: float
    per_class_iou: Dict[str, float]
    fg_iou: float
    bg_iou: float
    pixel_acc: float
    confusion: np.ndarray
    per_image_confusion: np.ndarray
    class_names: Tuple[str, ...]
    image_indices: np.ndarray
    predictions: Dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def _fields_from(cls, per_image: np.ndarray, class_names: Sequence[str],
                     image_indices: np.ndarray,
                     predictions: Dict[int, np.ndarray]) -> Dict[str, Any]:
        conf = per_image.sum(0) if len(per_image) else np.zeros(per_image.shape[1:], np.int64)
        s = scores_from_confusion(conf, class_names)
        return dict(miou=s["miou"], per_class_iou=s["per_class_iou"], fg_iou=s["fg_iou"],
                    bg_iou=s["bg_iou"], pixel_acc=s["pixel_acc"], confusion=conf,
                    per_image_confusion=per_image, class_names=tuple(class_names),
                    image_indices=np.asarray(image_indices, np.int64), predictions=predictions)

    def to_dict(self) -> Dict[str, Any]:
        """The scores as JSON-able values (confusion included; per-image confusions
        and predictions left out)."""
        out: Dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k in ("per_image_confusion", "predictions", "image_indices"):
                continue
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, float) and math.isnan(v):
                v = None
            elif isinstance(v, dict):
                v = {kk: (None if isinstance(vv, float) and math.isnan(vv) else vv)
                     for kk, vv in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        out["n_images"] = int(len(self.image_indices))
        return out


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval for a difference ``score(a) - score(b)``.

    Attributes:
        diff: the difference on the full validation set.
        low, high: the percentile interval of the resampled differences.
        std: standard deviation of the resampled differences.
        level: the interval's coverage, e.g. 0.95.
    """

    diff: float
    low: float
    high: float
    std: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        """True when 0 lies outside ``[low, high]`` (a significant difference)."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        """In percentage points, one decimal, e.g. ``+2.5 [+0.4, +4.6] (95% CI)``."""
        return (f"{percent(self.diff, signed=True)} [{percent(self.low, signed=True)}, "
                f"{percent(self.high, signed=True)}] ({100 * self.level:.0f}% CI)")


@dataclass(frozen=True)
class PairedBootstrap:
    """:func:`paired_bootstrap`'s result: intervals for ``a - b`` of each score.

    Attributes:
        miou, fg_iou, pixel_acc: the :class:`Interval` of each score's difference.
        n: resamples.
        n_images: validation images resampled.
        seed: the resampling seed.
    """

    miou: Interval
    fg_iou: Interval
    pixel_acc: Interval
    n: int
    n_images: int
    seed: int

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        out: Dict[str, Any] = {"n": self.n, "n_images": self.n_images, "seed": self.seed}
        for name in ("miou", "fg_iou", "pixel_acc"):
            iv: Interval = getattr(self, name)
            out[name] = {"diff": iv.diff, "low": iv.low, "high": iv.high, "std": iv.std,
                         "level": iv.level, "excludes_zero": iv.excludes_zero}
        return out


def paired_bootstrap(result_a: Any, result_b: Any, n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> PairedBootstrap:
    """Confidence intervals for the difference of two models on the same images.

    Each of the ``n`` resamples draws ``n_val`` validation images with replacement
    (one draw shared by both models: the comparison is paired), sums each model's
    per-image confusion matrices over the drawn images and scores them; the
    interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of
    ``score(a) - score(b)`` over the resamples.  A model against itself gives
    ``[0, 0]``.

    Args:
        result_a, result_b: :class:`SegmentationScores` (e.g. ``RetrievalResult``,
            ``ProbeResult``) of the same validation images, or (n_val, C, C)
            per-image confusion arrays.
        n: resamples (>= 1).
        seed: seed of the resampling (``numpy.random.default_rng``).
        level: coverage of the interval, in (0, 1).

    Returns:
        :class:`PairedBootstrap` with intervals for mIoU, foreground IoU and
        pixel accuracy (fractions; ``str()`` prints percentage points).

    Raises:
        ValueError: the two results are not on the same images and classes.
    """
    fn = "paired_bootstrap"
    pa, ia = _per_image(result_a)
    pb, ib = _per_image(result_b)
    if pa.shape != pb.shape:
        raise ValueError(f"{fn}: per-image confusions differ in shape, {pa.shape} vs {pb.shape} "
                         "(evaluate both models on the same images and classes)")
    if ia is not None and ib is not None and not np.array_equal(ia, ib):
        raise ValueError(f"{fn}: the two results scored different validation images")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"{fn}: n must be a positive integer, got {n!r}")
    if not 0 < level < 1:
        raise ValueError(f"{fn}: level must be in (0, 1), got {level}")
    n, m = int(n), pa.shape[0]
    if m == 0:
        raise ValueError(f"{fn}: no validation images")
    C2 = pa.shape[1] * pa.shape[2]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, m, size=(n, m))
    counts = np.bincount((draws + m * np.arange(n)[:, None]).ravel(),
                         minlength=n * m).reshape(n, m).astype(np.float64)
    # (n, m) @ (m, C*C): exact in float64 for any realistic pixel count (< 2^53).
    ca = (counts @ pa.reshape(m, C2).astype(np.float64)).reshape(n, *pa.shape[1:])
    cb = (counts @ pb.reshape(m, C2).astype(np.float64)).reshape(n, *pb.shape[1:])
    sa, sb = _summary(ca), _summary(cb)
    fa, fb = _summary(pa.sum(0)), _summary(pb.sum(0))
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for name in ("miou", "fg_iou", "pixel_acc"):
        d = sa[name] - sb[name]
        d = d[~np.isnan(d)]
        full = float(fa[name] - fb[name])
        if d.size == 0:
            out[name] = Interval(full, math.nan, math.nan, math.nan, level)
        else:
            lo, hi = np.percentile(d, [lo_q, hi_q])
            out[name] = Interval(full, float(lo), float(hi), float(d.std()), level)
    return PairedBootstrap(n=n, n_images=m, seed=int(seed), **out)


def _per_image(result: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if isinstance(result, SegmentationScores):
        return np.asarray(result.per_image_confusion), np.asarray(result.image_indices)
    a = np.asarray(result)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"paired_bootstrap: expected a SegmentationScores or an (n_val, C, C) "
                         f"array, got shape {a.shape}")
    return a, None
