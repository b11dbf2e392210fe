"""topk_cosine and ObjectQueue (C search) against the float64 reference of SPEC §4."""
from __future__ import annotations

import numpy as np
import pytest

import cribo
import reference as ref
from conftest import assert_close_f32


@pytest.mark.parametrize("M,Q,d,k", [(1, 1, 1, 1), (7, 30, 5, 3), (50, 3000, 8, 5),
                                     (600, 2500, 16, 1), (3, 1025, 2, 30)])
def test_topk_matches_reference(M, Q, d, k):
    rng = np.random.default_rng(M + Q + d + k)
    q = rng.standard_normal((M, d)).astype(np.float32)
    b = rng.standard_normal((Q, d)).astype(np.float32)
    idx, sim = cribo.topk_cosine(q, b, k)
    ridx, rsim = ref.topk_cosine(q, b, k)
    assert idx.dtype == np.int64 and sim.dtype == np.float32 and idx.shape == (M, k)
    # Indices may only differ where two similarities are within float32 rounding.
    diff = idx != ridx
    if diff.any():
        assert np.abs(rsim[diff] - np.take_along_axis(
            np.stack([ref.topk_cosine(q[i:i + 1], b, Q)[1][0] for i in range(M)]), idx, 1)[diff]
        ).max() < 1e-6
    assert_close_f32(sim, rsim, reduction=d, scale=1.0)


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
    rows the whole batch would get (SPEC §4, distributed deviation)."""
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
