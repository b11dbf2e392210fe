"""cribo.nn.autograd: the C pooling and fused losses as autograd nodes, against plain
torch autograd of docs/method.md §3 and §5 (float64 references)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from cribo.nn.autograd import NonFiniteError, fused_losses, pool_tokens  # noqa: E402


def test_pool_tokens_forward_and_gradient_match_a_plain_segment_mean(rng):
    B, N, d, K = 3, 7, 5, 4
    labels = rng.integers(0, K - 1, (B, 2, N))            # cluster K-1 stays empty
    x = torch.from_numpy(rng.standard_normal((B, 2, N, d)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((B, 2, K, d)))
    tokens = x.clone().requires_grad_(True)
    out = pool_tokens(tokens, labels, K)
    (out.double() * w).sum().backward()

    ref_x = x.double().requires_grad_(True)
    onehot = torch.from_numpy(np.eye(K)[labels])          # (B, 2, N, K)
    ref = torch.einsum("bvnk,bvnd->bvkd", onehot / onehot.sum(2, keepdim=True).clamp(min=1),
                       ref_x)
    (ref * w).sum().backward()
    assert out.shape == (B, 2, K, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    assert not out[:, :, K - 1].any()
    torch.testing.assert_close(tokens.grad.double(), ref_x.grad, rtol=1e-6, atol=1e-6)


def test_pool_tokens_names_non_finite_tokens(rng):
    x = torch.zeros(1, 2, 3, 4)
    x[0, 1, 2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="the student's patch tokens hold 1 non-finite"):
        pool_tokens(x, np.zeros((1, 2, 3), np.int64), 2)


def H(student, teacher, center, tau_s, tau_t):
    """Row-wise cross-entropy H(softmax((t - C)/tau_t), softmax(s/tau_s))."""
    p_t = F.softmax((teacher - center) / tau_t, dim=-1)
    return -(p_t * F.log_softmax(student / tau_s, dim=-1)).sum(-1)


@pytest.mark.parametrize("grad_scale", [1.0, 3.0])
def test_fused_losses_value_and_scaled_gradient(rng, grad_scale):
    """The loss is cribo_losses' total; its gradient, times grad_scale, is plain autograd's
    of the global and object terms (no neighbours here)."""
    B, M, L = 3, 5, 6
    arr = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    sg, so, tg, to, cg, co = arr(2, B, L), arr(2, M, L), arr(2, B, L), arr(2, M, L), arr(L), arr(L)
    w = (0.7, 1.3, 0.0)
    s_g = torch.from_numpy(sg).requires_grad_(True)
    s_o = torch.from_numpy(so).requires_grad_(True)
    loss, res = fused_losses(s_g, s_o, tg, to, None, np.ones(M, bool), np.ones(M, bool),
                             center_global=cg, center_objects=co, student_temp=0.1,
                             teacher_temp=0.05, teacher_temp_objects=None, weights=w,
                             center_momentum=0.9, grad_scale=grad_scale)
    (2.0 * loss).backward()

    r_g = torch.from_numpy(sg).double().requires_grad_(True)
    r_o = torch.from_numpy(so).double().requires_grad_(True)
    t_g, t_o = torch.from_numpy(tg).double(), torch.from_numpy(to).double()
    c_g, c_o = torch.from_numpy(cg).double(), torch.from_numpy(co).double()
    l_g = (H(r_g[1], t_g[0], c_g, 0.1, 0.05) + H(r_g[0], t_g[1], c_g, 0.1, 0.05)).mean()
    l_o = (H(r_o[1], t_o[0], c_o, 0.1, 0.05) + H(r_o[0], t_o[1], c_o, 0.1, 0.05)).mean()
    ref = w[0] * l_g + w[1] * l_o
    (2.0 * ref).backward()

    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == np.float32(res.total)                 # the value is not scaled
    assert res.total == pytest.approx(ref.item(), rel=1e-5)
    assert res.global_ == pytest.approx(l_g.item(), rel=1e-5)
    torch.testing.assert_close(s_g.grad.double(), grad_scale * r_g.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s_o.grad.double(), grad_scale * r_o.grad, rtol=1e-4, atol=1e-6)
