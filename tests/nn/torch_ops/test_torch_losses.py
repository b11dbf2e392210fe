"""cribo.nn.torch_ops.losses (torch) against the C core (cribo.softmax_cross_entropy,
cribo.cribo_losses, cribo.update_center) and the float64 reference of docs/method.md §5."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cribo
import reference as ref
from conftest import assert_close_f32
from cribo.nn.torch_ops import losses as tl
from ops.test_losses import CASES as C_CASES, _head_outputs, case_inputs


def _t(kw: dict) -> dict:
    """NumPy arrays of a keyword set as torch tensors."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


# ============================================================================
# softmax_cross_entropy
# ============================================================================

@pytest.mark.parametrize("R,L", [(1, 1), (3, 2), (5, 17), (8, 1000), (2, 65536)])
@pytest.mark.parametrize("centred", [False, True])
def test_softmax_cross_entropy_equals_the_c_core(R, L, centred):
    rng = np.random.default_rng(R * L + centred)
    s = (rng.standard_normal((R, L)) * 3).astype(np.float32)
    t = (rng.standard_normal((R, L)) * 3).astype(np.float32)
    c = (rng.standard_normal(L) * 0.5).astype(np.float32) if centred else None
    loss, grad = tl.softmax_cross_entropy(torch.from_numpy(s), torch.from_numpy(t),
                                          center=None if c is None else torch.from_numpy(c),
                                          student_temp=0.1, teacher_temp=0.04)
    assert loss.shape == (R,) and grad.shape == (R, L)
    assert loss.dtype == grad.dtype == torch.float32
    closs, cgrad = cribo.softmax_cross_entropy(s, t, center=c, student_temp=0.1,
                                               teacher_temp=0.04)
    rloss, rgrad = ref.softmax_cross_entropy(s, t, center=c, student_temp=0.1, teacher_temp=0.04)
    lscale = float(np.abs(s).max()) / 0.1
    for expected in (closs, rloss):
        assert_close_f32(loss.numpy(), expected, scale=lscale, reduction=L)
    for expected in (cgrad, rgrad):
        assert_close_f32(grad.numpy(), expected, scale=1.0 / 0.1, rtol=1e-4)


def test_gradient_is_the_autograd_gradient_of_the_loss(rng):
    """The returned gradient against torch.autograd of the loss written plainly in float64."""
    s = rng.standard_normal((6, 40)).astype(np.float32) * 2
    t = rng.standard_normal((6, 40)).astype(np.float32) * 2
    c = rng.standard_normal(40).astype(np.float32) * 0.3
    _, grad = tl.softmax_cross_entropy(torch.from_numpy(s), torch.from_numpy(t),
                                       center=torch.from_numpy(c), teacher_temp=0.05)
    s64 = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    p_t = torch.softmax((torch.tensor(t, dtype=torch.float64) - torch.tensor(c).double()) / 0.05,
                        dim=1)
    (-(p_t * torch.log_softmax(s64 / 0.1, dim=1)).sum()).backward()
    assert_close_f32(grad.numpy(), s64.grad.numpy(), scale=10.0, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, None, 100])
def test_chunking_changes_no_result_beyond_rounding(chunk, rng):
    s = torch.from_numpy(rng.standard_normal((23, 300)).astype(np.float32) * 3)
    t = torch.from_numpy(rng.standard_normal((23, 300)).astype(np.float32) * 3)
    c = torch.from_numpy(rng.standard_normal(300).astype(np.float32))
    whole_loss, whole_grad = tl.softmax_cross_entropy(s, t, center=c, chunk_rows=23)
    loss, grad = tl.softmax_cross_entropy(s, t, center=c, chunk_rows=chunk)
    assert_close_f32(loss.numpy(), whole_loss.numpy(), reduction=300, scale=30 / 0.1)
    assert_close_f32(grad.numpy(), whole_grad.numpy(), scale=10.0)
    assert_close_f32(tl.update_center(c, s, 0.9, chunk_rows=chunk).numpy(),
                     cribo.update_center(c.numpy(), s.numpy(), 0.9), reduction=23)


def test_the_default_chunk_fits_the_memory_budget():
    """L = 65,536 with 33,000 rows (the reference step's object rows) runs in chunks of a
    few dozen rows, whose temporaries stay within DEFAULT_CHUNK_BYTES."""
    rows = tl._chunk("f", None, 33000, 65536)
    assert 1 <= rows < 33000 and rows * 65536 * tl._BYTES_PER_LOGIT <= tl.DEFAULT_CHUNK_BYTES
    assert tl._chunk("f", None, 5, 16) == 5


