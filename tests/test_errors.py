"""Bad input, binding hygiene and memory: every public function and every ``cribo._C``
function (docs/contributing.md, "Binding conventions" 2-5 and "Test conventions" 5).

- Each documented error raises the right type with a message ``"fn: arg must be ...,
  got ..."`` that names the argument and what was expected.
- The public API converts dtype, byte order, strides and alignment visibly (same
  result as the native array); ``cribo._C`` refuses them with a clear error.
- Inputs are bit-identical after every call; reference counts of the inputs are
  unchanged after 1000 calls, failing calls included; 1000 calls do not grow memory.
"""
from __future__ import annotations

import gc
import os
import re
import sys
import tracemalloc

import numpy as np
import pytest

import cribo
from cribo import _C

F32, F64, I64 = np.float32, np.float64, np.int64
BIG = 2**31  # one more than INT_MAX
E = re.escape


# ============================================================================
# valid inputs
# ============================================================================

B, N, D, K = 2, 5, 4, 3      # cluster / pool
M, Q = 4, 6                  # top-k
R, L = 3, 7                  # logits


def valid():
    """Fresh valid inputs for every function (float32 / int64, C-contiguous)."""
    rng = np.random.default_rng(1234)
    v = {
        "tokens": rng.standard_normal((B, 2, N, D)).astype(F32),
        "positions": (rng.random((B, 2, N, 2)) * 10).astype(F32),
        "init": np.tile(np.arange(K, dtype=I64), (B, 1)),
        "labels": rng.integers(-1, K, (B, 2, N)).astype(I64),
        "weights": rng.random((B, 2, N, K)).astype(F32),
        "grad_objects": rng.standard_normal((B, 2, K, D)).astype(F32),
        "queries": rng.standard_normal((M, D)).astype(F32),
        "bank": rng.standard_normal((Q, D)).astype(F32),
        "query_ids": np.arange(M, dtype=I64),
        "bank_ids": np.arange(Q, dtype=I64) % 3,
        "student": rng.standard_normal((R, L)).astype(F32),
        "teacher": rng.standard_normal((R, L)).astype(F32),
        "teacher_b": rng.standard_normal((R, L)).astype(F32),
        "center": rng.standard_normal(L).astype(F32),
        "center_b": rng.standard_normal(L).astype(F32),
        "weight": rng.random(R).astype(F32),
        "weight_b": rng.random(R).astype(F32),
        "objects1": rng.standard_normal((5, D)).astype(F32),
        "objects2": rng.standard_normal((5, D)).astype(F32),
        "counts": np.array([2, 0, 3], I64),
        "image_ids": np.array([7, 8, 9], I64),
        "sg": rng.standard_normal((2, B, L)).astype(F32),
        "tg": rng.standard_normal((2, B, L)).astype(F32),
        "so": rng.standard_normal((2, M, L)).astype(F32),
        "to": rng.standard_normal((2, M, L)).astype(F32),
        "tn": rng.standard_normal((2, M, L)).astype(F32),
        "cg": rng.standard_normal(L).astype(F32),
        "co": rng.standard_normal(L).astype(F32),
    }
    return v


def losses(v, **kw):
    args = dict(student_global=v["sg"], teacher_global=v["tg"], student_objects=v["so"],
                teacher_objects=v["to"], teacher_neighbours=v["tn"], center_global=v["cg"],
                center_objects=v["co"])
    args.update(kw)
    return cribo.cribo_losses(**args)


def queue(v, capacity=4):
    q = cribo.ObjectQueue(capacity, D)
    q.push(v["objects1"], v["objects2"], v["counts"], v["image_ids"])
    return q


def state(v, **changes):
    s = queue(v).state_dict()
    for key, value in changes.items():
        if value is None:
            del s[key]
        else:
            s[key] = value
    return s


def C_cluster(v, **kw):
    a = dict(tokens=v["tokens"], positions=v["positions"], init=v["init"], pos_weight=2.0,
             sinkhorn_lambda=20.0, sinkhorn_iters=5, n_iters=5, update_marginals=True,
             return_plan=True)
    a.update(kw)
    return _C.cluster(**a)


def C_xent(v, **kw):
    a = dict(student_logits=v["student"], teacher_logits=v["teacher"],
             teacher_logits_b=v["teacher_b"], center=v["center"], center_b=v["center_b"],
             weight=v["weight"], weight_b=v["weight_b"], student_temp=0.1,
             teacher_temp=0.07, teacher_temp_b=0.05, with_grad=True)
    a.update(kw)
    return _C.softmax_cross_entropy(**a)


def _sub(x, **index):
    """x with one axis cut/extended: _sub(x, axis=2, size=3)."""
    axis, size = index["axis"], index["size"]
    shape = list(x.shape)
    shape[axis] = size
    out = np.zeros(shape, x.dtype)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape))
    out[sl] = x[sl]
    return out


# ============================================================================
# documented errors of the public API: (call, exception, message regex)
# ============================================================================

