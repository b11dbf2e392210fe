"""Self-distillation losses and centres in torch, on the tensors' device (docs/method.md §5).

The torch twins of :func:`cribo.softmax_cross_entropy`, :func:`cribo.cribo_losses`
and :func:`cribo.update_center` (C kernel csrc/loss.c, assembled in
csrc/binding/_C.c).  For student logits s and teacher logits t with centre C:
``p_t = softmax((t - C) / tau_t)``, ``H = lse(s / tau_s) - sum_l p_t[l] s[l] / tau_s``,
``dH/ds = (softmax(s / tau_s) - p_t) / tau_s``.  Like the C core they return the
loss values and the gradient w.r.t. the student logits explicitly (no autograd
graph); the caller hands the gradient to autograd.

Design (what a reviewer must know):

- **Chunked over rows.**  Each pass works on ``chunk_rows`` rows at a time, by
  default as many as fit :data:`DEFAULT_CHUNK_BYTES` of temporaries (about 40
  bytes per logit), so L = 65,536 with tens of thousands of rows needs the
  output gradient plus a fixed working set.  The chunk size changes no result
  beyond float32 rounding of the row sums (tested with 1, 7 and all rows).
- **Precision as the C core.**  The logits are scaled (and centred) in float32,
  exactly as csrc/loss.c does, the maxima subtracted, the exponentials taken in
  float32, every row sum (normalisers, the dot product ``sum p_t s``) formed as
  the C core forms it -- float32 over blocks of 512 logits, float64 across
  blocks -- and the log-sum-exp in float64; the gradient coefficients are rounded to
  float32 and the gradient written as ``cs * e_s - ca * e_t``, the C formula.
  Centres are updated from float64 column sums.  Loss values are float64 0-d
  tensors (the C core returns Python floats, i.e. doubles).
- **Finiteness without a host round trip on the fast path.**  The C core
  raises on a non-finite scaled logit.  Here the checks are 0-d bool tensors
  from each chunk's row maxima (which propagate NaN) and minima, read once at
  the end of the call (one device-to-host read) -- only when ``check_values``
  is true, which by default it is for CPU tensors and not for others.  Unchecked, a non-finite
  logit makes the losses NaN or infinite, which the training loop sees in the
  logged loss (its stop on a non-finite loss).  The pair counts against
  ``denominators`` are checked the same way.
- **Masks on the device.**  Z1, Z2 are 0-d int64 tensors; a part with Z = 0
  is 0 through a division by ``max(Z, 1)``, not a host branch.  Neighbour rows
  outside a mask are zeroed before any arithmetic (ignored, as in the C core).

Length (over 500 lines): the three functions share one fused row pass, its
chunking and its checks, which belong together.  No ``.cpu()``, ``.numpy()`` or
``.item()`` anywhere (tests/nn/torch_ops/test_losses.py
runs every function on the ``meta`` device and under a guard against them).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = ["softmax_cross_entropy", "update_center", "cribo_losses", "TorchCriboLosses",
           "DEFAULT_CHUNK_BYTES"]

#: Working memory of one chunk of rows (bytes), the default of ``chunk_rows``.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Temporaries per logit of a chunk, in bytes: float32 scaled rows and exponentials
# of up to three streams, a product and the gradient terms.
_BYTES_PER_LOGIT = 40
# Row sums: float32 within blocks of this many logits, float64 across (csrc/loss.c).
_SUM_BLOCK = 512
_MAX_TEMP = 1e5


# ============================================================================
# argument checks
# ============================================================================

def _tensor(fn: str, x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    return x.detach().float()


def _shape(fn: str, x: torch.Tensor, name: str, expected: Tuple[Optional[int], ...],
           letters: str) -> None:
    if x.dim() != len(expected) or any(e is not None and s != e
                                       for s, e in zip(x.shape, expected)):
        want = ", ".join(str(e) if e is not None else letter
                         for e, letter in zip(expected, letters.split(",")))
        raise ValueError(f"{fn}: {name} must have shape ({want}), got {tuple(x.shape)}")


def _same_device(fn: str, ref: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{fn}: {name} must be on the device of the other inputs "
                             f"({ref.device}), got {t.device}")


def _number(fn: str, x: object, name: str, lo: float, hi: float, lo_open: bool) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {x!r}")
    v = float(x)
    ok = (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{fn}: {name} must be a finite number in {interval}, got {x!r}")
    return v


def _chunk(fn: str, chunk_rows: Optional[int], R: int, L: int) -> int:
    if chunk_rows is None:
        return max(1, min(max(R, 1), DEFAULT_CHUNK_BYTES // (_BYTES_PER_LOGIT * max(L, 1))))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int):
        raise TypeError(f"{fn}: chunk_rows must be an integer or None, got {chunk_rows!r}")
    if chunk_rows < 1:
        raise ValueError(f"{fn}: chunk_rows must be at least 1, got {chunk_rows}")
    return chunk_rows


def _resolve_check(check_values: Optional[bool], device: torch.device) -> bool:
    return device.type == "cpu" if check_values is None else bool(check_values)


def _row_weight(w: float, den: Union[int, torch.Tensor], n: int) -> Union[float, torch.Tensor]:
    """w / den rounded to float32 as the C core rounds its row weights: a float, or (n,)."""
    if isinstance(den, torch.Tensor):
        return (w / den.double()).float().expand(n)
    return struct.unpack("f", struct.pack("f", w / den))[0]


class _Flags:
    """Failure flags (0-d bool tensors, on the device) with their messages, read once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.items: list = []

    def add(self, flag: Callable[[], torch.Tensor], message: str) -> None:
        """Records ``flag()`` (a 0-d bool tensor, computed only when enabled)."""
        if self.enabled:
            self.items.append((flag(), message))

    def raise_first(self) -> None:
        """One device-to-host read; raises ValueError with the first set flag's message."""
        if not self.items:
            return
        set_flags = torch.stack([f.reshape(()) for f, _ in self.items]).tolist()
        for is_set, (_, message) in zip(set_flags, self.items):
            if is_set:
                raise ValueError(message)