def test_non_finite_logits_raise_naming_the_argument(rng):
    s = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32))
    t = s.clone()
    bad = s.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="student_logits .* must be finite"):
        tl.softmax_cross_entropy(bad, t)
    with pytest.raises(ValueError, match="teacher_logits .* must be finite"):
        tl.softmax_cross_entropy(s, bad)
    for value in (float("inf"), -float("inf")):
        inf = s.clone()
        inf[2, 7] = value
        with pytest.raises(ValueError, match="student_logits .* must be finite"):
            tl.softmax_cross_entropy(inf, t, chunk_rows=2)
        with pytest.raises(ValueError, match="teacher_logits .* must be finite"):
            tl.softmax_cross_entropy(s, inf, chunk_rows=2)
    huge = s.clone()
    huge[0, 0] = 3e38  # finite, beyond float32 once divided by the temperature
    with pytest.raises(ValueError, match="student_logits"):
        tl.softmax_cross_entropy(huge, t)
    with pytest.raises(ValueError, match="center must be finite"):
        tl.softmax_cross_entropy(s, t, center=torch.full((8,), float("inf")))
    # Unchecked: no error, and the loss shows it.
    loss, _ = tl.softmax_cross_entropy(bad, t, check_values=False)
    assert not torch.isfinite(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_softmax_cross_entropy_argument_errors(rng):
    s = torch.zeros((3, 8))
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        tl.softmax_cross_entropy(s.numpy(), s)
    with pytest.raises(TypeError, match="teacher_logits must be a floating-point"):
        tl.softmax_cross_entropy(s, s.long())
    with pytest.raises(ValueError, match=r"teacher_logits must have shape \(3, 8\)"):
        tl.softmax_cross_entropy(s, s[:2])
    with pytest.raises(ValueError, match=r"center must have shape \(8\)"):
        tl.softmax_cross_entropy(s, s, center=torch.zeros(7))
    with pytest.raises(ValueError, match="the number of logits L must be at least 1"):
        tl.softmax_cross_entropy(s[:, :0], s[:, :0])
    with pytest.raises(ValueError, match=r"student_temp must be a finite number in \(0"):
        tl.softmax_cross_entropy(s, s, student_temp=0.0)
    with pytest.raises(TypeError, match="teacher_temp must be a number"):
        tl.softmax_cross_entropy(s, s, teacher_temp="0.1")
    with pytest.raises(ValueError, match="chunk_rows must be at least 1"):
        tl.softmax_cross_entropy(s, s, chunk_rows=0)
    with pytest.raises(ValueError, match="teacher_logits must be on the device"):
        tl.softmax_cross_entropy(s, s.to("meta"))


def test_half_precision_logits_are_upcast(rng):
    s = torch.from_numpy(rng.standard_normal((4, 50)).astype(np.float32)).bfloat16()
    t = torch.from_numpy(rng.standard_normal((4, 50)).astype(np.float32)).half()
    loss, grad = tl.softmax_cross_entropy(s, t)
    closs, cgrad = cribo.softmax_cross_entropy(s.float().numpy(), t.float().numpy())
    assert loss.dtype == grad.dtype == torch.float32
    assert_close_f32(loss.numpy(), closs, reduction=50, scale=40.0)
    assert_close_f32(grad.numpy(), cgrad, scale=10.0, rtol=1e-4)


# ============================================================================
# update_center
# ============================================================================

def test_update_center_equals_the_c_core(rng):
    c = rng.standard_normal(3000).astype(np.float32)
    t = rng.standard_normal((37, 3000)).astype(np.float32)
    out = tl.update_center(torch.from_numpy(c), torch.from_numpy(t), 0.9)
    assert out.dtype == torch.float32 and out.shape == (3000,)
    assert_close_f32(out.numpy(), cribo.update_center(c, t, 0.9), reduction=37)
    assert_close_f32(out.numpy(), ref.update_center(c, t, 0.9), reduction=37)
    same = tl.update_center(torch.from_numpy(c), torch.zeros((0, 3000)), 0.9)
    np.testing.assert_array_equal(same.numpy(), c)
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \[0, 1\]"):
        tl.update_center(torch.from_numpy(c), torch.from_numpy(t), 1.5)
    with pytest.raises(ValueError, match=r"teacher_logits must have shape \(R, 3000\)"):
        tl.update_center(torch.from_numpy(c), torch.from_numpy(t[:, :5]))
    with pytest.raises(ValueError, match="teacher_logits must be finite"):
        tl.update_center(torch.from_numpy(c), torch.from_numpy(t) / 0.0)


# ============================================================================
# cribo_losses
# ============================================================================

# The C tests' inputs and cases, plus one the torch engine adds.
CASES = C_CASES + [dict(no_masks=True)]


def _assert_equal_to_c(out: tl.TorchCriboLosses, c: cribo.CriboLosses, B: int, M: int,
                       L: int) -> None:
    scale = 2.0 * 4 / 0.1
    for attr in ("total", "global_", "objects", "neighbours"):
        value = getattr(out, attr)
        assert value.dim() == 0 and value.dtype == torch.float64
        assert_close_f32(float(value), getattr(c, attr), scale=scale, reduction=L, err_msg=attr)
    assert out.grad_global.shape == (2, B, L) and out.grad_objects.shape == (2, M, L)
    assert_close_f32(out.grad_global.numpy(), c.grad_global, scale=10.0 / B, rtol=1e-4)
    assert_close_f32(out.grad_objects.numpy(), c.grad_objects, scale=10.0, rtol=1e-4)
    assert_close_f32(out.center_global.numpy(), c.center_global, reduction=2 * B)
    assert_close_f32(out.center_objects.numpy(), c.center_objects, reduction=max(2 * M, 1))
    assert (int(out.n_pairs1), int(out.n_pairs2)) == (c.n_pairs1, c.n_pairs2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c) or "default")
