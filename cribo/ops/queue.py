"""The object queue and its nearest-neighbour look-up (docs/method.md §4; C kernel: csrc/queue.c).

A memory queue of the teacher's object representations of recent images; each
object of the current batch retrieves its nearest neighbour in the queue (per
view), and the pair is kept only if the neighbour's other view points back to
the same object (the cycle-consistency check).  The retrieved neighbours are the
targets of the cross-image loss (Lebailly, Stegmüller et al., ICLR 2024, §3.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import _C
from ._arrays import as_float32, as_int64

__all__ = ["topk_cosine", "ObjectQueue", "Match", "locate_entries"]


def topk_cosine(queries: Any, bank: Any, k: int = 1, *, query_ids: Any = None,
                bank_ids: Any = None) -> Tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar bank rows of each query, ranked exactly.

    Exact means: the ranking is by a score computed from the float32 rows alone,
    ``dot(x, y) / (|x| |y|)`` with the products and sums in double in one fixed
    order (0 where either row is zero), and results are sorted by (score
    descending, bank index ascending).  The score of two rows does not depend on
    where they sit in the bank, on the thread count, on how the queries are
    chunked or on the CPU and BLAS kernel, so equal rows always tie and ties
    always go to the lowest index, and the result is bit-for-bit the same on
    every machine.  It is the true cosine to within about ``4 (d + 4) 2^-53``, so
    only rows whose true cosines agree that closely may be ordered either way
    (the same way everywhere).  The bank is scanned in blocks (sgemm on
    1024 x 1024 tiles of L2-normalised copies, a few MB per thread whatever the
    bank size); every row whose sgemm similarity could reach the current k-th
    score, by a worst-case bound on the sgemm's rounding, is re-scored exactly
    (csrc/queue.c).  Many near-ties (a bank of copies of one row) are
    correct but slower: each of them is re-scored.  Any finite magnitude works.

    Args:
        queries: (M, d) float.
        bank: (Q, d) float, Q >= k.
        k: neighbours per query, 1 <= k <= Q.
        query_ids, bank_ids: optional (M,) and (Q,) integer ids, given together:
            a bank row with the same id as the query is never returned.

    Returns:
        ``(indices, similarities)``: (M, k) int64 and (M, k) float32, sorted by
        the exact score (descending), ties to the lowest bank index; each
        similarity is the exact score rounded to float32 (so two neighbours whose
        scores differ below float32 resolution show equal similarities, in the
        order of their scores).  Where exclusion leaves fewer than k candidates
        the rest are index -1, similarity -inf.
    """
    fn = "topk_cosine"
    return _C.topk_cosine(
        queries=as_float32(queries, fn, "queries"), bank=as_float32(bank, fn, "bank"), k=k,
        query_ids=None if query_ids is None else as_int64(query_ids, fn, "query_ids"),
        bank_ids=None if bank_ids is None else as_int64(bank_ids, fn, "bank_ids"))


@dataclass(frozen=True)
class Match:
    """Result of :meth:`ObjectQueue.match` for M query objects of width d.

    Attributes:
        index1, index2: (M,) int64 queue addresses (newest first) of the nearest
            view-1 / view-2 entries, -1 where nothing was matched.
        mask1, mask2: (M,) bool, the pair passed its cycle check (never for -1).
        targets1, targets2: (M, d) float32 un-normalised queue entries
            ``q1[index1]`` and ``q2[index2]`` (zeros for -1).
        similarity1, similarity2: (M,) float32 cosine similarities (-inf for -1).
    """

    index1: np.ndarray
    index2: np.ndarray
    mask1: np.ndarray
    mask2: np.ndarray
    targets1: np.ndarray
    targets2: np.ndarray
    similarity1: np.ndarray
    similarity2: np.ndarray

    @property
    def consistent_fraction(self) -> float:
        """Fraction of (object, view) pairs that passed the cycle check."""
        n = self.mask1.size + self.mask2.size
        return float((self.mask1.sum() + self.mask2.sum()) / n) if n else 0.0


