"""cribo.nn.torch_ops.queue against the C core (cribo.topk_cosine, cribo.ObjectQueue)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cribo
from cribo.nn.torch_ops import queue as tq

FIELDS_EXACT = ("index1", "index2", "mask1", "mask2")
FIELDS_CLOSE = ("targets1", "targets2", "similarity1", "similarity2")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _separated(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Random rows; cosines between random 32-d rows differ far above float32 rounding."""
    return (rng.standard_normal((n, d)) * rng.uniform(0.1, 10.0, (n, 1))).astype(np.float32)


def _check_topk(q, b, k, **kw):
    ids_c = {k2: v for k2, v in kw.items() if k2 in ("query_ids", "bank_ids")}
    i_c, s_c = cribo.topk_cosine(q, b, k, **ids_c)
    ids_t = {k2: _t(v) for k2, v in ids_c.items()}
    extra = {k2: v for k2, v in kw.items() if k2 not in ids_c}
    i_t, s_t = tq.topk_cosine(_t(q), _t(b), k, **ids_t, **extra)
    assert i_t.dtype == torch.int64 and s_t.dtype == torch.float32
    np.testing.assert_array_equal(i_t.numpy(), i_c)
    np.testing.assert_allclose(s_t.numpy(), s_c, rtol=0, atol=1e-6)
    return i_t, s_t


def test_topk_matches_c_core_on_separated_data():
    rng = np.random.default_rng(0)
    q, b = _separated(rng, 37, 32), _separated(rng, 301, 32)
    _check_topk(q, b, 7)


@pytest.mark.parametrize("chunk_bytes", [1, 50_000, 333_333, 10**8])
def test_topk_chunks(chunk_bytes):
    """One row at a time, uneven blocks of queries and bank rows, one block."""
    rng = np.random.default_rng(1)
    q, b = _separated(rng, 53, 32), _separated(rng, 257, 32)
    _check_topk(q, b, 5, chunk_bytes=chunk_bytes)


def test_topk_block_sizes_split_unevenly():
    assert tq._blocks(53, 32, 21, 1) == (1, 1)
    for chunk_bytes in (50_000, 333_333):
        mq, nb = tq._blocks(53, 32, 21, chunk_bytes)
        assert 1 < mq < 53 and 53 % mq and 1 < nb < 257 and 257 % nb
    mq, nb = tq._blocks(53, 32, 21, 10**8)
    assert mq == 53 and nb >= 257


def test_topk_k_equals_bank_size():
    rng = np.random.default_rng(2)
    q, b = _separated(rng, 9, 32), _separated(rng, 23, 32)
    i_t, _ = _check_topk(q, b, 23, chunk_bytes=3_000, margin=2)
    assert sorted(i_t[0].tolist()) == list(range(23))


def test_topk_duplicates_go_to_lowest_index():
    rng = np.random.default_rng(3)
    base = _separated(rng, 20, 32)
    # Bank: the 20 rows, then exact copies (scaled by powers of 2), in shuffled places.
    b = np.concatenate([base, base * 4.0, base[::-1] * 0.5])
    q = base[:6] + 0.01 * rng.standard_normal((6, 32)).astype(np.float32)
    for chunk in (1_500, 10**7):
        i_t, s_t = _check_topk(q, b, 3, chunk_bytes=chunk)
        np.testing.assert_array_equal(i_t[:, 0].numpy(), np.arange(6))  # lowest copy
        # The three copies of row j: equal similarities, ascending indices.
        assert (s_t[:, 0] == s_t[:, 1]).all() and (s_t[:, 1] == s_t[:, 2]).all()
        assert (i_t[:, 0] < i_t[:, 1]).all() and (i_t[:, 1] < i_t[:, 2]).all()


def test_topk_zero_rows_score_zero():
    rng = np.random.default_rng(4)
    b = _separated(rng, 10, 32)
    b[3] = 0
    q = np.zeros((2, 32), np.float32)
    q[1] = b[5]
    _check_topk(q, b, 10)


def test_topk_exclusion_with_ids():
    rng = np.random.default_rng(5)
    q, b = _separated(rng, 40, 32), _separated(rng, 120, 32)
    qid, bid = rng.integers(0, 4, 40), rng.integers(0, 4, 120)
    _check_topk(q, b, 3, query_ids=qid, bank_ids=bid, chunk_bytes=4_000)
    # Too few candidates: -1 / -inf padding, as in the C core.
    bid2 = np.repeat(np.arange(4), 30)
    bid2[:118] = 0
    i_t, s_t = _check_topk(q, b, 5, query_ids=np.zeros(40, np.int64) + 0, bank_ids=bid2)
    assert (i_t[:, 2:] == -1).all() and torch.isinf(s_t[:, 2:]).all()


