"""Self-checks of the float64 reference (tests/reference.py), so it can be trusted.

Gradients against central finite differences and torch.autograd, tiny cases
worked out by hand (the expected numbers come from the arithmetic in the
comments, not from running the code), and hypothesis properties.

One file for the whole reference, as tests/reference.py is one file: a reader
checks the reference's trustworthiness in one place.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference as ref
except ImportError:  # pragma: no cover
    import reference as ref  # type: ignore[no-redef]


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator for the non-hypothesis tests."""
    return np.random.default_rng(20240126)


def directional_fd(f: Callable[[np.ndarray], float], x: np.ndarray, v: np.ndarray, h: float = 1e-6) -> float:
    """Central difference of scalar ``f`` at ``x`` along ``v``: (f(x+hv) - f(x-hv)) / 2h."""
    return (f(x + h * v) - f(x - h * v)) / (2.0 * h)


# ============================================================================
# positional cost (hand-worked)
# ============================================================================


def test_positional_cost_by_hand_zero_distance_member_and_mean() -> None:
    # tokens: 0 at (0,0), 1 at (3,4), 2 at (0,0), 3 at (6,8)
    # cluster 0 = {0, 2} (both at (0,0)), cluster 1 = {1}, token 3 in none.
    P = np.array([[0, 0], [3, 4], [0, 0], [6, 8]], dtype=float)
    labels = np.array([0, 1, 0, -1])
    # raw D (0 = no member at non-zero distance):
    #   token 0: k0 members at distance 0,0 -> 0 ; k1: |(3,4)| = 5
    #   token 1: k0: 5                          ; k1: itself -> 0
    #   token 2: k0: 0                          ; k1: 5
    #   token 3: k0: |(6,8)| = 10               ; k1: |(3,4)| = 5
    # mean of D = (5+5+5+10+5) / 8 = 30/8 = 3.75 replaces the zeros; max = 10.
    expected = np.array([[3.75, 5], [5, 3.75], [3.75, 5], [10, 5]]) / 10.0
    np.testing.assert_allclose(ref.positional_cost(P, labels, 2), expected, rtol=0, atol=1e-15)

    # K = 3: cluster 2 is empty, its column is all 0 before the replacement.
    # mean = 30 / 12 = 2.5; max still 10.
    expected3 = np.array([[2.5, 5, 2.5], [5, 2.5, 2.5], [2.5, 5, 2.5], [10, 5, 2.5]]) / 10.0
    np.testing.assert_allclose(ref.positional_cost(P, labels, 3), expected3, rtol=0, atol=1e-15)


def test_positional_cost_all_zero_stays_zero() -> None:
    # every token at the same place: every distance is 0 -> D is all 0, max 0 -> stays 0
    P = np.zeros((3, 2))
    D = ref.positional_cost(P, np.array([0, 1, -1]), 2)
    np.testing.assert_array_equal(D, np.zeros((3, 2)))
    # a single member, alone: no other token at non-zero distance from itself
    D1 = ref.positional_cost(np.array([[1.0, 2.0]]), np.array([0]), 1)
    np.testing.assert_array_equal(D1, np.zeros((1, 1)))


def test_positional_cost_members_allows_shared_member() -> None:
    # token 0 at (0,0) in both clusters, token 1 at (0,2) in none.
    # D raw = [[0,0],[2,2]]; mean = 1 -> [[1,1],[2,2]]; / 2 -> [[.5,.5],[1,1]]
    P = np.array([[0.0, 0.0], [0.0, 2.0]])
    A = np.array([[1, 1], [0, 0]])
    np.testing.assert_allclose(ref.positional_cost_members(P, A), [[0.5, 0.5], [1, 1]], atol=1e-15)


# ============================================================================
# Sinkhorn
# ============================================================================


def test_sinkhorn_one_step_2x2_by_hand() -> None:
    # lam = ln 2, M = [[0,1],[0,0]] -> exp(-lam M) = [[1, 1/2], [1, 1]], sum 7/2
    #   T = [[2/7, 1/7], [2/7, 2/7]]
    # rows to r = (1/2, 1/2): row 0 sum 3/7 -> *7/6 -> [1/3, 1/6]
    #                         row 1 sum 4/7 -> *7/8 -> [1/4, 1/4]
    # cols to c = (1/2, 1/2): col 0 sum 7/12 -> *6/7 -> [2/7, 3/14]
    #                         col 1 sum 5/12 -> *6/5 -> [1/5, 3/10]
    M = np.array([[0.0, 1.0], [0.0, 0.0]])
    r = c = np.array([0.5, 0.5])
    expected = np.array([[2 / 7, 1 / 5], [3 / 14, 3 / 10]])
    np.testing.assert_allclose(ref.sinkhorn(M, np.log(2.0), 1, r, c), expected, rtol=1e-14)
    T, logT = ref.sinkhorn_log(M, np.log(2.0), 1, r, c)
    np.testing.assert_allclose(T, expected, rtol=1e-14)
    np.testing.assert_allclose(logT, np.log(expected), rtol=1e-13)


