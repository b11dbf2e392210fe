"""topk_cosine and ObjectQueue (C search) against the float64 reference of docs/method.md §4."""
from __future__ import annotations

import numpy as np
import pytest

import cribo
import reference as ref
from conftest import assert_close_f32


# The search ranks by an exact score (csrc/queue.c): the cosine computed in
# double from the float32 rows, in a fixed order.  Against the float64 reference
# it may only swap two rows whose cosines agree to double rounding (TIE), and rows
# whose scores are equal by construction (copies, and copies times a power of two)
# must come in index order; the similarities are the score rounded to float32.
TIE = 1e-13


def _tie_classes(bank):
    """(Q,) class of each row: copies and power-of-two multiples share a class."""
    mx = np.abs(bank).max(axis=1, keepdims=True)
    _, e = np.frexp(np.where(mx > 0, mx, 1.0))
    return np.unique(np.ldexp(bank.astype(np.float64), -e), axis=0, return_inverse=True)[1]


def _assert_exact_topk(q, bank, k, idx, sim, query_ids=None, bank_ids=None):
    M, Q = len(q), len(bank)
    assert idx.shape == sim.shape == (M, k) and idx.dtype == np.int64 and sim.dtype == np.float32
    full_idx, full_sim = ref.topk_cosine(q, bank, Q)          # every row, float64
    cos = np.empty((M, Q))
    np.put_along_axis(cos, full_idx, full_sim, 1)
    cls = _tie_classes(bank).reshape(-1)
    tied = [c for c in np.unique(cls) if (cls == c).sum() > 1]
    for m in range(M):
        allowed = np.ones(Q, bool) if query_ids is None else bank_ids != query_ids[m]
        expect = full_idx[m][allowed[full_idx[m]]][:k]         # the reference's ranking
        n = expect.size
        got = idx[m, :n]
        assert (idx[m, n:] == -1).all() and np.isneginf(sim[m, n:]).all()
        assert allowed[got].all() and len(set(got.tolist())) == n
        swap = got != expect
        gap = np.abs(cos[m, got[swap]] - cos[m, expect[swap]])
        assert (gap <= TIE).all(), (m, got[swap], expect[swap], gap)
        err = np.abs(sim[m, :n].astype(np.float64) - cos[m, got])
        assert (err <= 2.0**-24 * np.abs(cos[m, got]) + TIE).all(), (m, err.max())
        assert (np.diff(sim[m, :n]) <= 0).all()
        for c in tied:    # equal scores by construction: the lowest indices, in order
            same = np.flatnonzero((cls == c) & allowed)
            mine = got[cls[got] == c]
            np.testing.assert_array_equal(mine, same[:mine.size], err_msg=f"query {m}")


@pytest.mark.parametrize("M,Q,d,k", [(1, 1, 1, 1), (7, 30, 5, 3), (50, 3000, 8, 5),
                                     (60, 2500, 16, 1), (3, 1025, 2, 30)])
def test_topk_matches_reference(M, Q, d, k):
    rng = np.random.default_rng(M + Q + d + k)
    q = rng.standard_normal((M, d)).astype(np.float32)
    b = rng.standard_normal((Q, d)).astype(np.float32)
    idx, sim = cribo.topk_cosine(q, b, k)
    ridx, rsim = ref.topk_cosine(q, b, k)
    assert idx.dtype == np.int64 and sim.dtype == np.float32 and idx.shape == (M, k)
    np.testing.assert_array_equal(idx, ridx)          # random rows: no tie within 1e-13
    assert (np.abs(sim - rsim) <= 2.0**-24 * np.abs(rsim) + TIE).all()


def _adversarial(rng, Q=2600, D=16, n_base=6):
    """A bank (3 blocks of 1024 rows) built to defeat a ranking by float32 sgemm scores.

    Returns (bank, base): copies of the ``base`` rows at 300 positions spread over
    all blocks (exact ties); copies with one component moved by 1 to 3 float32
    ulps (near-ties: for a query near, not on, a base row their cosines differ
    from the copies' by 1e-9..1e-7, below the sgemm's rounding); copies times
    2^40 and 2^-60 (exact ties: a power of two scales the score exactly); copies
    times 1e30 and 1e-30 (norms far outside [1e-19, 1e19]); rows mixing components
    of 1e30 and 1e-30; and zero rows (similarity 0).
    """
    base = rng.standard_normal((n_base, D)).astype(np.float32)
    bank = rng.standard_normal((Q, D)).astype(np.float32)
    near = base[rng.integers(0, n_base, 120)]
    for r, c in enumerate(rng.integers(0, D, 120)):
        for _ in range(1 + r % 3):
            near[r, c] = np.nextafter(near[r, c], np.float32(np.inf))
    mixed = base[rng.integers(0, n_base, 20)] * np.float32(1e-30)
    mixed[:, 0] = np.float32(1e30)
    groups = [base[rng.integers(0, n_base, 300)], near]
    groups += [base[rng.integers(0, n_base, 40)] * np.float32(s)
               for s in (2.0**40, 2.0**-60, 1e30, 1e-30)]
    groups += [mixed, np.zeros((10, D), np.float32)]
    slots = rng.permutation(Q)       # each group at random positions in all blocks
    at = 0
    for g in groups:
        bank[slots[at:at + len(g)]] = g
        at += len(g)
    return bank, base