P = pytest.param
PUBLIC_ERRORS = [
    # ---------------------------------------------------------------- cluster
    P(lambda v: cribo.cluster(v["tokens"].astype(np.int64), v["positions"], K), TypeError,
      E("cluster: tokens must be a real floating-point array, got dtype int64"), id="cl-int"),
    P(lambda v: cribo.cluster(v["tokens"] > 0, v["positions"], K), TypeError,
      E("cluster: tokens must be a real floating-point array, got dtype bool"), id="cl-bool"),
    P(lambda v: cribo.cluster(v["tokens"].astype(complex), v["positions"], K), TypeError,
      E("cluster: tokens must be a real floating-point array, got dtype complex128"),
      id="cl-complex"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"].astype(np.int32), K), TypeError,
      E("cluster: positions must be a real floating-point array, got dtype int32"),
      id="cl-pos-int"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, init=v["init"].astype(F32)),
      TypeError, E("cluster: init must be an integer array, got dtype float32"),
      id="cl-init-float"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, init=v["init"] > 0),
      TypeError, E("cluster: init must be an integer array, got dtype bool"), id="cl-init-bool"),
    P(lambda v: cribo.cluster(v["tokens"][0], v["positions"], K), ValueError,
      E("cluster: tokens must have shape (B, 2, N, d), got (2, 5, 4)"), id="cl-tok-3d"),
    P(lambda v: cribo.cluster(np.zeros((B, 3, N, D), F32), v["positions"], K), ValueError,
      E("cluster: tokens must have shape (B, 2, N, d), got (2, 3, 5, 4)"), id="cl-tok-3views"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"][0], K), ValueError,
      E("cluster: positions must have shape (B, 2, N, 2), got 3 dimensions"), id="cl-pos-3d"),
    P(lambda v: cribo.cluster(v["tokens"], _sub(v["positions"], axis=2, size=3), K), ValueError,
      E("cluster: positions must have shape (2, 2, 5, 2) to match tokens, got (2, 2, 3, 2)"),
      id="cl-pos-N"),
    P(lambda v: cribo.cluster(v["tokens"], _sub(v["positions"], axis=3, size=3), K), ValueError,
      E("cluster: positions must have shape (2, 2, 5, 2) to match tokens, got (2, 2, 5, 3)"),
      id="cl-pos-xyz"),
    P(lambda v: cribo.cluster(v["tokens"], _sub(v["positions"], axis=0, size=1), K), ValueError,
      E("cluster: positions must have shape (2, 2, 5, 2) to match tokens, got (1, 2, 5, 2)"),
      id="cl-pos-B"),
    P(lambda v: cribo.cluster(v["tokens"][:, :, :0], v["positions"][:, :, :0], K), ValueError,
      E("cluster: tokens must hold at least one image and one token per view, got shape "
        "(2, 2, 0, 4)"), id="cl-N0"),
    P(lambda v: cribo.cluster(v["tokens"][:0], v["positions"][:0], K), ValueError,
      E("cluster: tokens must hold at least one image and one token per view, got shape "
        "(0, 2, 5, 4)"), id="cl-B0"),
    P(lambda v: cribo.cluster(v["tokens"][..., :0], v["positions"], K), ValueError,
      E("cluster: the token width d must be at least 1, got 0"), id="cl-D0"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], 0), ValueError,
      E("cluster: n_clusters must be in [1, 2147483647], got 0"), id="cl-K0"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], 2 * N + 1), ValueError,
      E("cluster: n_clusters must be at most 2N = 10 (the joint tokens of one image), got 11"),
      id="cl-K>2N"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], 3.0), TypeError,
      E("cluster: n_clusters must be an integer, got 3.0"), id="cl-K-float"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, init=np.zeros((B, K), I64)),
      ValueError, E("cluster: init must hold distinct token indices per image, got 0 twice "
                    "in image 0"), id="cl-init-dup"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K,
                              init=np.array([[0, 1, 2], [9, 3, 9]])),
      ValueError, E("cluster: init must hold distinct token indices per image, got 9 twice "
                    "in image 1"), id="cl-init-dup-img1"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, init=v["init"] + 2 * N),
      ValueError, E("cluster: init must lie in [0, 10), got 10"), id="cl-init-high"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, init=v["init"] - 1),
      ValueError, E("cluster: init must lie in [0, 10), got -1"), id="cl-init-neg"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, init=v["init"][:1]),
      ValueError, E("cluster: init must have shape (2, 3) (B, n_clusters), got (1, 3)"),
      id="cl-init-shape"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, pos_weight=-0.5), ValueError,
      E("cluster: pos_weight must be a finite number in [0.0, 1000000.0], got -0.5"),
      id="cl-posw-neg"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, pos_weight=float("nan")),
      ValueError, E("cluster: pos_weight must be a finite number in [0.0, 1000000.0], got nan"),
      id="cl-posw-nan"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, pos_weight=float("inf")),
      ValueError, E("cluster: pos_weight must be a finite number in [0.0, 1000000.0], got inf"),
      id="cl-posw-inf"),
    *[P(lambda v, lam=lam: cribo.cluster(v["tokens"], v["positions"], K, sinkhorn_lambda=lam),
        ValueError, E("cluster: sinkhorn_lambda must be a finite number in (0.0, 1000000.0], "
                      f"got {float(lam)}"), id=f"cl-lambda-{lam}")
      for lam in (0.0, -1.0, float("inf"), float("nan"), 1e7)],
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, sinkhorn_iters=-1), ValueError,
      E("cluster: sinkhorn_iters must be in [0, 100000], got -1"), id="cl-siters-neg"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, n_iters=0), ValueError,
      E("cluster: n_iters must be in [1, 100000], got 0"), id="cl-iters-0"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, n_iters=10**9), ValueError,
      E("cluster: n_iters must be in [1, 100000], got 1000000000"), id="cl-iters-absurd"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, n_iters=2.5), TypeError,
      E("cluster: n_iters must be an integer, got 2.5"), id="cl-iters-float"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, seed=-1), ValueError,
      E("cluster: seed must be in [0, 9223372036854775807], got -1"), id="cl-seed-neg"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, seed=[1, 2, 3]), ValueError,
      E("cluster: seed must be an integer or have shape (2,), got shape (3,)"),
      id="cl-seed-shape"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, seed=[1, -2]), ValueError,
      E("cluster: seed values must be non-negative"), id="cl-seeds-neg"),
    P(lambda v: cribo.cluster(v["tokens"], v["positions"], K, seed=[1.0, 2.0]), TypeError,
      E("cluster: seed must be an integer array, got dtype float64"), id="cl-seeds-float"),
    # ---------------------------------------------------------------- pool (hard)
    P(lambda v: cribo.pool(v["tokens"].astype(np.int16), v["labels"], K), TypeError,
      E("pool: tokens must be a real floating-point array, got dtype int16"), id="pool-int"),
    P(lambda v: cribo.pool(v["tokens"].astype(np.complex64), v["labels"], K), TypeError,
      E("pool: tokens must be a real floating-point array, got dtype complex64"),
      id="pool-complex"),
    P(lambda v: cribo.pool(v["tokens"], v["labels"] > 0, K), TypeError,
      E("pool: assignment must be integer labels (B, 2, N) or float weights (B, 2, N, K), "
        "got dtype bool"), id="pool-labels-bool"),
    P(lambda v: cribo.pool(v["tokens"], v["labels"].astype(complex), K), TypeError,
      E("pool: assignment must be integer labels (B, 2, N) or float weights (B, 2, N, K), "
        "got dtype complex128"), id="pool-labels-complex"),
    # Float "labels" are soft weights by design; a 3-D float array is a weights error.
    P(lambda v: cribo.pool(v["tokens"], v["labels"].astype(F32), K), ValueError,
      E("pool: weights must have shape (B, 2, N, K), got 3 dimensions"), id="pool-labels-float"),
    P(lambda v: cribo.pool(v["tokens"], v["labels"]), ValueError,
      E("pool: n_clusters is required with integer labels"), id="pool-no-K"),
    P(lambda v: cribo.pool(v["tokens"], v["labels"], 0), ValueError,
      E("pool: n_clusters must be in [1, 2147483647], got 0"), id="pool-K0"),
    P(lambda v: cribo.pool(v["tokens"], v["labels"], BIG), ValueError,
      E("pool: n_clusters must be in [1, 2147483647], got 2147483648"), id="pool-K-big"),
    P(lambda v: cribo.pool(v["tokens"], np.full((B, 2, N), K), K), ValueError,
      E("pool: labels must lie in [-1, 3), got 3"), id="pool-labels-high"),
    P(lambda v: cribo.pool(v["tokens"], np.full((B, 2, N), -2), K), ValueError,
      E("pool: labels must lie in [-1, 3), got -2"), id="pool-labels-low"),
    P(lambda v: cribo.pool(v["tokens"][0], v["labels"], K), ValueError,
      E("pool: tokens must have shape (B, 2, N, d), got 3 dimensions"), id="pool-tok-3d"),
    P(lambda v: cribo.pool(v["tokens"], v["labels"][0], K), ValueError,
      E("pool: labels must have shape (B, 2, N), got 2 dimensions"), id="pool-labels-2d"),
    P(lambda v: cribo.pool(_sub(v["tokens"], axis=2, size=3), v["labels"], K), ValueError,
      E("pool: tokens must have shape (2, 2, 5, d) to match labels (2, 2, 5) and "
        "n_clusters=3, got (2, 2, 3, 4)"), id="pool-N-mismatch"),
    P(lambda v: cribo.pool(_sub(v["tokens"], axis=0, size=1), v["labels"], K), ValueError,
      E("pool: tokens must have shape (2, 2, 5, d) to match labels"), id="pool-B-mismatch"),
    P(lambda v: cribo.pool(v["tokens"][:, :, :0], v["labels"][:, :, :0], K), ValueError,
      E("pool: the number of tokens per view N must be at least 1, got 0"), id="pool-N0"),
    P(lambda v: cribo.pool(v["tokens"][:0], v["labels"][:0], K), ValueError,
      E("pool: the batch size B must be at least 1, got 0"), id="pool-B0"),
    P(lambda v: cribo.pool(v["tokens"][..., :0], v["labels"], K), ValueError,
      E("pool: the token width d must be at least 1, got 0"), id="pool-D0"),
    # ---------------------------------------------------------------- pool (soft)
    P(lambda v: cribo.pool(v["tokens"], -v["weights"]), ValueError,
      E("pool: weights must be non-negative"), id="pool-soft-negative"),
    P(lambda v: cribo.pool(v["tokens"], v["weights"], K + 2), ValueError,
      E("pool: n_clusters=5 does not match weights with K = 3"), id="pool-soft-K-mismatch"),
    P(lambda v: cribo.pool(v["tokens"], v["weights"][..., :0]), ValueError,
      E("pool: the number of clusters K must be at least 1, got 0"), id="pool-soft-K0"),
    P(lambda v: cribo.pool(v["tokens"], v["weights"][0]), ValueError,
      E("pool: weights must have shape (B, 2, N, K), got 3 dimensions"), id="pool-soft-3d"),
    P(lambda v: cribo.pool(v["tokens"], _sub(v["weights"], axis=2, size=3)), ValueError,
      E("pool: tokens must have shape (2, 2, 3, d) to match weights (2, 2, 3, 3), got "
        "(2, 2, 5, 4)"), id="pool-soft-N-mismatch"),
    P(lambda v: cribo.pool(v["tokens"][:, :, :0], v["weights"][:, :, :0]), ValueError,
      E("pool: the number of tokens per view N must be at least 1, got 0"), id="pool-soft-N0"),
    # ---------------------------------------------------------------- pool_backward
    P(lambda v: cribo.pool_backward(v["grad_objects"].astype(int), v["labels"], K), TypeError,
      E("pool_backward: grad_objects must be a real floating-point array, got dtype int64"),
      id="pb-int"),
    P(lambda v: cribo.pool_backward(v["grad_objects"], v["labels"]), ValueError,
      E("pool_backward: n_clusters is required with integer labels"), id="pb-no-K"),
    P(lambda v: cribo.pool_backward(v["grad_objects"], v["labels"], K + 1), ValueError,
      E("pool_backward: grad_objects must have shape (2, 2, 4, d) to match labels (2, 2, 5) "
        "and n_clusters=4, got (2, 2, 3, 4)"), id="pb-K-mismatch"),
    P(lambda v: cribo.pool_backward(v["grad_objects"], v["labels"] + 1, K), ValueError,
      E("pool_backward: labels must lie in [-1, 3), got 3"), id="pb-labels-high"),
    P(lambda v: cribo.pool_backward(v["grad_objects"], _sub(v["weights"], axis=3, size=2)),
      ValueError, E("pool_backward: grad_objects must have shape (2, 2, 2, d) to match weights"),
      id="pb-soft-K-mismatch"),
    P(lambda v: cribo.pool_backward(v["grad_objects"], -v["weights"]), ValueError,
      E("pool_backward: weights must be non-negative"), id="pb-soft-negative"),
    P(lambda v: cribo.pool_backward(v["grad_objects"], v["labels"], 0), ValueError,
      E("pool_backward: n_clusters must be in [1, 2147483647], got 0"), id="pb-K0"),
    # ---------------------------------------------------------------- topk_cosine
    P(lambda v: cribo.topk_cosine(v["queries"].astype(int), v["bank"]), TypeError,
      E("topk_cosine: queries must be a real floating-point array, got dtype int64"),
      id="tk-int"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"] > 0), TypeError,
      E("topk_cosine: bank must be a real floating-point array, got dtype bool"), id="tk-bool"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"].astype(np.complex64)), TypeError,
      E("topk_cosine: bank must be a real floating-point array, got dtype complex64"),
      id="tk-complex"),
    P(lambda v: cribo.topk_cosine(v["queries"][0], v["bank"]), ValueError,
      E("topk_cosine: queries must have shape (M, d), got 1 dimensions"), id="tk-1d"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"][None]), ValueError,
      E("topk_cosine: bank must have shape (Q, d), got 3 dimensions"), id="tk-bank-3d"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"][:, :3]), ValueError,
      E("topk_cosine: bank must have shape (Q, 4) to match queries, got (6, 3)"), id="tk-d"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], 0), ValueError,
      E("topk_cosine: k must be in [1, 2147483647], got 0"), id="tk-k0"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], Q + 1), ValueError,
      E("topk_cosine: k must be in [1, 6] (the bank size), got 7"), id="tk-k>bank"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], 1.0), TypeError,
      E("topk_cosine: k must be an integer, got 1.0"), id="tk-k-float"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"][:0]), ValueError,
      E("topk_cosine: bank must hold at least one row, got an empty bank"), id="tk-empty-bank"),
    P(lambda v: cribo.topk_cosine(v["queries"][:, :0], v["bank"][:, :0]), ValueError,
      E("topk_cosine: the feature width d must be at least 1, got 0"), id="tk-d0"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], query_ids=v["query_ids"]),
      ValueError, E("topk_cosine: query_ids and bank_ids must be given together"),
      id="tk-one-id"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], query_ids=v["query_ids"] * 1.0,
                                  bank_ids=v["bank_ids"]),
      TypeError, E("topk_cosine: query_ids must be an integer array, got dtype float64"),
      id="tk-ids-float"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], query_ids=v["query_ids"],
                                  bank_ids=v["bank_ids"] > 0),
      TypeError, E("topk_cosine: bank_ids must be an integer array, got dtype bool"),
      id="tk-ids-bool"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], query_ids=v["query_ids"][:3],
                                  bank_ids=v["bank_ids"]),
      ValueError, E("topk_cosine: query_ids must have shape (4,) and bank_ids (6,), got (3,) "
                    "and (6,)"), id="tk-qids-shape"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], query_ids=v["query_ids"],
                                  bank_ids=v["bank_ids"][:5]),
      ValueError, E("topk_cosine: query_ids must have shape (4,) and bank_ids (6,), got (4,) "
                    "and (5,)"), id="tk-bids-shape"),
    P(lambda v: cribo.topk_cosine(v["queries"], v["bank"], query_ids=v["query_ids"][:, None],
                                  bank_ids=v["bank_ids"]),
      ValueError, E("topk_cosine: query_ids must have shape (M,), got 2 dimensions"),
      id="tk-ids-2d"),
    # ---------------------------------------------------------------- softmax_cross_entropy
    P(lambda v: cribo.softmax_cross_entropy(v["student"].astype(int), v["teacher"]), TypeError,
      E("softmax_cross_entropy: student_logits must be a real floating-point array, got "
        "dtype int64"), id="xent-int"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"] > 0), TypeError,
      E("softmax_cross_entropy: teacher_logits must be a real floating-point array, got "
        "dtype bool"), id="xent-bool"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"],
                                            center=v["center"].astype(complex)), TypeError,
      E("softmax_cross_entropy: center must be a real floating-point array, got dtype "
        "complex128"), id="xent-center-complex"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"][0], v["teacher"]), ValueError,
      E("softmax_cross_entropy: student_logits must have shape (R, L), got (7,)"),
      id="xent-1d"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"][None]), ValueError,
      E("softmax_cross_entropy: teacher_logits must have shape (R, L), got (1, 3, 7)"),
      id="xent-3d"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"][:2]), ValueError,
      E("softmax_cross_entropy: teacher_logits must have shape (3, 7), got (2, 7)"),
      id="xent-R-mismatch"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"][:, :5]), ValueError,
      E("softmax_cross_entropy: teacher_logits must have shape (3, 7), got (3, 5)"),
      id="xent-L-mismatch"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"], center=v["center"][:3]),
      ValueError, E("softmax_cross_entropy: center must have shape (7,), got (3,)"),
      id="xent-center-shape"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"],
                                            center=v["center"][None]),
      ValueError, E("softmax_cross_entropy: center must have shape (L,), got 2 dimensions"),
      id="xent-center-2d"),
    P(lambda v: cribo.softmax_cross_entropy(v["student"][:, :0], v["teacher"][:, :0]),
      ValueError, E("softmax_cross_entropy: the number of logits L must be at least 1, got 0"),
      id="xent-L0"),
    *[P(lambda v, t=t, name=name: cribo.softmax_cross_entropy(v["student"], v["teacher"],
                                                             **{name: t}),
        ValueError, E(f"softmax_cross_entropy: {name} must be a finite number in "
                      f"(0.0, 100000.0], got {float(t)}"), id=f"xent-{name}-{t}")
      for name in ("student_temp", "teacher_temp")
      for t in (0.0, -0.1, float("nan"), float("inf"), 1e9)],
    P(lambda v: cribo.softmax_cross_entropy(v["student"], v["teacher"], student_temp="0.1"),
      TypeError, E("softmax_cross_entropy: student_temp must be a number, got '0.1'"),
      id="xent-temp-str"),
    # ---------------------------------------------------------------- update_center
    P(lambda v: cribo.update_center(v["center"].astype(int), v["teacher"]), TypeError,
      E("update_center: center must be a real floating-point array, got dtype int64"),
      id="uc-int"),
    P(lambda v: cribo.update_center(v["center"], v["teacher"].astype(complex)), TypeError,
      E("update_center: teacher_logits must be a real floating-point array, got dtype "
        "complex128"), id="uc-complex"),
    P(lambda v: cribo.update_center(v["center"][:3], v["teacher"]), ValueError,
      E("update_center: center must have shape (7,), got (3,)"), id="uc-center-shape"),
    P(lambda v: cribo.update_center(v["center"][None], v["teacher"]), ValueError,
      E("update_center: center must have shape (L,), got 2 dimensions"), id="uc-center-2d"),
    P(lambda v: cribo.update_center(v["center"], v["teacher"][0]), ValueError,
      E("update_center: teacher_logits must have shape (R, L), got (7,)"), id="uc-1d"),
    *[P(lambda v, m=m: cribo.update_center(v["center"], v["teacher"], m), ValueError,
        E(f"update_center: momentum must be a finite number in [0.0, 1.0], got {float(m)}"),
        id=f"uc-momentum-{m}")
      for m in (1.5, -0.1, float("nan"), float("inf"))],
    P(lambda v: cribo.update_center(v["center"], v["teacher"], None), TypeError,
      E("update_center: momentum must be a number, got None"), id="uc-momentum-none"),
    # ---------------------------------------------------------------- cribo_losses
    P(lambda v: losses(v, student_global=v["sg"].astype(int)), TypeError,
      E("cribo_losses: student_global must be a real floating-point array, got dtype int64"),
      id="cl-sg-int"),
    P(lambda v: losses(v, student_global=v["sg"][0]), ValueError,
      E("cribo_losses: student_global must have shape (2, rows, L) [view 1, view 2], got "
        "(2, 7)"), id="cl-sg-2d"),
    P(lambda v: losses(v, teacher_global=v["tg"][:, :1]), ValueError,
      E("cribo_losses: teacher_global must have shape (2, 2, 7), got (2, 1, 7)"),
      id="cl-tg-B"),
    P(lambda v: losses(v, teacher_objects=v["to"][:, :3]), ValueError,
      E("cribo_losses: teacher_objects must have shape (2, 4, 7), got (2, 3, 7)"),
      id="cl-to-M"),
    P(lambda v: losses(v, teacher_neighbours=v["tn"][..., :3]), ValueError,
      E("cribo_losses: teacher_neighbours must have shape (2, 4, 7), got (2, 4, 3)"),
      id="cl-tn-L"),
    P(lambda v: losses(v, mask1=np.ones(M)), TypeError,
      E("cribo_losses: mask1 must be a boolean array, got dtype float64"), id="cl-mask-float"),
    P(lambda v: losses(v, mask2=np.ones(M + 1, bool)), ValueError,
      E("cribo_losses: mask2 must have shape (4,), got (5,)"), id="cl-mask-shape"),
    P(lambda v: losses(v, center_objects=v["co"][:5]), ValueError,
      E("cribo_losses: center_objects must have shape (7,), got (5,)"), id="cl-co-shape"),
    P(lambda v: losses(v, student_temp=0.0), ValueError,
      E("cribo_losses: student_temp must be a finite number in (0.0, 100000.0], got 0.0"),
      id="cl-ts-0"),
    P(lambda v: losses(v, teacher_temp=-1.0), ValueError,
      E("cribo_losses: teacher_temp must be a finite number in (0.0, 100000.0], got -1.0"),
      id="cl-tt-neg"),
    P(lambda v: losses(v, teacher_temp_objects=float("nan")), ValueError,
      E("cribo_losses: teacher_temp_objects must be a finite number in (0.0, 100000.0], "
        "got nan"), id="cl-tto-nan"),
    P(lambda v: losses(v, weights=(1.0, -1.0, 1.0)), ValueError,
      E("cribo_losses: weights must be a finite number in [0.0, 1000000.0], got -1.0"),
      id="cl-weights-neg"),
    P(lambda v: losses(v, weights=(1.0, 1.0)), ValueError,
      E("cribo_losses: weights must be (w_global, w_objects, w_neighbours), got (1.0, 1.0)"),
      id="cl-weights-len"),
    P(lambda v: losses(v, center_momentum=1.01), ValueError,
      E("cribo_losses: center_momentum must be a finite number in [0.0, 1.0], got 1.01"),
      id="cl-momentum"),
    P(lambda v: losses(v, student_global=v["sg"][:, :0], teacher_global=v["tg"][:, :0]),
      ValueError, E("cribo_losses: student_global must hold at least one image, got B = 0"),
      id="cl-B0"),
    # ---------------------------------------------------------------- ObjectQueue
    *[P(lambda v, c=c: cribo.ObjectQueue(c, D), ValueError,
        E(f"ObjectQueue: capacity must be in [1, 2147483647], got {c}"), id=f"oq-capacity-{c}")
      for c in (0, -1, BIG)],
    P(lambda v: cribo.ObjectQueue(3.0, D), TypeError,
      E("ObjectQueue: capacity must be an integer, got 3.0"), id="oq-capacity-float"),
    P(lambda v: cribo.ObjectQueue(3, 0), ValueError,
      E("ObjectQueue: dim must be in [1, 2147483647], got 0"), id="oq-dim-0"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"], [2, 2]), ValueError,
      E("ObjectQueue.push: counts must sum to the number of objects 5, got 4"),
      id="oq-push-counts-sum"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"], [6, -1]), ValueError,
      E("ObjectQueue.push: counts must be non-negative"), id="oq-push-counts-neg"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"], [2.0, 3.0]), TypeError,
      E("ObjectQueue.push: counts must be an integer array, got dtype float64"),
      id="oq-push-counts-float"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"], [[2, 3]]), ValueError,
      E("ObjectQueue.push: counts must have shape (B,), got (1, 2)"), id="oq-push-counts-2d"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"][:4], [2, 3]), ValueError,
      E("ObjectQueue.push: objects1 and objects2 must have the same shape, got (5, 4) and "
        "(4, 4)"), id="oq-push-shapes"),
    P(lambda v: queue(v).push(v["objects1"][:, :3], v["objects2"][:, :3], [2, 3]), ValueError,
      E("ObjectQueue.push: objects1 must have shape (M, 4), got (5, 3)"), id="oq-push-dim"),
    P(lambda v: queue(v).push(v["objects1"][0], v["objects2"][0], [1]), ValueError,
      E("ObjectQueue.push: objects1 must have shape (M, 4), got (4,)"), id="oq-push-1d"),
    P(lambda v: queue(v).push(v["objects1"].astype(int), v["objects2"], [2, 3]), TypeError,
      E("ObjectQueue.push: objects1 must be a real floating-point array, got dtype int64"),
      id="oq-push-int"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"], [2, 3], image_ids=[1]), ValueError,
      E("ObjectQueue.push: image_ids must have shape (2,) like counts, got (1,)"),
      id="oq-push-ids-shape"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"], [2, 3], image_ids=[1, -2]),
      ValueError, E("ObjectQueue.push: image_ids must be non-negative"), id="oq-push-ids-neg"),
    P(lambda v: queue(v).push(v["objects1"], v["objects2"], [2, 3], image_ids=[1.0, 2.0]),
      TypeError, E("ObjectQueue.push: image_ids must be an integer array, got dtype float64"),
      id="oq-push-ids-float"),
    P(lambda v: queue(v).match(v["objects1"], v["objects2"][:4]), ValueError,
      E("ObjectQueue.match: objects1 and objects2 must have the same shape, got (5, 4) and "
        "(4, 4)"), id="oq-match-shapes"),
    P(lambda v: queue(v).match(v["objects1"][:, :2], v["objects2"][:, :2]), ValueError,
      E("ObjectQueue.match: objects1 must have shape (M, 4), got (5, 2)"), id="oq-match-dim"),
    P(lambda v: queue(v).match(v["objects1"], v["objects2"].astype(complex)), TypeError,
      E("ObjectQueue.match: objects2 must be a real floating-point array, got dtype "
        "complex128"), id="oq-match-complex"),
    P(lambda v: queue(v).match(v["objects1"], v["objects2"], image_ids=[1]), ValueError,
      E("ObjectQueue.match: image_ids must have shape (5,) (one id per object), got (1,)"),
      id="oq-match-ids-shape"),
    P(lambda v: queue(v).match(v["objects1"], v["objects2"], image_ids=-np.ones(5, int)),
      ValueError, E("ObjectQueue.match: image_ids must be non-negative"), id="oq-match-ids-neg"),
    P(lambda v: queue(v).match(v["objects1"], v["objects2"], image_ids=np.ones(5)), TypeError,
      E("ObjectQueue.match: image_ids must be an integer array, got dtype float64"),
      id="oq-match-ids-float"),
    # ---------------------------------------------------------------- load_state_dict
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict([("capacity", 4)]), TypeError,
      E("ObjectQueue.load_state_dict: state must be a dict from state_dict(), got <class "
        "'list'>"), id="ld-not-dict"),
    *[P(lambda v, key=key: cribo.ObjectQueue(4, D).load_state_dict(state(v, **{key: None})),
        KeyError, E(f"ObjectQueue.load_state_dict: state is missing ['{key}']"),
        id=f"ld-missing-{key}")
      for key in ("capacity", "dim", "objects1", "objects2", "object_ids", "image_counts",
                  "image_ids")],
    P(lambda v: cribo.ObjectQueue(4, D + 1).load_state_dict(state(v)), ValueError,
      E("ObjectQueue.load_state_dict: state has dim 4, this queue 5"), id="ld-dim"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(
        state(v, dim=3, objects1=np.zeros((5, 3), F32), objects2=np.zeros((5, 3), F32))),
      ValueError, E("ObjectQueue.load_state_dict: state has dim 3, this queue 4"),
      id="ld-dim-consistent"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(
        state(v, objects1=np.zeros((5, 3), F32))),
      ValueError, E("ObjectQueue.load_state_dict: objects1 must have shape (M, 4), got (5, 3)"),
      id="ld-objects-width"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, objects2=np.zeros((4, D)))),
      ValueError, E("ObjectQueue.load_state_dict: objects1 and objects2 differ in shape"),
      id="ld-objects-rows"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, image_counts=np.array([1, 0,
                                                                                        3]))),
      ValueError, E("ObjectQueue.load_state_dict: image_counts must be non-negative and sum "
                    "to the objects"), id="ld-counts-sum"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, image_counts=np.array([6, 0,
                                                                                        -1]))),
      ValueError, E("ObjectQueue.load_state_dict: image_counts must be non-negative"),
      id="ld-counts-neg"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, image_counts=np.array([2.0, 0,
                                                                                        3]))),
      TypeError, E("ObjectQueue.load_state_dict: image_counts must be an integer array, got "
                   "dtype float64"), id="ld-counts-float"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, object_ids=np.arange(5))),
      ValueError, E("ObjectQueue.load_state_dict: object_ids do not agree with image_ids and "
                    "image_counts"), id="ld-object-ids"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, object_ids=np.arange(4))),
      ValueError, E("ObjectQueue.load_state_dict: object_ids must have shape (5,) like "
                    "objects1, got (4,)"),
      id="ld-object-ids-shape"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, image_ids=np.arange(2))),
      ValueError, E("ObjectQueue.load_state_dict: image_ids must have shape"),
      id="ld-image-ids-shape"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, capacity=2)), ValueError,
      E("ObjectQueue.load_state_dict: state holds 3 images for capacity 2"), id="ld-capacity"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(state(v, capacity=0)), ValueError,
      E("ObjectQueue.load_state_dict: capacity must be in [1, 2147483647], got 0"),
      id="ld-capacity-0"),
    P(lambda v: cribo.ObjectQueue(4, D).load_state_dict(
        state(v, objects1=np.full((5, D), np.nan, F32))),
      ValueError, E("ObjectQueue.load_state_dict: objects1 must be finite, got NaN or infinity"),
      id="ld-nan"),
    # ---------------------------------------------------------------- threads
    *[P(lambda v, n=n: cribo.set_num_threads(n), ValueError,
        E(f"set_num_threads: n must be in [1, 256], got {n}"), id=f"threads-{n}")
      for n in (0, -1, 257)],
    *[P(lambda v, n=n: cribo.set_num_threads(n), TypeError,
        E(f"set_num_threads: n must be an integer, got {n!r}"), id=f"threads-{n!r}")
      for n in (2.0, "2", True, None)],
]