def test_topk_bad_arguments():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="bank"):
        tq.topk_cosine(x, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="k must"):
        tq.topk_cosine(x, torch.zeros(5, 4), 6)
    with pytest.raises(TypeError, match="queries"):
        tq.topk_cosine(np.zeros((3, 4)), torch.zeros(5, 4))
    with pytest.raises(TypeError, match="bank"):
        tq.topk_cosine(x, torch.zeros(5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="together"):
        tq.topk_cosine(x, torch.zeros(5, 4), query_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="query_ids"):
        tq.topk_cosine(x, torch.zeros(5, 4), query_ids=torch.zeros(2, dtype=torch.int64),
                       bank_ids=torch.zeros(5, dtype=torch.int64))


# ----------------------------------------------------------------- the queue
def _compare_match(mc, mt):
    for f in FIELDS_EXACT:
        np.testing.assert_array_equal(getattr(mt, f).numpy(), getattr(mc, f), err_msg=f)
    for f in FIELDS_CLOSE:
        np.testing.assert_allclose(getattr(mt, f).numpy(), getattr(mc, f), rtol=0, atol=1e-6,
                                   err_msg=f)


def _compare_state(c, t):
    sc, st = c.state_dict(), t.state_dict()
    assert sc.keys() == st.keys()
    for key in sc:
        if isinstance(sc[key], np.ndarray):
            assert st[key].dtype == sc[key].dtype, key
            np.testing.assert_array_equal(st[key], sc[key], err_msg=key)
        else:
            assert st[key] == sc[key], key
    np.testing.assert_array_equal(t.image_counts.numpy(), c.image_counts)
    assert len(t) == len(c) and t.n_objects == c.n_objects


def _batch(rng, d, max_images=5, max_objects=4, ids_upto=12):
    n_b = int(rng.integers(1, max_images + 1))
    cnt = rng.integers(0, max_objects + 1, n_b)
    m = int(cnt.sum())
    # Objects near a few shared prototypes, so that cycle checks pass and fail.
    protos = rng.standard_normal((6, d)).astype(np.float32)
    o1 = protos[rng.integers(0, 6, m)] + 0.3 * rng.standard_normal((m, d)).astype(np.float32)
    o2 = o1 + 0.3 * rng.standard_normal((m, d)).astype(np.float32)
    return o1, o2, cnt, rng.integers(0, ids_upto, n_b)


@pytest.mark.parametrize("exclude", [True, False])
def test_queue_sequence_matches_c_core_with_wraparound(exclude):
    rng = np.random.default_rng(10)
    d, cap = 16, 7
    c, t = cribo.ObjectQueue(cap, d, exclude_same_image=exclude), \
        tq.ObjectQueue(cap, d, exclude_same_image=exclude)
    passed = 0
    for step in range(14):
        o1, o2, cnt, ids = _batch(rng, d, max_images=9 if step == 6 else 4)  # one block > cap
        obj_ids = np.repeat(ids, cnt)
        mc = c.match(o1, o2, obj_ids)
        mt = t.match(_t(o1), _t(o2), _t(obj_ids))
        _compare_match(mc, mt)
        passed += int(mc.mask1.sum() + mc.mask2.sum())
        if step % 3 == 0:
            _compare_match(c.match(o1, o2), t.match(_t(o1), _t(o2)))
        c.push(o1, o2, cnt, ids if step % 4 else None)
        t.push(_t(o1), _t(o2), _t(cnt), _t(ids) if step % 4 else None)
        _compare_state(c, t)
    assert passed > 0 and c.n_objects > 0 and len(c) == cap


def test_queue_empty_and_batch_offset():
    rng = np.random.default_rng(11)
    d = 8
    c, t = cribo.ObjectQueue(4, d), tq.ObjectQueue(4, d)
    o1, o2, cnt, ids = _batch(rng, d)
    mt = t.match(_t(o1), _t(o2))
    _compare_match(c.match(o1, o2), mt)
    assert not mt.mask1.any() and (mt.index1 == -1).all()
    c.push(np.zeros((0, d), np.float32), np.zeros((0, d), np.float32), [0, 0])
    t.push(torch.zeros(0, d), torch.zeros(0, d), torch.zeros(2, dtype=torch.int64))
    _compare_match(c.match(o1, o2), t.match(_t(o1), _t(o2)))
    c.push(o1, o2, cnt, ids)
    t.push(_t(o1), _t(o2), _t(cnt), _t(ids))
    a1, a2, _, _ = _batch(rng, d, max_images=5)
    big1, big2 = np.concatenate([a1, o1, a1]), np.concatenate([a2, o2, a2])
    mc = c.match(o1, o2, batch=(big1, big2), offset=len(a1))
    mt = t.match(_t(o1), _t(o2), batch=(_t(big1), _t(big2)), offset=len(a1))
    _compare_match(mc, mt)


@pytest.mark.parametrize("direction", ["c_to_torch", "torch_to_c"])
def test_state_dict_interchange(direction):
    rng = np.random.default_rng(12)
    d = 16
    src = cribo.ObjectQueue(6, d) if direction == "c_to_torch" else tq.ObjectQueue(6, d)
    ref = cribo.ObjectQueue(6, d)
    for _ in range(5):
        o1, o2, cnt, ids = _batch(rng, d)
        ref.push(o1, o2, cnt, ids)
        if isinstance(src, tq.ObjectQueue):
            src.push(_t(o1), _t(o2), _t(cnt), _t(ids))
        else:
            src.push(o1, o2, cnt, ids)
    state = src.state_dict()
    dst = tq.ObjectQueue(6, d) if direction == "c_to_torch" else cribo.ObjectQueue(6, d)
    dst.load_state_dict(state)
    # A smaller destination keeps the newest images, as the C core does.
    small_c, small_t = cribo.ObjectQueue(2, d), tq.ObjectQueue(2, d)
    small_c.load_state_dict(state)
    small_t.load_state_dict(state)
    _compare_state(small_c, small_t)
    o1, o2, cnt, ids = _batch(rng, d)
    obj = np.repeat(ids, cnt)
    mr = ref.match(o1, o2, obj)
    md = dst.match(_t(o1), _t(o2), _t(obj)) if isinstance(dst, tq.ObjectQueue) \
        else dst.match(o1, o2, obj)
    if isinstance(dst, tq.ObjectQueue):
        _compare_match(mr, md)
        _compare_state(ref, dst)
    else:
        for f in FIELDS_EXACT + FIELDS_CLOSE:
            np.testing.assert_array_equal(getattr(md, f), getattr(mr, f), err_msg=f)
    # Pushing on after the load continues identically.
    ref.push(o1, o2, cnt, ids)
    if isinstance(dst, tq.ObjectQueue):
        dst.push(_t(o1), _t(o2), _t(cnt), _t(ids))
        _compare_state(ref, dst)


def test_queue_bad_arguments():
    t = tq.ObjectQueue(3, 4)
    with pytest.raises(ValueError, match="capacity"):
        tq.ObjectQueue(0, 4)
    with pytest.raises(ValueError, match="objects1"):
        t.push(torch.zeros(2, 5), torch.zeros(2, 5), [1, 1])
    with pytest.raises(ValueError, match="counts"):
        t.push(torch.zeros(2, 4), torch.zeros(2, 4), [1, 2])
    with pytest.raises(ValueError, match="image_ids"):
        t.push(torch.zeros(2, 4), torch.zeros(2, 4), [1, 1], image_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="objects2"):
        t.match(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="offset"):
        t.match(torch.zeros(2, 4), torch.zeros(2, 4), batch=(torch.zeros(2, 4),) * 2, offset=1)
    with pytest.raises(ValueError):
        t.load_state_dict(cribo.ObjectQueue(3, 5).state_dict())


def test_no_host_round_trip(monkeypatch):
    """push, match and topk_cosine never call .cpu(), .numpy(), .item() or .tolist()."""
    rng = np.random.default_rng(13)
    d = 8
    t = tq.ObjectQueue(3, d)
    batches = [_batch(rng, d) for _ in range(4)]
    tensors = [(_t(o1), _t(o2), _t(cnt), _t(ids)) for o1, o2, cnt, ids in batches]

    def boom(*args, **kwargs):
        raise AssertionError("host round-trip")

    with monkeypatch.context() as mp:
        for name in ("cpu", "numpy", "item", "tolist"):
            mp.setattr(torch.Tensor, name, boom)
        with pytest.raises(AssertionError, match="host round-trip"):
            torch.zeros(1).item()          # the guard works
        for o1, o2, cnt, ids in tensors:
            obj = torch.repeat_interleave(ids, cnt)
            t.match(o1, o2, obj)
            t.push(o1, o2, cnt, ids)
        tq.topk_cosine(tensors[0][0], tensors[1][0], 1, chunk_bytes=500)
    assert len(t) == 3


def test_unmatched_object_never_passes_its_cycle_check():
    """Exclusion leaves nothing: -1, no mask, even where entry 0 would point back to j."""
    rng = np.random.default_rng(14)
    d = 8
    o1, o2 = _separated(rng, 3, d), _separated(rng, 3, d)
    c, t = cribo.ObjectQueue(4, d), tq.ObjectQueue(4, d)
    c.push(o1, o2, [3], [7])
    t.push(_t(o1), _t(o2), _t(np.array([3])), _t(np.array([7])))
    obj = np.full(3, 7)
    mc, mt = c.match(o1, o2, obj), t.match(_t(o1), _t(o2), _t(obj))
    _compare_match(mc, mt)
    assert (mt.index1 == -1).all() and not mt.mask1.any() and not mt.mask2.any()
    assert float(mt.consistent_fraction) == 0.0
    m_free = t.match(_t(o1), _t(o2))   # without ids: each object finds itself, cycles pass
    assert m_free.mask1.all() and float(m_free.consistent_fraction) == 1.0
