"""Fused losses (C, float32) against the float64 reference of docs/method.md §5."""
from __future__ import annotations

import numpy as np
import pytest

import cribo
import reference as ref
from conftest import assert_close_f32


@pytest.mark.parametrize("R,L", [(1, 1), (3, 2), (5, 17), (8, 1000), (2, 65536)])
@pytest.mark.parametrize("centred", [False, True])
def test_softmax_cross_entropy_matches_reference(R, L, centred):
    rng = np.random.default_rng(R * L + centred)
    s = (rng.standard_normal((R, L)) * 3).astype(np.float32)
    t = (rng.standard_normal((R, L)) * 3).astype(np.float32)
    c = (rng.standard_normal(L) * 0.5).astype(np.float32) if centred else None
    loss, grad = cribo.softmax_cross_entropy(s, t, center=c, student_temp=0.1, teacher_temp=0.04)
    rloss, rgrad = ref.softmax_cross_entropy(s, t, center=c, student_temp=0.1, teacher_temp=0.04)
    assert loss.shape == (R,) and grad.shape == (R, L) and grad.dtype == np.float32
    # Loss terms are logits/temperature (~|s|/0.1) summed over L.
    assert_close_f32(loss, rloss, scale=float(np.abs(s).max()) / 0.1, reduction=L)
    assert_close_f32(grad, rgrad, scale=1.0 / 0.1, rtol=1e-4)


def test_gradient_by_central_differences_of_the_c_loss(rng):
    """The C gradient against finite differences of the C loss itself (float32 inputs,
    so a directional derivative with a moderate step)."""
    s = rng.standard_normal((4, 9)).astype(np.float32)
    t = rng.standard_normal((4, 9)).astype(np.float32)
    loss, grad = cribo.softmax_cross_entropy(s, t)
    v = rng.standard_normal(s.shape)
    h = 1e-3
    lp = cribo.softmax_cross_entropy(s + h * v, t)[0].astype(np.float64).sum()
    lm = cribo.softmax_cross_entropy(s - h * v, t)[0].astype(np.float64).sum()
    np.testing.assert_allclose(np.vdot(grad, v), (lp - lm) / (2 * h), rtol=2e-3)


def _head_outputs(rng, B, M, L, scale=2.0):
    f = lambda *shape: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    return dict(student_global=f(2, B, L), teacher_global=f(2, B, L),
                student_objects=f(2, M, L), teacher_objects=f(2, M, L),
                teacher_neighbours=f(2, M, L),
                mask1=rng.random(M) < 0.6, mask2=rng.random(M) < 0.4,
                center_global=f(L) * 0.1, center_objects=f(L) * 0.1)


def case_inputs(case, B, M, L):
    """The keyword arguments of cribo_losses for one of CASES (its flags applied:
    no_neighbours, no_pairs, no_masks) on the head outputs seeded by the shape."""
    kw = _head_outputs(np.random.default_rng(B + M + L), B, M, L)
    case = dict(case)
    if case.pop("no_neighbours", False):
        kw["teacher_neighbours"] = None
    if case.pop("no_pairs", False):
        kw["mask1"] = np.zeros(M, bool)
        kw["mask2"] = np.zeros(M, bool)
    if case.pop("no_masks", False):
        kw["mask1"] = kw["mask2"] = None
    kw.update(case)
    return kw


CASES = [
    dict(),
    dict(weights=(1.0, 0.0, 0.0)),       # global only (DINO)
    dict(weights=(1.0, 1.0, 0.0)),       # no cross-image term
    dict(weights=(0.5, 2.0, 3.0), teacher_temp_objects=0.05, center_momentum=0.5),
    dict(no_neighbours=True),
    dict(no_pairs=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c) or "default")