@pytest.mark.parametrize("call, exc, msg", PUBLIC_ERRORS)
def test_public_errors(call, exc, msg):
    v = valid()
    threads = cribo.get_num_threads()
    with pytest.raises(exc, match=msg):
        call(v)
    assert cribo.get_num_threads() == threads


def test_num_threads_context_rejects_zero_and_keeps_the_count():
    before = cribo.get_num_threads()
    with pytest.raises(ValueError, match=E("set_num_threads: n must be in [1, 256], got 0")):
        with cribo.num_threads(0):
            pass  # pragma: no cover
    assert cribo.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with cribo.num_threads(1):
            assert cribo.get_num_threads() == 1
            raise RuntimeError
    assert cribo.get_num_threads() == before


def test_set_num_threads_absurd_value_is_a_named_value_error():
    with pytest.raises(ValueError, match=E("set_num_threads: n must be in [1, 256]")):
        cribo.set_num_threads(2**40)


@pytest.mark.parametrize("key, value", [("capacity", "x"), ("capacity", 2.5), ("dim", "x")])
def test_load_state_dict_checks_capacity_and_dim_types(key, value):
    v = valid()
    with pytest.raises((TypeError, ValueError), match=f"ObjectQueue.load_state_dict: {key}"):
        cribo.ObjectQueue(4, D).load_state_dict(state(v, **{key: value}))


