"""The memory bank of dense retrieval: which patches of the training views it keeps
(:func:`sample_patches`) and the :class:`Bank` that :func:`build_bank` fills with the
backbone's L2-normalised final patch tokens and their class histograms
(docs/method.md §7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from .features import _bar, encode, patch_histograms, patch_size_of, train_view
from .metrics import IGNORE_INDEX

__all__ = ["sample_patches", "Bank", "build_bank"]

# Stream tag of the bank's generators, so they never coincide with a data set's
# own ``default_rng([seed, split, index])`` or the pretraining views'.
_BANK_STREAM = 0x42616E6B  # "Bank"


def sample_patches(counts: np.ndarray, cap: Optional[int],
                   rng: np.random.Generator) -> np.ndarray:
    """The patches of one view that go into the memory bank.

    Rule: only patches with at least one non-ignored pixel are candidates; each
    has a majority class (argmax of its histogram, ties to the lower class).
    If there are at most ``cap`` candidates (or ``cap`` is None) all are kept.
    Otherwise the ``cap`` slots are shared out over the classes present, rarest
    first: the classes are visited in increasing order of their candidate count
    ``n_c`` (ties: lower class first) and, with ``r`` slots and ``m`` classes
    left, class ``c`` keeps ``min(n_c, r // m)`` of its patches (the last class
    visited takes all that remain), chosen uniformly at random without
    replacement from ``rng``.  So a class with few patches in the view keeps
    them all, and exactly ``cap`` patches are kept.

    Args:
        counts: (N, C) per-patch class counts (:func:`patch_histograms`).
        cap: the most patches kept, or None for no cap.
        rng: the generator of the random choices.

    Returns:
        (n_keep,) int64 patch indices, increasing.
    """
    total = counts.sum(1)
    cand = np.flatnonzero(total > 0)
    if cap is None or cand.size <= cap:
        return cand.astype(np.int64)
    major = counts[cand].argmax(1)
    classes, n_c = np.unique(major, return_counts=True)
    order = np.lexsort((classes, n_c))                         # by count, then class
    keep: List[np.ndarray] = []
    slots, left = int(cap), len(classes)
    for j in order:
        take = slots if left == 1 else min(int(n_c[j]), slots // left)
        members = cand[major == classes[j]]
        keep.append(members if take >= members.size
                    else rng.choice(members, size=take, replace=False))
        slots -= take
        left -= 1
    return np.sort(np.concatenate(keep)).astype(np.int64)


@dataclass
class Bank:
    """The memory bank of dense nearest-neighbour retrieval.

    Attributes:
        features: (Q, D) float32, L2-normalised final patch tokens.
        histograms: (Q, C) float32, each patch's class fractions (rows sum to 1,
            ignored pixels not counted).
        labels: (Q,) int64 majority class of each patch (ties to the lower class).
        image_index: (Q,) int64 training item each patch came from.
        n_views: training views encoded.
    """

    features: np.ndarray
    histograms: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    n_views: int

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _batches(n: int, size: int) -> Iterator[range]:
    for s in range(0, n, size):
        yield range(s, min(n, s + size))


def build_bank(backbone: Any, train_set: Any, *, image_size: int, n_classes: int,
               patch_size: Optional[int] = None, patches_per_image: Optional[int] = 100,
               augment_passes: int = 2, crop_scale: Tuple[float, float] = (0.5, 1.0),
               batch_size: int = 32, seed: int = 0, device: Any = None,
               progress: bool = True,
               ignore_index: int = IGNORE_INDEX) -> Bank:
    """Encodes the training images' views into a :class:`Bank`.

    Each training image is seen ``augment_passes`` times through
    :func:`train_view` (``augment_passes=0``: once, un-augmented); view ``a`` of
    item ``i`` draws its crop, flip and patch choice from
    ``default_rng([seed, stream, a, i])`` alone, so the bank does not depend on
    the batch size and is the same for every backbone given the seed.  Each
    view's patches are labelled by :func:`patch_histograms` and capped by
    :func:`sample_patches` (``patches_per_image`` per view).

    Args:
        backbone: network returning ``(cls, patches)``.
        train_set: items ``(image (H, W, 3) uint8, mask (H, W) int)``.
        image_size: side S of the training views (multiple of the patch size).
        n_classes: C, background included.
        patch_size: p (default: ``backbone.patch_size``).
        patches_per_image: cap per view (None: every labelled patch).
        augment_passes: augmented views per image (0: one plain view).
        crop_scale: area range of the random resized crop.
        batch_size: images per forward pass.
        seed: seed of the views and the sampling.
        device: torch device (default: the backbone's).
        progress: show a tqdm bar.

    Returns:
        The :class:`Bank`; its size is at most
        ``len(train_set) * max(augment_passes, 1) * patches_per_image``.
    """
    p = patch_size_of(backbone) if patch_size is None else int(patch_size)
    if augment_passes < 0:
        raise ValueError(f"build_bank: augment_passes must be >= 0, got {augment_passes}")
    if patches_per_image is not None and patches_per_image < 1:
        raise ValueError(f"build_bank: patches_per_image must be >= 1 or None, "
                         f"got {patches_per_image}")
    if image_size % p:
        raise ValueError(f"build_bank: image_size {image_size} must be a multiple of the patch "
                         f"size {p}")
    passes = max(augment_passes, 1)
    n = len(train_set)
    feats: List[np.ndarray] = []
    hists: List[np.ndarray] = []
    owners: List[np.ndarray] = []
    bar = _bar(n * passes, "bank", progress)
    for a in range(passes):
        for chunk in _batches(n, batch_size):
            views, masks, rngs = [], [], []
            for i in chunk:
                image, mask = train_set[i]
                rng = np.random.default_rng([seed, _BANK_STREAM, a, i])
                v, m = train_view(np.asarray(image), np.asarray(mask),
                                  rng if augment_passes > 0 else None, image_size, p,
                                  crop_scale)
                views.append(v)
                masks.append(m)
                rngs.append(rng)
            z = encode(backbone, views, device, batch_size)
            for i, zi, m, rng in zip(chunk, z, masks, rngs):
                counts = patch_histograms(m, p, n_classes, ignore_index)
                if counts.shape[0] != zi.shape[0]:
                    raise ValueError(f"build_bank: the backbone gave {zi.shape[0]} tokens for a "
                                     f"{m.shape[0]}x{m.shape[1]} view, expected "
                                     f"{counts.shape[0]} at patch size {p}")
                keep = sample_patches(counts, patches_per_image, rng)
                c = counts[keep].astype(np.float32)
                feats.append(zi[keep])
                hists.append(c / c.sum(1, keepdims=True))
                owners.append(np.full(keep.size, i, np.int64))
            bar.update(len(chunk))
    bar.close()
    D = feats[0].shape[1] if feats else 0
    features = np.concatenate(feats) if feats else np.zeros((0, D), np.float32)
    histograms = (np.concatenate(hists) if hists
                  else np.zeros((0, n_classes), np.float32)).astype(np.float32)
    return Bank(features=np.ascontiguousarray(features, np.float32),
                histograms=np.ascontiguousarray(histograms),
                labels=histograms.argmax(1).astype(np.int64) if len(histograms)
                else np.zeros(0, np.int64),
                image_index=np.concatenate(owners) if owners else np.zeros(0, np.int64),
                n_views=n * passes)
