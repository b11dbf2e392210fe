"""Operator smoke test of an installed cribo, on cases small enough to check by hand.

    python tests/packaging_smoke.py

Run as a script (not collected by pytest: the name does not start with
``test_``) by ``.ci/run`` on the oldest supported Python and by
``tests/test_packaging.py`` on a wheel built from the sdist, each in a fresh
environment with NumPy alone, no torch.  Run it by path, not with ``python -c``
from the repository root, so that ``import cribo`` finds the installed package
and not the source tree (which has no compiled ``cribo._C``).

Every expected value below is worked out in the comment beside it, from the
definitions in docs/method.md, not taken from a run of the code.  Prints one
line per operator and ``packaging smoke: OK`` at the end; any mismatch raises.
"""
from __future__ import annotations

import math
import sys

import numpy as np


def check(name: str, got: object, want: object, atol: float = 1e-6) -> None:
    """Raises AssertionError with both values unless ``got`` equals ``want`` (to ``atol``)."""
    g, w = np.asarray(got), np.asarray(want)
    if g.shape != w.shape or not np.allclose(g, w, rtol=0.0, atol=atol):
        raise AssertionError(f"{name}: got {g.tolist()}, expected {w.tolist()}")
    print(f"  {name}: {g.tolist()}")


def main() -> int:
    import cribo
    from cribo import _C  # the compiled extension must load

    print(f"cribo {cribo.__version__} from {cribo.__file__}")
    print(f"Python {sys.version.split()[0]}, NumPy {np.__version__}, extension {_C.__file__}")

    # ---------------------------------------------------------------- cluster
    # One image, N = 4 tokens per view, d = 2: tokens 0-1 of each view point along
    # e1, tokens 2-3 along e2.  Seeds: joint token 0 (e1) and joint token 2 (e2),
    # positional cost off.  Cosine similarity is 1 to the own direction and 0 to
    # the other; the balanced Sinkhorn (4 tokens per direction, marginals 1/2)
    # then puts every e1 token in cluster 0 and every e2 token in cluster 1.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    tokens = np.array([[[e1, e1, e2, e2], [e1, e1, e2, e2]]], np.float32)      # (1, 2, 4, 2)
    positions = np.zeros((1, 2, 4, 2), np.float32)
    positions[0, :, :, 0] = np.arange(4)                                         # x = 0..3
    c = cribo.cluster(tokens, positions, 2, pos_weight=0.0, init=[[0, 2]])
    check("cluster labels", c.labels, [[[0, 0, 1, 1], [0, 0, 1, 1]]])
    check("cluster counts", c.counts, [[[2, 2], [2, 2]]])
    check("cluster valid", c.valid, [[True, True]])

    # ---------------------------------------------------------------- pool
    # View 1: tokens (1,0), (3,0) in cluster 0 -> mean (2,0); (0,2), (0,4) in
    # cluster 1 -> mean (0,3).  View 2: all four in cluster 0 -> mean (1,1.5);
    # cluster 1 empty -> (0,0).
    tok = np.array([[[[1, 0], [3, 0], [0, 2], [0, 4]],
                     [[1, 0], [3, 0], [0, 2], [0, 4]]]], np.float32)
    labels = np.array([[[0, 0, 1, 1], [0, 0, 0, 0]]], np.int64)
    check("pool", cribo.pool(tok, labels, 2), [[[[2, 0], [0, 3]], [[1, 1.5], [0, 0]]]])
    # Backward: each token gets its cluster's gradient divided by the member count.
    grad = np.array([[[[1, 1], [2, 2]], [[4, 8], [5, 5]]]], np.float32)
    check("pool_backward", cribo.pool_backward(grad, labels, 2),
          [[[[0.5, 0.5], [0.5, 0.5], [1, 1], [1, 1]],
            [[1, 2], [1, 2], [1, 2], [1, 2]]]])

    # ---------------------------------------------------------------- top-k
    # Query (1,0) against (0,1), (2,0), (1,1): cosines 0, 1, 1/sqrt(2).
    idx, sim = cribo.topk_cosine([[1.0, 0.0]], [[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], k=2)
    check("topk_cosine indices", idx, [[1, 2]])
    check("topk_cosine similarities", sim, [[1.0, 1.0 / math.sqrt(2.0)]])

    # ---------------------------------------------------------------- queue
    # A queue holding one image with objects (1,0) and (0,1) in both views.  The
    # batch objects (1,0.1) and (0.1,1) find entries 0 and 1, whose other view
    # points straight back at them: both pairs pass both cycle checks.
    q = cribo.ObjectQueue(capacity=4, dim=2)
    eye = np.eye(2, dtype=np.float32)
    q.push(eye, eye, [2])
    batch = np.array([[1, 0.1], [0.1, 1]], np.float32)
    m = q.match(batch, batch)
    check("queue index1", m.index1, [0, 1])
    check("queue mask1 and mask2", [m.mask1, m.mask2], [[True, True], [True, True]])

    # ---------------------------------------------------------------- losses
    # Student logits 0 (uniform softmax over L = 4) and teacher logits log(1,1,1,5)
    # at both temperatures 1: p_t = (1,1,1,5)/8, H = -sum p_t log(1/4) = log 4, and
    # dH/ds = softmax(s) - p_t = (1/8, 1/8, 1/8, -3/8).
    t = np.log(np.array([[1, 1, 1, 5]], np.float32))
    loss, g = cribo.softmax_cross_entropy(np.zeros((1, 4), np.float32), t,
                                          student_temp=1.0, teacher_temp=1.0)
    check("softmax_cross_entropy loss", loss, [math.log(4.0)])
    check("softmax_cross_entropy grad", g, [[0.125, 0.125, 0.125, -0.375]])
    # The three CrIBo terms with L = 2, one image, one object, all student logits 0
    # and all teacher logits 1 (uniform teacher): every cross-entropy is log 2, each
    # term sums two of them, so total = 3 * 2 log 2.  Centres start at 0 and move to
    # 0.9 * 0 + 0.1 * 1 = 0.1.
    z, one = np.zeros((2, 1, 2), np.float32), np.ones((2, 1, 2), np.float32)
    out = cribo.cribo_losses(z, one, z, one, one, [True], [True],
                             center_global=np.zeros(2, np.float32),
                             center_objects=np.zeros(2, np.float32))
    check("cribo_losses terms", [out.global_, out.objects, out.neighbours],
          [2 * math.log(2.0)] * 3)
    check("cribo_losses total", out.total, 6 * math.log(2.0))
    check("cribo_losses centres", [out.center_global, out.center_objects], [[0.1, 0.1]] * 2)
    print("packaging smoke: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
