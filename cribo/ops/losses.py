"""Self-distillation losses and centres (docs/method.md §5; C kernel: csrc/loss.c).

For student logits s and teacher logits t with running centre C:
``p_t = softmax((t - C) / tau_t)``, ``H(p_t, p_s) = -sum_l p_t[l] log softmax(s / tau_s)[l]``,
``dH/ds = (softmax(s / tau_s) - p_t) / tau_s``.  CrIBo sums three such terms
(Lebailly, Stegmüller et al., ICLR 2024, §3.3): global cross-view, cross-view
object-level and cross-image object-level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .. import _C
from ._arrays import as_bool, as_float32

__all__ = ["softmax_cross_entropy", "update_center", "cribo_losses", "CriboLosses"]


def _opt_float32(x: Any, fn: str, name: str) -> Optional[np.ndarray]:
    return None if x is None else as_float32(x, fn, name)


def softmax_cross_entropy(student_logits: Any, teacher_logits: Any, *, center: Any = None,
                          student_temp: float = 0.1, teacher_temp: float = 0.07
                          ) -> Tuple[np.ndarray, np.ndarray]:
    """Row-wise H(softmax((t - C)/tau_t), softmax(s/tau_s)) and its gradient w.r.t. s.

    One fused pass per row: the logits are read once from memory and the
    gradient written once; exponentials are summed in double.

    Args:
        student_logits: (R, L) float.
        teacher_logits: (R, L) float (no gradient flows to the teacher).
        center: optional (L,) teacher centre C.
        student_temp, teacher_temp: temperatures, > 0.

    Returns:
        ``(losses, grad)``: (R,) float32 per-row cross-entropies and (R, L)
        float32 ``(softmax(s/tau_s) - p_t) / tau_s``.
    """
    fn = "softmax_cross_entropy"
    return _C.softmax_cross_entropy(
        student_logits=as_float32(student_logits, fn, "student_logits"),
        teacher_logits=as_float32(teacher_logits, fn, "teacher_logits"),
        center=_opt_float32(center, fn, "center"), student_temp=student_temp,
        teacher_temp=teacher_temp)


def update_center(center: Any, teacher_logits: Any, momentum: float = 0.9) -> np.ndarray:
    """``momentum * center + (1 - momentum) * mean(teacher_logits, axis=0)``.

    Args:
        center: (L,) current centre.
        teacher_logits: (R, L) this step's teacher outputs; with R = 0 the centre
            is returned unchanged.
        momentum: in [0, 1] (0.9 in DINO and CrIBo).

    Returns:
        (L,) float32 new centre (the input is not modified).
    """
    fn = "update_center"
    return _C.update_center(center=as_float32(center, fn, "center"),
                            teacher_logits=as_float32(teacher_logits, fn, "teacher_logits"),
                            momentum=momentum)


@dataclass(frozen=True)
class CriboLosses:
    """The CrIBo objective at one step (see :func:`cribo_losses`).

    Attributes:
        total: weighted sum ``w_g * global_ + w_o * objects + w_nn * neighbours``.
        global_: L_g, global cross-view term.
        objects: L_o, cross-view object-level term (0 with no object).
        neighbours: L_nn, cross-image object-level term (0 with no kept pair).
        grad_global: (2, B, L) gradient of ``total`` w.r.t. the student's global
            logits [view 1, view 2].
        grad_objects: (2, M, L) gradient of ``total`` w.r.t. the student's object
            logits [view 1, view 2].
        center_global, center_objects: (L,) the centres updated with this step's
            teacher outputs (the losses used the previous ones).
        n_pairs1, n_pairs2: Z1 and Z2, cycle-consistent pairs per direction.
    """

    total: float
    global_: float
    objects: float
    neighbours: float
    grad_global: np.ndarray
    grad_objects: np.ndarray
    center_global: np.ndarray
    center_objects: np.ndarray
    n_pairs1: int
    n_pairs2: int


def cribo_losses(student_global: Any, teacher_global: Any, student_objects: Any,
                 teacher_objects: Any, teacher_neighbours: Any = None, mask1: Any = None,
                 mask2: Any = None, *, center_global: Any, center_objects: Any,
                 student_temp: float = 0.1, teacher_temp: float = 0.07,
                 teacher_temp_objects: Optional[float] = None,
                 weights: Sequence[float] = (1.0, 1.0, 1.0),
                 center_momentum: float = 0.9,
                 denominators: Optional[Sequence[int]] = None) -> CriboLosses:
    """CrIBo's three loss terms, their gradients and the centre update (docs/method.md §5).

    ``L_g  = mean_b [H(pt1_b, ps2_b) + H(pt2_b, ps1_b)]`` (global, centre C_g);
    ``L_o  = mean_j [H(pt1_j, ps2_j) + H(pt2_j, ps1_j)]`` over the M valid objects
    (centre C_o); ``L_nn = (1/Z1) sum_j m1_j H(pnn1_j, ps2_j) + (1/Z2) sum_j m2_j
    H(pnn2_j, ps1_j)`` with the neighbours' teacher outputs centred with C_o and
    sharpened with the object teacher temperature, Z = sum of the mask (a part with
    Z = 0 is 0).  Each student object row gets its L_o and L_nn gradients in one
    fused pass.  A term with weight 0 is still reported, at no gradient cost.

    Args:
        student_global, teacher_global: (2, B, L) CLS head outputs [view 1, view 2].
        student_objects, teacher_objects: (2, M, L) object head outputs.
        teacher_neighbours: (2, M, L) teacher head outputs of the retrieved queue
            entries nn1 (row 0) and nn2 (row 1), or None (no cross-image term).
        mask1, mask2: (M,) bool cycle-consistency masks (None: all True).
        center_global, center_objects: (L,) centres C_g and C_o.
        student_temp: tau_s (0.1).
        teacher_temp: tau_t of the global term (0.04 -> 0.07 schedule in CrIBo).
        teacher_temp_objects: tau_t of the object terms (default: teacher_temp).
        weights: (w_g, w_o, w_nn), e.g. (1, 0, 0) for DINO's global term alone.
        center_momentum: centre EMA momentum (0.9).
        denominators: optional (B, M, Z1, Z2) used in place of this call's own
            batch size, object count and pair counts.  A distributed step passes
            the totals over all processes, so that each process returns its share
            of the global loss and gradient (the shares sum to what one process
            with the whole batch computes).  The centres returned are still those
            of this call's rows alone.

    Returns:
        A :class:`CriboLosses`.
    """
    fn = "cribo_losses"
    (total, l_g, l_o, l_nn, grad_global, grad_objects, new_cg, new_co, z1,
     z2) = _C.cribo_losses(
        student_global=as_float32(student_global, fn, "student_global"),
        teacher_global=as_float32(teacher_global, fn, "teacher_global"),
        student_objects=as_float32(student_objects, fn, "student_objects"),
        teacher_objects=as_float32(teacher_objects, fn, "teacher_objects"),
        teacher_neighbours=_opt_float32(teacher_neighbours, fn, "teacher_neighbours"),
        mask1=None if mask1 is None else as_bool(mask1, fn, "mask1"),
        mask2=None if mask2 is None else as_bool(mask2, fn, "mask2"),
        center_global=as_float32(center_global, fn, "center_global"),
        center_objects=as_float32(center_objects, fn, "center_objects"),
        student_temp=student_temp, teacher_temp=teacher_temp,
        teacher_temp_objects=teacher_temp_objects, weights=weights,
        center_momentum=center_momentum, denominators=denominators)
    return CriboLosses(total=total, global_=l_g, objects=l_o, neighbours=l_nn,
                       grad_global=grad_global, grad_objects=grad_objects,
                       center_global=new_cg, center_objects=new_co, n_pairs1=z1, n_pairs2=z2)
