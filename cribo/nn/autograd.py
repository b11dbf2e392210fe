"""The C operators of :mod:`cribo.ops` as torch autograd nodes (docs/method.md §3, §5).

=========================  ===================================================
function                   what it differentiates
=========================  ===================================================
:func:`pool_tokens`        hard per-view mean pooling, (B, 2, N, d) tokens ->
                           (B, 2, K, d) objects; forward and backward in C
                           (:func:`cribo.pool`, :func:`cribo.pool_backward`)
:func:`student_logits`     the student's side of the objective: pooling, then
                           the head on the CLS outputs and on the objects
:func:`fused_losses`       the three CrIBo terms (:func:`cribo.cribo_losses`);
                           the gradient w.r.t. the student's logits comes from
                           the same fused C pass as the losses
:func:`device_losses`      the same with :func:`cribo.nn.torch_ops.cribo_losses`
                           on the logits' device (the objective's torch backend)
=========================  ===================================================

:func:`pool_tokens` and :func:`student_logits` take the labels as a NumPy array
(the C backend: C pooling, host copies) or as a torch tensor (the torch backend:
:func:`cribo.nn.torch_ops.pool` on the tokens' device, autograd native).

Each function returns its results; the autograd nodes only carry what their
backward pass needs.  CPU float32 tensors reach the C kernels without copies
(``Tensor.numpy()`` shares memory); tensors on another device, or in another
dtype, are copied to host float32 and the results copied back.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..ops.losses import CriboLosses, cribo_losses
from ..ops.pooling import pool, pool_backward
from . import torch_ops

__all__ = ["NonFiniteError", "check_finite", "host_float32", "pool_tokens", "student_logits",
           "fused_losses", "device_losses"]

#: Cluster labels / valid clusters as the objective hands them to the student: NumPy
#: arrays (C backend) or tensors on the tokens' device (torch backend).
Labels = Union[np.ndarray, torch.Tensor]


class NonFiniteError(FloatingPointError):
    """A network output the objective was given holds NaN or infinite values (a
    diverging run): raised before the C operators see it, naming the tensor."""


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raises :class:`NonFiniteError`, naming ``what``, if ``t`` holds a NaN or an
    infinity."""
    if t.numel() and not bool(torch.isfinite(t.detach()).all()):
        n_bad = int((~torch.isfinite(t.detach())).sum())
        raise NonFiniteError(f"{what} hold {n_bad} non-finite value{'s' if n_bad > 1 else ''} "
                             f"(NaN or inf) of {t.numel()}")