class ObjectQueue:
    """A FIFO memory of the valid teacher objects of the last ``capacity`` images.

    Storage holds only valid objects (no padding to K per image), for view 1 and
    view 2, newest image first; an image with no valid object still takes a slot.
    The state is plain NumPy arrays, so ``state_dict()`` is a checkpoint.

    Args:
        capacity: images held (the reference uses 25 000 on COCO).
        dim: object width d.
        exclude_same_image: when image ids are given, never match an object to a
            queue entry from the same source image (on a data set smaller than the
            queue an object otherwise finds its own copy from the last epoch).

    Example:
        >>> q = cribo.ObjectQueue(capacity=1000, dim=384)
        >>> m = q.match(t1, t2)             # look up, then
        >>> q.push(t1, t2, counts)          # push the batch (docs/method.md §4 order)
    """

    def __init__(self, capacity: int, dim: int, *, exclude_same_image: bool = True) -> None:
        self.capacity, self.dim = _C.ObjectQueue(capacity=capacity, dim=dim)
        self.exclude_same_image = bool(exclude_same_image)
        # Objects live in [_start, _end) of the buffers, newest first; images in
        # [_istart, _iend) of the image arrays.  New blocks go in front; when the
        # front is full the live part moves to the back of a (grown) buffer.
        self._q1 = np.zeros((0, self.dim), np.float32)
        self._q2 = np.zeros((0, self.dim), np.float32)
        self._obj_ids = np.zeros(0, np.int64)
        self._img_counts = np.zeros(0, np.int64)
        self._img_ids = np.zeros(0, np.int64)
        self._start = self._end = 0
        self._istart = self._iend = 0

    # ---------------------------------------------------------------- views
    def __len__(self) -> int:
        """Images held."""
        return self._iend - self._istart

    @property
    def n_objects(self) -> int:
        """Objects held (per view)."""
        return self._end - self._start

    @property
    def objects1(self) -> np.ndarray:
        """(n_objects, d) view-1 entries, newest first (a view, do not modify)."""
        return self._q1[self._start:self._end]

    @property
    def objects2(self) -> np.ndarray:
        """(n_objects, d) view-2 entries, newest first (a view, do not modify)."""
        return self._q2[self._start:self._end]

    @property
    def object_ids(self) -> np.ndarray:
        """(n_objects,) source image id of each entry (-1 where none was given)."""
        return self._obj_ids[self._start:self._end]

    @property
    def image_counts(self) -> np.ndarray:
        """(len,) objects of each held image, newest first."""
        return self._img_counts[self._istart:self._iend]

    @property
    def image_ids(self) -> np.ndarray:
        """(len,) id of each held image, newest first (-1 where none was given)."""
        return self._img_ids[self._istart:self._iend]

    def __repr__(self) -> str:
        return (f"ObjectQueue(capacity={self.capacity}, dim={self.dim}, images={len(self)}, "
                f"objects={self.n_objects})")

    # ---------------------------------------------------------------- push
    def push(self, objects1: Any, objects2: Any, counts: Any, image_ids: Any = None) -> None:
        """Put a batch in front of the queue, then drop the oldest images.

        Args:
            objects1, objects2: (M, d) the batch's valid teacher objects of view 1
                and view 2, image by image, clusters in order within an image.
            counts: (B,) objects of each image (sum M; 0 allowed: the image still
                takes a slot).
            image_ids: optional (B,) integer ids of the source images.
        """
        fn = "ObjectQueue.push"
        o1, o2 = as_float32(objects1, fn, "objects1"), as_float32(objects2, fn, "objects2")
        counts = as_int64(counts, fn, "counts")
        ids = None if image_ids is None else as_int64(image_ids, fn, "image_ids")
        _C.ObjectQueue_push(objects1=o1, objects2=o2, counts=counts, image_ids=ids, dim=self.dim)
        B = counts.shape[0]
        if ids is None:
            ids = np.full(B, -1, np.int64)
        if B > self.capacity:  # a block larger than the queue keeps its first images
            keep = int(counts[: self.capacity].sum())
            o1, o2 = o1[:keep], o2[:keep]
            counts, ids = counts[: self.capacity], ids[: self.capacity]
            B = self.capacity
        M = o1.shape[0]
        # Drop images from the back until the batch fits.
        while len(self) + B > self.capacity:
            self._iend -= 1
            self._end -= int(self._img_counts[self._iend])
        self._reserve(M, B)
        self._start -= M
        self._istart -= B
        self._q1[self._start:self._start + M] = o1
        self._q2[self._start:self._start + M] = o2
        self._obj_ids[self._start:self._start + M] = np.repeat(ids, counts)
        self._img_counts[self._istart:self._istart + B] = counts
        self._img_ids[self._istart:self._istart + B] = ids

    def _reserve(self, m: int, b: int) -> None:
        """Make room for m objects and b images in front of the live part."""
        if self._start >= m and self._istart >= b:
            return
        live, ilive = self.n_objects, len(self)
        # Room for the live part plus as much again (amortised O(1) per object).
        cap = max(self._q1.shape[0], 2 * (live + m), 64)
        icap = max(self._img_counts.shape[0], 2 * (ilive + b), 16)
        self._q1 = self._moved(self._q1, self._start, self._end, cap)
        self._q2 = self._moved(self._q2, self._start, self._end, cap)
        self._obj_ids = self._moved(self._obj_ids, self._start, self._end, cap)
        self._img_counts = self._moved(self._img_counts, self._istart, self._iend, icap)
        self._img_ids = self._moved(self._img_ids, self._istart, self._iend, icap)
        self._start, self._end = cap - live, cap
        self._istart, self._iend = icap - ilive, icap

    @staticmethod
    def _moved(a: np.ndarray, lo: int, hi: int, cap: int) -> np.ndarray:
        if a.shape[0] == cap:
            # Same size: move the live part to the back in place (ranges may overlap;
            # numpy handles overlapping assignment correctly).
            n = hi - lo
            a[cap - n:cap] = a[lo:hi].copy()
            return a
        out = np.zeros((cap,) + a.shape[1:], a.dtype)
        n = hi - lo
        out[cap - n:cap] = a[lo:hi]
        return out

    # ---------------------------------------------------------------- match
    def match(self, objects1: Any, objects2: Any, image_ids: Any = None, *,
              batch: Optional[Tuple[Any, Any]] = None, offset: int = 0) -> Match:
        """Nearest queue entries of the batch's objects, with both cycle checks.

        For object j with teacher representations t1_j, t2_j (cosine similarity
        throughout): ``a(j)`` is the nearest view-1 entry to t1_j; pair 1 is kept
        iff the nearest batch view-2 object to the view-2 entry of ``a(j)`` is j
        itself; symmetrically ``b(j)`` and pair 2.  Ties go to the lowest address.

        Args:
            objects1, objects2: (M, d) the batch's valid teacher objects.
            image_ids: optional (M,) source image id of each object; with
                ``exclude_same_image`` an entry of the same image is never matched.
            batch: optional (all_objects1, all_objects2), each (M_all, d): the whole
                current batch when it is split over processes (docs/method.md §4: the cycle
                checks run against the objects of all processes); the queries are
                its rows ``offset .. offset + M``.  Default: the queries themselves.
            offset: row of the first query in ``batch``.

        Returns:
            A :class:`Match`; an empty queue matches nothing (all -1 / False).
        """
        fn = "ObjectQueue.match"
        o1, o2 = as_float32(objects1, fn, "objects1"), as_float32(objects2, fn, "objects2")
        qids = None if image_ids is None else as_int64(image_ids, fn, "image_ids")
        if batch is not None:
            batch = (as_float32(batch[0], fn, "batch[0]"), as_float32(batch[1], fn, "batch[1]"))
        _C.ObjectQueue_match(**{"objects1": o1, "objects2": o2, "image_ids": qids,
                                "batch[0]": None if batch is None else batch[0],
                                "batch[1]": None if batch is None else batch[1],
                                "offset": offset, "dim": self.dim})
        M = o1.shape[0]
        index = [np.full(M, -1, np.int64), np.full(M, -1, np.int64)]
        sim = [np.full(M, -np.inf, np.float32), np.full(M, -np.inf, np.float32)]
        mask = [np.zeros(M, bool), np.zeros(M, bool)]
        targets = [np.zeros((M, self.dim), np.float32), np.zeros((M, self.dim), np.float32)]
        if M == 0 or self.n_objects == 0:
            return Match(index[0], index[1], mask[0], mask[1], targets[0], targets[1],
                         sim[0], sim[1])
        exclude = self.exclude_same_image and qids is not None
        queue = (self.objects1, self.objects2)
        if batch is None:
            cycle = (o1, o2)
            offset = 0
        else:
            cycle = batch
            offset = int(offset)
        batch = (o1, o2)
        for v in (0, 1):
            other = 1 - v
            if exclude:
                idx, s = _C.topk_cosine(queries=batch[v], bank=queue[v], k=1, query_ids=qids,
                                        bank_ids=self.object_ids)
            else:
                idx, s = _C.topk_cosine(queries=batch[v], bank=queue[v], k=1)
            idx, s = idx[:, 0], s[:, 0]
            found = idx >= 0
            index[v], sim[v] = idx, s
            if found.any():
                # Cycle: the retrieved entry's other view must point back to j.
                back = np.ascontiguousarray(queue[other][idx[found]])
                j_back, _ = _C.topk_cosine(queries=back, bank=cycle[other], k=1)
                mask[v][found] = j_back[:, 0] == offset + np.flatnonzero(found)
                targets[v][found] = queue[v][idx[found]]
        return Match(index[0], index[1], mask[0], mask[1], targets[0], targets[1],
                     sim[0], sim[1])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """The queue as plain arrays and ints (newest first), for checkpoints."""
        return {
            "capacity": self.capacity,
            "dim": self.dim,
            "exclude_same_image": self.exclude_same_image,
            "objects1": self.objects1.copy(),
            "objects2": self.objects2.copy(),
            "object_ids": self.object_ids.copy(),
            "image_counts": self.image_counts.copy(),
            "image_ids": self.image_ids.copy(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; checks it is consistent before changing anything.

        The queue keeps its own ``capacity``: a state saved from a larger queue
        that holds more than ``capacity`` images gives this queue its newest
        ``capacity`` images (and their objects), exactly what pushing the state's
        images would leave; a state with fewer images is restored whole.  ``dim``
        must match; ``exclude_same_image`` is taken from the state.

        Args:
            state: a dict from :meth:`state_dict` (arrays newest first).
        """
        fn = "ObjectQueue.load_state_dict"
        required = ("capacity", "dim", "objects1", "objects2", "object_ids", "image_counts",
                    "image_ids")
        if not isinstance(state, dict):
            raise _C.ArgumentTypeError(f"{fn}: state must be a dict from state_dict(), "
                                       f"got {type(state)}")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"{fn}: state is missing {missing}")
        o1 = as_float32(state["objects1"], fn, "objects1")
        o2 = as_float32(state["objects2"], fn, "objects2")
        oid = as_int64(state["object_ids"], fn, "object_ids")
        cnt = as_int64(state["image_counts"], fn, "image_counts")
        iid = as_int64(state["image_ids"], fn, "image_ids")
        _C.ObjectQueue_load_state_dict(capacity=state["capacity"], dim=state["dim"], objects1=o1,
                                       objects2=o2, object_ids=oid, image_counts=cnt,
                                       image_ids=iid, queue_dim=self.dim)
        if cnt.shape[0] > self.capacity:   # keep the newest self.capacity images
            n_obj = int(cnt[:self.capacity].sum())
            o1, o2, oid = o1[:n_obj], o2[:n_obj], oid[:n_obj]
            cnt, iid = cnt[:self.capacity], iid[:self.capacity]
        self.exclude_same_image = bool(state.get("exclude_same_image", self.exclude_same_image))
        self._q1 = o1.copy()
        self._q2 = o2.copy()
        self._obj_ids = oid.copy()
        self._img_counts = cnt.copy()
        self._img_ids = iid.copy()
        self._start, self._end = 0, o1.shape[0]
        self._istart, self._iend = 0, cnt.shape[0]


def locate_entries(addresses: Any, image_counts: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Which queued image, and which of its objects, each queue address is.

    :class:`ObjectQueue` stores objects newest first, one contiguous run
    per image, in the order of ``queue.image_counts``: image slot ``s`` holds
    addresses ``[sum(counts[:s]), sum(counts[:s+1]))``.  Each ``push`` puts its
    batch in front, in batch order, so with a constant batch size B and a queue
    that has not wrapped, slot ``s`` is image ``s % B`` of the batch pushed
    ``s // B + 1`` steps before the look-up, and the object of rank ``r`` is
    that image's r-th valid cluster: ``np.flatnonzero(valid[b])[r]``.
    ``cribo.viz.MatchBuffer`` does this bookkeeping for any batch sizes.

    Args:
        addresses: (M,) int, e.g. ``match.index1`` (-1 for no match).
        image_counts: (I,) int, the queue's ``image_counts`` at look-up time
            (before the batch itself was pushed).

    Returns:
        ``(slot, rank)``: (M,) int64 each, -1 where the address is -1 or outside
        the images given.
    """
    a = np.asarray(addresses).astype(np.int64).ravel()
    counts = np.asarray(image_counts).astype(np.int64).ravel()
    ends = np.cumsum(counts)
    total = int(ends[-1]) if ends.size else 0
    ok = (a >= 0) & (a < total)
    slot = np.full(a.shape, -1, np.int64)
    rank = np.full(a.shape, -1, np.int64)
    s = np.searchsorted(ends, a[ok], side="right")  # empty images are skipped
    slot[ok] = s
    rank[ok] = a[ok] - (ends[s] - counts[s])
    return slot, rank