def test_failed_load_state_dict_leaves_the_queue_unchanged():
    v = valid()
    q = queue(v)
    before = q.state_dict()
    for bad in (state(v, image_counts=np.array([1, 1, 3])), state(v, capacity=1),
                state(v, objects1=np.full((5, D), np.inf, F32)), state(v, image_ids=None)):
        with pytest.raises((ValueError, KeyError)):
            q.load_state_dict(bad)
        after = q.state_dict()
        assert after.keys() == before.keys()
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])
    m1 = q.match(v["objects1"], v["objects2"])
    q2 = cribo.ObjectQueue(4, D)
    q2.load_state_dict(before)
    m2 = q2.match(v["objects1"], v["objects2"])
    np.testing.assert_array_equal(m1.index1, m2.index1)
    np.testing.assert_array_equal(m1.mask2, m2.mask2)


# ============================================================================
# an empty queue (or one holding no object) matches nothing, never raises
# ============================================================================

@pytest.mark.parametrize("with_ids, fill", [(False, "empty"), (True, "empty"),
                                             (False, "zero-count images"),
                                             (True, "zero-count images"),
                                             (True, "all excluded")])
def test_empty_queue_match_is_all_missing(with_ids, fill):
    v = valid()
    q = cribo.ObjectQueue(4, D)
    ids = np.array([7, 7, 7, 7, 7]) if with_ids else None
    if fill == "zero-count images":
        q.push(np.zeros((0, D), F32), np.zeros((0, D), F32), [0, 0, 0], [1, 2, 3])
        assert len(q) == 3 and q.n_objects == 0
    elif fill == "all excluded":  # every entry comes from the query's own image
        q.push(v["objects1"], v["objects2"], [5], [7])
    m = q.match(v["objects1"], v["objects2"], image_ids=ids)
    for idx in (m.index1, m.index2):
        assert idx.dtype == np.int64 and idx.shape == (5,) and (idx == -1).all()
    for mask in (m.mask1, m.mask2):
        assert mask.dtype == np.bool_ and mask.shape == (5,) and not mask.any()
    for t in (m.targets1, m.targets2):
        assert t.shape == (5, D) and t.dtype == F32 and (t == 0).all()
    for s in (m.similarity1, m.similarity2):
        assert s.shape == (5,) and np.isneginf(s).all()
    assert m.consistent_fraction == 0.0
    # No query objects at all.
    m0 = q.match(np.zeros((0, D), F32), np.zeros((0, D), F32),
                 image_ids=np.zeros(0, I64) if with_ids else None)
    assert m0.index1.shape == (0,) and m0.targets2.shape == (0, D)


def test_empty_pushes_and_empty_batches_are_valid():
    v = valid()
    q = cribo.ObjectQueue(2, D)
    q.push(np.zeros((0, D), F32), np.zeros((0, D), F32), np.zeros(0, I64))  # B = 0
    assert len(q) == 0
    q.push(v["objects1"], v["objects2"], [5, 0, 0])  # a block larger than the queue
    assert len(q) == 2 and q.n_objects == 5
    np.testing.assert_array_equal(q.image_counts, [5, 0])


def test_zero_row_inputs_that_are_allowed():
    v = valid()
    idx, sim = cribo.topk_cosine(v["queries"][:0], v["bank"], 2)
    assert idx.shape == (0, 2) and idx.dtype == I64 and sim.shape == (0, 2)
    loss, grad = cribo.softmax_cross_entropy(v["student"][:0], v["teacher"][:0])
    assert loss.shape == (0,) and grad.shape == (0, L)
    c = cribo.update_center(v["center"], v["teacher"][:0])
    np.testing.assert_array_equal(c, v["center"])
    assert c is not v["center"]
    r = losses(v, student_objects=v["so"][:, :0], teacher_objects=v["to"][:, :0],
               teacher_neighbours=v["tn"][:, :0])
    assert r.objects == 0.0 and r.neighbours == 0.0 and r.grad_objects.shape == (2, 0, L)


# ============================================================================
# NaN / inf in every float input
# ============================================================================

NONFINITE = [np.nan, np.inf, -np.inf]