def host_float32(t: torch.Tensor) -> np.ndarray:
    """A float32 NumPy view of ``t``, same shape (no copy for a contiguous CPU
    float32 tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype != torch.float32:
        t = t.float()
    return t.contiguous().numpy()


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------

class _Pool(torch.autograd.Function):
    """Hard per-view mean pooling with the C forward and backward."""

    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, labels: np.ndarray, K: int) -> torch.Tensor:
        check_finite(tokens, "the student's patch tokens")
        ctx.labels, ctx.K = labels, K
        ctx.device, ctx.dtype = tokens.device, tokens.dtype
        out = pool(host_float32(tokens), labels, K)
        return torch.from_numpy(out).to(tokens.device, tokens.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        dz = pool_backward(host_float32(grad), ctx.labels, ctx.K)
        return torch.from_numpy(dz).to(ctx.device, ctx.dtype), None, None


def pool_tokens(tokens: torch.Tensor, labels: Labels, n_clusters: int) -> torch.Tensor:
    """Differentiable :func:`cribo.pool`.

    Args:
        tokens: (B, 2, N, d) patch tokens of the two views.
        labels: (B, 2, N) int64 cluster of each token, in [0, n_clusters): a NumPy
            array (the C kernels, tokens copied to the host unless CPU float32),
            or a tensor (:func:`cribo.nn.torch_ops.pool` on the tokens' device,
            no host copy and no value check: the objective checks the logits).
        n_clusters: K.

    Returns:
        (B, 2, K, d) objects: the mean of each cluster's tokens per view (0 for an
        empty cluster), with gradient w.r.t. ``tokens``.

    Raises:
        NonFiniteError: ``tokens`` hold a NaN or an infinity (NumPy labels only).
    """
    if isinstance(labels, torch.Tensor):
        out = torch_ops.pool(tokens, labels.to(tokens.device), n_clusters, check_values=False)
        return out.to(tokens.dtype)
    return _Pool.apply(tokens, labels, n_clusters)


def student_logits(cls: torch.Tensor, tokens: torch.Tensor, head: nn.Module,
                   labels: Labels, valid: Labels) -> Tuple[torch.Tensor, torch.Tensor]:
    """The student's side of the objective, with gradient.

    Args:
        cls: (B, 2, d) CLS outputs [image, view].
        tokens: (B, 2, N, d) final patch tokens.
        head: a module with ``forward_global`` and ``forward_objects``.
        labels: (B, 2, N) the teacher's cluster labels (array or tensor, see
            :func:`pool_tokens`).
        valid: (B, K) bool clusters present in both views (array or tensor).

    Returns:
        Global logits (2, B, L) and object logits (2, M, L), M = valid.sum().
    """
    B, _, _, d = tokens.shape
    K = valid.shape[1]
    objects = pool_tokens(tokens, labels, K)
    vmask = (valid if isinstance(valid, torch.Tensor) else torch.from_numpy(valid)
             ).to(objects.device)
    o1, o2 = objects[:, 0][vmask], objects[:, 1][vmask]
    g = head.forward_global(cls.transpose(0, 1).reshape(2 * B, d))
    o = head.forward_objects(torch.cat([o1, o2]))
    return g.reshape(2, B, -1), o.reshape(2, o1.shape[0], -1)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

class _FusedGradient(torch.autograd.Function):
    """The loss value as an autograd node whose gradient w.r.t. the student's
    logits was computed with it (by the fused C pass): backward only scales it."""

    @staticmethod
    def forward(ctx: Any, student_global: torch.Tensor, student_objects: torch.Tensor,
                total: float, grad_global: np.ndarray, grad_objects: np.ndarray,
                grad_scale: float) -> torch.Tensor:
        ctx.grads = (grad_global, grad_objects)
        ctx.scale = grad_scale
        ctx.meta = (student_global.device, student_global.dtype)
        return torch.tensor(total, dtype=student_global.dtype, device=student_global.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        device, dtype = ctx.meta
        g = float(grad) * ctx.scale
        gg, go = (torch.from_numpy(x).to(device, dtype) * g for x in ctx.grads)
        return gg, go, None, None, None, None


def fused_losses(student_global: torch.Tensor, student_objects: torch.Tensor,
                 teacher_global: np.ndarray, teacher_objects: np.ndarray,
                 teacher_neighbours: Optional[np.ndarray], mask1: np.ndarray,
                 mask2: np.ndarray, *, center_global: np.ndarray, center_objects: np.ndarray,
                 student_temp: float, teacher_temp: float,
                 teacher_temp_objects: Optional[float], weights: Sequence[float],
                 center_momentum: float, denominators: Optional[Sequence[int]] = None,
                 grad_scale: float = 1.0) -> Tuple[torch.Tensor, CriboLosses]:
    """:func:`cribo.cribo_losses` with its gradient on autograd.

    Args:
        student_global: (2, B, L) the student's global logits, with gradient.
        student_objects: (2, M, L) the student's object logits, with gradient.
        teacher_global, teacher_objects, teacher_neighbours, mask1, mask2,
        center_global, center_objects, student_temp, teacher_temp,
        teacher_temp_objects, weights, center_momentum, denominators: as
            :func:`cribo.cribo_losses` (teacher side as float32 arrays).
        grad_scale: factor on the gradient that reaches the student's logits
            (not on the loss value): the world size in a distributed step, where
            DDP averages the processes' gradients that should be summed.

    Returns:
        ``(loss, result)``: the weighted total as a 0-d tensor on the student's
        device and dtype, to call ``backward()`` on, and the
        :class:`cribo.CriboLosses` it came from (terms, gradients, new centres).
    """
    result = cribo_losses(host_float32(student_global), teacher_global,
                          host_float32(student_objects), teacher_objects, teacher_neighbours,
                          mask1, mask2, center_global=center_global,
                          center_objects=center_objects, student_temp=student_temp,
                          teacher_temp=teacher_temp, teacher_temp_objects=teacher_temp_objects,
                          weights=weights, center_momentum=center_momentum,
                          denominators=denominators)
    loss = _FusedGradient.apply(student_global, student_objects, result.total,
                                result.grad_global, result.grad_objects, float(grad_scale))
    return loss, result


class _DeviceGradient(torch.autograd.Function):
    """:class:`_FusedGradient` for gradients held as tensors on the logits' device:
    backward scales them by the incoming gradient without reading it on the host."""

    @staticmethod
    def forward(ctx: Any, student_global: torch.Tensor, student_objects: torch.Tensor,
                total: torch.Tensor, grad_global: torch.Tensor, grad_objects: torch.Tensor,
                grad_scale: float) -> torch.Tensor:
        ctx.grads = (grad_global, grad_objects)
        ctx.scale = grad_scale
        ctx.dtypes = (student_global.dtype, student_objects.dtype)
        return total.detach().to(student_global.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        g = grad.double() * ctx.scale  # as _FusedGradient: float(grad) * scale, then float32
        gg, go = ((x * g.to(x.dtype)).to(dt) for x, dt in zip(ctx.grads, ctx.dtypes))
        return gg, go, None, None, None, None


def device_losses(student_global: torch.Tensor, student_objects: torch.Tensor,
                  teacher_global: torch.Tensor, teacher_objects: torch.Tensor,
                  teacher_neighbours: Optional[torch.Tensor], mask1: torch.Tensor,
                  mask2: torch.Tensor, *, center_global: torch.Tensor,
                  center_objects: torch.Tensor, student_temp: float, teacher_temp: float,
                  teacher_temp_objects: Optional[float], weights: Sequence[float],
                  center_momentum: float,
                  denominators: Optional[torch.Tensor] = None,
                  grad_scale: float = 1.0) -> Tuple[torch.Tensor, "torch_ops.TorchCriboLosses"]:
    """:func:`fused_losses` on the logits' device (:func:`cribo.nn.torch_ops.cribo_losses`).

    Same arguments as :func:`fused_losses`, all tensors on the student logits'
    device (``denominators``: an optional (4,) int64 tensor, e.g. straight from
    an all-reduce).  No value is read on the host: the losses are computed
    unchecked (the objective checks its inputs' finiteness itself).

    Returns:
        ``(loss, result)``: the weighted total as a 0-d tensor in the student's
        dtype, whose gradient w.r.t. the student's logits is ``result``'s
        explicit gradient (times ``grad_scale``), and the
        :class:`cribo.nn.torch_ops.TorchCriboLosses` (terms, gradients, centres).
    """
    result = torch_ops.cribo_losses(
        student_global.detach(), teacher_global, student_objects.detach(), teacher_objects,
        teacher_neighbours, mask1, mask2, center_global=center_global,
        center_objects=center_objects, student_temp=student_temp, teacher_temp=teacher_temp,
        teacher_temp_objects=teacher_temp_objects, weights=weights,
        center_momentum=center_momentum, denominators=denominators, check_values=False)
    loss = _DeviceGradient.apply(student_global, student_objects, result.total,
                                 result.grad_global, result.grad_objects, float(grad_scale))
    return loss, result