@settings(deadline=None, max_examples=40)
@given(
    st.integers(1, 6), st.integers(1, 5), st.integers(0, 6),
    st.floats(0.5, 30.0), st.integers(0, 2**32 - 1),
)
def test_sinkhorn_plain_and_log_agree(R: int, K: int, n_iters: int, lam: float, seed: int) -> None:
    g = np.random.default_rng(seed)
    M = g.random((R, K))  # in [0, 1): exp(-30) does not underflow in float64
    r = np.full(R, 1.0 / R)
    c = g.random(K) + 0.1
    c /= c.sum()
    T_plain = ref.sinkhorn(M, lam, n_iters, r, c)
    T_log, logT = ref.sinkhorn_log(M, lam, n_iters, r, c)
    np.testing.assert_allclose(T_log, T_plain, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(np.exp(logT), T_log, rtol=0, atol=0)
    if n_iters > 0:  # the last step scales columns: column sums are exactly c
        np.testing.assert_allclose(T_log.sum(axis=0), c, rtol=1e-12)


def test_sinkhorn_log_finite_where_plain_underflows(rng: np.random.Generator) -> None:
    M = rng.random((8, 3))
    M = (M - M.min()) / (M.max() - M.min())
    M[5] = [0.9, 0.95, 1.0]  # exp(-1000 * 0.9) underflows to 0 in float64
    r, c = np.full(8, 1 / 8), np.full(3, 1 / 3)
    for lam in (500.0, 1000.0):
        T, logT = ref.sinkhorn_log(M, lam, 5, r, c)
        assert np.all(np.isfinite(logT))
        assert np.all(np.isfinite(T))
        np.testing.assert_allclose(T.sum(axis=0), c, rtol=1e-12)
    # the plain version at lam=1000: row 5 underflows, 0/0 -> NaN -> patched to 1e-8
    T_plain = ref.sinkhorn(M, 1000.0, 5, r, c)
    assert np.any(T_plain == 1e-8)


# ============================================================================
# clustering
# ============================================================================


def _e(i: int, d: int = 2) -> np.ndarray:
    """Unit basis vector e_i, shape (d,)."""
    v = np.zeros(d)
    v[i] = 1.0
    return v


def test_cluster_two_tokens_per_view_by_hand() -> None:
    # view 1: e1 at (0,0), e2 at (10,0); view 2: e1 at (1,0), e2 at (9,0).
    # init = joint tokens 0 and 1 (view-1 tokens): mu = (e1, e2).
    # iteration 1: Sim = [[1,0],[0,1],[1,0],[0,1]]
    #   D raw: n0 [0(self), 10], n1 [10, 0(self)], n2 [1, 9], n3 [9, 1]; mean 40/8 = 5
    #   D = [[5,10],[10,5],[1,9],[9,1]] / 10
    #   M = -Sim + 2D = [[0,2],[2,0],[-.8,1.8],[1.8,-.8]]
    # The problem is symmetric under (swap clusters, swap e1/e2 tokens), c uniform,
    # so columns always get the same scale and each row keeps the order of exp(-lam M):
    # the lower cost wins -> joint labels [0,1,0,1]. Iteration 2 on: mu = (e1, e2)
    # again, D raw = [[1,9],[9,1],[1,8],[8,1]] -> same labels, counts (2,2), c = (1/2,1/2).
    tokens = np.array([[[_e(0), _e(1)], [_e(0), _e(1)]]])  # (1,2,2,2)
    positions = np.array([[[[0, 0], [10, 0]], [[1, 0], [9, 0]]]], dtype=float)
    out = ref.cluster(tokens, positions, 2, np.array([[0, 1]]))
    np.testing.assert_array_equal(out["labels"], [[[0, 1], [0, 1]]])
    np.testing.assert_array_equal(out["counts"], [[[1, 1], [1, 1]]])
    np.testing.assert_array_equal(out["valid"], [[True, True]])
    T = out["plan"][0]
    np.testing.assert_allclose(T.sum(axis=0), [0.5, 0.5], rtol=1e-12)  # columns end at c
    np.testing.assert_allclose(T[0], T[1][::-1], rtol=1e-12)  # the symmetry above
    np.testing.assert_allclose(T[2], T[3][::-1], rtol=1e-12)
    # tokens are L2-normalised before clustering: scaling them changes nothing
    out2 = ref.cluster(3.0 * tokens, positions, 2, np.array([[0, 1]]))
    np.testing.assert_array_equal(out2["labels"], out["labels"])


def test_cluster_object_in_one_view_only_is_invalid() -> None:
    # view 1: e1 at (0,0), e2 at (10,0); view 2: e1 at (1,0), e1 at (2,0); init (0, 1).
    # iteration 1: Sim = [[1,0],[0,1],[1,0],[1,0]]
    #   D raw: n0 [0, 10], n1 [10, 0], n2 [1, 9], n3 [2, 8]; mean 40/8 = 5
    #   M = -Sim + 2 D/10 = [[0,2],[2,0],[-.8,1.8],[-.6,1.6]] -> minmax over [-.8, 2]:
    #   every token prefers its cluster by >= 1.4/2.8 * 20 = 10 nats in exp(-lam M),
    #   ~14 nats for n0..n3 except n1 (20*1.6/2.8 = 11.4 the other way, towards k1).
    #   Column 1 holds ~1/4 of the mass against c_1 = 1/2: each column scaling can tilt
    #   a row's ratio by at most ~3x, 5 scalings ~243x = e^5.5 < e^10 -> no label flips.
    #   labels: view 1 [0, 1], view 2 [0, 0]. Later iterations: mu = (e1, e2) again,
    #   c = (3.01, 1.01)/4.02 matches the sizes, so nothing moves.
    tokens = np.array([[[_e(0), _e(1)], [_e(0), _e(0)]]])
    positions = np.array([[[[0, 0], [10, 0]], [[1, 0], [2, 0]]]], dtype=float)
    out = ref.cluster(tokens, positions, 2, np.array([[0, 1]]))
    np.testing.assert_array_equal(out["labels"], [[[0, 1], [0, 0]]])
    np.testing.assert_array_equal(out["counts"], [[[1, 1], [2, 0]]])
    np.testing.assert_array_equal(out["valid"], [[True, False]])
    # with updated marginals, the last Sinkhorn used c = (3.01, 1.01) / 4.02
    np.testing.assert_allclose(out["plan"][0].sum(axis=0), [3.01 / 4.02, 1.01 / 4.02], rtol=1e-12)


def test_cluster_ties_go_to_lowest_cluster() -> None:
    # all four tokens identical and at the same position: Sim is constant 1, D is all 0,
    # M is constant -> zeros; T is uniform 1/8, every row is an exact tie -> cluster 0.
    tokens = np.ones((1, 2, 2, 3))
    positions = np.zeros((1, 2, 2, 2))
    out = ref.cluster(tokens, positions, 2, np.array([[1, 2]]), n_iters=1)
    np.testing.assert_array_equal(out["labels"], np.zeros((1, 2, 2)))
    np.testing.assert_array_equal(out["valid"], [[True, False]])
    np.testing.assert_allclose(out["plan"][0], np.full((4, 2), 1 / 8), rtol=1e-14)
    # iteration 2 on: cluster 1 is empty -> zero centroid -> Sim = [1, 0] on every row,
    # c = (4.01, 0.01) / 4.02. All rows equal, so the final column scaling gives every
    # row c / 4; cluster 0 keeps every token.
    out = ref.cluster(tokens, positions, 2, np.array([[1, 2]]))
    np.testing.assert_array_equal(out["labels"], np.zeros((1, 2, 2)))
    np.testing.assert_allclose(out["plan"][0], np.tile([4.01 / 4.02 / 4, 0.01 / 4.02 / 4], (4, 1)), rtol=1e-12)


def test_cluster_large_lambda_stays_finite(rng: np.random.Generator) -> None:
    B, N, d, K = 2, 9, 5, 4
    tokens = rng.standard_normal((B, 2, N, d))
    positions = rng.random((B, 2, N, 2)) * 100
    init = np.stack([rng.choice(2 * N, K, replace=False) for _ in range(B)])
    out = ref.cluster(tokens, positions, K, init, sinkhorn_lambda=500.0)
    assert np.all(np.isfinite(out["plan"]))
    assert np.all((out["labels"] >= 0) & (out["labels"] < K))
    np.testing.assert_array_equal(out["counts"].sum(axis=2), np.full((B, 2), N))


@settings(deadline=None, max_examples=15)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_cluster_image_independent_of_batch_mates(B: int, N: int, d: int, K: int, seed: int) -> None:
    K = min(K, 2 * N)
    g = np.random.default_rng(seed)
    tokens = g.standard_normal((B, 2, N, d))
    positions = np.round(g.random((B, 2, N, 2)) * 8)  # integer grid: repeated positions happen
    init = np.stack([g.choice(2 * N, K, replace=False) for _ in range(B)])
    kw: dict[str, Any] = {"n_iters": 3, "sinkhorn_iters": 3}
    full = ref.cluster(tokens, positions, K, init, **kw)
    perm = g.permutation(B)
    permuted = ref.cluster(tokens[perm], positions[perm], K, init[perm], **kw)
    for key in ("labels", "valid", "counts", "plan"):
        np.testing.assert_array_equal(permuted[key], full[key][perm])
    b = int(g.integers(B))
    alone = ref.cluster(tokens[b : b + 1], positions[b : b + 1], K, init[b : b + 1], **kw)
    for key in ("labels", "valid", "counts", "plan"):
        np.testing.assert_array_equal(alone[key][0], full[key][b])
    # consistency of the outputs among themselves
    assert np.all((full["labels"] >= 0) & (full["labels"] < K))
    np.testing.assert_array_equal(full["valid"], (full["counts"][:, 0] > 0) & (full["counts"][:, 1] > 0))
    np.testing.assert_array_equal(full["counts"].sum(axis=2), np.full((B, 2), N))
    np.testing.assert_array_equal(
        full["labels"].reshape(B, 2 * N), np.argmax(full["plan"], axis=2)
    )


# ============================================================================
# pooling
# ============================================================================


def test_pool_by_hand() -> None:
    # view 1 tokens 1, 3, 5 with labels 0, 0, 1 -> objects [(1+3)/2, 5] = [2, 5]
    # view 2 tokens 2, 4, 6 with labels 1, 1, 1 -> objects [0 (empty), 4]
    tokens = np.array([[[[1.0], [3.0], [5.0]], [[2.0], [4.0], [6.0]]]])
    labels = np.array([[[0, 0, 1], [1, 1, 1]]])
    np.testing.assert_allclose(ref.pool(tokens, labels, 2), [[[[2.0], [5.0]], [[0.0], [4.0]]]])
    W = np.zeros((1, 2, 3, 2))
    W[0, 0, :, 0] = [2, 2, 0]  # normalised to [1/2, 1/2, 0] -> 2
    W[0, 0, :, 1] = [0, 0, 7]  # -> 5
    W[0, 1, :, 1] = [1, 1, 2]  # -> (2 + 4 + 2*6)/4 = 4.5 ; column 0 stays zero
    np.testing.assert_allclose(ref.pool_soft(tokens, W), [[[[2.0], [5.0]], [[0.0], [4.5]]]])
    # backward, grad of objects = 1: view 1 tokens get 1/2, 1/2, 1 ; view 2 get 1/3 each
    g = np.ones((1, 2, 2, 1))
    np.testing.assert_allclose(ref.pool_backward(g, labels, 2), [[[[0.5], [0.5], [1.0]], [[1 / 3], [1 / 3], [1 / 3]]]])


def _random_pool_case(g: np.random.Generator, B: int = 2, N: int = 5, d: int = 3, K: int = 4) -> tuple[np.ndarray, ...]:
    """tokens (B,2,N,d), labels (B,2,N) in [-1,K), weights (B,2,N,K) with a zero column, dout (B,2,K,d)."""
    tokens = g.standard_normal((B, 2, N, d))
    labels = g.integers(-1, K, size=(B, 2, N))
    W = g.random((B, 2, N, K)) * (g.random((B, 2, N, K)) < 0.7)
    W[0, 1, :, 2] = 0.0  # one all-zero column
    dout = g.standard_normal((B, 2, K, d))
    return tokens, labels, W, dout


def test_pool_hard_equals_soft_with_one_hot(rng: np.random.Generator) -> None:
    tokens, labels, _, dout = _random_pool_case(rng)
    onehot = (labels[..., None] == np.arange(4)).astype(float)
    np.testing.assert_allclose(ref.pool(tokens, labels, 4), ref.pool_soft(tokens, onehot), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(
        ref.pool_backward(dout, labels, 4), ref.pool_soft_backward(dout, onehot), rtol=1e-13, atol=1e-15
    )


def test_pool_backward_matches_central_differences(rng: np.random.Generator) -> None:
    tokens, labels, W, dout = _random_pool_case(rng)
    v = rng.standard_normal(tokens.shape)
    fd = directional_fd(lambda x: float(np.vdot(dout, ref.pool(x, labels, 4))), tokens, v)
    np.testing.assert_allclose(np.vdot(ref.pool_backward(dout, labels, 4), v), fd, rtol=1e-6)
    fd = directional_fd(lambda x: float(np.vdot(dout, ref.pool_soft(x, W))), tokens, v)
    np.testing.assert_allclose(np.vdot(ref.pool_soft_backward(dout, W), v), fd, rtol=1e-6)


def test_pool_backward_matches_torch(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    tokens, labels, W, dout = _random_pool_case(rng)
    x = torch.tensor(tokens, dtype=torch.float64, requires_grad=True)
    # hard: per-view segment mean written with one-hot and counts
    onehot = torch.nn.functional.one_hot(torch.tensor(labels + 1), 5)[..., 1:].to(torch.float64)
    cnt = onehot.sum(dim=2, keepdim=True)
    objs = torch.einsum("bink,bind->bikd", onehot / cnt.clamp(min=1), x)
    np.testing.assert_allclose(objs.detach().numpy(), ref.pool(tokens, labels, 4), rtol=1e-13, atol=1e-15)
    (objs * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), ref.pool_backward(dout, labels, 4), rtol=1e-13, atol=1e-15)
    # soft
    x.grad = None
    Wt = torch.tensor(W)
    cs = Wt.sum(dim=2, keepdim=True)
    Q = torch.where(cs > 0, Wt / torch.where(cs > 0, cs, torch.ones_like(cs)), torch.zeros_like(Wt))
    objs = torch.einsum("bink,bind->bikd", Q, x)
    np.testing.assert_allclose(objs.detach().numpy(), ref.pool_soft(tokens, W), rtol=1e-13, atol=1e-15)
    (objs * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), ref.pool_soft_backward(dout, W), rtol=1e-13, atol=1e-15)


# ============================================================================
# top-k cosine
# ============================================================================


def test_topk_cosine_by_hand() -> None:
    # query (1,0); bank (0,0) (2,0) (1,0) (0,1): cosines 0, 1, 1, 0
    # descending, ties to the lowest index: 1, 2, 0, 3
    q = np.array([[1.0, 0.0]])
    bank = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    idx, sim = ref.topk_cosine(q, bank, 4)
    np.testing.assert_array_equal(idx, [[1, 2, 0, 3]])
    np.testing.assert_allclose(sim, [[1.0, 1.0, 0.0, 0.0]])
    # ids: query 5, bank [5, 6, 5, 6] -> rows 0 and 2 excluded; 1 (cos 1), 3 (cos 0), then missing
    idx, sim = ref.topk_cosine(q, bank, 4, query_ids=np.array([5]), bank_ids=np.array([5, 6, 5, 6]))
    np.testing.assert_array_equal(idx, [[1, 3, -1, -1]])
    np.testing.assert_array_equal(sim, [[1.0, 0.0, -np.inf, -np.inf]])
    with pytest.raises(ValueError):
        ref.topk_cosine(q, bank, 5)


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_topk_reaches_max_similarity_ties_lowest(Mq: int, Nb: int, d: int, k: int, seed: int) -> None:
    g = np.random.default_rng(seed)
    queries = g.integers(-2, 3, size=(Mq, d)).astype(float)  # zero vectors and ties happen
    base = g.integers(-2, 3, size=(Nb, d)).astype(float)
    bank = np.concatenate([base, base])  # exact duplicates: the first copy must win
    k = min(k, 2 * Nb)
    idx, sim = ref.topk_cosine(queries, bank, k)
    qn = np.linalg.norm(queries, axis=1, keepdims=True)
    bn = np.linalg.norm(bank, axis=1, keepdims=True)
    cos = np.where((qn > 0) & (bn.T > 0), queries @ bank.T / np.where(qn * bn.T > 0, qn * bn.T, 1.0), 0.0)
    np.testing.assert_allclose(sim[:, 0], cos.max(axis=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sim, np.take_along_axis(cos, idx, axis=1), rtol=0, atol=1e-12)
    assert np.all(np.diff(sim, axis=1) <= 0)
    assert np.all(idx[:, 0] < Nb)  # a duplicate in the second half never beats its first copy
    assert all(len(set(row)) == k for row in idx.tolist())  # no bank row returned twice


# ============================================================================
# object queue and cycle checks
# ============================================================================


def test_queue_eviction_order_by_hand() -> None:
    q = ref.RefQueue(capacity=3, dim=1)
    # batch A: images 0 (1 object: 10), 1 (2 objects: 11, 12)
    q.push(np.array([[10.0], [11.0], [12.0]]), -np.array([[10.0], [11.0], [12.0]]), [1, 2], [0, 1])
    assert len(q) == 2 and q.n_objects == 3
    # batch B: images 2 (no object), 3 (1 object: 20) -> [2, 3, 0, 1] -> drop 1 -> [2, 3, 0]
    q.push(np.array([[20.0]]), np.array([[-20.0]]), [0, 1], [2, 3])
    assert len(q) == 3
    q1, q2, ids = q.arrays()
    np.testing.assert_array_equal(q1[:, 0], [20.0, 10.0])
    np.testing.assert_array_equal(q2[:, 0], [-20.0, -10.0])
    np.testing.assert_array_equal(ids, [3, 0])
    # a block of 4 images (ids 4..7, one object each) keeps its first 3 only
    objs = np.array([[40.0], [50.0], [60.0], [70.0]])
    q.push(objs, objs, [1, 1, 1, 1], [4, 5, 6, 7])
    q1, _, ids = q.arrays()
    np.testing.assert_array_equal(q1[:, 0], [40.0, 50.0, 60.0])
    np.testing.assert_array_equal(ids, [4, 5, 6])
    # three empty images fill the queue with zero objects
    q.push(np.zeros((0, 1)), np.zeros((0, 1)), [0, 0, 0])
    assert len(q) == 3 and q.n_objects == 0
    q1, _, ids = q.arrays()
    assert q1.shape == (0, 1) and ids.shape == (0,)


def _hand_queue() -> tuple[np.ndarray, ...]:
    """q1, q2 (3, 2) queue entries (newest first) and t1, t2 (2, 2) batch objects."""
    q1 = np.array([[3.0, 0.0], [0.0, 1.0], [0.2, 1.0]])
    q2 = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 2.0]])
    t1 = np.array([[2.0, 0.0], [0.0, 3.0]])
    t2 = np.array([[1.0, 0.0], [0.0, 1.0]])
    return q1, q2, t1, t2


