"""Neighbour matches from the queue, drawn as object pairs (docs/method.md §4).

A training loop keeps a :class:`MatchBuffer` of its last batches;
:func:`match_examples` turns a step's queue addresses back into images and
regions (the queue's storage order is :func:`cribo.ops.queue.locate_entries`'s,
not re-derived here), and :func:`plot_matches` draws each query object next to
the entry it retrieved, framed green (cycle-consistent) or red.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..ops.queue import locate_entries
from ._figure import (PathLike, _draw_boundaries, _figure, _finish, _label_grid, _no_ticks,
                      _numpy, _to_uint8, _upsample, to_rgb)

__all__ = ["MatchExample", "MatchBuffer", "match_examples", "plot_matches"]

_GREEN = "#1a9850"
_RED = "#d73027"


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
        slot, rank = locate_entries(addresses, counts)
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
