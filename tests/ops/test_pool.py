"""cribo.pool / pool_backward (C, float32) against the float64 reference of docs/method.md §3."""
from __future__ import annotations

import numpy as np
import pytest

import cribo
import reference as ref
from conftest import assert_close_f32

SHAPES = [(1, 1, 1, 1), (2, 7, 5, 3), (3, 16, 1, 8), (2, 9, 33, 18), (4, 196, 64, 16)]


@pytest.mark.parametrize("B,N,d,K", SHAPES)
def test_hard_pool_forward_backward(B, N, d, K):
    rng = np.random.default_rng(N * d + K)
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    labels = rng.integers(-1, K, (B, 2, N))
    out = cribo.pool(tok, labels, K)
    assert out.shape == (B, 2, K, d) and out.dtype == np.float32
    assert_close_f32(out, ref.pool(tok, labels, K), reduction=N)
    g = rng.standard_normal((B, 2, K, d)).astype(np.float32)
    dz = cribo.pool_backward(g, labels, K)
    assert dz.shape == (B, 2, N, d)
    assert_close_f32(dz, ref.pool_backward(g, labels, K))


@pytest.mark.parametrize("B,N,d,K", SHAPES)
def test_soft_pool_forward_backward(B, N, d, K):
    rng = np.random.default_rng(N * d + K + 1)
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    w = rng.random((B, 2, N, K)).astype(np.float32)
    w[..., 0] = 0.0  # a zero column stays zero
    out = cribo.pool(tok, w)
    assert_close_f32(out, ref.pool_soft(tok, w), reduction=N)
    assert (out[:, :, 0] == 0).all()
    g = rng.standard_normal((B, 2, K, d)).astype(np.float32)
    assert_close_f32(cribo.pool_backward(g, w), ref.pool_soft_backward(g, w), reduction=K)


def test_one_hot_weights_equal_labels(rng):
    B, N, d, K = 2, 11, 6, 4
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    labels = rng.integers(0, K, (B, 2, N))
    onehot = np.eye(K, dtype=np.float32)[labels]
    assert_close_f32(cribo.pool(tok, onehot), cribo.pool(tok, labels, K), reduction=N)
    g = rng.standard_normal((B, 2, K, d)).astype(np.float32)
    assert_close_f32(cribo.pool_backward(g, onehot), cribo.pool_backward(g, labels, K))


def test_empty_cluster_pools_to_zero(rng):
    tok = rng.standard_normal((1, 2, 5, 3)).astype(np.float32)
    labels = np.array([[[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]])
    out = cribo.pool(tok, labels, 3)
    assert (out[0, 0, 2] == 0).all() and (out[0, 1, 0] == 0).all() and (out[0, 1, 2] == 0).all()
    np.testing.assert_allclose(out[0, 0, 0], tok[0, 0, :2].mean(0), rtol=1e-6)


def test_backward_is_the_adjoint_of_forward(rng):
    """<pool(z), g> == <z, pool_backward(g)> for labels and weights."""
    B, N, d, K = 3, 13, 7, 5
    z = rng.standard_normal((B, 2, N, d))
    g = rng.standard_normal((B, 2, K, d))
    for a in (rng.integers(-1, K, (B, 2, N)), rng.random((B, 2, N, K))):
        lhs = np.vdot(cribo.pool(z, a, K).astype(np.float64), g)
        rhs = np.vdot(z, cribo.pool_backward(g, a, K).astype(np.float64))
        np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_pool_pipeline_with_clustering(rng):
    """Objects of the clusters that are valid, as the objective uses them."""
    from test_cluster import grid_positions
    B, N, d, K = 3, 16, 8, 6
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    c = cribo.cluster(tok, grid_positions(B, N, rng), K)
    objs = cribo.pool(tok, c.labels, K)
    o1, o2 = objs[:, 0][c.valid], objs[:, 1][c.valid]
    assert o1.shape == (c.valid.sum(), d) and np.isfinite(o1).all() and np.isfinite(o2).all()