def _poison(x, value):
    x = x.copy()
    x.reshape(-1)[x.size // 2] = value
    return x


NAN_CASES = [
    P("tokens", lambda v, q: cribo.cluster(v["tokens"], v["positions"], K),
      E("cluster: tokens must be finite, got NaN or infinity"), id="cluster-tokens"),
    P("positions", lambda v, q: cribo.cluster(v["tokens"], v["positions"], K),
      E("cluster: positions must be finite, got NaN or infinity"), id="cluster-positions"),
    P("tokens", lambda v, q: cribo.pool(v["tokens"], v["labels"], K),
      E("pool: tokens must be finite, got NaN or infinity"), id="pool-tokens"),
    P("tokens", lambda v, q: cribo.pool(v["tokens"], v["weights"]),
      E("pool: tokens must be finite, got NaN or infinity"), id="pool-soft-tokens"),
    P("weights", lambda v, q: cribo.pool(v["tokens"], v["weights"]),
      E("pool: weights must be finite, got NaN or infinity"), id="pool-soft-weights"),
    P("grad_objects", lambda v, q: cribo.pool_backward(v["grad_objects"], v["labels"], K),
      E("pool_backward: grad_objects must be finite, got NaN or infinity"), id="pb-grad"),
    P("grad_objects", lambda v, q: cribo.pool_backward(v["grad_objects"], v["weights"]),
      E("pool_backward: grad_objects must be finite, got NaN or infinity"), id="pb-soft-grad"),
    P("weights", lambda v, q: cribo.pool_backward(v["grad_objects"], v["weights"]),
      E("pool_backward: weights must be finite, got NaN or infinity"), id="pb-soft-weights"),
    P("queries", lambda v, q: cribo.topk_cosine(v["queries"], v["bank"], 2),
      E("topk_cosine: queries and bank must be finite, got NaN or infinity"), id="tk-queries"),
    P("bank", lambda v, q: cribo.topk_cosine(v["queries"], v["bank"], 2),
      E("topk_cosine: queries and bank must be finite, got NaN or infinity"), id="tk-bank"),
    P("bank", lambda v, q: cribo.topk_cosine(v["queries"], v["bank"], 2,
                                          query_ids=v["query_ids"], bank_ids=v["bank_ids"]),
      E("topk_cosine: queries and bank must be finite, got NaN or infinity"), id="tk-bank-ids"),
    P("student", lambda v, q: cribo.softmax_cross_entropy(v["student"], v["teacher"],
                                                       center=v["center"]),
      E("softmax_cross_entropy: student_logits (divided by student_temp) must be finite, "
        "got NaN or infinity"), id="xent-student"),
    P("teacher", lambda v, q: cribo.softmax_cross_entropy(v["student"], v["teacher"],
                                                       center=v["center"]),
      E("softmax_cross_entropy: teacher_logits") + ".*" + E("must be finite, got NaN or "
                                                            "infinity"),
      id="xent-teacher"),
    P("center", lambda v, q: cribo.softmax_cross_entropy(v["student"], v["teacher"],
                                                      center=v["center"]),
      E("softmax_cross_entropy: center must be finite, got NaN or infinity"),
      id="xent-center"),
    P("center", lambda v, q: cribo.update_center(v["center"], v["teacher"]),
      E("update_center: center must be finite, got NaN or infinity"), id="uc-center"),
    P("teacher", lambda v, q: cribo.update_center(v["center"], v["teacher"]),
      E("update_center: teacher_logits must be finite, got NaN or infinity"), id="uc-teacher"),
    P("objects1", lambda v, q: q.push(v["objects1"], v["objects2"], v["counts"]),
      E("ObjectQueue.push: objects1 must be finite, got NaN or infinity"), id="oq-push-o1"),
    P("objects2", lambda v, q: q.push(v["objects1"], v["objects2"], v["counts"]),
      E("ObjectQueue.push: objects2 must be finite, got NaN or infinity"), id="oq-push-o2"),
    P("objects1", lambda v, q: q.match(v["objects1"], v["objects2"]),
      E("ObjectQueue.match: objects1 must be finite, got NaN or infinity"), id="oq-match-o1"),
    P("objects2", lambda v, q: cribo.ObjectQueue(3, D).match(v["objects1"], v["objects2"]),
      E("ObjectQueue.match: objects2 must be finite, got NaN or infinity"),
      id="oq-match-o2-empty-queue"),
]


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key, call, msg", NAN_CASES)
def test_nonfinite_inputs_are_rejected(key, call, msg, value):
    v = valid()
    q = queue(v)  # a queue filled from the clean inputs
    v[key] = _poison(v[key], value)
    with pytest.raises(ValueError, match=msg):
        call(v, q)


def test_finite_logits_that_overflow_once_scaled_are_named_with_the_cause():
    # 1e38 / 0.1 is beyond float32: finite input, non-finite scaled logits.
    s = np.zeros((2, 5), np.float32)
    s[1, 2] = 1e38
    with pytest.raises(ValueError, match=E("softmax_cross_entropy: student_logits (divided by "
                                           "student_temp) must be finite") + ".*" +
                       E("beyond float32's range once scaled")):
        cribo.softmax_cross_entropy(s, np.zeros((2, 5), np.float32), student_temp=0.1)
    v = valid()
    v["sg"] = np.full_like(v["sg"], 1e38)
    with pytest.raises(ValueError, match=E("cribo_losses: student_global (divided by "
                                           "student_temp) must be finite") + ".*" +
                       E("once scaled")):
        losses(v)


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["sg", "tg", "so", "to", "tn", "cg", "co"])
def test_nonfinite_cribo_losses_inputs_raise(key, value):
    v = valid()
    v[key] = _poison(v[key], value)
    with pytest.raises(ValueError, match="must be finite, got NaN or infinity"):
        losses(v)


_LOSS_ARG = {"sg": "student_global", "tg": "teacher_global", "so": "student_objects",
             "to": "teacher_objects", "tn": "teacher_neighbours", "cg": "center_global",
             "co": "center_objects"}


@pytest.mark.parametrize("key", list(_LOSS_ARG))
def test_nonfinite_cribo_losses_message_names_function_and_argument(key):
    v = valid()
    v[key] = _poison(v[key], np.nan)
    # The kernel's qualifier stays: "(divided by student_temp)", "(after centring ...)".
    with pytest.raises(ValueError, match=E(f"cribo_losses: {_LOSS_ARG[key]}") +
                       r"( \([^)]*\))? must be finite"):
        losses(v)


def test_nonfinite_hyperparameters_of_raw_C_functions():
    v = valid()
    nan, inf = float("nan"), float("inf")
    for kw, msg in [
        (dict(pos_weight=nan), "cluster: pos_weight must be a finite number in [0, 1e6], got nan"),
        (dict(pos_weight=-1.0), "cluster: pos_weight must be a finite number in [0, 1e6], got -1"),
        (dict(sinkhorn_lambda=inf), "cluster: sinkhorn_lambda must be a finite number in "
                                    "(0, 1e6], got inf"),
        (dict(sinkhorn_lambda=0.0), "cluster: sinkhorn_lambda must be a finite number in "
                                    "(0, 1e6], got 0"),
        (dict(sinkhorn_lambda=nan), "cluster: sinkhorn_lambda must be a finite number in "
                                    "(0, 1e6], got nan"),
        (dict(sinkhorn_iters=-1), "cluster: sinkhorn_iters must be in [0, 100000], got -1"),
        (dict(n_iters=0), "cluster: n_iters must be in [1, 100000], got 0"),
        (dict(n_iters=10**6), "cluster: n_iters must be in [1, 100000], got 1000000"),
    ]:
        with pytest.raises(ValueError, match=E(msg)):
            C_cluster(v, **kw)
    for kw, msg in [
        (dict(student_temp=0.0), "softmax_cross_entropy: student_temp must be a finite number "
                                 "> 0, got 0"),
        (dict(teacher_temp=nan), "softmax_cross_entropy: teacher_temp must be a finite number "
                                 "> 0, got nan"),
        (dict(teacher_temp_b=-inf), "softmax_cross_entropy: teacher_temp_b must be a finite "
                                    "number > 0, got -inf"),
        (dict(student_temp=inf), "softmax_cross_entropy: student_temp must be a finite number "
                                 "> 0, got inf"),
    ]:
        with pytest.raises(ValueError, match=E(msg)):
            C_xent(v, **kw)
    for m in (nan, 1.5, -0.5):
        with pytest.raises(ValueError, match=E("update_center: momentum must be in [0, 1], got")):
            _C.update_center(v["center"], v["teacher"], m)
    for name in ("weight", "weight_b"):
        with pytest.raises(ValueError, match=E(f"softmax_cross_entropy: {name} must be finite")):
            C_xent(v, **{name: _poison(v[name], np.nan)})
    # A second teacher is read only where its weight is non-zero.
    tb = v["teacher_b"].copy()
    tb[0] = np.nan
    wb = v["weight_b"].copy()
    wb[0] = 0.0
    la, lb, g = C_xent(v, teacher_logits_b=tb, weight_b=wb)
    assert lb[0] == 0.0 and np.isfinite(la).all() and np.isfinite(g).all()
    with pytest.raises(ValueError, match=E("softmax_cross_entropy: teacher_logits_b")
                       + ".*must be finite"):
        C_xent(v, teacher_logits_b=tb)
    with pytest.raises(ValueError, match=E("softmax_cross_entropy: center_b must be finite")):
        C_xent(v, center_b=_poison(v["center_b"], np.inf))


# ============================================================================
# the raw binding: strict dtype / byte order / layout, clear errors
# ============================================================================

def _swapped(x):
    return x.astype(x.dtype.newbyteorder("S"))


def _strided(x):
    """Same values, not C-contiguous (every other element of a wider array)."""
    wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def _fortran(x):
    return np.asfortranarray(x)


def _unaligned(x):
    raw = np.zeros(x.nbytes + 1, np.uint8)[1:]
    out = raw.view(x.dtype).reshape(x.shape)
    out[...] = x
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