def test_queue_match_by_hand_one_cycle_check_fails() -> None:
    q1, q2, t1, t2 = _hand_queue()
    # a(0): t1^0 = (1,0) vs q1^ = (1,0), (0,1), (.196,.981) -> 1, 0, .196 -> 0
    # a(1): t1^1 = (0,1) -> 0, 1, .981 -> 1
    # cycle 1, j=0: q2^0 = (1,0) vs t2^ = (1,0), (0,1) -> back to 0: keep
    # cycle 1, j=1: q2^1 = (.995,.0995) -> back to 0 != 1: drop
    # b(0): t2^0 = (1,0) vs q2^ = (1,0), (.995,.0995), (0,1) -> 0
    # b(1): t2^1 = (0,1) -> 0, .0995, 1 -> 2
    # cycle 2, j=0: q1^0 = (1,0) vs t1^ -> 0: keep; j=1: q1^2 = (.196,.981) -> 1: keep
    out = ref.queue_match(q1, q2, None, t1, t2)
    np.testing.assert_array_equal(out["index1"], [0, 1])
    np.testing.assert_array_equal(out["mask1"], [True, False])
    np.testing.assert_array_equal(out["index2"], [0, 2])
    np.testing.assert_array_equal(out["mask2"], [True, True])
    np.testing.assert_array_equal(out["targets1"], [[3.0, 0.0], [0.0, 1.0]])  # un-normalised
    np.testing.assert_array_equal(out["targets2"], [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(out["similarity1"], [1.0, 1.0])
    np.testing.assert_allclose(out["similarity2"], [1.0, 1.0])


def test_queue_match_excludes_same_image_by_hand() -> None:
    q1, q2, t1, t2 = _hand_queue()
    q_ids, image_ids = np.array([7, 8, 9]), np.array([7, 9])
    # j=0 (image 7) may use entries 1, 2; j=1 (image 9) entries 0, 1.
    # a(0): cosines with q1^1, q1^2: 0, .196 -> 2 ; a(1): q1^0 0, q1^1 1 -> 1
    # b(0): q2^1 .995, q2^2 0 -> 1 ; b(1): q2^0 0, q2^1 .0995 -> 1
    # cycle 1: j=0: q2^2 = (0,1) -> 1 != 0 drop ; j=1: q2^1 -> 0 != 1 drop
    # cycle 2: j=0: q1^1 = (0,1) -> 1 != 0 drop ; j=1: q1^1 -> 1: keep
    out = ref.queue_match(q1, q2, q_ids, t1, t2, image_ids=image_ids)
    np.testing.assert_array_equal(out["index1"], [2, 1])
    np.testing.assert_array_equal(out["index2"], [1, 1])
    np.testing.assert_array_equal(out["mask1"], [False, False])
    np.testing.assert_array_equal(out["mask2"], [False, True])
    # exclusion off: same as without ids
    out = ref.queue_match(q1, q2, q_ids, t1, t2, image_ids=image_ids, exclude_same_image=False)
    np.testing.assert_array_equal(out["index1"], [0, 1])
    np.testing.assert_array_equal(out["index2"], [0, 2])


def test_queue_match_empty_and_all_excluded() -> None:
    t = np.array([[1.0, 2.0], [3.0, 4.0]])
    for q1, q2, q_ids in (
        (np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, np.int64)),  # empty queue
        (np.ones((2, 2)), np.ones((2, 2)), np.array([5, 5])),  # every entry from image 5
    ):
        out = ref.queue_match(q1, q2, q_ids, t, t, image_ids=np.array([5, 5]))
        np.testing.assert_array_equal(out["index1"], [-1, -1])
        np.testing.assert_array_equal(out["index2"], [-1, -1])
        np.testing.assert_array_equal(out["mask1"], [False, False])
        np.testing.assert_array_equal(out["mask2"], [False, False])
        np.testing.assert_array_equal(out["targets1"], np.zeros((2, 2)))
        np.testing.assert_array_equal(out["targets2"], np.zeros((2, 2)))


def test_queue_then_match_uses_newest_first_addresses() -> None:
    q = ref.RefQueue(capacity=2, dim=2)
    q.push(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]), [1], [0])  # older
    q.push(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]), [1], [1])  # newer: address 0
    q1, q2, ids = q.arrays()
    t = np.array([[1.0, 0.0]])
    # both entries are equally similar; the tie goes to the lowest address (the newest)
    out = ref.queue_match(q1, q2, ids, t, t)
    np.testing.assert_array_equal(out["index1"], [0])
    # the query from image 1 may not take its own copy: address 1 (image 0)
    out = ref.queue_match(q1, q2, ids, t, t, image_ids=np.array([1]))
    np.testing.assert_array_equal(out["index1"], [1])
    np.testing.assert_array_equal(out["mask1"], [True])