def _adversarial_queries(rng, base):
    """The base rows, base rows plus a little noise (where near-ties are first-order),
    huge and tiny copies, random rows and a zero row."""
    D = base.shape[1]
    q = np.concatenate([base, base + 0.05 * rng.standard_normal(base.shape),
                        base[:2] * np.float32(1e30), base[2:4] * np.float32(1e-30),
                        rng.standard_normal((3, D)), np.zeros((1, D))])
    return q.astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 40, 2600])
@pytest.mark.parametrize("with_ids", [False, True])
def test_topk_is_exact_on_adversarial_banks(k, with_ids):
    """Duplicates, near-ties, huge, tiny and zero rows, k up to the bank size."""
    rng = np.random.default_rng(k + 7 * with_ids)
    bank, base = _adversarial(rng)
    q = _adversarial_queries(rng, base)
    ids = {}
    if with_ids:
        ids = dict(query_ids=rng.integers(0, 3, len(q)), bank_ids=rng.integers(0, 3, len(bank)))
    idx, sim = cribo.topk_cosine(q, bank, k, **ids)
    _assert_exact_topk(q, bank, k, idx, sim, **ids)


def test_topk_does_not_depend_on_threads_or_query_chunks():
    """Bitwise: 1, 2 and 3 threads; queries in one call (two 1024-row chunks inside
    the kernel) or in chunks of 1, 7 and 500."""
    rng = np.random.default_rng(3)
    bank, base = _adversarial(rng, Q=2300, D=8, n_base=4)
    q = np.concatenate([_adversarial_queries(rng, base),
                        bank[rng.integers(0, len(bank), 1100)]])   # 1114 queries
    ids = dict(query_ids=rng.integers(0, 4, len(q)), bank_ids=rng.integers(0, 4, len(bank)))
    with cribo.num_threads(1):
        idx, sim = cribo.topk_cosine(q, bank, 6, **ids)
    for t in (2, 3):
        with cribo.num_threads(t):
            i2, s2 = cribo.topk_cosine(q, bank, 6, **ids)
        assert i2.tobytes() == idx.tobytes() and s2.tobytes() == sim.tobytes(), t
    for step in (1, 7, 500):
        parts = [cribo.topk_cosine(q[a:a + step], bank, 6, query_ids=ids["query_ids"][a:a + step],
                                   bank_ids=ids["bank_ids"])
                 for a in range(0, len(q), step)]
        assert np.concatenate([p[0] for p in parts]).tobytes() == idx.tobytes(), step
        assert np.concatenate([p[1] for p in parts]).tobytes() == sim.tobytes(), step


def test_topk_bank_of_identical_rows_is_ranked_by_index():
    """Every row ties: all are re-scored exactly (slow path), lowest indices first."""
    rng = np.random.default_rng(4)
    row = rng.standard_normal(24).astype(np.float32)
    bank = np.tile(row, (2100, 1))
    q = np.stack([row, -row, row * np.float32(3.0), rng.standard_normal(24).astype(np.float32)])
    for t in (1, 3):
        with cribo.num_threads(t):
            idx, sim = cribo.topk_cosine(q, bank, 50)
        np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(50), (4, 50)))
        assert (sim == sim[:, :1]).all()
        np.testing.assert_allclose(sim[:3, 0], [1.0, -1.0, 1.0], rtol=2.0**-23)


