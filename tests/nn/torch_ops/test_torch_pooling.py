"""cribo.nn.torch_ops.pooling.pool (torch) against the C core (cribo.pool, cribo.pool_backward)
and the float64 reference of docs/method.md §3; gradients through torch.autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cribo
import reference as ref
from conftest import assert_close_f32
from cribo.nn.torch_ops.pooling import pool

SHAPES = [(1, 1, 1, 1), (2, 7, 5, 3), (3, 16, 1, 8), (2, 9, 33, 18), (4, 196, 64, 16)]


def _forward_backward(tok: np.ndarray, assignment, K, grad: np.ndarray, **kw):
    """(objects, d tokens) from the torch pool and autograd, as NumPy."""
    t = torch.tensor(tok, requires_grad=True)
    out = pool(t, torch.as_tensor(assignment), K, **kw)
    out.backward(torch.tensor(grad))
    assert out.dtype == torch.float32 and t.grad is not None
    return out.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("B,N,d,K", SHAPES)
def test_hard_pool_and_its_autograd_equal_the_c_core(B, N, d, K):
    rng = np.random.default_rng(N * d + K)
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    labels = rng.integers(-1, K, (B, 2, N))
    g = rng.standard_normal((B, 2, K, d)).astype(np.float32)
    out, dz = _forward_backward(tok, labels, K, g)
    assert out.shape == (B, 2, K, d) and dz.shape == (B, 2, N, d)
    assert_close_f32(out, cribo.pool(tok, labels, K), reduction=N)
    assert_close_f32(out, ref.pool(tok, labels, K), reduction=N)
    # The gradient: the cluster's gradient divided by its count, as the C core does.
    assert_close_f32(dz, cribo.pool_backward(g, labels, K))
    assert_close_f32(dz, ref.pool_backward(g, labels, K))


@pytest.mark.parametrize("B,N,d,K", SHAPES)
def test_soft_pool_and_its_autograd_equal_the_c_core(B, N, d, K):
    rng = np.random.default_rng(N * d + K + 1)
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    w = rng.random((B, 2, N, K)).astype(np.float32)
    w[..., 0] = 0.0  # a zero column stays zero
    g = rng.standard_normal((B, 2, K, d)).astype(np.float32)
    out, dz = _forward_backward(tok, w, None, g)
    assert_close_f32(out, cribo.pool(tok, w), reduction=N)
    assert_close_f32(out, ref.pool_soft(tok, w), reduction=N)
    assert (out[:, :, 0] == 0).all()
    assert_close_f32(dz, cribo.pool_backward(g, w), reduction=K)
    assert_close_f32(dz, ref.pool_soft_backward(g, w), reduction=K)


def test_one_hot_weights_equal_labels(rng):
    B, N, d, K = 2, 11, 6, 4
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    labels = rng.integers(0, K, (B, 2, N))
    onehot = np.eye(K, dtype=np.float32)[labels]
    g = rng.standard_normal((B, 2, K, d)).astype(np.float32)
    hard = _forward_backward(tok, labels, K, g)
    soft = _forward_backward(tok, onehot, K, g)
    for a, b in zip(hard, soft):
        assert_close_f32(a, b, reduction=N)


def test_empty_clusters_and_label_minus_one(rng):
    tok = rng.standard_normal((1, 2, 5, 3)).astype(np.float32)
    labels = np.array([[[0, 0, 1, 1, -1], [-1, -1, -1, -1, -1]]])
    g = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    out, dz = _forward_backward(tok, labels, 3, g)
    assert (out[0, 0, 2] == 0).all() and (out[0, 1] == 0).all()
    np.testing.assert_allclose(out[0, 0, 0], tok[0, 0, :2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], tok[0, 0, 2:4].mean(0), rtol=1e-6)
    assert (dz[0, 0, 4] == 0).all() and (dz[0, 1] == 0).all()
    np.testing.assert_array_equal(dz, cribo.pool_backward(g, labels, 3))


def test_soft_pooling_takes_weights_and_tokens_of_any_finite_magnitude(rng):
    """Columns normalised in float64 first: a power-of-two scale of the weights changes
    no bit, and weights near the float limit pool huge tokens to finite means."""
    B, N, D, K = 2, 13, 5, 4
    w = (rng.uniform(0.01, 1.0, (B, 2, N, K)) * (rng.random((B, 2, N, K)) > 0.3)).astype(
        np.float32)
    tok = rng.uniform(-1.0, 1.0, (B, 2, N, D)).astype(np.float32)
    t, wt = torch.tensor(tok), torch.tensor(w)
    for scale in (2.0 ** 60, 2.0 ** -60):
        assert torch.equal(pool(t, wt * scale), pool(t, wt))
    huge = tok * np.float32(3e38)
    out = pool(torch.tensor(huge), torch.tensor(w * np.float32(1e38)))
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy() / 3e38, ref.pool_soft(huge, w) / 3e38, atol=1e-6 * N)
    np.testing.assert_allclose(out.numpy() / 3e38, cribo.pool(huge, w * np.float32(1e38)) / 3e38,
                               atol=1e-6 * N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes_are_pooled_in_float32(dtype, rng):
    B, N, d, K = 2, 8, 4, 3
    tok = torch.tensor(rng.standard_normal((B, 2, N, d)), dtype=dtype, requires_grad=True)
    labels = torch.tensor(rng.integers(-1, K, (B, 2, N)))
    out = pool(tok, labels, K)
    assert out.dtype == torch.float32
    assert_close_f32(out.detach().numpy(),
                     cribo.pool(tok.detach().float().numpy(), labels.numpy(), K), reduction=N)
    out.sum().backward()
    assert tok.grad is not None and tok.grad.dtype == dtype


def test_unchecked_out_of_range_labels_are_in_no_cluster(rng):
    tok = torch.tensor(rng.standard_normal((1, 2, 6, 3)).astype(np.float32))
    labels = torch.tensor([[[0, 1, 5, -3, 1, 0], [2, 2, 1, 0, 9, -1]]])
    clean = torch.where((labels >= 0) & (labels < 3), labels, torch.full_like(labels, -1))
    assert torch.equal(pool(tok, labels, 3, check_values=False), pool(tok, clean, 3))
    with pytest.raises(ValueError, match=r"labels must be in \[-1, n_clusters\)"):
        pool(tok, labels, 3)


def test_bad_arguments_raise_clear_errors(rng):
    tok = torch.tensor(rng.standard_normal((2, 2, 5, 3)).astype(np.float32))
    lab = torch.zeros((2, 2, 5), dtype=torch.int64)
    w = torch.ones((2, 2, 5, 4))
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor"):
        pool(tok.numpy(), lab, 2)
    with pytest.raises(TypeError, match="tokens must be a floating-point"):
        pool(lab.unsqueeze(-1), lab, 2)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, 2, N, d\)"):
        pool(tok[:, :1], lab, 2)
    with pytest.raises(ValueError, match="the token width d must be at least 1"):
        pool(tok[..., :0], lab, 2)
    with pytest.raises(TypeError, match="n_clusters must be an integer >= 1"):
        pool(tok, lab)
    with pytest.raises(TypeError, match="n_clusters must be an integer"):
        pool(tok, lab, 2.0)
    with pytest.raises(ValueError, match="n_clusters must be at least 1"):
        pool(tok, lab, 0)
    with pytest.raises(TypeError, match="labels_or_weights must be integer labels"):
        pool(tok, lab.bool(), 2)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, 2, N\)"):
        pool(tok, lab[:, :, :4], 2)
    with pytest.raises(ValueError, match=r"weights must have shape \(B, 2, N, K\)"):
        pool(tok, w[:, :, :4])
    with pytest.raises(ValueError, match="n_clusters must match the weights' K = 4"):
        pool(tok, w, 3)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        pool(tok, -w)
    with pytest.raises(ValueError, match="weights must be finite"):
        pool(tok, w * float("inf"))
    with pytest.raises(ValueError, match="tokens must be finite"):
        pool(tok * float("nan"), lab, 2)
    with pytest.raises(ValueError, match="labels_or_weights must be on the tokens' device"):
        pool(tok, lab.to("meta"), 2)


def test_runs_on_the_meta_device_so_never_reads_values():
    """No value is ever read on the host: the meta device has none to read."""
    tok = torch.empty((3, 2, 7, 5), device="meta", requires_grad=True)
    out = pool(tok, torch.empty((3, 2, 7), dtype=torch.int64, device="meta"), 4)
    assert out.shape == (3, 2, 4, 5) and out.device.type == "meta"
    out.sum().backward()
    assert tok.grad is not None and tok.grad.shape == tok.shape
    soft = pool(tok, torch.empty((3, 2, 7, 4), device="meta"))
    assert soft.shape == (3, 2, 4, 5)


def test_no_host_round_trip_on_cpu_tensors(monkeypatch, rng):
    """Forward and backward, unchecked, call no .cpu/.numpy/.item/.tolist/bool."""
    tok = torch.tensor(rng.standard_normal((2, 2, 6, 3)).astype(np.float32), requires_grad=True)
    lab = torch.tensor(rng.integers(-1, 3, (2, 2, 6)))
    w = torch.tensor(rng.random((2, 2, 6, 3)).astype(np.float32))

    def refuse(*args, **kwargs):
        raise AssertionError("host round trip")

    with monkeypatch.context() as m:
        for name in ("cpu", "numpy", "item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, refuse)
        out = pool(tok, lab, 3, check_values=False) + pool(tok, w, check_values=False)
        out.sum().backward()
    with monkeypatch.context() as m:  # the guard does catch a checked call
        m.setattr(torch.Tensor, "__bool__", refuse)
        with pytest.raises(AssertionError, match="host round trip"):
            pool(tok, lab, 3, check_values=True)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 6), st.integers(1, 7),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_pool_equals_the_c_core_on_random_shapes(B, N, d, K, soft, seed):
    rng = np.random.default_rng(seed)
    tok = rng.standard_normal((B, 2, N, d)).astype(np.float32)
    a = (rng.random((B, 2, N, K)) * (rng.random((B, 2, N, K)) > 0.5)).astype(np.float32) \
        if soft else rng.integers(-1, K, (B, 2, N))
    g = rng.standard_normal((B, 2, K, d)).astype(np.float32)
    out, dz = _forward_backward(tok, a, K, g)
    assert_close_f32(out, cribo.pool(tok, a, K), reduction=N)
    assert_close_f32(dz, cribo.pool_backward(g, a, K), reduction=K)