def _nonfinite_message(fn: str, name: str, student: bool) -> str:
    how = "(divided by student_temp)" if student else "(after centring and scaling)"
    return (f"{fn}: {name} {how} must be finite, got NaN or infinity (in the input, or from a "
            "finite value beyond float32's range once scaled)")


# ============================================================================
# the fused row pass
# ============================================================================

def _rows(fn: str, flags: _Flags, names: Tuple[str, str, str], s: torch.Tensor,
          ta: torch.Tensor, tb: Optional[torch.Tensor], center: Optional[torch.Tensor],
          wa: Union[float, torch.Tensor], wb: Optional[torch.Tensor], use_b: Optional[torch.Tensor],
          inv_s: float, inv_a: float, inv_b: float, chunk: int, grad: Optional[torch.Tensor],
          grad_b: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The C kernel's fused pass over rows (csrc/loss.c), ``chunk`` rows at a time.

    Shapes: s, ta, tb (R, L); center (L,) or None; wa a float or (R,) float32
    row weights; wb (R,) float32 (rows outside ``use_b`` have weight 0); use_b
    (R,) bool, the rows whose tb is read (None: no tb).  ``grad`` (R, L) float32
    (or None) is overwritten with ``((wa + wb) p_s - wa p_a - wb p_b) / tau_s``,
    chunk by chunk; ``grad_b`` False leaves the wb term out (weight 0: no cost).

    Returns:
        loss_a (R,) float32: H(p_a, p_s) per row; loss_b (R,) float32 (0 outside
        use_b) or None.
    """
    R, L = s.shape
    loss_a = s.new_empty(R)
    loss_b = s.new_zeros(R) if tb is not None else None
    f32 = torch.float32
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        # Pass 1: scaled (centred) logits in float32 as the C core scales them.
        xs = s[r0:r1] * inv_s
        ms = xs.amax(dim=1, keepdim=True)
        flags.add(partial(_nonfinite, xs, ms), _nonfinite_message(fn, names[0], True))
        xa = (ta[r0:r1] - center if center is not None else ta[r0:r1]) * inv_a
        # Pass 2: exponentials in float32, blocked row sums, the log-sum-exp in float64.
        ea, ma, za, dot_a = _exp_rows(xa, xs)
        flags.add(partial(_nonfinite, xa, ma), _nonfinite_message(fn, names[1], False))
        if tb is not None:
            assert use_b is not None
            keep = use_b[r0:r1].unsqueeze(1)
            xb = (tb[r0:r1] - center if center is not None else tb[r0:r1]) * inv_b
            xb = torch.where(keep, xb, torch.zeros((), dtype=f32, device=xb.device))
            eb, mb, zb, dot_b = _exp_rows(xb, xs)
            flags.add(partial(_nonfinite, xb, mb), _nonfinite_message(fn, names[2], False))
        es = torch.exp(xs - ms)
        zs = _row_sum(es)
        lse = ms.squeeze(1).double() + torch.log(zs)
        loss_a[r0:r1] = (lse - dot_a / za).to(f32)
        if tb is not None:
            assert loss_b is not None
            loss_b[r0:r1] = torch.where(use_b[r0:r1], (lse - dot_b / zb).to(f32),
                                        torch.zeros((), dtype=f32, device=s.device))
        if grad is None:
            continue
        # Pass 3: the coefficients rounded to float32, then one write per logit.
        w_a = (wa[r0:r1].double() if isinstance(wa, torch.Tensor)
               else torch.full((r1 - r0,), wa, dtype=torch.float64, device=s.device))
        w_b = wb[r0:r1].double() if (tb is not None and grad_b and wb is not None) else None
        c_s = (w_a + w_b if w_b is not None else w_a) * inv_s / zs
        g = es.mul_(c_s.to(f32).unsqueeze(1))
        g.sub_(ea.mul_((w_a * inv_s / za).to(f32).unsqueeze(1)))
        if w_b is not None:
            g.sub_(eb.mul_((w_b * inv_s / zb).to(f32).unsqueeze(1)))
        grad[r0:r1] = g
    return loss_a, loss_b


def _exp_rows(x: torch.Tensor, xs: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (r, L) rows x: e = exp(x - m) (float32), the maxima m (r, 1), and the row sums
    of e and of e * xs (float64, (r,))."""
    m = x.amax(dim=1, keepdim=True)
    e = torch.exp(x - m)
    return e, m, _row_sum(e), _row_sum(e * xs)


def _any_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all()


def _nonfinite(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """0-d bool: a NaN or infinity in the rows x, whose maxima (NaN-propagating) are m."""
    return ~(torch.isfinite(m).all() & torch.isfinite(x.amin(dim=1)).all())


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """(r, L) float32 -> (r,) float64 row sums as csrc/loss.c forms them: float32 partial
    sums over blocks of 512 columns, added in float64 (no float64 copy of the rows)."""
    r, L = x.shape
    n_blocks = L // _SUM_BLOCK
    tail = x[:, n_blocks * _SUM_BLOCK:].sum(dim=1, dtype=torch.float64)
    if n_blocks == 0:
        return tail
    blocks = x[:, :n_blocks * _SUM_BLOCK].reshape(r, n_blocks, _SUM_BLOCK).sum(dim=2)
    return blocks.sum(dim=1, dtype=torch.float64) + tail


# ============================================================================
# public functions
# ============================================================================

def softmax_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                          center: Optional[torch.Tensor] = None, student_temp: float = 0.1,
                          teacher_temp: float = 0.07, chunk_rows: Optional[int] = None,
                          check_values: Optional[bool] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise H(softmax((t - C)/tau_t), softmax(s/tau_s)) and its gradient w.r.t. s.

    Equal to :func:`cribo.softmax_cross_entropy` within float32 rounding.

    Args:
        student_logits: (R, L) floating point (converted to float32; no autograd).
        teacher_logits: (R, L) floating point, on the same device.
        center: optional (L,) teacher centre C.
        student_temp, teacher_temp: temperatures in (0, 1e5].
        chunk_rows: rows per pass (None: from :data:`DEFAULT_CHUNK_BYTES`).
        check_values: raise ValueError naming the argument on a non-finite scaled
            logit or centre (one device-to-host read).  None: only on CPU.

    Returns:
        ``(losses, grad)``: (R,) float32 per-row cross-entropies and (R, L)
        float32 ``(softmax(s/tau_s) - p_t) / tau_s``, on the inputs' device.
    """
    fn = "softmax_cross_entropy"
    s = _tensor(fn, student_logits, "student_logits")
    t = _tensor(fn, teacher_logits, "teacher_logits")
    _shape(fn, s, "student_logits", (None, None), "R,L")
    _shape(fn, t, "teacher_logits", tuple(s.shape), "R,L")
    R, L = s.shape
    if L < 1:
        raise ValueError(f"{fn}: the number of logits L must be at least 1, got {L}")
    c = None if center is None else _tensor(fn, center, "center")
    if c is not None:
        _shape(fn, c, "center", (L,), "L")
    _same_device(fn, s, teacher_logits=t, center=c)
    ts = _number(fn, student_temp, "student_temp", 0.0, _MAX_TEMP, True)
    tt = _number(fn, teacher_temp, "teacher_temp", 0.0, _MAX_TEMP, True)
    chunk = _chunk(fn, chunk_rows, R, L)
    flags = _Flags(_resolve_check(check_values, s.device))
    if c is not None:
        flags.add(partial(_any_nonfinite, c), f"{fn}: center must be finite, got NaN or infinity")
    grad = s.new_empty(R, L)
    loss, _ = _rows(fn, flags, ("student_logits", "teacher_logits", ""), s, t, None, c, 1.0,
                    None, None, 1.0 / ts, 1.0 / tt, 1.0 / tt, chunk, grad, False)
    flags.raise_first()
    return loss, grad


def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9,
                  *, chunk_rows: Optional[int] = None,
                  check_values: Optional[bool] = None) -> torch.Tensor:
    """``momentum * center + (1 - momentum) * mean(teacher_logits, dim=0)``.

    Equal to :func:`cribo.update_center` within float32 rounding (column sums in
    float64, over ``chunk_rows`` rows at a time).

    Args:
        center: (L,) current centre.
        teacher_logits: (R, L) this step's teacher outputs; with R = 0 the centre
            is returned unchanged.
        momentum: in [0, 1] (0.9 in DINO and CrIBo).
        chunk_rows: rows per pass (None: from :data:`DEFAULT_CHUNK_BYTES`).
        check_values: raise ValueError on a non-finite centre or logit (one
            device-to-host read).  None: only on CPU.

    Returns:
        (L,) float32 new centre on the inputs' device (the input is not modified).
    """
    fn = "update_center"
    c = _tensor(fn, center, "center")
    if c.dim() != 1:
        raise ValueError(f"{fn}: center must have shape (L,), got {tuple(c.shape)}")
    t = _tensor(fn, teacher_logits, "teacher_logits")
    _shape(fn, t, "teacher_logits", (None, c.shape[0]), "R,L")
    _same_device(fn, c, teacher_logits=t)
    m = _number(fn, momentum, "momentum", 0.0, 1.0, False)
    flags = _Flags(_resolve_check(check_values, c.device))
    flags.add(partial(_any_nonfinite, c), f"{fn}: center must be finite, got NaN or infinity")
    flags.add(partial(_any_nonfinite, t),
              f"{fn}: teacher_logits must be finite, got NaN or infinity")
    out = _update_center(c, t, m, _chunk(fn, chunk_rows, t.shape[0], t.shape[1]))
    flags.raise_first()
    return out


def _update_center(c: torch.Tensor, t: torch.Tensor, m: float, chunk: int) -> torch.Tensor:
    R = t.shape[0]
    if R == 0:
        return c.clone()
    acc = torch.zeros(c.shape, dtype=torch.float64, device=c.device)
    for r0 in range(0, R, chunk):
        acc += t[r0:r0 + chunk].sum(dim=0, dtype=torch.float64)
    return (m * c.double() + ((1.0 - m) / R) * acc).float()


@dataclass(frozen=True)
class TorchCriboLosses:
    """The CrIBo objective at one step (:func:`cribo_losses`): the fields of
    :class:`cribo.CriboLosses` as tensors on the inputs' device.

    Attributes:
        total, global_, objects, neighbours: 0-d float64, ``total = w_g * global_
            + w_o * objects + w_nn * neighbours``.
        grad_global, grad_objects: (2, B, L) and (2, M, L) float32 gradients of
            ``total`` w.r.t. the student's global and object logits.
        center_global, center_objects: (L,) float32 centres updated with this
            step's teacher outputs (the losses used the previous ones).
        n_pairs1, n_pairs2: 0-d int64 Z1 and Z2, cycle-consistent pairs.
    """

    total: torch.Tensor
    global_: torch.Tensor
    objects: torch.Tensor
    neighbours: torch.Tensor
    grad_global: torch.Tensor
    grad_objects: torch.Tensor
    center_global: torch.Tensor
    center_objects: torch.Tensor
    n_pairs1: torch.Tensor
    n_pairs2: torch.Tensor


def _mask(fn: str, mask: Optional[torch.Tensor], name: str, M: int,
          ref: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(M, dtype=torch.bool, device=ref.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{fn}: {name} must be a bool tensor, got dtype {mask.dtype}")
    _shape(fn, mask, name, (M,), "M")
    _same_device(fn, ref, **{name: mask})
    return mask


def _denominators(fn: str, denominators: object, B: int, M: int, Z: torch.Tensor,
                  flags: _Flags) -> Tuple[Union[int, torch.Tensor], ...]:
    """(B_den, M_den, Z1_den, Z2_den): ints, or 0-d int64 tensors for tensor input."""
    if denominators is None:
        return B, M, Z[0], Z[1]
    if isinstance(denominators, torch.Tensor):
        if denominators.dtype.is_floating_point or denominators.dtype == torch.bool or \
                tuple(denominators.shape) != (4,):
            raise ValueError(f"{fn}: denominators must be 4 integers (B, M, Z1, Z2), got a "
                             f"tensor of shape {tuple(denominators.shape)} and dtype "
                             f"{denominators.dtype}")
        d = denominators.to(device=Z.device, dtype=torch.int64)
        counts = torch.stack([torch.tensor(B, device=Z.device), torch.tensor(M, device=Z.device),
                              Z[0], Z[1]])
        flags.add(lambda: (d < counts).any(),
                  f"{fn}: denominators must be at least this call's counts (B={B}, M={M}, Z1, Z2)")
        return d[0], d[1], d[2], d[3]
    vals = tuple(denominators)  # type: ignore[call-overload]
    if len(vals) != 4 or any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
        raise ValueError(f"{fn}: denominators must be 4 integers (B, M, Z1, Z2), got "
                         f"{denominators!r}")
    if vals[0] < B or vals[1] < M or min(vals) < 0:
        raise ValueError(f"{fn}: denominators {vals} must be at least this call's counts "
                         f"(B={B}, M={M}, Z1, Z2)")
    flags.add(lambda: (torch.tensor(vals[2:], device=Z.device) < Z).any(),
              f"{fn}: denominators {vals} must be at least this call's pair counts Z1, Z2")
    return vals


def cribo_losses(student_global: torch.Tensor, teacher_global: torch.Tensor,
                 student_objects: torch.Tensor, teacher_objects: torch.Tensor,
                 teacher_neighbours: Optional[torch.Tensor] = None,
                 mask1: Optional[torch.Tensor] = None, mask2: Optional[torch.Tensor] = None, *,
                 center_global: torch.Tensor, center_objects: torch.Tensor,
                 student_temp: float = 0.1, teacher_temp: float = 0.07,
                 teacher_temp_objects: Optional[float] = None,
                 weights: Sequence[float] = (1.0, 1.0, 1.0), center_momentum: float = 0.9,
                 denominators: Union[Sequence[int], torch.Tensor, None] = None,
                 chunk_rows: Optional[int] = None,
                 check_values: Optional[bool] = None) -> TorchCriboLosses:
    """CrIBo's three loss terms, their gradients and the centre update (docs/method.md §5).

    The arguments and results of :func:`cribo.cribo_losses`, as tensors on one
    device: ``L_g = mean_b [H(pt1_b, ps2_b) + H(pt2_b, ps1_b)]`` (centre C_g);
    ``L_o = mean_j [H(pt1_j, ps2_j) + H(pt2_j, ps1_j)]`` over the M objects
    (centre C_o); ``L_nn = (1/Z1) sum_j m1_j H(pnn1_j, ps2_j) + (1/Z2) sum_j m2_j
    H(pnn2_j, ps1_j)`` (centre C_o, object temperature; a part with Z = 0 is 0);
    ``total = w_g L_g + w_o L_o + w_nn L_nn``.  A term with weight 0 is still
    reported, without its gradient work.

    Args:
        student_global, teacher_global: (2, B, L) CLS head outputs [view 1, view 2].
        student_objects, teacher_objects: (2, M, L) object head outputs (M may be 0).
        teacher_neighbours: (2, M, L) teacher outputs of nn1 (row 0) and nn2
            (row 1), or None (no cross-image term).
        mask1, mask2: (M,) bool cycle-consistency masks (None: all True).
        center_global, center_objects: (L,) centres C_g and C_o.
        student_temp: tau_s; teacher_temp: tau_t of the global term;
            teacher_temp_objects: tau_t of the object terms (None: teacher_temp).
        weights: (w_g, w_o, w_nn), each in [0, 1e6].
        center_momentum: centre EMA momentum in [0, 1].
        denominators: optional (B, M, Z1, Z2) used in place of this call's counts
            (a distributed step passes the totals over all processes), as 4 ints
            or a (4,) integer tensor (e.g. straight from an all-reduce, with no
            host read).  The centres are still those of this call's rows.
        chunk_rows: rows per pass (None: from :data:`DEFAULT_CHUNK_BYTES`).
        check_values: raise ValueError on non-finite logits or centres (naming the
            argument) and on pair counts above ``denominators``, with one
            device-to-host read.  None: only on CPU.

    Returns:
        A :class:`TorchCriboLosses`.
    """
    fn = "cribo_losses"
    sg = _tensor(fn, student_global, "student_global")
    _shape(fn, sg, "student_global", (2, None, None), "2,B,L")
    _, B, L = sg.shape
    tg = _tensor(fn, teacher_global, "teacher_global")
    _shape(fn, tg, "teacher_global", (2, B, L), "2,B,L")
    so = _tensor(fn, student_objects, "student_objects")
    _shape(fn, so, "student_objects", (2, None, L), "2,M,L")
    M = so.shape[1]
    to = _tensor(fn, teacher_objects, "teacher_objects")
    _shape(fn, to, "teacher_objects", (2, M, L), "2,M,L")
    tn = None
    if teacher_neighbours is not None:
        tn = _tensor(fn, teacher_neighbours, "teacher_neighbours")
        _shape(fn, tn, "teacher_neighbours", (2, M, L), "2,M,L")
    if B < 1 or L < 1:
        raise ValueError(f"{fn}: the batch size B and the number of logits L must be at least "
                         f"1, got B={B}, L={L}")
    cg = _tensor(fn, center_global, "center_global")
    _shape(fn, cg, "center_global", (L,), "L")
    co = _tensor(fn, center_objects, "center_objects")
    _shape(fn, co, "center_objects", (L,), "L")
    _same_device(fn, sg, teacher_global=tg, student_objects=so, teacher_objects=to,
                 teacher_neighbours=tn, center_global=cg, center_objects=co)
    masks = (_mask(fn, mask1, "mask1", M, sg), _mask(fn, mask2, "mask2", M, sg))
    ts = _number(fn, student_temp, "student_temp", 0.0, _MAX_TEMP, True)
    tt = _number(fn, teacher_temp, "teacher_temp", 0.0, _MAX_TEMP, True)
    tto = tt if teacher_temp_objects is None else _number(
        fn, teacher_temp_objects, "teacher_temp_objects", 0.0, _MAX_TEMP, True)
    w = tuple(weights)
    if len(w) != 3:
        raise ValueError(f"{fn}: weights must be 3 numbers (w_global, w_objects, "
                         f"w_neighbours), got {weights!r}")
    w_g, w_o, w_nn = (_number(fn, x, "weights", 0.0, 1e6, False) for x in w)
    mom = _number(fn, center_momentum, "center_momentum", 0.0, 1.0, False)
    chunk = _chunk(fn, chunk_rows, max(B, M), L)
    flags = _Flags(_resolve_check(check_values, sg.device))
    for name, c in (("center_global", cg), ("center_objects", co)):
        flags.add(partial(_any_nonfinite, c), f"{fn}: {name} must be finite, got NaN or infinity")
    Z = torch.stack([m.sum() for m in masks])  # (2,) int64
    B_den, M_den, *Z_den = _denominators(fn, denominators, B, M, Z, flags)
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=sg.device)

    # Global: student view 2 learns from teacher view 1 and vice versa.
    grad_g = sg.new_empty(2, B, L)
    l_g = zero
    for v in (0, 1):
        la, _ = _rows(fn, flags, ("student_global", "teacher_global", ""), sg[1 - v], tg[v],
                      None, cg, _row_weight(w_g, B_den, B), None, None, 1.0 / ts, 1.0 / tt,
                      1.0 / tt, chunk, grad_g[1 - v], False)
        l_g = l_g + la.sum(dtype=f64) / B_den
    # Objects: student view 2 row j learns from teacher view 1 row j (L_o) and from
    # view 1's neighbour (L_nn, where mask1[j]); symmetrically for view 1.
    grad_o = so.new_empty(2, M, L)
    l_o, l_nn = zero, zero
    if M > 0:
        wa = _row_weight(w_o, M_den, M)
        for v in (0, 1):
            z_den = torch.as_tensor(Z_den[v], device=sg.device).clamp(min=1).double()
            wb = (masks[v].double() * (w_nn / z_den)).float() if tn is not None else None
            la, lb = _rows(fn, flags, ("student_objects", "teacher_objects",
                                       "teacher_neighbours"), so[1 - v], to[v],
                           tn[v] if tn is not None else None, co, wa, wb,
                           masks[v] if tn is not None else None, 1.0 / ts, 1.0 / tto,
                           1.0 / tto, chunk, grad_o[1 - v], w_nn != 0.0)
            l_o = l_o + la.sum(dtype=f64) / M_den
            if lb is not None:
                l_nn = l_nn + lb.sum(dtype=f64) / z_den
    total = w_g * l_g + w_o * l_o + w_nn * l_nn
    new_cg = _update_center(cg, tg.reshape(2 * B, L), mom, chunk)
    new_co = _update_center(co, to.reshape(2 * M, L), mom, chunk)
    flags.raise_first()
    return TorchCriboLosses(total=total, global_=l_g, objects=l_o, neighbours=l_nn,
                            grad_global=grad_g, grad_objects=grad_o, center_global=new_cg,
                            center_objects=new_co, n_pairs1=Z[0], n_pairs2=Z[1])