def test_topk_exclusion_and_missing(rng):
    q = rng.standard_normal((20, 4)).astype(np.float32)
    b = rng.standard_normal((2100, 4)).astype(np.float32)
    qi = rng.integers(0, 3, 20)
    bi = rng.integers(0, 3, 2100)
    idx, sim = cribo.topk_cosine(q, b, 4, query_ids=qi, bank_ids=bi)
    ridx, rsim = ref.topk_cosine(q, b, 4, query_ids=qi, bank_ids=bi)
    np.testing.assert_array_equal(idx, ridx)
    assert (bi[idx] != qi[:, None]).all()
    # Only 2 rows not excluded: the rest are -1 / -inf.
    idx, sim = cribo.topk_cosine(q[:1], b[:5], 4, query_ids=[1], bank_ids=[1, 0, 1, 1, 0])
    np.testing.assert_array_equal(idx[0, 2:], [-1, -1])
    assert np.isneginf(sim[0, 2:]).all() and set(idx[0, :2]) == {1, 4}


def test_topk_ties_go_to_lowest_index_across_blocks_and_threads(rng):
    base = rng.standard_normal((5, 8)).astype(np.float32)
    bank = np.tile(base, (700, 1))  # each row repeated every 5 rows: 3500 rows, 4 blocks
    for t in (1, 2, 3):
        with cribo.num_threads(t):
            idx, _ = cribo.topk_cosine(base, bank, 3)
        np.testing.assert_array_equal(idx, np.arange(5)[:, None] + 5 * np.arange(3))


