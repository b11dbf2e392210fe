"""The object queue and its top-k cosine search in torch, on the tensors' device (docs/method.md §4).

The same operations as :class:`cribo.ObjectQueue` and :func:`cribo.topk_cosine`
(cribo/ops/queue.py, C kernel csrc/queue.c), written so that ``push``,
``match`` and :func:`topk_cosine` never copy data to the host nor wait for the
device: every shape they need is known on the host from the arguments' shapes,
and everything that depends on values (which images are still held, which entry
is nearest) stays in device tensors.

**The search.**  The bank is scanned in blocks of rows (and the queries in
blocks) sized from ``chunk_bytes``, so memory does not grow with the bank.  The
scan scores are float32 products of L2-normalised rows; each block keeps, per
query, the ``k + margin`` best rows by (scan score descending, index
ascending) -- packed into one int64 key so that ``torch.topk`` keeps the lowest
index among equal scores -- and blocks are merged the same way.  The surviving
candidates are then re-scored exactly, ``dot(x, y) / (|x| |y|)`` with the float32
rows promoted to float64 (0 where either row is zero), all candidates of a
query in one elementwise product and sum so equal rows get equal scores, and
sorted by (exact score descending, index ascending).  The exact score is the C
core's score up to the order of the float64 summation (both are the true cosine
to within about ``d 2^-52``), so the two agree except where two rows' cosines
agree to that level.

*When the result is the exact search.*  Let ``eps`` bound the scan's error on
one score (for float32 rows of width d: about ``(2 d + 8) 2^-24``, from
normalising both rows and a d-term float32 dot product).  A row of the exact
top-k has scan score at least ``s_k - eps``, and the k-th scan score is at most
``s_k + eps``; so the exact top-k is among the candidates whenever fewer than
``margin`` rows outside it have scan scores within ``2 eps`` of the k-th scan
score.  Exact duplicates of a row are always ranked right (lowest index first)
while there are at most ``margin`` of them among the near-best.  Only float32
scans are offered: a bfloat16/TF32 scan has ``eps`` of about ``2^-8``, where the
number of rows inside ``2 eps`` is data dependent, and a provable result would
need a candidate list sized at run time (a host round-trip) or a fallback scan.

**The queue** is a device ring buffer of objects, newest first; see
:class:`ObjectQueue`.  Its ``state_dict`` is the same dict of host NumPy arrays
as :class:`cribo.ObjectQueue`'s, so checkpoints move between the two.

(About 590 lines, mostly docstrings and argument checks: the queue reads its
ring through the search's private ``_Bank``/``_search``, so the two stay in one
module, as in cribo/ops/queue.py.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ... import _C
from ...ops._arrays import as_float32, as_int64

__all__ = ["topk_cosine", "ObjectQueue", "Match"]

DEFAULT_CHUNK_BYTES = 64 << 20
_LOW32 = (1 << 32) - 1
# Order-preserving int32 image of float32 -inf (see _keys): the marker of "no candidate".
_NEG_INF_KEY = int(np.array(-np.inf, np.float32).view(np.int32)) ^ 0x7FFFFFFF


# ----------------------------------------------------------------- argument checks
def _float_matrix(x: Any, fn: str, name: str, dim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (rows, d), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{fn}: {name} must have {dim} columns, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float32)


def _int_vector(x: Any, fn: str, name: str, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"{fn}: {name} must have shape ({n},), got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int64)


def _same_device(x: torch.Tensor, device: torch.device, fn: str, name: str) -> None:
    if x.device != device:
        raise ValueError(f"{fn}: {name} is on {x.device}, expected {device}")


# ----------------------------------------------------------------- the search
class _Bank:
    """A bank read by address: ``rows(a0, a1)``, ``take(idx)``, and the excluded rows."""

    def __init__(self, n: int, rows: Callable[[int, int], torch.Tensor],
                 take: Callable[[torch.Tensor], torch.Tensor],
                 ids: Optional[Callable[[int, int], torch.Tensor]] = None,
                 alive: Optional[Callable[[int, int], torch.Tensor]] = None) -> None:
        self.n, self.rows, self.take, self.ids, self.alive = n, rows, take, ids, alive


def _keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (score descending, index ascending); scores float32."""
    bits = (scores + 0.0).view(torch.int32)       # + 0.0 turns -0 into +0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int64) * (1 << 32) + (_LOW32 - index)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    """Rows over their norms (zero rows stay zero); scaled first so any finite size works."""
    scale = x.abs().amax(dim=1, keepdim=True)
    x = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _blocks(m: int, d: int, c: int, chunk_bytes: int) -> Tuple[int, int]:
    """(query block, bank block) sizes that keep one step's temporaries near chunk_bytes."""
    # Re-scoring holds about 3 float64 copies of (query block, c, d).
    mq = max(1, min(m, 1024, chunk_bytes // max(1, 24 * c * d)))
    # A scan step holds scores (4 B), keys (8 B) and their concatenation (8 B) per pair.
    nb = max(1, (chunk_bytes - 24 * mq * c * d) // (20 * mq + 8 * d))
    return mq, nb


def _search(queries: torch.Tensor, bank: _Bank, k: int, query_ids: Optional[torch.Tensor],
            margin: int, chunk_bytes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    m, d = queries.shape
    dev = queries.device
    c = min(k + margin, bank.n)
    mq, nb = _blocks(m, d, c, chunk_bytes)
    out_idx, out_sim = [], []
    for q0 in range(0, m, mq):
        q = queries[q0:q0 + mq]
        qn = _normalised(q)
        qid = None if query_ids is None else query_ids[q0:q0 + mq, None]
        run = torch.empty((q.shape[0], 0), dtype=torch.int64, device=dev)
        for b0 in range(0, bank.n, nb):
            b1 = min(bank.n, b0 + nb)
            s = qn @ _normalised(bank.rows(b0, b1)).T
            drop = None
            if bank.alive is not None:
                drop = ~bank.alive(b0, b1)[None, :]
            if qid is not None and bank.ids is not None:
                same = bank.ids(b0, b1)[None, :] == qid
                drop = same if drop is None else drop | same
            if drop is not None:
                s = s.masked_fill(drop, -torch.inf)
            keys = torch.cat([run, _keys(s, torch.arange(b0, b1, device=dev))], dim=1)
            run = keys.topk(min(c, keys.shape[1]), dim=1).values
        idx = _LOW32 - (run & _LOW32)
        valid = (run >> 32) > _NEG_INF_KEY
        idx = torch.where(valid, idx, torch.full_like(idx, -1))
        # Exact re-score of the candidates in float64.
        rows = bank.take(idx.clamp(min=0)).to(torch.float64)            # (mq, c, d)
        q64 = q.to(torch.float64)
        dot = (rows * q64[:, None, :]).sum(dim=2)
        nrm = torch.sqrt((rows * rows).sum(dim=2)) * torch.sqrt((q64 * q64).sum(dim=1))[:, None]
        score = torch.where(nrm > 0, dot / torch.where(nrm > 0, nrm, torch.ones_like(nrm)),
                            torch.zeros_like(dot))
        score = torch.where(valid, score, torch.full_like(score, -torch.inf))
        # (score descending, index ascending): sort by index, then stably by score.
        order = torch.where(valid, idx, torch.full_like(idx, bank.n)).argsort(dim=1, stable=True)
        idx, score = idx.gather(1, order), score.gather(1, order)
        order = score.argsort(dim=1, descending=True, stable=True)[:, :k]
        out_idx.append(idx.gather(1, order))
        out_sim.append(score.gather(1, order).to(torch.float32))
    if not out_idx:
        return (torch.empty((0, k), dtype=torch.int64, device=dev),
                torch.empty((0, k), dtype=torch.float32, device=dev))
    return torch.cat(out_idx), torch.cat(out_sim)


def topk_cosine(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, *,
                query_ids: Optional[torch.Tensor] = None, bank_ids: Optional[torch.Tensor] = None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, margin: int = 16
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar bank rows of each query, on the tensors' device.

    The torch counterpart of :func:`cribo.topk_cosine`: the ranking is by the
    exact cosine (float64 re-score of the float32 rows, 0 where a row is zero),
    ties to the lowest bank index; see the module docstring for when the float32
    scan's candidate list provably contains the exact top-k.

    Args:
        queries: (M, d) floating tensor.
        bank: (Q, d) floating tensor on the same device, Q >= k.
        k: neighbours per query, 1 <= k <= Q.
        query_ids, bank_ids: optional (M,) and (Q,) integer tensors, given
            together: a bank row with the same id as the query is never returned.
        chunk_bytes: rough memory budget of one step's temporaries (the bank
            and the queries are processed in blocks sized from it).
        margin: candidates kept per query beyond k for the exact re-score.

    Returns:
        ``(indices, similarities)``: (M, k) int64 and (M, k) float32 on the
        queries' device, sorted by exact score (descending), ties to the lowest
        index; where exclusion leaves fewer than k candidates the rest are
        index -1, similarity -inf.
    """
    fn = "topk_cosine"
    q = _float_matrix(queries, fn, "queries")
    b = _float_matrix(bank, fn, "bank", dim=q.shape[1])
    _same_device(b, q.device, fn, "bank")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= b.shape[0]:
        raise ValueError(f"{fn}: k must be an int in [1, {b.shape[0]}] (the bank's rows), got {k!r}")
    if (query_ids is None) != (bank_ids is None):
        raise ValueError(f"{fn}: query_ids and bank_ids must be given together")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"{fn}: margin must be an int >= 0, got {margin!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"{fn}: chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if b.shape[0] >= 1 << 31:
        raise ValueError(f"{fn}: bank holds {b.shape[0]} rows, at most 2^31 - 1 are supported")
    qids = bids = None
    if query_ids is not None:
        qids = _int_vector(query_ids, fn, "query_ids", q.shape[0], q.device)
        bids = _int_vector(bank_ids, fn, "bank_ids", b.shape[0], q.device)
    bank_ = _Bank(b.shape[0], rows=lambda a0, a1: b[a0:a1], take=lambda i: b[i],
                  ids=None if bids is None else (lambda a0, a1: bids[a0:a1]))
    return _search(q, bank_, k, qids, margin, chunk_bytes)


# ----------------------------------------------------------------- the queue
@dataclass(frozen=True)
class Match:
    """Result of :meth:`ObjectQueue.match` for M query objects of width d (device tensors).

    The fields of :class:`cribo.ops.queue.Match`, as torch tensors.

    Attributes:
        index1, index2: (M,) int64 queue addresses (newest first) of the nearest
            view-1 / view-2 entries, -1 where nothing was matched.
        mask1, mask2: (M,) bool, the pair passed its cycle check (never for -1).
        targets1, targets2: (M, d) float32 un-normalised entries (zeros for -1).
        similarity1, similarity2: (M,) float32 cosine similarities (-inf for -1).
    """

    index1: torch.Tensor
    index2: torch.Tensor
    mask1: torch.Tensor
    mask2: torch.Tensor
    targets1: torch.Tensor
    targets2: torch.Tensor
    similarity1: torch.Tensor
    similarity2: torch.Tensor

    @property
    def consistent_fraction(self) -> torch.Tensor:
        """0-d float32 tensor: fraction of (object, view) pairs that passed (0 for none)."""
        n = self.mask1.numel() + self.mask2.numel()
        total = self.mask1.sum() + self.mask2.sum()
        return total.to(torch.float32) / n if n else total.to(torch.float32) * 0


class ObjectQueue:
    """The object queue of :class:`cribo.ObjectQueue` as a ring buffer on a device.

    Same contents and addresses: the valid objects of the last ``capacity``
    images (capacity counts images; an image without objects still takes a
    place), views 1 and 2, newest image first, an entry's address its rank in
    that order.

    Storage: object rows live in a ring of S slots (address a at slot
    ``(head + a) % S``), with each row's image serial number (images are
    numbered as pushed; the first image of a batch gets the highest number, as
    it is the newest) and image id; image counts and ids live in a ring of
    ``capacity`` slots indexed by serial.  Which images are still held is
    known on the host from the serials alone; how many objects they hold is a
    device value, so the host keeps an upper bound instead: the objects of
    every push that still has a held image.  Rows within that bound whose image
    was dropped are masked out of the search (they are always the last
    addresses).  S grows (amortised doubling) when the bound exceeds it, so
    memory is the queue plus at most one batch.

    ``push``, ``match`` and the search make no host round-trip.  The
    properties that report objects (``n_objects``, ``objects1``, ``objects2``,
    ``object_ids``) and ``state_dict`` wait for the device; ``state_dict``
    returns host NumPy arrays (checkpoints live on the CPU), identical in
    layout to :meth:`cribo.ObjectQueue.state_dict`.

    Args:
        capacity: images held (>= 1).
        dim: object width d (>= 1).
        exclude_same_image: when image ids are given, never match an object to
            an entry of the same source image.
        device: where the queue lives (default: the CPU).
    """

    def __init__(self, capacity: int, dim: int, *, exclude_same_image: bool = True,
                 device: Optional[torch.device | str] = None) -> None:
        fn = "ObjectQueue"
        for name, v in (("capacity", capacity), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
        self.capacity, self.dim = int(capacity), int(dim)
        self.exclude_same_image = bool(exclude_same_image)
        self.device = torch.device("cpu" if device is None else device)
        self._reset(0)

    def _reset(self, slots: int) -> None:
        dev = self.device
        self._q1 = torch.zeros((slots, self.dim), dtype=torch.float32, device=dev)
        self._q2 = torch.zeros((slots, self.dim), dtype=torch.float32, device=dev)
        self._serial = torch.zeros(slots, dtype=torch.int64, device=dev)
        self._oid = torch.full((slots,), -1, dtype=torch.int64, device=dev)
        self._img_counts = torch.zeros(self.capacity, dtype=torch.int64, device=dev)
        self._img_ids = torch.full((self.capacity,), -1, dtype=torch.int64, device=dev)
        self._head = 0            # slot of address 0
        self._n_images = 0        # images ever pushed (next serial)
        self._pushes: List[Tuple[int, int]] = []   # (images, objects), newest first
        self._bound = 0           # objects of the pushes in _pushes

    # ---------------------------------------------------------------- views
    def __len__(self) -> int:
        """Images held."""
        return min(self._n_images, self.capacity)

    def _slots(self, addresses: torch.Tensor) -> torch.Tensor:
        return (addresses + self._head) % max(1, self._q1.shape[0])

    def _image_slots(self) -> torch.Tensor:
        serial = self._n_images - 1 - torch.arange(len(self), device=self.device)
        return serial % self.capacity

    @property
    def image_counts(self) -> torch.Tensor:
        """(len,) int64 objects of each held image, newest first."""
        return self._img_counts[self._image_slots()]

    @property
    def image_ids(self) -> torch.Tensor:
        """(len,) int64 id of each held image, newest first (-1 where none was given)."""
        return self._img_ids[self._image_slots()]

    @property
    def n_objects(self) -> int:
        """Objects held per view (waits for the device)."""
        return int(self.image_counts.sum())

    def _live(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[self._slots(torch.arange(self.n_objects, device=self.device))]

    @property
    def objects1(self) -> torch.Tensor:
        """(n_objects, d) view-1 entries, newest first (a copy; waits for the device)."""
        return self._live(self._q1)

    @property
    def objects2(self) -> torch.Tensor:
        """(n_objects, d) view-2 entries, newest first (a copy; waits for the device)."""
        return self._live(self._q2)

    @property
    def object_ids(self) -> torch.Tensor:
        """(n_objects,) source image id of each entry (waits for the device)."""
        return self._live(self._oid)

    def __repr__(self) -> str:
        return (f"ObjectQueue(capacity={self.capacity}, dim={self.dim}, images={len(self)}, "
                f"device={self.device})")

    # ---------------------------------------------------------------- push
    def _objects(self, objects1: Any, objects2: Any, fn: str
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two views' (M, d) float32 objects, checked to sit on the queue's device."""
        o1 = _float_matrix(objects1, fn, "objects1", self.dim)
        o2 = _float_matrix(objects2, fn, "objects2", self.dim)
        _same_device(o1, self.device, fn, "objects1")
        _same_device(o2, self.device, fn, "objects2")
        if o1.shape != o2.shape:
            raise ValueError(f"{fn}: objects1 and objects2 must have the same shape, got "
                             f"{tuple(o1.shape)} and {tuple(o2.shape)}")
        return o1, o2

    def push(self, objects1: torch.Tensor, objects2: torch.Tensor, counts: Any,
             image_ids: Any = None) -> None:
        """Put a batch in front of the queue, then drop the oldest images.

        Args:
            objects1, objects2: (M, d) the batch's valid teacher objects of view
                1 and 2 on the queue's device, image by image.
            counts: (B,) integer objects of each image (sum M; 0 allowed).  The
                sum and signs are checked when ``counts`` is on the CPU; on a
                device they are trusted (checking would wait for the device).
            image_ids: optional (B,) integer ids of the source images.
        """
        fn = "ObjectQueue.push"
        o1, o2 = self._objects(objects1, objects2, fn)
        if isinstance(counts, torch.Tensor) and counts.dim() != 1:
            raise ValueError(f"{fn}: counts must be 1-D (B,), got shape {tuple(counts.shape)}")
        n_b = counts.shape[0] if isinstance(counts, torch.Tensor) else len(counts)
        on_cpu = not isinstance(counts, torch.Tensor) or counts.device.type == "cpu"
        cnt_host = _int_vector(counts, fn, "counts", n_b, torch.device("cpu")) if on_cpu else None
        cnt = _int_vector(counts, fn, "counts", n_b, self.device)
        m = o1.shape[0]
        if cnt_host is not None:
            if bool((cnt_host < 0).any()):
                raise ValueError(f"{fn}: counts must be >= 0")
            if int(cnt_host.sum()) != m:
                raise ValueError(f"{fn}: counts sum to {int(cnt_host.sum())} but objects1 has "
                                 f"{m} rows")
        ids = (torch.full((n_b,), -1, dtype=torch.int64, device=self.device) if image_ids is None
               else _int_vector(image_ids, fn, "image_ids", n_b, self.device))
        if n_b == 0:
            return
        # Serials: the batch's first image is the newest.
        serial = self._n_images + n_b - 1 - torch.arange(n_b, device=self.device)
        keep = min(n_b, self.capacity)      # images beyond capacity are never held
        self._img_counts[serial[:keep] % self.capacity] = cnt[:keep]
        self._img_ids[serial[:keep] % self.capacity] = ids[:keep]
        self._n_images += n_b
        # Host bound: objects of every push with a held image.
        pushes, held, bound = [], 0, 0
        for b, mm in [(n_b, m)] + self._pushes:
            if held >= self.capacity:
                break
            pushes.append((b, mm))
            held += b
            bound += mm
        if bound > self._q1.shape[0]:
            self._grow(max(2 * bound, 64))
        self._pushes, self._bound = pushes, bound
        if m == 0:
            return
        s = self._q1.shape[0]
        self._head = (self._head - m) % s
        slots = self._slots(torch.arange(m, device=self.device))
        self._q1[slots] = o1
        self._q2[slots] = o2
        self._serial[slots] = torch.repeat_interleave(serial, cnt, output_size=m)
        self._oid[slots] = torch.repeat_interleave(ids, cnt, output_size=m)

    def _grow(self, slots: int) -> None:
        """Move addresses [0, bound) to slots [0, bound) of larger buffers."""
        old = self._slots(torch.arange(self._bound, device=self.device))
        for name in ("_q1", "_q2", "_serial", "_oid"):
            a = getattr(self, name)
            out = torch.zeros((slots,) + tuple(a.shape[1:]), dtype=a.dtype, device=a.device)
            out[:self._bound] = a[old]
            setattr(self, name, out)
        self._head = 0

    # ---------------------------------------------------------------- match
    def _bank(self, view: torch.Tensor, with_ids: bool) -> _Bank:
        threshold = self._n_images - self.capacity
        ar = lambda a0, a1: torch.arange(a0, a1, device=self.device)  # noqa: E731
        return _Bank(
            self._bound,
            rows=lambda a0, a1: view[self._slots(ar(a0, a1))],
            take=lambda i: view[self._slots(i)],
            ids=(lambda a0, a1: self._oid[self._slots(ar(a0, a1))]) if with_ids else None,
            alive=lambda a0, a1: self._serial[self._slots(ar(a0, a1))] >= threshold)

    def match(self, objects1: torch.Tensor, objects2: torch.Tensor, image_ids: Any = None, *,
              batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, offset: int = 0,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Match:
        """Nearest queue entries of the batch's objects, with both cycle checks.

        As :meth:`cribo.ObjectQueue.match`: ``a(j)`` is the nearest view-1
        entry to ``objects1[j]`` (the view-1 bank), kept iff the nearest row of
        the batch's view 2 to the view-2 entry of ``a(j)`` is j; symmetrically
        ``b(j)`` against the view-2 bank.  Ties go to the lowest address.

        Args:
            objects1, objects2: (M, d) the batch's valid teacher objects.
            image_ids: optional (M,) integer source image of each object; with
                ``exclude_same_image`` an entry of the same image is never
                matched (the cycle checks search the batch without exclusion).
            batch: optional (all_objects1, all_objects2), each (M_all, d): the
                whole batch across processes, for the cycle checks; the queries
                are its rows ``offset .. offset + M``.
            offset: row of the first query in ``batch``.
            chunk_bytes: memory budget of the search (see :func:`topk_cosine`).

        Returns:
            A :class:`Match` of device tensors; an empty queue matches nothing.
        """
        fn = "ObjectQueue.match"
        o1, o2 = self._objects(objects1, objects2, fn)
        m = o1.shape[0]
        qids = None if image_ids is None else _int_vector(image_ids, fn, "image_ids", m,
                                                          self.device)
        if batch is None:
            cycle, offset = (o1, o2), 0
        else:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"{fn}: batch must be a pair (all_objects1, all_objects2)")
            cycle = (_float_matrix(batch[0], fn, "batch[0]", self.dim),
                     _float_matrix(batch[1], fn, "batch[1]", self.dim))
            if cycle[0].shape != cycle[1].shape:
                raise ValueError(f"{fn}: batch[0] and batch[1] must have the same shape")
            if isinstance(offset, bool) or not isinstance(offset, int) \
                    or not 0 <= offset <= cycle[0].shape[0] - m:
                raise ValueError(f"{fn}: offset must be an int in [0, {cycle[0].shape[0] - m}] "
                                 f"(batch rows minus objects1 rows), got {offset!r}")
        dev = self.device
        index = [torch.full((m,), -1, dtype=torch.int64, device=dev) for _ in range(2)]
        sim = [torch.full((m,), -torch.inf, dtype=torch.float32, device=dev) for _ in range(2)]
        mask = [torch.zeros(m, dtype=torch.bool, device=dev) for _ in range(2)]
        targets = [torch.zeros((m, self.dim), dtype=torch.float32, device=dev) for _ in range(2)]
        if m == 0 or self._bound == 0:
            return Match(index[0], index[1], mask[0], mask[1], targets[0], targets[1],
                         sim[0], sim[1])
        exclude = self.exclude_same_image and qids is not None
        queue = (self._q1, self._q2)
        mine = offset + torch.arange(m, device=dev)
        for v, q in ((0, o1), (1, o2)):
            other = 1 - v
            idx, s = _search(q, self._bank(queue[v], exclude), 1, qids if exclude else None,
                             16, chunk_bytes)
            idx, s = idx[:, 0], s[:, 0]
            found = idx >= 0
            slots = self._slots(idx.clamp(min=0))
            back = queue[other][slots]
            j_back, _ = topk_cosine(back, cycle[other], 1, chunk_bytes=chunk_bytes)
            index[v], sim[v] = idx, s
            mask[v] = found & (j_back[:, 0] == mine)
            targets[v] = torch.where(found[:, None], queue[v][slots], targets[v])
        return Match(index[0], index[1], mask[0], mask[1], targets[0], targets[1], sim[0], sim[1])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """The queue as host NumPy arrays and ints, newest first (waits for the device).

        The same keys, dtypes and layout as :meth:`cribo.ObjectQueue.state_dict`,
        so either class loads the other's state.
        """
        return {
            "capacity": self.capacity,
            "dim": self.dim,
            "exclude_same_image": self.exclude_same_image,
            "objects1": self.objects1.cpu().numpy().copy(),
            "objects2": self.objects2.cpu().numpy().copy(),
            "object_ids": self.object_ids.cpu().numpy().copy(),
            "image_counts": self.image_counts.cpu().numpy().copy(),
            "image_ids": self.image_ids.cpu().numpy().copy(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state of this class or of :class:`cribo.ObjectQueue`.

        Same rules as :meth:`cribo.ObjectQueue.load_state_dict` (checked by the
        same C validator, before anything changes): ``dim`` must match, a state
        with more than ``capacity`` images gives its newest ``capacity``,
        ``exclude_same_image`` is taken from the state.  Arrays may be NumPy
        arrays or tensors on any device; they are copied to the queue's device.

        Args:
            state: a dict from either class's ``state_dict()`` (newest first).
        """
        fn = "ObjectQueue.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{fn}: state must be a dict from state_dict(), got {type(state)}")
        required = ("capacity", "dim", "objects1", "objects2", "object_ids", "image_counts",
                    "image_ids")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"{fn}: state is missing {missing}")

        def host(name: str) -> Any:
            x = state[name]
            return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x

        o1, o2 = as_float32(host("objects1"), fn, "objects1"), as_float32(host("objects2"), fn,
                                                                            "objects2")
        oid = as_int64(host("object_ids"), fn, "object_ids")
        cnt = as_int64(host("image_counts"), fn, "image_counts")
        iid = as_int64(host("image_ids"), fn, "image_ids")
        _C.ObjectQueue_load_state_dict(capacity=state["capacity"], dim=state["dim"], objects1=o1,
                                       objects2=o2, object_ids=oid, image_counts=cnt,
                                       image_ids=iid, queue_dim=self.dim)
        if cnt.shape[0] > self.capacity:
            n_obj = int(cnt[:self.capacity].sum())
            o1, o2, oid = o1[:n_obj], o2[:n_obj], oid[:n_obj]
            cnt, iid = cnt[:self.capacity], iid[:self.capacity]
        self.exclude_same_image = bool(state.get("exclude_same_image", self.exclude_same_image))
        n_img, n_obj = cnt.shape[0], o1.shape[0]
        self._reset(max(2 * n_obj, 64) if n_obj else 0)
        dev = self.device
        serial = n_img - 1 - torch.arange(n_img, device=dev)
        counts = torch.from_numpy(cnt).to(dev)
        self._q1[:n_obj] = torch.from_numpy(o1).to(dev)
        self._q2[:n_obj] = torch.from_numpy(o2).to(dev)
        self._oid[:n_obj] = torch.from_numpy(oid).to(dev)
        self._serial[:n_obj] = torch.repeat_interleave(serial, counts, output_size=n_obj)
        self._img_counts[serial % self.capacity] = counts
        self._img_ids[serial % self.capacity] = torch.from_numpy(iid).to(dev)
        self._n_images = n_img
        self._pushes = [(n_img, n_obj)] if n_img else []
        self._bound = n_obj