# ============================================================================
# losses and centres
# ============================================================================


def test_softmax_cross_entropy_by_hand() -> None:
    # row 0: s = t = 0 -> p_t = p_s = (1/2, 1/2): H = ln 2, grad 0
    # row 1: s/0.1 = (ln 3, 0) -> p_s = (3/4, 1/4); (t - C)/0.07 = (0, ln 3) -> p_t = (1/4, 3/4)
    #   H = -(1/4 ln 3/4 + 3/4 ln 1/4) = ln 4 - (1/4) ln 3 ; grad = ((3/4,1/4)-(1/4,3/4))/0.1 = (5, -5)
    C = np.array([1.0, -2.0])
    s = np.array([[0.0, 0.0], [0.1 * np.log(3.0), 0.0]])
    t = np.array([[0.0, 0.0], [0.0, 0.07 * np.log(3.0)]]) + C
    t[0] = C  # row 0: t - C = 0
    losses, grad = ref.softmax_cross_entropy(s, t, C, student_temp=0.1, teacher_temp=0.07)
    np.testing.assert_allclose(losses, [np.log(2.0), np.log(4.0) - 0.25 * np.log(3.0)], rtol=1e-14)
    np.testing.assert_allclose(grad, [[0.0, 0.0], [5.0, -5.0]], rtol=1e-13, atol=1e-13)