def test_zero_vectors_have_similarity_zero():
    q = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    b = np.array([[0.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], np.float32)
    idx, sim = cribo.topk_cosine(q, b, 3)
    np.testing.assert_array_equal(idx[0], [0, 1, 2])
    np.testing.assert_array_equal(sim[0], [0, 0, 0])
    np.testing.assert_array_equal(idx[1], [0, 2, 1])
    np.testing.assert_allclose(sim[1], [0, 0, -1])


def _random_batch(rng, B, d, kmax=4):
    counts = rng.integers(0, kmax + 1, B)
    M = int(counts.sum())
    return (rng.standard_normal((M, d)).astype(np.float32),
            rng.standard_normal((M, d)).astype(np.float32), counts)


@pytest.mark.parametrize("with_ids", [False, True])
def test_queue_push_match_sequence_matches_reference(with_ids):
    rng = np.random.default_rng(5 + with_ids)
    d, cap = 6, 9
    q = cribo.ObjectQueue(cap, d)
    rq = ref.RefQueue(cap, d)
    for step in range(12):
        B = int(rng.integers(1, 12))  # sometimes more images than the capacity
        o1, o2, counts = _random_batch(rng, B, d)
        ids = rng.integers(0, 6, B) if with_ids else None
        obj_ids = np.repeat(ids, counts) if with_ids else None
        m = q.match(o1, o2, image_ids=obj_ids)
        q1, q2, qids = rq.arrays()
        r = ref.queue_match(q1, q2, qids, o1, o2, image_ids=obj_ids)
        for key in ("index1", "index2", "mask1", "mask2"):
            np.testing.assert_array_equal(getattr(m, key), r[key], err_msg=f"{key} step {step}")
        assert_close_f32(m.targets1, r["targets1"])
        assert_close_f32(m.targets2, r["targets2"])
        q.push(o1, o2, counts, image_ids=ids)
        rq.push(o1, o2, counts, image_ids=ids)
        assert len(q) == len(rq) and q.n_objects == rq.n_objects
        np.testing.assert_array_equal(q.objects1, rq.arrays()[0].astype(np.float32))


def test_queue_eviction_order():
    q = cribo.ObjectQueue(3, 1)
    q.push([[1.0], [2.0]], [[1.0], [2.0]], [1, 1], image_ids=[10, 11])
    q.push([[3.0]], [[3.0]], [1, 0], image_ids=[12, 13])  # image 13 has no object
    # newest first: 12, 13 (empty), 10; image 11 dropped.
    np.testing.assert_array_equal(q.image_ids, [12, 13, 10])
    np.testing.assert_array_equal(q.objects1[:, 0], [3.0, 1.0])
    q.push(np.zeros((5, 1)), np.zeros((5, 1)), [1, 1, 1, 1, 1], image_ids=[1, 2, 3, 4, 5])
    np.testing.assert_array_equal(q.image_ids, [1, 2, 3])  # a block > capacity keeps its first


def test_empty_queue_matches_nothing(rng):
    q = cribo.ObjectQueue(10, 4)
    m = q.match(rng.standard_normal((3, 4)), rng.standard_normal((3, 4)))
    assert (m.index1 == -1).all() and not m.mask1.any() and not m.mask2.any()
    assert (m.targets1 == 0).all() and m.consistent_fraction == 0.0


def test_object_is_not_matched_to_its_own_copy(rng):
    """On a data set smaller than the queue, ids keep an object from its last-epoch copy."""
    q = cribo.ObjectQueue(100, 8)
    o1, o2, counts = _random_batch(rng, 6, 8)
    ids = np.arange(6)
    q.push(o1, o2, counts, image_ids=ids)
    obj_ids = np.repeat(ids, counts)
    m_plain = q.match(o1, o2)
    assert (m_plain.index1 == np.arange(len(o1))).all()  # finds itself
    m = q.match(o1, o2, image_ids=obj_ids)
    assert (q.object_ids[m.index1[m.index1 >= 0]] != obj_ids[m.index1 >= 0]).all()


def test_state_dict_round_trip(rng):
    q = cribo.ObjectQueue(7, 5)
    for _ in range(4):
        o1, o2, counts = _random_batch(rng, 3, 5)
        q.push(o1, o2, counts, image_ids=rng.integers(0, 9, 3))
    state = q.state_dict()
    q2 = cribo.ObjectQueue(7, 5)
    q2.load_state_dict(state)
    o1, o2, counts = _random_batch(rng, 4, 5)
    a, b = q.match(o1, o2), q2.match(o1, o2)
    np.testing.assert_array_equal(a.index1, b.index1)
    np.testing.assert_array_equal(a.mask2, b.mask2)
    q.push(o1, o2, counts)
    q2.push(o1, o2, counts)
    np.testing.assert_array_equal(q.objects2, q2.objects2)
    np.testing.assert_array_equal(q.image_counts, q2.image_counts)


def test_match_split_over_processes_equals_one_process(rng):
    """Cycle checks against the gathered batch: each share of a split batch gets the
    rows the whole batch would get (docs/method.md §4, distributed deviation)."""
    q = cribo.ObjectQueue(50, 6)
    for _ in range(5):
        o1, o2, counts = _random_batch(rng, 6, 6)
        q.push(o1, o2, counts)
    o1, o2, _ = _random_batch(rng, 10, 6)
    whole = q.match(o1, o2)
    cut = len(o1) // 3
    parts = [q.match(o1[a:b], o2[a:b], batch=(o1, o2), offset=a)
             for a, b in ((0, cut), (cut, len(o1)))]
    for key in ("index1", "index2", "mask1", "mask2"):
        np.testing.assert_array_equal(np.concatenate([getattr(p, key) for p in parts]),
                                      getattr(whole, key))
    # A batch that does not hold the queries at the offset is refused.
    with pytest.raises(ValueError, match="batch must be"):
        q.match(o1[:2], o2[:2], batch=(o1[:1], o2[:1]), offset=0)


def test_state_from_a_larger_queue_keeps_the_newest_images(rng):
    """load_state_dict keeps the receiving queue's capacity: from a larger queue it
    takes the newest images, and then behaves as a queue of its capacity built by
    the same pushes (bitwise), never holding more than its capacity."""
    d = 5
    big = cribo.ObjectQueue(9, d)
    pushed = cribo.ObjectQueue(3, d)
    rq = ref.RefQueue(3, d)
    for _ in range(4):
        o1, o2, counts = _random_batch(rng, 3, d)
        ids = rng.integers(0, 20, 3)
        for q in (big, pushed, rq):
            q.push(o1, o2, counts, image_ids=ids)
    assert len(big) == 9
    small = cribo.ObjectQueue(3, d)
    small.load_state_dict(big.state_dict())
    assert small.capacity == 3 and len(small) == 3
    a, b = small.state_dict(), pushed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key
    r1, r2, rids = rq.arrays()
    np.testing.assert_array_equal(small.objects1, r1.astype(np.float32))
    np.testing.assert_array_equal(small.object_ids, rids)
    for _ in range(3):
        o1, o2, counts = _random_batch(rng, 2, d)
        ids = rng.integers(0, 20, 2)
        m, m_ref = small.match(o1, o2, np.repeat(ids, counts)), \
            pushed.match(o1, o2, np.repeat(ids, counts))
        for key in ("index1", "index2", "mask1", "mask2", "similarity1", "similarity2"):
            assert getattr(m, key).tobytes() == getattr(m_ref, key).tobytes(), key
        small.push(o1, o2, counts, image_ids=ids)
        pushed.push(o1, o2, counts, image_ids=ids)
        assert len(small) == len(pushed) <= 3
        np.testing.assert_array_equal(small.objects2, pushed.objects2)
    # A smaller state into a larger queue: restored whole, the capacity stays.
    large = cribo.ObjectQueue(9, d)
    large.load_state_dict(pushed.state_dict())
    assert large.capacity == 9 and len(large) == len(pushed)
    for _ in range(4):
        o1, o2, counts = _random_batch(rng, 2, d)
        large.push(o1, o2, counts)
    assert len(large) == 9
