"""Self-distillation losses and centres (docs/method.md §5; C kernel: csrc/loss.c).

For student logits s and teacher logits t with running centre C:
``p_t = softmax((t - C) / tau_t)``, ``H(p_t, p_s) = -sum_l p_t[l] log softmax(s / tau_s)[l]``,
``dH/ds = (softmax(s / tau_s) - p_t) / tau_s``.  CrIBo sums three such terms
(Lebailly, Stegmüller et al., ICLR 2024, §3.3): global cross-view, cross-view
object-level and cross-image object-level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .. import _C
from ._arrays import as_bool, as_float32, check_float, check_int

__all__ = ["softmax_cross_entropy", "update_center", "cribo_losses", "CriboLosses"]


def _logits(x: Any, fn: str, name: str) -> np.ndarray:
    a = as_float32(x, fn, name)
    if a.ndim != 2:
        raise ValueError(f"{fn}: {name} must have shape (R, L), got {a.shape}")
    return a


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
    s = _logits(student_logits, fn, "student_logits")
    t = _logits(teacher_logits, fn, "teacher_logits")
    c = None if center is None else as_float32(center, fn, "center")
    ts = check_float(student_temp, fn, "student_temp", 0.0, 1e5, lo_open=True)
    tt = check_float(teacher_temp, fn, "teacher_temp", 0.0, 1e5, lo_open=True)
    losses, _, grad = _C.softmax_cross_entropy(s, t, None, c, None, None, None, ts, tt, tt, True)
    return losses, grad


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
    c = as_float32(center, fn, "center")
    t = _logits(teacher_logits, fn, "teacher_logits")
    m = check_float(momentum, fn, "momentum", 0.0, 1.0)
    return _C.update_center(c, t, m)


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


def _xent(fn: str, names: Dict[str, str], *args: Any):
    """_C.softmax_cross_entropy, with a non-finite-input error renamed to ``fn``'s
    argument names (``names`` maps the kernel's argument names to ours)."""
    try:
        return _C.softmax_cross_entropy(*args)
    except ValueError as e:
        msg = str(e)
        if "must be finite" in msg:
            for c_name in sorted(names, key=len, reverse=True):
                prefix = f"softmax_cross_entropy: {c_name}"
                if msg.startswith(prefix):  # keep the kernel's account of the cause
                    raise ValueError(f"{fn}: {names[c_name]}{msg[len(prefix):]}") from None
        raise


def _views(x: Any, fn: str, name: str, rows: Optional[int] = None,
           width: Optional[int] = None) -> np.ndarray:
    a = as_float32(x, fn, name)
    if a.ndim != 3 or a.shape[0] != 2:
        raise ValueError(f"{fn}: {name} must have shape (2, rows, L) [view 1, view 2], "
                         f"got {a.shape}")
    if (rows is not None and a.shape[1] != rows) or (width is not None and a.shape[2] != width):
        raise ValueError(f"{fn}: {name} must have shape (2, {rows}, {width}), got {a.shape}")
    return a


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
    sg = _views(student_global, fn, "student_global")
    B, L = sg.shape[1], sg.shape[2]
    tg = _views(teacher_global, fn, "teacher_global", B, L)
    so = _views(student_objects, fn, "student_objects", None, L)
    M = so.shape[1]
    to = _views(teacher_objects, fn, "teacher_objects", M, L)
    tn = None if teacher_neighbours is None else _views(teacher_neighbours, fn,
                                                        "teacher_neighbours", M, L)
    m1 = np.ones(M, bool) if mask1 is None else as_bool(mask1, fn, "mask1", (M,))
    m2 = np.ones(M, bool) if mask2 is None else as_bool(mask2, fn, "mask2", (M,))
    cg = as_float32(center_global, fn, "center_global")
    co = as_float32(center_objects, fn, "center_objects")
    for name, c in (("center_global", cg), ("center_objects", co)):
        if c.shape != (L,):
            raise ValueError(f"{fn}: {name} must have shape ({L},), got {c.shape}")
    ts = check_float(student_temp, fn, "student_temp", 0.0, 1e5, lo_open=True)
    tg_temp = check_float(teacher_temp, fn, "teacher_temp", 0.0, 1e5, lo_open=True)
    to_temp = tg_temp if teacher_temp_objects is None else check_float(
        teacher_temp_objects, fn, "teacher_temp_objects", 0.0, 1e5, lo_open=True)
    if len(weights) != 3:
        raise ValueError(f"{fn}: weights must be (w_global, w_objects, w_neighbours), "
                         f"got {weights!r}")
    w_g, w_o, w_nn = (check_float(w, fn, "weights", 0.0, 1e6) for w in weights)
    mom = check_float(center_momentum, fn, "center_momentum", 0.0, 1.0)
    if B < 1:
        raise ValueError(f"{fn}: student_global must hold at least one image, got B = 0")
    Z = (int(m1.sum()), int(m2.sum()))
    if denominators is None:
        B_den, M_den, Z_den = B, M, Z
    else:
        if len(denominators) != 4:
            raise ValueError(f"{fn}: denominators must be (B, M, Z1, Z2), got {denominators!r}")
        B_den, M_den, z1, z2 = (check_int(d, fn, "denominators", 0, 2**62) for d in denominators)
        Z_den = (z1, z2)
        if B_den < B or M_den < M or z1 < Z[0] or z2 < Z[1]:
            raise ValueError(f"{fn}: denominators {tuple(denominators)} must be at least this "
                             f"call's counts (B={B}, M={M}, Z1={Z[0]}, Z2={Z[1]})")

    # Global: student view 2 learns from teacher view 1 and vice versa.
    # Gradients are written by the kernel straight into these arrays (no copies).
    grad_global = np.empty_like(sg)
    wrow = np.full(B, w_g / B_den, np.float32)
    l_g = 0.0
    for v in (0, 1):
        la, _, _ = _xent(fn, {"student_logits": "student_global",
                              "teacher_logits": "teacher_global", "center": "center_global"},
                         sg[1 - v], tg[v], None, cg, None, wrow, None, ts, tg_temp, tg_temp, True,
                         grad_global[1 - v])
        l_g += float(la.astype(np.float64).sum() / B_den)

    # Objects: student view 2 row j learns from teacher view 1 row j (L_o) and
    # from neighbour nn1_j (L_nn, where m1_j); symmetrically for view 1.
    grad_objects = np.empty_like(so)
    l_o = 0.0
    l_nn = 0.0
    if M > 0:
        w_obj = np.full(M, w_o / M_den, np.float32)
        for v, mask, z, zd in ((0, m1, Z[0], Z_den[0]), (1, m2, Z[1], Z_den[1])):
            use_nn = tn is not None and z > 0
            wb = (mask * (w_nn / zd)).astype(np.float32) if use_nn else None
            la, lb, _ = _xent(
                fn, {"student_logits": "student_objects", "teacher_logits": "teacher_objects",
                     "teacher_logits_b": "teacher_neighbours", "center": "center_objects",
                     "center_b": "center_objects"},
                so[1 - v], to[v], tn[v] if use_nn else None, co, co if use_nn else None,
                w_obj, wb, ts, to_temp, to_temp, True, grad_objects[1 - v])
            l_o += float(la.astype(np.float64).sum() / M_den)
            if use_nn:
                # Weight 0 skips the neighbour part of a row; compute the masked rows'
                # losses even when w_nn = 0 so the term is still reported.
                if w_nn == 0.0:
                    lb = _xent(fn, {"student_logits": "student_objects",
                                    "teacher_logits": "teacher_neighbours",
                                    "center": "center_objects"},
                               so[1 - v][mask], tn[v][mask], None, co, None, None, None, ts,
                               to_temp, to_temp, False)[0]
                    l_nn += float(lb.astype(np.float64).sum() / zd)
                else:
                    l_nn += float(lb[mask].astype(np.float64).sum() / zd)

    total = w_g * l_g + w_o * l_o + w_nn * l_nn
    new_cg = _C.update_center(cg, tg.reshape(2 * B, L), mom)
    new_co = _C.update_center(co, to.reshape(2 * M, L), mom)
    return CriboLosses(total=float(total), global_=l_g, objects=l_o, neighbours=l_nn,
                       grad_global=grad_global, grad_objects=grad_objects,
                       center_global=new_cg, center_objects=new_co,
                       n_pairs1=Z[0], n_pairs2=Z[1])