def test_softmax_cross_entropy_extreme_logits_finite() -> None:
    s = np.array([[1e3, -1e3, 0.0], [30.0, -30.0, 30.0]])
    t = np.array([[-1e3, 1e3, 0.0], [-30.0, 30.0, 0.0]])
    losses, grad = ref.softmax_cross_entropy(s, t, student_temp=0.05, teacher_temp=0.04)
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(losses[0], 2e3 / 0.05, rtol=1e-12)  # p_t = e2, log p_s[1] = -2e3/0.05


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 5), st.integers(1, 7), st.floats(0.02, 1.0), st.floats(0.02, 1.0),
       st.floats(0.1, 30.0), st.integers(0, 2**32 - 1))
def test_softmax_cross_entropy_properties(R: int, L: int, ts: float, tt: float, scale: float, seed: int) -> None:
    g = np.random.default_rng(seed)
    s, t, C = g.standard_normal((R, L)) * scale, g.standard_normal((R, L)) * scale, g.standard_normal(L)
    losses, grad = ref.softmax_cross_entropy(s, t, C, student_temp=ts, teacher_temp=tt)
    assert np.all(losses >= 0)
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-12 / ts)
    # entropy lower bound: H(p_t, p_s) >= H(p_t)
    p_t = ref.softmax((t - C) / tt)
    ent = -np.sum(p_t * np.log(np.where(p_t > 0, p_t, 1.0)), axis=1)
    assert np.all(losses >= ent - 1e-9)


