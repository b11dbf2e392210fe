"""Property tests of the C operators (docs/contributing.md, "Test conventions" 4 and 5).

Batch independence and determinism of the clustering, bitwise thread-count
independence of every operator, algebraic properties of pooling and the losses,
top-k optimality and tie-breaking, extreme inputs, and the object queue against
the list-of-images model in tests/reference.py.  Float data come from NumPy
generators seeded by hypothesis, so shrinking acts on shapes and seeds.

One file for the properties of every operator (longer than most) because they
share the strategies at its top and are run together under each BLAS kernel by
tests/ops/test_blas_kernels.py.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cribo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from test_queue import _assert_exact_topk  # noqa: E402

F32 = np.float32
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**32 - 1)


def bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def scene(rng, B, N, D, spread=10.0):
    tok = rng.standard_normal((B, 2, N, D)).astype(F32)
    pos = (rng.random((B, 2, N, 2)) * spread).astype(F32)
    return tok, pos


@st.composite
def cluster_problem(draw, max_b=4, max_n=10, max_d=6):
    B = draw(st.integers(1, max_b))
    N = draw(st.integers(1, max_n))
    D = draw(st.integers(1, max_d))
    K = draw(st.integers(1, 2 * N))
    kw = dict(
        pos_weight=draw(st.sampled_from([0.0, 2.0])),
        sinkhorn_lambda=draw(st.sampled_from([20.0, 80.0, 500.0])),
        sinkhorn_iters=draw(st.integers(0, 5)),
        n_iters=draw(st.integers(1, 4)),
        update_marginals=draw(st.booleans()),
    )
    return B, N, D, K, kw, draw(seeds)


# ============================================================================
# clustering: an image's clusters depend on that image alone
# ============================================================================

@SETTINGS
@given(cluster_problem(), st.data())
def test_cluster_image_does_not_depend_on_batch_mates_or_order(problem, data):
    B, N, D, K, kw, seed = problem
    rng = np.random.default_rng(seed)
    tok, pos = scene(rng, B, N, D)
    # Same positions for many tokens too (distance-0 members are ignored).
    if data.draw(st.booleans()):
        pos[..., : N // 2, :] = pos[..., :1, :]
    int_seed = data.draw(seeds)
    base = cribo.cluster(tok, pos, K, seed=int_seed, return_plan=True, **kw)

    extra = data.draw(st.integers(0, 3))
    tok_x, pos_x = scene(rng, extra, N, D)
    tok2 = np.concatenate([tok, tok_x])
    pos2 = np.concatenate([pos, pos_x])
    order = np.array(data.draw(st.permutations(range(B + extra))))
    threads = data.draw(st.sampled_from([1, 2, 3]))
    with cribo.num_threads(threads):
        other = cribo.cluster(tok2[order], pos2[order], K, seed=int_seed, return_plan=True, **kw)
        # Explicit init, moved with the images, gives the same as the seed did.
        init2 = np.concatenate([base.init, cribo.draw_init(extra, N, K, int_seed)])[order]
        other_init = cribo.cluster(tok2[order], pos2[order], K, init=init2, return_plan=True,
                                   **kw)
    where = np.argsort(order)  # new position of old image i
    for i in range(B):
        j = where[i]
        for res in (other, other_init):
            assert bitwise_equal(res.labels[j], base.labels[i])
            assert bitwise_equal(res.counts[j], base.counts[i])
            assert bitwise_equal(res.valid[j], base.valid[i])
            assert bitwise_equal(res.plan[j], base.plan[i])
            assert bitwise_equal(res.init[j], base.init[i])


@SETTINGS
@given(cluster_problem(), st.data())
def test_per_image_seeds_follow_their_images(problem, data):
    B, N, D, K, kw, seed = problem
    rng = np.random.default_rng(seed)
    tok, pos = scene(rng, B, N, D)
    image_seeds = rng.integers(0, 2**40, B)
    base = cribo.cluster(tok, pos, K, seed=image_seeds, **kw)
    order = np.array(data.draw(st.permutations(range(B))))
    moved = cribo.cluster(tok[order], pos[order], K, seed=image_seeds[order], **kw)
    assert bitwise_equal(moved.labels, base.labels[order])
    assert bitwise_equal(moved.init, base.init[order])
    for b in range(B):
        assert len(set(base.init[b].tolist())) == K
        assert base.init[b].min() >= 0 and base.init[b].max() < 2 * N


@SETTINGS
@given(cluster_problem())
def test_cluster_same_seed_same_result_bitwise(problem):
    B, N, D, K, kw, seed = problem
    tok, pos = scene(np.random.default_rng(seed), B, N, D)
    a = cribo.cluster(tok, pos, K, seed=seed % 1000, return_plan=True, **kw)
    b = cribo.cluster(tok, pos, K, seed=seed % 1000, return_plan=True, **kw)
    for f in ("labels", "counts", "valid", "init", "plan"):
        assert bitwise_equal(getattr(a, f), getattr(b, f)), f
    assert a.labels.min() >= 0 and a.labels.max() < K
    np.testing.assert_array_equal(a.counts.sum(axis=2), N)
    np.testing.assert_array_equal(a.valid, (a.counts[:, 0] > 0) & (a.counts[:, 1] > 0))


# ============================================================================
# clustering is scale-invariant (the tokens are L2-normalised first)
# ============================================================================

@SETTINGS
@given(cluster_problem(), st.sampled_from([2.0**-100, 2.0**-60, 2.0**60, 2.0**100]))
def test_cluster_is_bitwise_invariant_under_power_of_two_scaling(problem, scale):
    """Scaling by a power of two is exact in float and cancels exactly in the
    normalisation (done in double), so every result is bitwise the same, for any
    tokens -- including magnitudes whose float squares overflow (2^100) or
    underflow (2^-100)."""
    B, N, D, K, kw, seed = problem
    tok, pos = scene(np.random.default_rng(seed), B, N, D)
    a = cribo.cluster(tok, pos, K, seed=seed % 1000, return_plan=True, **kw)
    b = cribo.cluster(tok * F32(scale), pos, K, seed=seed % 1000, return_plan=True, **kw)
    for f in ("labels", "counts", "valid", "plan"):
        assert bitwise_equal(getattr(a, f), getattr(b, f)), f


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 4), st.integers(1, 4), st.integers(0, 4),
       st.sampled_from([1e-30, 1e-10, 1e10, 1e30]), seeds)
def test_cluster_labels_are_invariant_under_any_scaling(B, K, per, extra_dims, scale, seed):
    """Well-separated objects (K orthogonal prototypes, ``per`` tokens of each in each
    view, plus 5% noise) give the same labels at any finite scale of the tokens:
    the ground truth, at 1 and at 1e+-10 and 1e+-30 (where float squares overflow
    or underflow)."""
    rng = np.random.default_rng(seed)
    D, N = K + extra_dims, K * per
    protos = np.linalg.qr(rng.standard_normal((D, K)))[0].T          # (K, D) orthonormal
    groups = np.stack([rng.permutation(np.arange(2 * N) % K) for _ in range(B)])   # (B, 2N)
    tok = protos[groups] + 0.05 * rng.standard_normal((B, 2 * N, D))
    tok *= rng.uniform(0.5, 2.0, (B, 2 * N, 1))                       # norms do not matter
    tok = np.copysign(np.maximum(np.abs(tok), 1e-3), tok)   # x 1e-30 stays a normal float
    tok = tok.reshape(B, 2, N, D).astype(F32)
    pos = (rng.random((B, 2, N, 2)) * 10).astype(F32)
    init = np.stack([[np.flatnonzero(g == k)[0] for k in range(K)] for g in groups])
    big = tok * F32(scale)
    assert np.isfinite(big).all() and np.abs(big).min() > 1e-36   # finite, not subnormal
    kw = dict(init=init, pos_weight=0.0, sinkhorn_lambda=20.0)
    a = cribo.cluster(tok, pos, K, **kw)
    np.testing.assert_array_equal(a.labels.reshape(B, 2 * N), groups)
    b = cribo.cluster(big, pos, K, **kw)
    np.testing.assert_array_equal(b.labels, a.labels)


# ============================================================================
# results do not depend on the number of threads (bitwise)
# ============================================================================

def _under_threads(fn):
    out = []
    for t in (1, 2, 3):
        with cribo.num_threads(t):
            r = fn()
        out.append(r if isinstance(r, tuple) else (r,))
    for r in out[1:]:
        assert len(r) == len(out[0])
        for x, y in zip(r, out[0]):
            assert bitwise_equal(x, y)
    return out[0]


@FEW
@given(cluster_problem(max_b=6), st.booleans())
def test_threads_cluster(problem, plan):
    B, N, D, K, kw, seed = problem
    tok, pos = scene(np.random.default_rng(seed), B, N, D)

    def run():
        c = cribo.cluster(tok, pos, K, seed=seed % 97, return_plan=plan, **kw)
        return (c.labels, c.counts, c.init) + ((c.plan,) if plan else ())
    _under_threads(run)


@FEW
@given(st.integers(1, 5), st.integers(1, 9), st.integers(1, 7), st.integers(1, 6), seeds)
def test_threads_pool_hard_and_soft(B, N, D, K, seed):
    rng = np.random.default_rng(seed)
    tok = rng.standard_normal((B, 2, N, D)).astype(F32)
    lab = rng.integers(-1, K, (B, 2, N))
    w = rng.random((B, 2, N, K)).astype(F32) * (rng.random((B, 2, N, K)) > 0.3)
    g = rng.standard_normal((B, 2, K, D)).astype(F32)
    _under_threads(lambda: (cribo.pool(tok, lab, K), cribo.pool(tok, w),
                            cribo.pool_backward(g, lab, K), cribo.pool_backward(g, w)))


@FEW
@given(st.integers(1, 40), st.sampled_from([7, 1024, 1025, 2500]), st.integers(1, 9),
       st.integers(1, 5), st.booleans(), seeds)
def test_threads_topk(M, Q, D, k, with_ids, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((M, D)).astype(F32)
    bank = rng.standard_normal((Q, D)).astype(F32)
    bank[rng.integers(0, Q, Q // 3)] = bank[rng.integers(0, Q, Q // 3)]  # exact duplicates
    k = min(k, Q)
    ids = dict(query_ids=rng.integers(0, 5, M), bank_ids=rng.integers(0, 5, Q)) if with_ids \
        else {}
    _under_threads(lambda: cribo.topk_cosine(q, bank, k, **ids))


@FEW
@given(st.integers(0, 9), st.sampled_from([1, 5, 300, 1025, 3000]), seeds)
def test_threads_losses_and_center(R, L, seed):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((R, L)).astype(F32) * 3
    t = rng.standard_normal((R, L)).astype(F32) * 3
    c = rng.standard_normal(L).astype(F32)
    _under_threads(lambda: cribo.softmax_cross_entropy(s, t, center=c, student_temp=0.1,
                                                       teacher_temp=0.04))
    _under_threads(lambda: cribo.update_center(c, t, 0.9))
    if R >= 1:
        M = R
        so, to, tn = (rng.standard_normal((2, M, L)).astype(F32) for _ in range(3))
        sg, tg = (rng.standard_normal((2, R, L)).astype(F32) for _ in range(2))
        m1, m2 = rng.random(M) > 0.5, rng.random(M) > 0.5

        def run():
            r = cribo.cribo_losses(sg, tg, so, to, tn, m1, m2, center_global=c, center_objects=c)
            return (np.float64(r.total), r.grad_global, r.grad_objects, r.center_global,
                    r.center_objects)
        _under_threads(run)


@FEW
@given(st.integers(1, 6), st.integers(0, 12), st.booleans(), seeds)
def test_threads_queue_match(capacity, M, with_ids, seed):
    rng = np.random.default_rng(seed)
    d = 6
    q = cribo.ObjectQueue(capacity, d)
    for _ in range(3):
        counts = rng.integers(0, 4, rng.integers(1, capacity + 2))
        n = int(counts.sum())
        q.push(rng.standard_normal((n, d)), rng.standard_normal((n, d)), counts,
               rng.integers(0, 4, counts.size) if with_ids else None)
    t1, t2 = rng.standard_normal((M, d)), rng.standard_normal((M, d))
    ids = rng.integers(0, 4, M) if with_ids else None

    def run():
        m = q.match(t1, t2, image_ids=ids)
        return (m.index1, m.index2, m.mask1, m.mask2, m.targets1, m.targets2, m.similarity1,
                m.similarity2)
    _under_threads(run)


# ============================================================================
# losses
# ============================================================================

@SETTINGS
@given(st.integers(1, 6), st.integers(1, 300), st.floats(0.01, 30.0),
       st.sampled_from([0.1, 0.5, 1.0]), st.sampled_from([0.01, 0.04, 0.07, 1.0]),
       st.booleans(), seeds)
def test_softmax_cross_entropy_gradient_rows_sum_to_zero_and_loss_is_nonnegative(R, L, scale, ts, tt,
                                                                 with_center, seed):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((R, L)) * scale).astype(F32)
    t = (rng.standard_normal((R, L)) * scale).astype(F32)
    c = (rng.standard_normal(L) * scale).astype(F32) if with_center else None
    loss, grad = cribo.softmax_cross_entropy(s, t, center=c, student_temp=ts, teacher_temp=tt)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    # Rounding of logits of size |s|/ts in float32.
    slack = 1e-6 * (1.0 + float(np.abs(s).max()) / ts)
    assert (loss >= -slack).all(), loss.min()
    # Each row of grad is (p_s - p_t) / ts: both are distributions.
    row = grad.astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(row, 0.0, atol=1e-5 * (1.0 + 1.0 / ts))
    assert (grad.astype(np.float64) * ts >= -1.0 - 1e-6).all()
    assert (grad.astype(np.float64) * ts <= 1.0 + 1e-6).all()


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 2000), seeds)
def test_extreme_logits_stay_finite(R, L, seed):
    rng = np.random.default_rng(seed)
    s = rng.choice([-1e4, 1e4], (R, L)).astype(F32) * rng.random((R, L)).astype(F32)
    t = rng.choice([-1e4, 1e4], (R, L)).astype(F32)
    s[:, 0], t[:, -1] = 1e4, -1e4
    loss, grad = cribo.softmax_cross_entropy(s, t, student_temp=0.1, teacher_temp=0.01)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert (loss >= -1e-6 * 1e5).all()
    np.testing.assert_allclose(grad.astype(np.float64).sum(axis=1), 0.0, atol=1e-3)
    # Compare with the float64 reference.  The scaled logits are ~1e5 (1e6 for the
    # teacher), so float32 rounds them by ~1e5 * 2**-24 = 0.006: probabilities carry
    # that relative error, the gradient (p_s - p_t) / 0.1 ten times it.
    ref_loss, ref_grad = ref.softmax_cross_entropy(s, t, None, 0.1, 0.01)
    rounding = 2 * 1e6 * 2.0**-24
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=10 * rounding)
    np.testing.assert_allclose(grad, ref_grad, atol=rounding / 0.1)
    # The whole objective too, with teacher centres and neighbours.
    M = R
    big = lambda *shape: rng.choice([-1e4, 1e4], shape).astype(F32)  # noqa: E731
    r = cribo.cribo_losses(big(2, R, L), big(2, R, L), big(2, M, L), big(2, M, L), big(2, M, L),
                           center_global=big(L), center_objects=big(L), student_temp=0.1,
                           teacher_temp=0.01)
    for x in (r.total, r.global_, r.objects, r.neighbours):
        assert np.isfinite(x)
    assert np.isfinite(r.grad_global).all() and np.isfinite(r.grad_objects).all()
    assert np.isfinite(r.center_global).all() and np.isfinite(r.center_objects).all()


@SETTINGS
@given(st.integers(1, 50), st.integers(1, 40), st.floats(0.0, 1.0), seeds)
def test_update_center_is_a_convex_combination(R, L, m, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal(L).astype(F32)
    x = rng.standard_normal((R, L)).astype(F32)
    out = cribo.update_center(c, x, m)
    expect = m * c.astype(np.float64) + (1 - m) * x.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
    assert bitwise_equal(cribo.update_center(c, x, 1.0), c)


# ============================================================================
# pooling is linear
# ============================================================================

@SETTINGS
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 8), st.integers(1, 6),
       st.floats(-3, 3), st.floats(-3, 3), st.booleans(), seeds)
def test_pooling_is_linear_in_tokens_and_adjoint_to_its_backward(B, N, D, K, a, b, soft, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 2, N, D)).astype(F32)
    y = rng.standard_normal((B, 2, N, D)).astype(F32)
    g = rng.standard_normal((B, 2, K, D)).astype(F32)
    if soft:
        assign = (rng.random((B, 2, N, K)) * (rng.random((B, 2, N, K)) > 0.4)).astype(F32)
    else:
        assign = rng.integers(-1, K, (B, 2, N))
    z = (np.float32(a) * x + np.float32(b) * y).astype(F32)
    lhs = cribo.pool(z, assign, K).astype(np.float64)
    rhs = a * cribo.pool(x, assign, K).astype(np.float64) + \
        b * cribo.pool(y, assign, K).astype(np.float64)
    tol = 1e-5 * (1 + abs(a) + abs(b)) * (1 + float(np.abs(x).max() + np.abs(y).max()))
    np.testing.assert_allclose(lhs, rhs, atol=tol)
    # Backward is linear in the incoming gradient and is the adjoint of the forward:
    # <pool(x), g> == <x, pool_backward(g)>.
    g2 = rng.standard_normal((B, 2, K, D)).astype(F32)
    lhs = cribo.pool_backward((np.float32(a) * g + np.float32(b) * g2).astype(F32), assign, K)
    rhs = a * cribo.pool_backward(g, assign, K).astype(np.float64) + \
        b * cribo.pool_backward(g2, assign, K).astype(np.float64)
    np.testing.assert_allclose(lhs, rhs, atol=tol)
    inner_fwd = float(np.vdot(cribo.pool(x, assign, K).astype(np.float64), g))
    inner_bwd = float(np.vdot(x.astype(np.float64), cribo.pool_backward(g, assign, K)))
    assert abs(inner_fwd - inner_bwd) <= 1e-4 * (1 + np.abs(x).sum() * np.abs(g).max())
    # A cluster with no member (or a zero weight column) pools to zero.
    pooled = cribo.pool(x, assign, K)
    if soft:
        empty = assign.sum(axis=2) == 0                      # (B, 2, K)
    else:
        empty = np.stack([(assign == k).sum(axis=2) == 0 for k in range(K)], axis=-1)
    assert (pooled[empty] == 0).all()


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 6), st.integers(1, 5),
       st.sampled_from([2.0**-60, 2.0**100]), seeds)
def test_soft_pooling_takes_weights_and_tokens_of_any_finite_magnitude(B, N, D, K, scale, seed):
    """The columns of the weights are normalised (in double) before the sgemm, so
    scaling the weights by a power of two changes no bit, and tokens near the float
    limit pool to finite means (a convex combination cannot exceed its inputs)."""
    rng = np.random.default_rng(seed)
    w = (rng.uniform(0.01, 1.0, (B, 2, N, K)) * (rng.random((B, 2, N, K)) > 0.3)).astype(F32)
    tok = rng.uniform(-1.0, 1.0, (B, 2, N, D)).astype(F32)
    g = rng.standard_normal((B, 2, K, D)).astype(F32)
    assert bitwise_equal(cribo.pool(tok, w * F32(scale)), cribo.pool(tok, w))
    assert bitwise_equal(cribo.pool_backward(g, w * F32(scale)), cribo.pool_backward(g, w))
    huge = tok * F32(3e38)
    out = cribo.pool(huge, w * F32(1e38))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out / 3e38, ref.pool_soft(huge, w) / 3e38, atol=1e-6 * N)


# ============================================================================
# top-k: optimal, sorted, ties to the lowest index
# ============================================================================

@SETTINGS
@given(st.integers(1, 12), st.sampled_from([1, 2, 5, 40, 1030]), st.integers(1, 8),
       st.integers(1, 6), st.booleans(), st.booleans(), st.booleans(), seeds)
def test_topk_reaches_the_maximum_and_ties_go_to_the_lowest_index(M, Q, D, k, with_ids,
                                                                  duplicates, scaled, seed):
    """The exact ranking (test_queue._assert_exact_topk): the float64 order up to
    double rounding, equal scores in index order, similarities rounded from it."""
    rng = np.random.default_rng(seed)
    k = min(k, Q)
    bank = rng.standard_normal((Q, D)).astype(F32)
    if duplicates and Q > 1:
        src = rng.integers(0, Q, max(1, Q // 2))
        dst = rng.integers(0, Q, src.size)
        bank[dst] = bank[src]
        # near-ties: copies moved by one float32 ulp in one component
        near = rng.integers(0, Q, max(1, Q // 8))
        comp = rng.integers(0, D, near.size)
        bank[near, comp] = np.nextafter(bank[near, comp], F32(np.inf))
    if scaled:   # huge, tiny and power-of-two multiples (exact ties) of some rows
        rows = rng.integers(0, Q, max(1, Q // 4))
        bank[rows] *= rng.choice(np.array([1e30, 1e-30, 2.0**30, 2.0**-30], F32), (rows.size, 1))
    if Q > 3:
        bank[rng.integers(0, Q)] = 0.0  # a zero row: similarity 0
    # Queries: copies of bank rows (exact ties with all their duplicates), rows near
    # bank rows (where near-ties differ at first order) and random ones.
    kind = rng.integers(0, 3, (M, 1))
    near_q = bank[rng.integers(0, Q, M)] + 0.01 * rng.standard_normal((M, D))
    q = np.where(kind == 0, bank[rng.integers(0, Q, M)],
                 np.where(kind == 1, near_q, rng.standard_normal((M, D)))).astype(F32)
    ids = {}
    if with_ids:
        ids = dict(query_ids=rng.integers(0, 3, M), bank_ids=rng.integers(0, 3, Q))
    idx, sim = cribo.topk_cosine(q, bank, k, **ids)
    _assert_exact_topk(q, bank, k, idx, sim, **ids)


def test_topk_tie_across_bank_blocks_goes_to_the_lowest_index():
    rng = np.random.default_rng(5)
    Q, D = 3 * 1024 + 10, 7
    bank = rng.standard_normal((Q, D)).astype(F32)
    row = bank[2500].copy()
    for j in (3000, 2500, 1500, 1024, 1023):   # copies in blocks 0..2
        bank[j] = row
    for t in (1, 2, 3):
        with cribo.num_threads(t):
            idx, sim = cribo.topk_cosine(row[None], bank, 6)
        assert idx[0, :5].tolist() == [1023, 1024, 1500, 2500, 3000]
        assert (sim[0, :5] == sim[0, 0]).all()


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_topk_similarity_is_a_cosine_at_any_finite_scale(scale):
    rng = np.random.default_rng(11)
    q = (rng.standard_normal((3, 4)) * scale).astype(F32)
    bank = (rng.standard_normal((5, 4)) * scale).astype(F32)
    idx, sim = cribo.topk_cosine(q, bank, 5)
    cos = ref.l2_normalize(q.astype(np.float64)) @ ref.l2_normalize(bank.astype(np.float64)).T
    np.testing.assert_allclose(sim, np.sort(cos, axis=1)[:, ::-1], rtol=2.0**-24, atol=1e-13)
    np.testing.assert_array_equal(idx, np.argsort(-cos, axis=1, kind="stable"))


# ============================================================================
# clustering at large lambda: the log-domain Sinkhorn stays finite
# ============================================================================

@SETTINGS
@given(cluster_problem(max_b=3, max_n=12, max_d=5), st.sampled_from([500.0, 1e4]))
def test_cluster_plan_is_finite_at_large_lambda(problem, lam):
    """The plan of the last iteration is finite, non-negative and has total mass 1.

    docs/method.md §2's Sinkhorn ends each round with the column scaling, so with fixed
    marginals (``update_marginals=False``) the COLUMNS sum to c_k = 1/K exactly;
    the rows reach r_n = 1/(2N) only in the limit of many rounds (at lambda = 1e4
    and 5 rounds they are far from it), so they are checked only for the mass they
    can hold.  float32 logits of size lambda limit the accuracy to ~lambda * 6e-8
    relative.
    """
    B, N, D, K, kw, seed = problem
    kw = dict(kw, sinkhorn_lambda=lam, sinkhorn_iters=max(kw["sinkhorn_iters"], 1))
    tok, pos = scene(np.random.default_rng(seed), B, N, D)
    for um in (False, True):
        c = cribo.cluster(tok, pos, K, seed=seed % 1000, return_plan=True,
                          **dict(kw, update_marginals=um))
        T = c.plan.astype(np.float64)
        assert np.isfinite(T).all() and (T >= 0).all()
        tol = 5e-4 if lam > 1000 else 2e-5
        np.testing.assert_allclose(T.sum(axis=(1, 2)), 1.0, atol=tol)
        assert (T.sum(axis=2) <= 1.0 + tol).all()
        if not um:
            np.testing.assert_allclose(T.sum(axis=1) * K, 1.0, atol=tol * K)
        # Hard labels are an argmax of the plan rows (ties: lowest k).
        assert c.labels.min() >= 0 and c.labels.max() < K


def test_cluster_plan_rows_approach_uniform_with_many_rounds():
    """With enough Sinkhorn rounds the rows do sum to 1/(2N) (moderate lambda)."""
    rng = np.random.default_rng(3)
    N, K = 12, 4
    tok, pos = scene(rng, 2, N, 5)
    for lam in (20.0, 500.0):
        c = cribo.cluster(tok, pos, K, sinkhorn_lambda=lam, sinkhorn_iters=2000,
                          update_marginals=False, n_iters=1, return_plan=True,
                          pos_weight=0.0)
        rows = c.plan.astype(np.float64).sum(axis=2) * (2 * N)
        np.testing.assert_allclose(rows, 1.0, atol=2e-2 if lam > 100 else 1e-4)


# ============================================================================
# the object queue against the list-of-images reference
# ============================================================================

def _near_tie(cos_row, i, j, tol=1e-5):
    return abs(cos_row[i] - cos_row[j]) <= tol


def _compare_match(m, r, t1, t2, q1, q2):
    """C match vs reference; a disagreement is accepted only at a float32 near-tie."""
    T1h, T2h = ref.l2_normalize(t1), ref.l2_normalize(t2)
    Q1h, Q2h = ref.l2_normalize(q1), ref.l2_normalize(q2)
    for v, (Th, Qh, Oh, Ob) in enumerate(((T1h, Q1h, Q2h, T2h), (T2h, Q2h, Q1h, T1h))):
        idx, ridx = (m.index1, m.index2)[v], r[f"index{v + 1}"]
        mask, rmask = (m.mask1, m.mask2)[v], r[f"mask{v + 1}"]
        tgt, rtgt = (m.targets1, m.targets2)[v], r[f"targets{v + 1}"]
        sim, rsim = (m.similarity1, m.similarity2)[v], r[f"similarity{v + 1}"]
        for j in range(idx.size):
            if idx[j] != ridx[j]:
                assert idx[j] >= 0 and ridx[j] >= 0, (v, j, idx[j], ridx[j])
                assert _near_tie(Th[j] @ Qh.T, idx[j], ridx[j]), (v, j, idx[j], ridx[j])
                continue
            if ridx[j] < 0:
                assert not mask[j] and np.isneginf(sim[j]) and (tgt[j] == 0).all()
                continue
            assert tgt[j].astype(np.float64).tobytes() == rtgt[j].tobytes()
            assert abs(sim[j] - rsim[j]) <= 2e-6
            if mask[j] != rmask[j]:
                back = Oh[idx[j]] @ Ob.T        # the cycle search over the batch
                top = np.sort(back)[::-1]
                assert top.size > 1 and top[0] - top[1] <= 1e-5, (v, j, back)


@st.composite
def queue_program(draw):
    capacity = draw(st.integers(1, 6))
    dim = draw(st.integers(3, 7))
    exclude = draw(st.booleans())
    ops = draw(st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, capacity + 3), st.booleans(),
                      st.booleans()),
            st.tuples(st.just("match"), st.integers(0, 9), st.booleans(), st.booleans())),
        min_size=1, max_size=10))
    tail = draw(st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, capacity + 2), st.booleans(),
                      st.booleans()),
            st.tuples(st.just("match"), st.integers(0, 8), st.booleans(), st.booleans())),
        min_size=1, max_size=6))
    return capacity, dim, exclude, ops, tail, draw(seeds)


def _apply(op, rng, dim, history, queues, refq, exclude):
    """Runs one push or match on every queue (and on the reference if given)."""
    kind, size, with_ids, reuse = op
    if kind == "push":
        if reuse and history:      # push an earlier batch again: exact duplicates
            o1, o2, counts, ids = history[int(rng.integers(0, len(history)))]
        else:
            counts = rng.integers(0, 4, size)
            counts[rng.random(size) < 0.3] = 0        # images without a valid object
            n = int(counts.sum())
            o1 = rng.standard_normal((n, dim)).astype(F32)
            o2 = rng.standard_normal((n, dim)).astype(F32)
            ids = rng.integers(0, 5, size) if with_ids else None
            history.append((o1, o2, counts, ids))
        for q in queues:
            q.push(o1, o2, counts, ids)
        if refq is not None:
            refq.push(o1, o2, counts, ids)
        return None
    M = size
    if reuse and queues[0].n_objects > 0 and M > 0:   # look up queue entries themselves
        pick = rng.integers(0, queues[0].n_objects, M)
        t1 = queues[0].objects1[pick].copy()
        t2 = queues[0].objects2[pick].copy()
        ids = queues[0].object_ids[pick].copy() if with_ids else None
        if ids is not None:
            ids[ids < 0] = 0
    else:
        t1 = rng.standard_normal((M, dim)).astype(F32)
        t2 = rng.standard_normal((M, dim)).astype(F32)
        ids = rng.integers(0, 5, M) if with_ids else None
    matches = [q.match(t1, t2, image_ids=ids) for q in queues]
    if refq is not None:
        q1, q2, qids = refq.arrays()
        r = ref.queue_match(q1, q2, qids, t1, t2, image_ids=ids, exclude_same_image=exclude)
        _compare_match(matches[0], r, t1, t2, q1, q2)
    return matches


def _assert_same_state(q, refq):
    q1, q2, qids = refq.arrays()
    assert len(q) == len(refq) <= q.capacity
    assert q.n_objects == refq.n_objects
    assert q.objects1.astype(np.float64).tobytes() == q1.tobytes()
    assert q.objects2.astype(np.float64).tobytes() == q2.tobytes()
    np.testing.assert_array_equal(q.object_ids, qids)
    np.testing.assert_array_equal(q.image_counts, [im[0].shape[0] for im in refq.images])
    np.testing.assert_array_equal(q.image_ids, [im[2] for im in refq.images])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queue_program())
def test_object_queue_matches_the_reference_and_round_trips(program):
    capacity, dim, exclude, ops, tail, seed = program
    rng = np.random.default_rng(seed)
    q = cribo.ObjectQueue(capacity, dim, exclude_same_image=exclude)
    refq = ref.RefQueue(capacity, dim)
    history: list = []
    for op in ops:
        _apply(op, rng, dim, history, [q], refq, exclude)
        _assert_same_state(q, refq)

    # state_dict / load_state_dict: the restored queue behaves identically from here on.
    sd = q.state_dict()
    q2 = cribo.ObjectQueue(capacity, dim, exclude_same_image=not exclude)
    q2.load_state_dict(sd)
    assert q2.capacity == capacity and q2.exclude_same_image == exclude
    for op in tail:
        m = _apply(op, rng, dim, history, [q, q2], refq, exclude)
        _assert_same_state(q, refq)
        _assert_same_state(q2, refq)
        if m is not None:
            a, b = m
            for f in ("index1", "index2", "mask1", "mask2", "targets1", "targets2",
                      "similarity1", "similarity2"):
                assert bitwise_equal(getattr(a, f), getattr(b, f)), f
    s1, s2 = q.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert bitwise_equal(s1[key], s2[key]), key


def test_object_queue_block_larger_than_capacity_keeps_its_first_images():
    rng = np.random.default_rng(0)
    q = cribo.ObjectQueue(3, 4)
    refq = ref.RefQueue(3, 4)
    counts = np.array([2, 0, 1, 3, 1])
    o1 = rng.standard_normal((7, 4)).astype(F32)
    o2 = rng.standard_normal((7, 4)).astype(F32)
    q.push(o1, o2, counts, [10, 11, 12, 13, 14])
    refq.push(o1, o2, counts, [10, 11, 12, 13, 14])
    _assert_same_state(q, refq)
    np.testing.assert_array_equal(q.image_ids, [10, 11, 12])
    np.testing.assert_array_equal(q.objects1, o1[:3])
    # An object never matches its own image when ids are given...
    m = q.match(o1[:1], o2[:1], image_ids=[10])
    assert m.index1[0] == 2 and m.index2[0] == 2      # the only entry of image 12
    # ...and does without ids (its exact copy, similarity 1, lowest address).
    m = q.match(o1[:1], o2[:1])
    assert m.index1[0] == 0 and m.index2[0] == 0 and m.mask1[0] and m.mask2[0]
    np.testing.assert_allclose(m.similarity1, 1.0, rtol=1e-6)