# (C function, fn name in messages, ordered list of (argument, kind), builder of valid args)
def _c_specs(v):
    return {
        "cluster": ("cluster", [("tokens", "f"), ("positions", "f"), ("init", "i")],
                    lambda a: _C.cluster(a["tokens"], a["positions"], a["init"], 2.0, 20.0, 5,
                                         5, True, False),
                    dict(tokens=v["tokens"], positions=v["positions"], init=v["init"])),
        "pool": ("pool", [("tokens", "f"), ("labels", "i")],
                 lambda a: _C.pool(a["tokens"], a["labels"], K),
                 dict(tokens=v["tokens"], labels=v["labels"])),
        "pool_backward": ("pool_backward", [("grad_objects", "f"), ("labels", "i")],
                          lambda a: _C.pool_backward(a["grad_objects"], a["labels"], K),
                          dict(grad_objects=v["grad_objects"], labels=v["labels"])),
        "pool_soft": ("pool", [("tokens", "f"), ("weights", "f")],
                      lambda a: _C.pool_soft(a["tokens"], a["weights"]),
                      dict(tokens=v["tokens"], weights=v["weights"])),
        "pool_soft_backward": ("pool_backward", [("grad_objects", "f"), ("weights", "f")],
                               lambda a: _C.pool_soft_backward(a["grad_objects"], a["weights"]),
                               dict(grad_objects=v["grad_objects"], weights=v["weights"])),
        "topk_cosine": ("topk_cosine", [("queries", "f"), ("bank", "f"), ("query_ids", "i"),
                                        ("bank_ids", "i")],
                        lambda a: _C.topk_cosine(a["queries"], a["bank"], 2, a["query_ids"],
                                                 a["bank_ids"]),
                        dict(queries=v["queries"], bank=v["bank"], query_ids=v["query_ids"],
                             bank_ids=v["bank_ids"])),
        "softmax_cross_entropy": (
            "softmax_cross_entropy",
            [("student_logits", "f"), ("teacher_logits", "f"), ("teacher_logits_b", "f"),
             ("center", "f"), ("center_b", "f"), ("weight", "f"), ("weight_b", "f")],
            lambda a: _C.softmax_cross_entropy(**a),
            dict(student_logits=v["student"], teacher_logits=v["teacher"],
                 teacher_logits_b=v["teacher_b"], center=v["center"], center_b=v["center_b"],
                 weight=v["weight"], weight_b=v["weight_b"])),
        "update_center": ("update_center", [("center", "f"), ("teacher_logits", "f")],
                          lambda a: _C.update_center(a["center"], a["teacher_logits"], 0.9),
                          dict(center=v["center"], teacher_logits=v["teacher"])),
    }


C_FUNCS = ["cluster", "pool", "pool_backward", "pool_soft", "pool_soft_backward", "topk_cosine",
           "softmax_cross_entropy", "update_center"]

_F32_MSG = "{fn}: {arg} must be a native-endian float32 array, got {dt}"
_I64_MSG = "{fn}: {arg} must be a native-endian int64 array, got {dt}"
_LAYOUT_MSG = "{fn}: {arg} must be C-contiguous and aligned (use numpy.require(x, requirements='CA'))"


def _corruptions(kind):
    """(name, transform, exception, message template) for one argument kind."""
    if kind == "f":
        return [
            ("float64", lambda x: x.astype(F64), TypeError, _F32_MSG, "dtype('float64')"),
            ("float16", lambda x: x.astype(np.float16), TypeError, _F32_MSG, "dtype('float16')"),
            ("int32", lambda x: x.astype(np.int32), TypeError, _F32_MSG, "dtype('int32')"),
            ("bool", lambda x: x > 0, TypeError, _F32_MSG, "dtype('bool')"),
            ("complex64", lambda x: x.astype(np.complex64), TypeError, _F32_MSG,
             "dtype('complex64')"),
            ("byteswapped", _swapped, TypeError, _F32_MSG, "dtype('>f4')"),
            ("strided", _strided, ValueError, _LAYOUT_MSG, None),
            ("fortran", _fortran, ValueError, _LAYOUT_MSG, None),
            ("unaligned", _unaligned, ValueError, _LAYOUT_MSG, None),
        ]
    return [
        ("int32", lambda x: x.astype(np.int32), TypeError, _I64_MSG, "dtype('int32')"),
        ("uint64", lambda x: np.abs(x).astype(np.uint64), TypeError, _I64_MSG,
         "dtype('uint64')"),
        ("float32", lambda x: x.astype(F32), TypeError, _I64_MSG, "dtype('float32')"),
        ("byteswapped", _swapped, TypeError, _I64_MSG, "dtype('>i8')"),
        ("strided", _strided, ValueError, _LAYOUT_MSG, None),
        ("unaligned", _unaligned, ValueError, _LAYOUT_MSG, None),
    ]


def _raw_cases():
    v = valid()
    out = []
    for name, (fn, args, _call, _a) in _c_specs(v).items():
        for arg, kind in args:
            for cname, _t, exc, _tmpl, _dt in _corruptions(kind):
                if cname == "fortran" and v_ndim(v, name, arg) < 2:
                    continue
                out.append(P(name, arg, cname, id=f"{name}-{arg}-{cname}"))
    return out


def v_ndim(v, name, arg):
    return _c_specs(v)[name][3][arg].ndim


@pytest.mark.parametrize("name, arg, cname", _raw_cases())
def test_raw_C_refuses_what_the_public_API_converts(name, arg, cname):
    v = valid()
    fn, args, call, a = _c_specs(v)[name]
    kind = dict(args)[arg]
    (_, transform, exc, tmpl, dt), = [c for c in _corruptions(kind) if c[0] == cname]
    a = dict(a)
    a[arg] = transform(a[arg])
    with pytest.raises(exc, match=E(tmpl.format(fn=fn, arg=arg, dt=dt))):
        call(a)


@pytest.mark.parametrize("name", C_FUNCS)
def test_raw_C_refuses_non_arrays_and_wrong_ndim(name):
    v = valid()
    fn, args, call, a = _c_specs(v)[name]
    for arg, _kind in args:
        bad = dict(a)
        bad[arg] = a[arg].tolist()
        with pytest.raises(TypeError, match=f"{arg}|argument|ndarray"):
            call(bad)
        bad[arg] = a[arg][None]
        with pytest.raises(ValueError, match=E(f"{fn}: {arg} must have shape")
                           + f".*got {a[arg].ndim + 1} dimensions"):
            call(bad)