def test_softmax_cross_entropy_grad_matches_fd_and_torch(rng: np.random.Generator) -> None:
    R, L = 4, 6
    s, t, C = rng.standard_normal((R, L)), rng.standard_normal((R, L)), rng.standard_normal(L)
    dout = rng.standard_normal(R)
    _, grad = ref.softmax_cross_entropy(s, t, C)
    v = rng.standard_normal(s.shape)
    fd = directional_fd(lambda x: float(np.dot(dout, ref.softmax_cross_entropy(x, t, C)[0])), s, v)
    np.testing.assert_allclose(np.vdot(dout[:, None] * grad, v), fd, rtol=1e-6)

    torch = pytest.importorskip("torch")
    st_ = torch.tensor(s, requires_grad=True)
    p_t = torch.softmax((torch.tensor(t) - torch.tensor(C)) / 0.07, dim=1)
    H = -(p_t * torch.log_softmax(st_ / 0.1, dim=1)).sum(dim=1)
    np.testing.assert_allclose(H.detach().numpy(), ref.softmax_cross_entropy(s, t, C)[0], rtol=1e-12)
    (H * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(st_.grad.numpy(), dout[:, None] * grad, rtol=1e-10, atol=1e-12)


def test_update_center_by_hand() -> None:
    # 0.9 * (1, 0) + 0.1 * mean((0, 2), (2, 4)) = (0.9, 0) + 0.1 * (1, 3) = (1.0, 0.3)
    np.testing.assert_allclose(ref.update_center([1.0, 0.0], [[0.0, 2.0], [2.0, 4.0]]), [1.0, 0.3], rtol=1e-15)
    np.testing.assert_allclose(ref.update_center([1.0, 0.0], np.zeros((0, 2))), [1.0, 0.0])


def _losses_case(g: np.random.Generator, B: int = 3, M: int = 4, L: int = 5) -> dict[str, Any]:
    """Keyword arguments of ref.cribo_losses: (2,B,L) global, (2,M,L) object logits, masks (M,)."""
    return {
        "student_global": g.standard_normal((2, B, L)),
        "teacher_global": g.standard_normal((2, B, L)),
        "student_objects": g.standard_normal((2, M, L)),
        "teacher_objects": g.standard_normal((2, M, L)),
        "teacher_neighbours": g.standard_normal((2, M, L)),
        "mask1": np.array([True, False, True, True])[:M],
        "mask2": np.array([False, True, False, False])[:M],
        "center_global": g.standard_normal(L) * 0.1,
        "center_objects": g.standard_normal(L) * 0.1,
        "teacher_temp": 0.06,
        "teacher_temp_objects": 0.05,
        "weights": (1.0, 0.7, 1.3),
    }


def test_cribo_losses_composition(rng: np.random.Generator) -> None:
    a = _losses_case(rng)
    out = ref.cribo_losses(**a)
    H = ref.softmax_cross_entropy
    sg, tg, so, to, tn = (a[k] for k in ("student_global", "teacher_global", "student_objects",
                                         "teacher_objects", "teacher_neighbours"))
    Cg, Co = a["center_global"], a["center_objects"]
    Lg = np.mean(H(sg[1], tg[0], Cg, 0.1, 0.06)[0] + H(sg[0], tg[1], Cg, 0.1, 0.06)[0])
    Lo = np.mean(H(so[1], to[0], Co, 0.1, 0.05)[0] + H(so[0], to[1], Co, 0.1, 0.05)[0])
    # m1 = [1,0,1,1] -> Z1 = 3 ; m2 = [0,1,0,0] -> Z2 = 1 (its own normaliser, not Z1)
    n1 = H(so[1], tn[0], Co, 0.1, 0.05)[0]
    n2 = H(so[0], tn[1], Co, 0.1, 0.05)[0]
    Lnn = (n1[0] + n1[2] + n1[3]) / 3 + n2[1] / 1
    np.testing.assert_allclose(out["global_"], Lg, rtol=1e-14)
    np.testing.assert_allclose(out["objects"], Lo, rtol=1e-14)
    np.testing.assert_allclose(out["neighbours"], Lnn, rtol=1e-14)
    np.testing.assert_allclose(out["total"], Lg + 0.7 * Lo + 1.3 * Lnn, rtol=1e-14)
    # centres: over both views' rows; objects never include the neighbours
    np.testing.assert_allclose(out["center_global"], 0.9 * Cg + 0.1 * tg.reshape(-1, 5).mean(0), rtol=1e-14)
    np.testing.assert_allclose(out["center_objects"], 0.9 * Co + 0.1 * to.reshape(-1, 5).mean(0), rtol=1e-14)
    # a cross-image part with Z = 0 is 0; no neighbours -> L_nn = 0
    a2 = dict(a, mask2=np.zeros(4, bool))
    np.testing.assert_allclose(ref.cribo_losses(**a2)["neighbours"], Lnn - n2[1], rtol=1e-14)
    a3 = dict(a, teacher_neighbours=None, mask1=None, mask2=None)
    assert ref.cribo_losses(**a3)["neighbours"] == 0.0


def _total(a: dict[str, Any], sg: np.ndarray, so: np.ndarray) -> float:
    """Total loss with student_global sg (2,B,L) and student_objects so (2,M,L) replaced."""
    return float(ref.cribo_losses(**dict(a, student_global=sg, student_objects=so))["total"])


def test_cribo_losses_grad_matches_central_differences(rng: np.random.Generator) -> None:
    a = _losses_case(rng)
    out = ref.cribo_losses(**a)
    sg, so = a["student_global"], a["student_objects"]
    vg, vo = rng.standard_normal(sg.shape), rng.standard_normal(so.shape)
    fd = directional_fd(lambda x: _total(a, x, so), sg, vg)
    np.testing.assert_allclose(np.vdot(out["grad_global"], vg), fd, rtol=1e-6)
    fd = directional_fd(lambda x: _total(a, sg, x), so, vo)
    np.testing.assert_allclose(np.vdot(out["grad_objects"], vo), fd, rtol=1e-6)


def test_cribo_losses_grad_matches_torch(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    a = _losses_case(rng)
    out = ref.cribo_losses(**a)
    T = {k: torch.tensor(v) for k, v in a.items() if isinstance(v, np.ndarray)}
    sg = T["student_global"].clone().requires_grad_(True)
    so = T["student_objects"].clone().requires_grad_(True)

    def H(s: Any, t: Any, C: Any, tau_t: float) -> Any:
        """Per-row H(p_t, p_s) in torch: s, t (R, L), C (L,) -> (R,)."""
        return -(torch.softmax((t - C) / tau_t, dim=-1) * torch.log_softmax(s / 0.1, dim=-1)).sum(-1)

    Cg, Co, tg, to, tn = T["center_global"], T["center_objects"], T["teacher_global"], T["teacher_objects"], T["teacher_neighbours"]
    m1, m2 = T["mask1"].to(torch.float64), T["mask2"].to(torch.float64)
    Lg = (H(sg[1], tg[0], Cg, 0.06) + H(sg[0], tg[1], Cg, 0.06)).mean()
    Lo = (H(so[1], to[0], Co, 0.05) + H(so[0], to[1], Co, 0.05)).mean()
    Lnn = (m1 * H(so[1], tn[0], Co, 0.05)).sum() / m1.sum() + (m2 * H(so[0], tn[1], Co, 0.05)).sum() / m2.sum()
    total = Lg + 0.7 * Lo + 1.3 * Lnn
    total.backward()
    np.testing.assert_allclose(out["total"], total.item(), rtol=1e-12)
    np.testing.assert_allclose(out["grad_global"], sg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["grad_objects"], so.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_reference_never_imports_the_package() -> None:
    import pathlib

    src = pathlib.Path(ref.__file__).read_text()
    assert "import cribo" not in src and "from cribo" not in src