@pytest.mark.parametrize("B,M,L", [(1, 1, 3), (4, 7, 64), (3, 0, 16), (2, 40, 4096)])
def test_cribo_losses_equal_the_c_core(case, B, M, L):
    kw = case_inputs(case, B, M, L)
    out = tl.cribo_losses(**_t(kw))
    _assert_equal_to_c(out, cribo.cribo_losses(**kw), B, M, L)
    r = ref.cribo_losses(**kw)
    assert_close_f32(float(out.total), r["total"], scale=80.0, reduction=L)
    assert_close_f32(out.grad_objects.numpy(), r["grad_objects"], scale=10.0, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_cribo_losses_chunking(chunk, rng):
    B, M, L = 5, 12, 96
    kw = _head_outputs(rng, B, M, L)
    out = tl.cribo_losses(**_t(kw), chunk_rows=chunk)
    _assert_equal_to_c(out, cribo.cribo_losses(**kw), B, M, L)


def test_zero_weight_term_is_reported_but_has_no_gradient(rng):
    kw = _t(_head_outputs(rng, 3, 5, 32))
    full = tl.cribo_losses(**kw)
    no_nn = tl.cribo_losses(**kw, weights=(1.0, 1.0, 0.0))
    assert float(no_nn.neighbours) == pytest.approx(float(full.neighbours), rel=1e-6)
    assert float(no_nn.total) == pytest.approx(float(full.global_ + full.objects), rel=1e-6)
    base = tl.cribo_losses(**{**kw, "teacher_neighbours": None})
    torch.testing.assert_close(no_nn.grad_objects, base.grad_objects, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_denominators_split_a_batch_into_shares_that_sum_to_the_whole(as_tensor, rng):
    B, M, L = 6, 10, 32
    kw = _t(_head_outputs(rng, B, M, L))
    full = tl.cribo_losses(**kw)
    den = (B, M, int(kw["mask1"].sum()), int(kw["mask2"].sum()))
    den_arg = torch.tensor(den) if as_tensor else den
    parts = []
    for bs, ms in ((slice(0, 2), slice(0, 7)), (slice(2, 6), slice(7, 10))):
        part = {k: (v[:, bs] if k in ("student_global", "teacher_global")
                    else v[:, ms] if k in ("student_objects", "teacher_objects",
                                           "teacher_neighbours")
                    else v[ms] if k in ("mask1", "mask2") else v) for k, v in kw.items()}
        parts.append(tl.cribo_losses(**part, denominators=den_arg))
    for attr in ("total", "global_", "objects", "neighbours"):
        assert float(sum(getattr(p, attr) for p in parts)) == pytest.approx(
            float(getattr(full, attr)), rel=1e-6)
    torch.testing.assert_close(torch.cat([p.grad_global for p in parts], 1), full.grad_global,
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cat([p.grad_objects for p in parts], 1), full.grad_objects,
                               rtol=1e-6, atol=1e-9)
    small = torch.tensor((B, M, 0, 0)) if as_tensor else (B, M, 0, 0)
    with pytest.raises(ValueError, match="denominators"):
        tl.cribo_losses(**kw, denominators=small)
    with pytest.raises(ValueError, match="denominators"):
        tl.cribo_losses(**kw, denominators=(1, M, 0, 0))


def test_masks_all_false_and_one_row(rng):
    kw = _head_outputs(rng, 1, 1, 5)
    kw["mask1"] = kw["mask2"] = np.zeros(1, bool)
    out = tl.cribo_losses(**_t(kw))
    assert float(out.neighbours) == 0.0 and int(out.n_pairs1) == int(out.n_pairs2) == 0
    _assert_equal_to_c(out, cribo.cribo_losses(**kw), 1, 1, 5)


def test_non_finite_inputs_raise_naming_the_argument(rng):
    kw = _t(_head_outputs(rng, 2, 4, 8))
    kw["mask1"] = torch.tensor([True, False, True, True])
    for name in ("student_global", "teacher_global", "student_objects", "teacher_objects",
                 "teacher_neighbours", "center_global", "center_objects"):
        bad = kw[name].clone()
        bad.view(-1)[0] = float("inf")
        with pytest.raises(ValueError, match=f"{name} .*must be finite"):
            tl.cribo_losses(**{**kw, name: bad})
        unchecked = tl.cribo_losses(**{**kw, name: bad}, check_values=False)
        if not name.startswith("center"):  # a bad centre shows in the new centre instead
            assert not torch.isfinite(unchecked.total)
    # A neighbour outside the mask is never read, as in the C core.
    tn = kw["teacher_neighbours"].clone()
    tn[0, 1] = float("nan")
    out = tl.cribo_losses(**{**kw, "teacher_neighbours": tn})
    c = cribo.cribo_losses(**{k: v.numpy() if isinstance(v, torch.Tensor) else v
                              for k, v in {**kw, "teacher_neighbours": tn}.items()})
    _assert_equal_to_c(out, c, 2, 4, 8)


def test_cribo_losses_argument_errors(rng):
    kw = _t(_head_outputs(rng, 2, 3, 8))
    cases = [
        (TypeError, "mask1 must be a bool tensor", dict(mask1=kw["mask1"].long())),
        (ValueError, r"mask2 must have shape \(3\)", dict(mask2=kw["mask2"][:2])),
        (ValueError, r"teacher_objects must have shape \(2, 3, 8\)",
         dict(teacher_objects=kw["teacher_objects"][:, :2])),
        (ValueError, r"student_objects must have shape \(2, M, 8\)",
         dict(student_objects=kw["student_objects"][..., :4])),
        (ValueError, r"teacher_neighbours must have shape \(2, 3, 8\)",
         dict(teacher_neighbours=kw["teacher_neighbours"][:1])),
        (ValueError, r"center_objects must have shape \(8\)",
         dict(center_objects=kw["center_objects"][:3])),
        (ValueError, "weights must be 3 numbers", dict(weights=(1.0, 1.0))),
        (ValueError, r"weights must be a finite number in \[0", dict(weights=(1.0, -1.0, 1.0))),
        (ValueError, "teacher_temp_objects must be a finite number",
         dict(teacher_temp_objects=0.0)),
        (ValueError, "denominators must be 4 integers", dict(denominators=(1, 2, 3))),
        (ValueError, "student_objects must be on the device",
         dict(student_objects=kw["student_objects"].to("meta"))),
    ]
    for exc, pattern, change in cases:
        with pytest.raises(exc, match=pattern):
            tl.cribo_losses(**{**kw, **change})


# ============================================================================
# no host round trip
# ============================================================================

def _meta(kw: dict) -> dict:
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def test_every_function_runs_on_the_meta_device(rng):
    """The meta device holds no values, so nothing here can have been read on the host."""
    kw = _meta(_t(_head_outputs(rng, 3, 4, 16)))
    out = tl.cribo_losses(**kw, denominators=torch.tensor((6, 8, 3, 3), device="meta"))
    assert out.grad_objects.shape == (2, 4, 16) and out.total.device.type == "meta"
    loss, grad = tl.softmax_cross_entropy(kw["student_global"][0], kw["teacher_global"][0],
                                          center=kw["center_global"], chunk_rows=2)
    assert loss.shape == (3,) and grad.shape == (3, 16)
    assert tl.update_center(kw["center_global"], kw["teacher_global"][0]).shape == (16,)


def test_no_host_round_trip_on_cpu_tensors_unchecked(monkeypatch, rng):
    kw = _t(_head_outputs(rng, 3, 4, 16))

    def refuse(*args, **kwargs):
        raise AssertionError("host round trip")

    with monkeypatch.context() as m:
        for name in ("cpu", "numpy", "item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, refuse)
        tl.cribo_losses(**kw, check_values=False, denominators=torch.tensor((3, 4, 4, 4)))
        tl.softmax_cross_entropy(kw["student_global"][0], kw["teacher_global"][0],
                                 check_values=False)
        tl.update_center(kw["center_global"], kw["teacher_global"][0], check_values=False)
        with pytest.raises(AssertionError, match="host round trip"):  # the checked path reads
            tl.cribo_losses(**kw, check_values=True)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(0, 6), st.integers(1, 40), st.booleans(),
       st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_cribo_losses_equal_the_c_core_on_random_shapes(B, M, L, neighbours, chunk, seed):
    rng = np.random.default_rng(seed)
    kw = _head_outputs(rng, B, M, L)
    if not neighbours:
        kw["teacher_neighbours"] = None
    out = tl.cribo_losses(**_t(kw), chunk_rows=chunk)
    _assert_equal_to_c(out, cribo.cribo_losses(**kw), B, M, L)