def test_raw_C_shape_mismatches_and_ranges():
    v = valid()
    cases = [
        (lambda: _C.cluster(v["tokens"], v["positions"][:1], v["init"], 2.0, 20.0, 5, 5, True,
                            False),
         "cluster: positions must have shape (2, 2, 5, 2) to match tokens, got (1, 2, 5, 2)"),
        (lambda: _C.cluster(v["tokens"], v["positions"], v["init"][:1], 2.0, 20.0, 5, 5, True,
                            False), "cluster: init must have shape (2, K), got (1, 3)"),
        (lambda: _C.cluster(v["tokens"], v["positions"], v["init"][:, :0], 2.0, 20.0, 5, 5,
                            True, False), "cluster: n_clusters must be at least 1, got 0"),
        (lambda: _C.cluster(v["tokens"][:, :, :0], v["positions"][:, :, :0], v["init"], 2.0,
                            20.0, 5, 5, True, False),
         "cluster: the number of tokens per view N must be at least 1, got 0"),
        (lambda: _C.cluster(v["tokens"][:0], v["positions"][:0], v["init"][:0], 2.0, 20.0, 5, 5,
                            True, False), "cluster: the batch size B must be at least 1, got 0"),
        (lambda: _C.cluster(np.zeros((B, 1, N, D), F32), v["positions"], v["init"], 2.0, 20.0,
                            5, 5, True, False),
         "cluster: tokens must have shape (B, 2, N, d) with 2 views, got 1 views"),
        (lambda: _C.cluster(v["tokens"][:, :, :1].copy(), v["positions"][:, :, :1].copy(),
                            np.tile(np.arange(3), (B, 1)), 2.0, 20.0, 5, 5, True, False),
         "cluster: n_clusters must be at most 2N = 2 (the joint tokens of one image), got 3"),
        (lambda: _C.cluster(v["tokens"], v["positions"], v["init"] + 8, 2.0, 20.0, 5, 5, True,
                            False), "cluster: init must lie in [0, 10), got 10"),
        (lambda: _C.pool(v["tokens"], v["labels"], 0),
         "pool: n_clusters must be in [1, 2147483647], got 0"),
        (lambda: _C.pool(v["tokens"], v["labels"], BIG),
         "pool: n_clusters must be in [1, 2147483647], got 2147483648"),
        (lambda: _C.pool_backward(v["grad_objects"], v["labels"], K - 1),
         "pool_backward: grad_objects must have shape (2, 2, 2, d) to match labels"),
        (lambda: _C.pool_soft(v["tokens"], -v["weights"]), "pool: weights must be non-negative"),
        (lambda: _C.topk_cosine(v["queries"], v["bank"], 7),
         "topk_cosine: k must be in [1, 6] (the bank size), got 7"),
        (lambda: _C.topk_cosine(v["queries"], v["bank"], BIG),
         "topk_cosine: k must be in [1, 6] (the bank size), got 2147483648"),
        (lambda: _C.topk_cosine(v["queries"], v["bank"][:0], 1),
         "topk_cosine: bank must hold at least one row, got an empty bank"),
        (lambda: _C.topk_cosine(v["queries"], v["bank"], 1, v["query_ids"], None),
         "topk_cosine: query_ids and bank_ids must be given together"),
        (lambda: _C.topk_cosine(v["queries"], v["bank"], 1, v["query_ids"], v["bank_ids"][:2]),
         "topk_cosine: query_ids must have shape (4,) and bank_ids (6,), got (4,) and (2,)"),
        (lambda: C_xent(v, weight_b=None),
         "softmax_cross_entropy: weight_b is required with teacher_logits_b"),
        (lambda: C_xent(v, weight=v["weight"][:2]),
         "softmax_cross_entropy: weight must have shape (3,), got (2,)"),
        (lambda: C_xent(v, center_b=v["center_b"][:2]),
         "softmax_cross_entropy: center_b must have shape (7,), got (2,)"),
        (lambda: C_xent(v, teacher_logits_b=v["teacher_b"][:, :2].copy()),
         "softmax_cross_entropy: teacher_logits_b must have shape (3, 7), got (3, 2)"),
        (lambda: _C.update_center(v["center"][:2], v["teacher"], 0.9),
         "update_center: center must have shape (7,), got (2,)"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=E(msg)):
            call()
    for bad in ([1.0] * L, 1.0):
        with pytest.raises(TypeError, match=E("softmax_cross_entropy: center must be a numpy "
                                              "array or None")):
            _C.softmax_cross_entropy(v["student"], v["teacher"], None, bad)
    with pytest.raises(TypeError, match="query_ids must be a numpy array or None"):
        _C.topk_cosine(v["queries"], v["bank"], 1, [0, 1, 2, 3], v["bank_ids"])
    with pytest.raises(ValueError, match=E("set_num_threads: n must be in [1, 256], got 0")):
        _C.set_num_threads(0)
    with pytest.raises(TypeError):
        _C.set_num_threads(1.5)


# ---------------------------------------------------------------- visible conversion

def _public_calls(v):
    """name -> (callable taking the dict, the float/int argument keys it reads)."""
    def match(a):
        q = cribo.ObjectQueue(4, D)
        q.push(a["objects1"][::-1].copy(), a["objects2"][::-1].copy(), a["counts"],
               a["image_ids"])
        m = q.match(a["objects1"], a["objects2"], image_ids=np.repeat(a["image_ids"],
                                                                       a["counts"]))
        return (m.index1, m.index2, m.mask1, m.mask2, m.targets1, m.targets2, m.similarity1,
                m.similarity2)

    def push(a):
        q = cribo.ObjectQueue(4, D)
        q.push(a["objects1"], a["objects2"], a["counts"], a["image_ids"])
        s = q.state_dict()
        return tuple(s[k] for k in ("objects1", "objects2", "object_ids", "image_counts",
                                    "image_ids"))

    def cl(a):
        c = cribo.cribo_losses(a["sg"], a["tg"], a["so"], a["to"], a["tn"],
                               center_global=a["cg"], center_objects=a["co"])
        return (np.float64(c.total), c.grad_global, c.grad_objects, c.center_global,
                c.center_objects)

    return {
        "cluster": (lambda a: tuple(getattr(cribo.cluster(a["tokens"], a["positions"], K,
                                                          init=a["init"], return_plan=True), f)
                                    for f in ("labels", "counts", "plan")),
                    ["tokens", "positions", "init"]),
        "pool": (lambda a: cribo.pool(a["tokens"], a["labels"], K), ["tokens", "labels"]),
        "pool_soft": (lambda a: cribo.pool(a["tokens"], a["weights"]), ["tokens", "weights"]),
        "pool_backward": (lambda a: cribo.pool_backward(a["grad_objects"], a["labels"], K),
                          ["grad_objects", "labels"]),
        "pool_soft_backward": (lambda a: cribo.pool_backward(a["grad_objects"], a["weights"]),
                               ["grad_objects", "weights"]),
        "topk_cosine": (lambda a: cribo.topk_cosine(a["queries"], a["bank"], 3,
                                                    query_ids=a["query_ids"],
                                                    bank_ids=a["bank_ids"]),
                        ["queries", "bank", "query_ids", "bank_ids"]),
        "softmax_cross_entropy": (lambda a: cribo.softmax_cross_entropy(
            a["student"], a["teacher"], center=a["center"]), ["student", "teacher", "center"]),
        "update_center": (lambda a: cribo.update_center(a["center"], a["teacher"]),
                          ["center", "teacher"]),
        "ObjectQueue.push": (push, ["objects1", "objects2", "counts", "image_ids"]),
        "ObjectQueue.match": (match, ["objects1", "objects2", "counts", "image_ids"]),
        "cribo_losses": (cl, ["sg", "tg", "so", "to", "tn", "cg", "co"]),
    }


PUBLIC_NAMES = list(_public_calls(valid()))


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def _assert_bitwise(got, ref):
    got, ref = _as_tuple(got), _as_tuple(ref)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        g, r = np.asarray(g), np.asarray(r)
        assert g.dtype == r.dtype and g.shape == r.shape
        assert g.tobytes() == r.tobytes()


_LAYOUTS = {
    "float64/int32": lambda x: x.astype(F64) if x.dtype == F32 else x.astype(np.int32),
    "byteswapped": _swapped,
    "strided": _strided,
    "fortran": _fortran,
    "unaligned": _unaligned,
    "readonly": lambda x: _readonly(x),
}


def _readonly(x):
    y = x.copy()
    y.flags.writeable = False
    return y


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_API_converts_dtype_byte_order_and_layout_visibly(name, layout):
    v = valid()
    call, keys = _public_calls(v)[name]
    ref = call(v)
    for key in keys:
        w = dict(v)
        w[key] = _LAYOUTS[layout](v[key])
        before = w[key].copy()
        _assert_bitwise(call(w), ref)
        np.testing.assert_array_equal(w[key], before)  # and the input is untouched


# ============================================================================
# dimensions beyond 32 bits (size-0 arrays with one huge dimension)
# ============================================================================

def _huge(shape, dtype=F32):
    a = np.empty(shape, dtype)
    assert a.size == 0 and a.flags.c_contiguous
    return a


def test_dimensions_over_INT_MAX_are_refused_by_name():
    v = valid()
    over = "{fn}: {arg} dimension {i} is {n}, larger than the supported 2147483647"
    cases = [
        # public API: which check fires first is stated per case
        (lambda: cribo.cluster(_huge((1, 2, BIG, 0)), np.zeros((1, 2, 1, 2), F32), 1),
         over.format(fn="cluster", arg="tokens", i=2, n=BIG)),
        (lambda: cribo.cluster(v["tokens"], _huge((B, 2, BIG, 0)), K),
         over.format(fn="cluster", arg="positions", i=2, n=BIG)),
        (lambda: cribo.pool(_huge((1, 2, 0, BIG)), np.zeros((1, 2, 0), I64), 1),
         over.format(fn="pool", arg="tokens", i=3, n=BIG)),
        (lambda: cribo.pool(_huge((0, 2, 5, 4)), _huge((0, 2, BIG), I64), 1),
         over.format(fn="pool", arg="labels", i=2, n=BIG)),
        (lambda: cribo.pool(_huge((0, 2, 5, 4)), _huge((0, 2, 5, BIG))),
         over.format(fn="pool", arg="weights", i=3, n=BIG)),
        (lambda: cribo.pool_backward(_huge((0, 2, BIG, 4)), _huge((0, 2, 5), I64), 3),
         over.format(fn="pool_backward", arg="grad_objects", i=2, n=BIG)),
        (lambda: cribo.pool_backward(_huge((BIG + 1, 2, 3, 0)), _huge((0, 2, 5, 3))),
         over.format(fn="pool_backward", arg="grad_objects", i=0, n=BIG + 1)),
        (lambda: cribo.topk_cosine(_huge((0, BIG)), v["bank"]),
         over.format(fn="topk_cosine", arg="queries", i=1, n=BIG)),
        (lambda: cribo.topk_cosine(_huge((0, 0)), _huge((BIG + 1, 0))),
         over.format(fn="topk_cosine", arg="bank", i=0, n=BIG + 1)),
        (lambda: cribo.softmax_cross_entropy(_huge((0, BIG)), _huge((0, BIG))),
         over.format(fn="softmax_cross_entropy", arg="student_logits", i=1, n=BIG)),
        (lambda: cribo.softmax_cross_entropy(_huge((BIG, 0)), _huge((BIG, 0))),
         over.format(fn="softmax_cross_entropy", arg="student_logits", i=0, n=BIG)),
        (lambda: cribo.update_center(np.zeros(0, F32), _huge((BIG, 0))),
         over.format(fn="update_center", arg="teacher_logits", i=0, n=BIG)),
        (lambda: cribo.update_center(np.zeros(0, F32), _huge((0, BIG))),
         over.format(fn="update_center", arg="teacher_logits", i=1, n=BIG)),
        # raw binding
        (lambda: _C.cluster(_huge((1, 2, 0, BIG)), np.zeros((1, 2, 0, 2), F32),
                            np.zeros((1, 1), I64), 2.0, 20.0, 5, 5, True, False),
         over.format(fn="cluster", arg="tokens", i=3, n=BIG)),
        (lambda: _C.cluster(v["tokens"], v["positions"], _huge((0, BIG), I64), 2.0, 20.0, 5, 5,
                            True, False),
         over.format(fn="cluster", arg="init", i=1, n=BIG)),
        (lambda: _C.pool_soft(_huge((BIG, 2, 0, 4)), _huge((0, 2, 0, 3))),
         over.format(fn="pool", arg="tokens", i=0, n=BIG)),
        (lambda: _C.pool_soft_backward(_huge((0, 2, 3, 4)), _huge((0, BIG, 0, 3))),
         over.format(fn="pool_backward", arg="weights", i=1, n=BIG)),
        (lambda: _C.softmax_cross_entropy(_huge((0, 5)), _huge((BIG, 0))),
         over.format(fn="softmax_cross_entropy", arg="teacher_logits", i=0, n=BIG)),
        # (1-D arguments -- ids, centres, row weights -- cannot be size 0 with a huge
        # dimension; they are checked by the same helper.)
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=E(msg)):
            call()
    # Scalars beyond 32 bits.
    with pytest.raises(ValueError, match=E("topk_cosine: k must be in [1, 2147483647], got "
                                           "2147483648")):
        cribo.topk_cosine(v["queries"], v["bank"], BIG)
    with pytest.raises(ValueError, match=E("cluster: n_clusters must be in [1, 2147483647], got "
                                           "2147483648")):
        cribo.cluster(v["tokens"], v["positions"], BIG)
    with pytest.raises(ValueError, match=E("ObjectQueue: dim must be in [1, 2147483647], got "
                                           "2147483648")):
        cribo.ObjectQueue(1, BIG)


def test_cluster_plan_size_limit():
    """2N x K beyond 64 * INT_MAX is refused before anything is allocated.

    (The companion check 2N > INT_MAX cannot be reached with a size-0 array: it needs
    N > 2**30 with B, d >= 1, i.e. an 8 GiB tokens array, and B, N, d >= 1 are checked
    first.)"""
    n = 2**20
    tok = np.ones((1, 2, n, 1), F32)
    pos = np.zeros((1, 2, n, 2), F32)
    init = np.arange(n, dtype=I64)[None]
    with pytest.raises(ValueError, match=E("cluster: 2N x n_clusters = 2097152 x 1048576 is too "
                                           "large")):
        cribo.cluster(tok, pos, n, init=init)


# ============================================================================
# immutability: inputs are bit-identical after every call
# ============================================================================

@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_inputs_are_not_modified(name):
    v = valid()
    # float64 / int32 inputs too, so a conversion that aliases would show up
    wide = {k: (x.astype(F64) if x.dtype == F32 else x) for k, x in v.items()}
    for inputs in (v, wide):
        snap = {k: x.copy() for k, x in inputs.items()}
        call, _keys = _public_calls(v)[name]
        call(inputs)
        call(inputs)
        for k, x in inputs.items():
            assert x.tobytes() == snap[k].tobytes() and x.dtype == snap[k].dtype, k


@pytest.mark.parametrize("name", C_FUNCS)
def test_raw_C_inputs_are_not_modified_even_on_failure(name):
    v = valid()
    fn, args, call, a = _c_specs(v)[name]
    snap = {k: x.copy() for k, x in a.items()}
    call(a)
    # a failing call (NaN in the first float input; or a shape error)
    first_f = [arg for arg, kind in args if kind == "f"][0]
    bad = dict(a)
    bad[first_f] = _poison(a[first_f], np.nan)
    bad_snap = bad[first_f].copy()
    with pytest.raises(ValueError):
        call(bad)
    assert bad[first_f].tobytes() == bad_snap.tobytes()
    for k, x in a.items():
        assert x.tobytes() == snap[k].tobytes(), k


def test_queue_does_not_alias_pushed_arrays():
    v = valid()
    q = cribo.ObjectQueue(4, D)
    o1, o2 = v["objects1"].copy(), v["objects2"].copy()
    q.push(o1, o2, v["counts"])
    stored = q.objects1.copy()
    o1[:] = 123.0
    np.testing.assert_array_equal(q.objects1, stored)
    s = q.state_dict()
    s["objects1"][:] = -5.0
    np.testing.assert_array_equal(q.objects1, stored)


# ============================================================================
# reference counts over 1000 calls, failing calls included
# ============================================================================

def _refcount_cases(v):
    """name -> (list of arrays to watch, good call, list of failing calls)."""
    nan_tok = _poison(v["tokens"], np.nan)
    dup = np.zeros((B, K), I64)
    swapped = _swapped(v["tokens"])
    nan_bank = _poison(v["bank"], np.nan)
    nan_s = _poison(v["student"], np.nan)
    nan_t = _poison(v["teacher"], np.inf)
    neg_w = -v["weights"]
    bad_lab = v["labels"] + K
    i32 = v["query_ids"].astype(np.int32)
    watched = [v["tokens"], v["positions"], v["init"], nan_tok, dup, swapped]
    return {
        "cluster": (
            watched,
            lambda: C_cluster(v),
            [lambda: C_cluster(v, tokens=nan_tok), lambda: C_cluster(v, init=dup),
             lambda: C_cluster(v, tokens=swapped), lambda: C_cluster(v, sinkhorn_lambda=-1.0),
             lambda: C_cluster(v, positions=v["tokens"])]),
        "pool": (
            [v["tokens"], v["labels"], bad_lab, nan_tok],
            lambda: _C.pool(v["tokens"], v["labels"], K),
            [lambda: _C.pool(v["tokens"], bad_lab, K), lambda: _C.pool(nan_tok, v["labels"], K),
             lambda: _C.pool(v["tokens"], v["labels"], 0)]),
        "pool_backward": (
            [v["grad_objects"], v["labels"], bad_lab],
            lambda: _C.pool_backward(v["grad_objects"], v["labels"], K),
            [lambda: _C.pool_backward(v["grad_objects"], bad_lab, K),
             lambda: _C.pool_backward(v["grad_objects"], v["labels"], K + 1)]),
        "pool_soft": (
            [v["tokens"], v["weights"], neg_w],
            lambda: _C.pool_soft(v["tokens"], v["weights"]),
            [lambda: _C.pool_soft(v["tokens"], neg_w),
             lambda: _C.pool_soft(v["tokens"], v["weights"][:, :, :2])]),
        "pool_soft_backward": (
            [v["grad_objects"], v["weights"], neg_w],
            lambda: _C.pool_soft_backward(v["grad_objects"], v["weights"]),
            [lambda: _C.pool_soft_backward(v["grad_objects"], neg_w),
             lambda: _C.pool_soft_backward(v["tokens"], v["weights"])]),
        "topk_cosine": (
            [v["queries"], v["bank"], v["query_ids"], v["bank_ids"], nan_bank, i32],
            lambda: _C.topk_cosine(v["queries"], v["bank"], 2, v["query_ids"], v["bank_ids"]),
            [lambda: _C.topk_cosine(v["queries"], nan_bank, 2, v["query_ids"], v["bank_ids"]),
             lambda: _C.topk_cosine(v["queries"], v["bank"], 2, i32, v["bank_ids"]),
             lambda: _C.topk_cosine(v["queries"], v["bank"], 99),
             lambda: _C.topk_cosine(v["queries"], v["bank"], 1, v["query_ids"], None)]),
        "softmax_cross_entropy": (
            [v["student"], v["teacher"], v["teacher_b"], v["center"], v["center_b"],
             v["weight"], v["weight_b"], nan_s, nan_t],
            lambda: C_xent(v),
            [lambda: C_xent(v, student_logits=nan_s), lambda: C_xent(v, teacher_logits_b=nan_t),
             lambda: C_xent(v, weight_b=None), lambda: C_xent(v, student_temp=0.0),
             lambda: C_xent(v, center=v["weight"])]),
        "update_center": (
            [v["center"], v["teacher"], nan_t],
            lambda: _C.update_center(v["center"], v["teacher"], 0.9),
            [lambda: _C.update_center(v["center"], nan_t, 0.9),
             lambda: _C.update_center(v["center"], v["teacher"], 1.5),
             lambda: _C.update_center(v["teacher"], v["teacher"], 0.9)]),
    }


@pytest.mark.parametrize("name", C_FUNCS)
def test_refcounts_are_stable_over_1000_calls(name):
    v = valid()
    watched, good, bad = _refcount_cases(v)[name]
    good()
    for b in bad:
        with pytest.raises((ValueError, TypeError)):
            b()
    before = [sys.getrefcount(x) for x in watched]
    for _ in range(1000):
        out = good()
        for b in bad:
            try:
                b()
            except (ValueError, TypeError):
                pass
    after = [sys.getrefcount(x) for x in watched]
    assert after == before
    # Outputs are owned by the caller alone (no reference leaked by the binding).
    del out
    r = good()
    if isinstance(r, tuple):
        assert sys.getrefcount(r) == 2
        for e in r:
            if e is not None:
                assert sys.getrefcount(e) == 3  # the tuple, `e`, the argument
    else:
        assert sys.getrefcount(r) == 2


def test_thread_functions_refcounts():
    n = cribo.get_num_threads()
    before = sys.getrefcount(None)
    for _ in range(1000):
        _C.set_num_threads(n)
        _C.get_num_threads()
        try:
            _C.set_num_threads(0)
        except ValueError:
            pass
    # None is shared; allow unrelated churn but not one reference per call.
    assert abs(sys.getrefcount(None) - before) < 100
    assert cribo.get_num_threads() == n


# ============================================================================
# memory: 1000 calls (good and failing) do not grow the process
# ============================================================================

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_cases():
    """Sizes chosen so that one leaked output or workspace per call is >= 16 KiB."""
    rng = np.random.default_rng(7)
    tok = rng.standard_normal((2, 2, 64, 32)).astype(F32)
    pos = rng.random((2, 2, 64, 2)).astype(F32)
    init = np.tile(np.arange(16, dtype=I64), (2, 1))
    big_tok = np.ones((1, 2, 20000, 1), F32)          # duplicate-init check: 40 KB scratch
    big_pos = np.zeros((1, 2, 20000, 2), F32)
    lab = rng.integers(-1, 8, (2, 2, 64)).astype(I64)
    tok128 = rng.standard_normal((2, 2, 64, 128)).astype(F32)
    w = rng.random((2, 2, 64, 8)).astype(F32)
    g = rng.standard_normal((2, 2, 8, 128)).astype(F32)
    qs = rng.standard_normal((64, 32)).astype(F32)
    bank = rng.standard_normal((300, 32)).astype(F32)
    nan_bank = _poison(bank, np.nan)
    s = rng.standard_normal((64, 256)).astype(F32)
    t = rng.standard_normal((64, 256)).astype(F32)
    nan_t = _poison(t, np.nan)
    c = np.zeros(8192, F32)
    x = rng.standard_normal((2, 8192)).astype(F32)
    nan_x = _poison(x, np.nan)
    o = rng.standard_normal((40, 32)).astype(F32)
    cnt = np.full(8, 5)

    def queue_cycle():
        qq = cribo.ObjectQueue(16, 32)
        for _ in range(3):
            qq.match(o, o)
            qq.push(o, o, cnt, np.arange(8))
        qq.match(o, o, image_ids=np.repeat(np.arange(8), 5))

    def fail(f):
        def run():
            try:
                f()
            except (ValueError, TypeError):
                return
            raise AssertionError("expected a failure")
        return run

    return {
        "cluster": [lambda: _C.cluster(tok, pos, init, 2.0, 20.0, 5, 3, True, True),
                    lambda: _C.cluster(tok, pos, init, 2.0, 500.0, 5, 3, True, True),
                    fail(lambda: _C.cluster(big_tok, big_pos, np.zeros((1, 2), I64), 2.0, 20.0,
                                            5, 5, True, True))],
        "pool": [lambda: _C.pool(tok128, lab, 8), lambda: _C.pool_backward(g, lab, 8),
                 fail(lambda: _C.pool(tok128, lab + 8, 8))],
        "pool_soft": [lambda: _C.pool_soft(tok128, w), lambda: _C.pool_soft_backward(g, w),
                      fail(lambda: _C.pool_soft(tok128, -w))],
        "topk_cosine": [lambda: _C.topk_cosine(qs, bank, 8),
                        fail(lambda: _C.topk_cosine(qs, nan_bank, 8))],
        "softmax_cross_entropy": [lambda: _C.softmax_cross_entropy(s, t),
                                  lambda: _C.softmax_cross_entropy(s, t, t, None, None, None,
                                                                   np.ones(64, F32)),
                                  fail(lambda: _C.softmax_cross_entropy(s, nan_t))],
        "update_center": [lambda: _C.update_center(c, x, 0.9),
                          fail(lambda: _C.update_center(c, nan_x, 0.9))],
        "ObjectQueue": [queue_cycle],
    }


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("name", list(_memory_cases()))
def test_1000_calls_do_not_grow_memory(name):
    calls = _memory_cases()[name]
    n = 1000 if name != "ObjectQueue" else 200

    def loop(k):
        for _ in range(k):
            for f in calls:
                f()

    loop(50)
    gc.collect()
    rss0 = _rss()
    loop(n)
    gc.collect()
    grew = _rss() - rss0
    assert grew < 4 * 2**20, f"RSS grew by {grew / 2**20:.1f} MiB over {n} calls"

    tracemalloc.start()
    try:
        loop(20)
        gc.collect()
        t0, _ = tracemalloc.get_traced_memory()
        loop(n // 2)
        gc.collect()
        t1, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t1 - t0 < 64 * 2**10, f"traced Python memory grew by {(t1 - t0) / 2**10:.1f} KiB"