@pytest.mark.parametrize("B,M,L", [(1, 1, 3), (4, 7, 64), (3, 0, 16), (2, 40, 4096)])
def test_cribo_losses_match_reference(case, B, M, L):
    kw = case_inputs(case, B, M, L)
    out = cribo.cribo_losses(**kw)
    r = ref.cribo_losses(**kw)
    scale = 2.0 * 4 / 0.1
    for key, attr in (("total", "total"), ("global_", "global_"), ("objects", "objects"),
                      ("neighbours", "neighbours")):
        assert_close_f32(getattr(out, attr), r[key], scale=scale, reduction=L, err_msg=key)
    assert_close_f32(out.grad_global, r["grad_global"], scale=10.0 / max(B, 1), rtol=1e-4)
    assert_close_f32(out.grad_objects, r["grad_objects"], scale=10.0, rtol=1e-4)
    assert_close_f32(out.center_global, r["center_global"], reduction=2 * B)
    assert_close_f32(out.center_objects, r["center_objects"], reduction=max(2 * M, 1))
    if kw["teacher_neighbours"] is not None:
        assert out.n_pairs1 == int(kw["mask1"].sum()) and out.n_pairs2 == int(kw["mask2"].sum())


def test_zero_weight_term_is_reported_but_has_no_gradient(rng):
    kw = _head_outputs(rng, 3, 5, 32)
    full = cribo.cribo_losses(**kw)
    no_nn = cribo.cribo_losses(**kw, weights=(1.0, 1.0, 0.0))
    assert no_nn.neighbours == pytest.approx(full.neighbours, rel=1e-6)
    assert no_nn.total == pytest.approx(full.global_ + full.objects, rel=1e-6)
    base = cribo.cribo_losses(**{**kw, "teacher_neighbours": None})
    np.testing.assert_allclose(no_nn.grad_objects, base.grad_objects, rtol=1e-6, atol=1e-9)


def test_update_center_matches_reference(rng):
    c = rng.standard_normal(3000).astype(np.float32)
    t = rng.standard_normal((37, 3000)).astype(np.float32)
    assert_close_f32(cribo.update_center(c, t, 0.9), ref.update_center(c, t, 0.9), reduction=37)
    np.testing.assert_array_equal(cribo.update_center(c, np.zeros((0, 3000)), 0.9), c)


def test_denominators_split_a_batch_into_shares_that_sum_to_the_whole(rng):
    """What a distributed step relies on: two 'processes' with the global counts as
    denominators return shares whose sum is the one-process loss and gradient."""
    B, M, L = 6, 10, 32
    kw = _head_outputs(rng, B, M, L)
    full = cribo.cribo_losses(**kw)
    den = (B, M, int(kw["mask1"].sum()), int(kw["mask2"].sum()))
    parts = []
    for bs, ms in ((slice(0, 2), slice(0, 7)), (slice(2, 6), slice(7, 10))):
        part = {k: (v[:, bs] if k.endswith("global") and k.startswith(("student", "teacher"))
                    else v[:, ms] if k in ("student_objects", "teacher_objects",
                                           "teacher_neighbours")
                    else v[ms] if k in ("mask1", "mask2") else v) for k, v in kw.items()}
        parts.append(cribo.cribo_losses(**part, denominators=den))
    assert sum(p.total for p in parts) == pytest.approx(full.total, rel=1e-6)
    for attr in ("global_", "objects", "neighbours"):
        assert sum(getattr(p, attr) for p in parts) == pytest.approx(getattr(full, attr),
                                                                     rel=1e-6)
    np.testing.assert_allclose(np.concatenate([p.grad_global for p in parts], 1),
                               full.grad_global, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.concatenate([p.grad_objects for p in parts], 1),
                               full.grad_objects, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="denominators"):
        cribo.cribo_losses(**kw, denominators=(1, M, 0, 0))


def test_cribo_losses_writes_each_views_gradient_in_place(rng):
    # The binding's cribo_losses entry point writes each view's gradient straight into
    # its (2, B, L) output: view 2's student rows learn from teacher view 1 and vice versa.
    B, L = 3, 50
    sg = rng.standard_normal((2, B, L)).astype(np.float32)
    tg = rng.standard_normal((2, B, L)).astype(np.float32)
    so = rng.standard_normal((2, 0, L)).astype(np.float32)
    c = rng.standard_normal(L).astype(np.float32)
    r = cribo.cribo_losses(sg, tg, so, so, center_global=c, center_objects=c,
                           weights=(1.0, 0.0, 0.0))
    for v in (0, 1):
        _, g = cribo.softmax_cross_entropy(sg[1 - v], tg[v], center=c, teacher_temp=0.07)
        np.testing.assert_allclose(r.grad_global[1 - v], g / B, rtol=1e-5, atol=1e-8)
    assert np.isfinite(r.grad_global).all() and r.grad_objects.shape == (2, 0, L)
