"""Bad input, binding hygiene and memory, driven by ONE registry of the binding's entry
points (docs/contributing.md, "Binding conventions" 2-5 and "Test conventions" 5).

This file is long because it is that registry: one ``Op`` per entry point of
``cribo._C`` (how to build a valid call, the public function that reaches it, its bad
inputs with the expected messages, its non-finite inputs, a larger call for the memory
test).  Adding an operator means adding one ``Op``; every test below then covers it:

- each bad input raises the right type with the message ``"fn: arg must be ...,
  got ..."`` (csrc/binding/_C.c and csrc/binding/args.c write every message), through ``cribo._C`` directly and
  through the public function;
- ``cribo._C`` refuses wrong dtypes, byte orders, layouts, non-arrays, wrong ndim,
  missing or unknown arguments (never a crash); the public API converts dtype, byte
  order, strides and alignment visibly (same result as the native array);
- inputs are bit-identical after every call; reference counts of the inputs are
  unchanged after 1000 calls, failing calls included; 1000 calls do not grow memory.
"""
from __future__ import annotations

import gc
import os
import re
import sys
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import numpy as np
import pytest

import cribo
from cribo import _C
from cribo.ops.clustering import _draw

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
        "center": rng.standard_normal(L).astype(F32),
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


def _sub(x, axis, size):
    """x with one axis cut/extended (zeros): _sub(x, 2, 3)."""
    shape = list(x.shape)
    shape[axis] = size
    out = np.zeros(shape, x.dtype)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape))
    out[sl] = x[sl]
    return out


def _poison(x, value):
    x = x.copy()
    x.reshape(-1)[x.size // 2] = value
    return x


# ============================================================================
# THE registry: one Op per entry point of cribo._C
# ============================================================================

DROP = object()  # S(name=DROP): leave the argument out


class S:
    """A change of a valid call: S(tokens=lambda x: x[0], n_clusters=0, init=DROP).
    A callable value maps the valid argument to the bad one; anything else replaces it."""

    def __init__(self, **changes: Any) -> None:
        self.changes = changes

    def __call__(self, kw: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(kw)
        for key, c in self.changes.items():
            if c is DROP:
                out.pop(key, None)
            elif callable(c) and not isinstance(c, np.ndarray):
                y = c(kw[key])  # a slice becomes a C-contiguous array: only its shape is bad
                out[key] = np.ascontiguousarray(y) if isinstance(y, np.ndarray) else y
            else:
                out[key] = c
        return out


@dataclass
class Bad:
    id: str
    change: S
    exc: type
    msg: str           # a regex (most are E(...) of the literal message)
    via: str = "both"  # "both": through _C and the public function; "C" or "public" alone


@dataclass
class Op:
    name: str                                  # cribo._C.<name>
    fn: str                                    # the public function its messages name
    args: Callable[[dict], Dict[str, Any]]     # valid keywords from valid()
    public: Callable[[Dict[str, Any]], Any]    # the public call with those keywords
    bad: List[Bad]
    nonfinite: Dict[str, str] = field(default_factory=dict)  # float arg -> message regex
    big: Callable[[], Dict[str, Any]] = None   # a larger valid call (memory test)
    memory_extra: List[Callable[[], None]] = field(default_factory=list)

    def C(self, kw):
        return getattr(_C, self.name)(**kw)


def _pub(name, drop=()):
    return lambda a: getattr(cribo, name)(**{k: x for k, x in a.items() if k not in drop})


def _rng(seed=7):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- cluster, draw_init

def _cluster_args(v):
    return dict(tokens=v["tokens"], positions=v["positions"], n_clusters=K, init=v["init"],
                return_plan=True)


def _cluster_big():
    r = _rng()
    return dict(tokens=r.standard_normal((2, 2, 64, 32)).astype(F32),
                positions=r.random((2, 2, 64, 2)).astype(F32), n_clusters=16,
                init=np.tile(np.arange(16, dtype=I64), (2, 1)), n_iters=3, return_plan=True)


def _dup_init_scratch():  # the duplicate-init check allocates 40 KB of scratch, then fails
    with pytest.raises(ValueError):
        _C.cluster(tokens=np.ones((1, 2, 20000, 1), F32), positions=np.zeros((1, 2, 20000, 2),
                   F32), n_clusters=2, init=np.zeros((1, 2), I64))


CLUSTER = Op(
    "cluster", "cluster", _cluster_args, _pub("cluster", ("draw",)), big=_cluster_big,
    memory_extra=[_dup_init_scratch,
                  lambda: _C.cluster(**{**_cluster_big(), "sinkhorn_lambda": 500.0})],
    nonfinite={"tokens": E("cluster: tokens must be finite, got NaN or infinity"),
               "positions": E("cluster: positions must be finite, got NaN or infinity")},
    bad=[
        Bad("tokens-int", S(tokens=lambda x: x.astype(I64)), TypeError,
            E("cluster: tokens must be a real floating-point array, got dtype int64"), "public"),
        Bad("tokens-bool", S(tokens=lambda x: x > 0), TypeError,
            E("cluster: tokens must be a real floating-point array, got dtype bool"), "public"),
        Bad("tokens-complex", S(tokens=lambda x: x.astype(complex)), TypeError,
            E("cluster: tokens must be a real floating-point array, got dtype complex128"),
            "public"),
        Bad("positions-int", S(positions=lambda x: x.astype(np.int32)), TypeError,
            E("cluster: positions must be a real floating-point array, got dtype int32"),
            "public"),
        Bad("init-float", S(init=lambda x: x.astype(F32)), TypeError,
            E("cluster: init must be an integer array, got dtype float32"), "public"),
        Bad("init-bool", S(init=lambda x: x > 0), TypeError,
            E("cluster: init must be an integer array, got dtype bool"), "public"),
        Bad("tokens-3d", S(tokens=lambda x: x[0]), ValueError,
            E("cluster: tokens must have shape (B, 2, N, d), got (2, 5, 4)")),
        Bad("tokens-3views", S(tokens=np.zeros((B, 3, N, D), F32)), ValueError,
            E("cluster: tokens must have shape (B, 2, N, d), got (2, 3, 5, 4)")),
        Bad("tokens-1view", S(tokens=np.zeros((B, 1, N, D), F32)), ValueError,
            E("cluster: tokens must have shape (B, 2, N, d), got (2, 1, 5, 4)")),
        Bad("positions-3d", S(positions=lambda x: x[0]), ValueError,
            E("cluster: positions must have shape (B, 2, N, 2), got (2, 5, 2)")),
        Bad("positions-N", S(positions=lambda x: _sub(x, 2, 3)), ValueError,
            E("cluster: positions must have shape (2, 2, 5, 2) to match tokens, got (2, 2, 3, 2)")),
        Bad("positions-xyz", S(positions=lambda x: _sub(x, 3, 3)), ValueError,
            E("cluster: positions must have shape (2, 2, 5, 2) to match tokens, got (2, 2, 5, 3)")),
        Bad("positions-B", S(positions=lambda x: _sub(x, 0, 1)), ValueError,
            E("cluster: positions must have shape (2, 2, 5, 2) to match tokens, got (1, 2, 5, 2)")),
        Bad("N0", S(tokens=lambda x: x[:, :, :0], positions=lambda x: x[:, :, :0]), ValueError,
            E("cluster: the number of tokens per view N must be at least 1, got 0")),
        Bad("B0", S(tokens=lambda x: x[:0], positions=lambda x: x[:0], init=lambda x: x[:0]),
            ValueError, E("cluster: the batch size B must be at least 1, got 0")),
        Bad("D0", S(tokens=lambda x: x[..., :0]), ValueError,
            E("cluster: the token width d must be at least 1, got 0")),
        Bad("K0", S(n_clusters=0), ValueError,
            E("cluster: n_clusters must be in [1, 2147483647], got 0")),
        Bad("K-big", S(n_clusters=BIG), ValueError,
            E("cluster: n_clusters must be in [1, 2147483647], got 2147483648")),
        Bad("K>2N", S(n_clusters=2 * N + 1, init=DROP), ValueError,
            E("cluster: n_clusters must be at most 2N = 10 (the joint tokens of one image), "
              "got 11")),
        Bad("K>2N-N1", S(tokens=lambda x: x[:, :, :1], positions=lambda x: x[:, :, :1]),
            ValueError, E("cluster: n_clusters must be at most 2N = 2 (the joint tokens of one "
                          "image), got 3")),
        Bad("K-float", S(n_clusters=3.0), TypeError,
            E("cluster: n_clusters must be an integer, got 3.0")),
        Bad("K-missing", S(n_clusters=DROP), TypeError,
            E("cluster: missing required argument 'n_clusters'"), "C"),
        Bad("init-dup", S(init=np.zeros((B, K), I64)), ValueError,
            E("cluster: init must hold distinct token indices per image, got 0 twice in image 0")),
        Bad("init-dup-img1", S(init=np.array([[0, 1, 2], [9, 3, 9]], I64)), ValueError,
            E("cluster: init must hold distinct token indices per image, got 9 twice in image 1")),
        Bad("init-high", S(init=lambda x: x + 2 * N), ValueError,
            E("cluster: init must lie in [0, 10), got 10")),
        Bad("init-high-8", S(init=lambda x: x + 8), ValueError,
            E("cluster: init must lie in [0, 10), got 10")),
        Bad("init-neg", S(init=lambda x: x - 1), ValueError,
            E("cluster: init must lie in [0, 10), got -1")),
        Bad("init-shape", S(init=lambda x: x[:1]), ValueError,
            E("cluster: init must have shape (2, 3) to match tokens and n_clusters, got (1, 3)")),
        Bad("init-K", S(init=lambda x: x[:, :0]), ValueError,
            E("cluster: init must have shape (2, 3) to match tokens and n_clusters, got (2, 0)")),
        Bad("posw-neg", S(pos_weight=-0.5), ValueError,
            E("cluster: pos_weight must be a finite number in [0, 1000000], got -0.5")),
        Bad("posw--1", S(pos_weight=-1.0), ValueError,
            E("cluster: pos_weight must be a finite number in [0, 1000000], got -1.0")),
        Bad("posw-nan", S(pos_weight=float("nan")), ValueError,
            E("cluster: pos_weight must be a finite number in [0, 1000000], got nan")),
        Bad("posw-inf", S(pos_weight=float("inf")), ValueError,
            E("cluster: pos_weight must be a finite number in [0, 1000000], got inf")),
        Bad("posw-huge-int", S(pos_weight=10**400), ValueError,  # float() overflows
            E("cluster: pos_weight must be a finite number in [0, 1000000], got an integer "
              "beyond the float range")),
        *[Bad(f"lambda-{lam}", S(sinkhorn_lambda=lam), ValueError,
              E("cluster: sinkhorn_lambda must be a finite number in (0, 1000000], "
                f"got {float(lam)!r}"))
          for lam in (0.0, -1.0, float("inf"), float("nan"), 1e7)],
        Bad("siters-neg", S(sinkhorn_iters=-1), ValueError,
            E("cluster: sinkhorn_iters must be in [0, 100000], got -1")),
        Bad("iters-0", S(n_iters=0), ValueError,
            E("cluster: n_iters must be in [1, 100000], got 0")),
        Bad("iters-1e6", S(n_iters=10**6), ValueError,
            E("cluster: n_iters must be in [1, 100000], got 1000000")),
        Bad("iters-absurd", S(n_iters=10**9), ValueError,
            E("cluster: n_iters must be in [1, 100000], got 1000000000")),
        Bad("iters-float", S(n_iters=2.5), TypeError,
            E("cluster: n_iters must be an integer, got 2.5")),
        Bad("seed-neg", S(init=DROP, seed=-1), ValueError,
            E("cluster: seed must be in [0, 9223372036854775807], got -1")),
        Bad("seed-shape", S(init=DROP, seed=np.array([1, 2, 3], I64)), ValueError,
            E("cluster: seed must be an integer or have shape (2,), got shape (3,)")),
        Bad("seeds-neg", S(init=DROP, seed=np.array([1, -2], I64)), ValueError,
            E("cluster: seed values must be non-negative, got -2")),
        Bad("seeds-float", S(init=DROP, seed=[1.0, 2.0]), TypeError,
            E("cluster: seed must be an integer array, got dtype float64"), "public"),
        Bad("no-init-no-draw", S(init=DROP), ValueError,
            E("cluster: init is required when draw is None"), "C"),
        Bad("draw-not-callable", S(init=DROP, draw=3), TypeError,
            E("cluster: draw must be callable, got <class 'int'>"), "C"),
    ])

DRAW_INIT = Op(
    "draw_init", "draw_init",
    lambda v: dict(n_images=B, n_tokens=N, n_clusters=K, seed=0, draw=_draw),
    _pub("draw_init", ("draw",)),
    big=lambda: dict(n_images=64, n_tokens=64, n_clusters=32, seed=np.arange(64, dtype=I64),
                     draw=_draw),
    bad=[
        Bad("K>2N", S(n_clusters=2 * N + 1), ValueError,
            E("draw_init: n_clusters must be at most 2N = 10 (the joint tokens of one image), "
              "got 11")),
        Bad("K0", S(n_clusters=0), ValueError,
            E("draw_init: n_clusters must be in [1, 2147483647], got 0")),
        Bad("N0", S(n_tokens=0), ValueError,
            E("draw_init: n_tokens must be in [1, 2147483647], got 0")),
        Bad("images-neg", S(n_images=-1), ValueError,
            E("draw_init: n_images must be in [0, 2147483647], got -1")),
        Bad("seed-neg", S(seed=-1), ValueError,
            E("draw_init: seed must be in [0, 9223372036854775807], got -1")),
        Bad("seed-big", S(seed=2**63), ValueError,
            E("draw_init: seed must be in [0, 9223372036854775807], got 9223372036854775808")),
        Bad("seed-str", S(seed="1"), TypeError, E("draw_init: seed must be an integer, got '1'")),
        Bad("seed-shape", S(seed=np.array([1, 2, 3], I64)), ValueError,
            E("draw_init: seed must be an integer or have shape (2,), got shape (3,)")),
        Bad("seeds-neg", S(seed=np.array([1, -2], I64)), ValueError,
            E("draw_init: seed values must be non-negative, got -2")),
        Bad("seeds-float", S(seed=[1.0, 2.0]), TypeError,
            E("draw_init: seed must be an integer array, got dtype float64"), "public"),
        Bad("seeds-int32", S(seed=np.array([1, 2], np.int32)), TypeError,
            E("draw_init: seed must be an integer or a native-endian, C-contiguous int64 array"),
            "C"),
        Bad("draw-missing", S(draw=DROP), TypeError,
            E("draw_init: missing required argument 'draw'"), "C"),
    ])


# ---------------------------------------------------------------- pool

def _pool_public(key, backward):
    f = cribo.pool_backward if backward else cribo.pool
    first = "grad_objects" if backward else "tokens"
    return lambda a: f(a[first], a[key], a.get("n_clusters"))


def _pool_big(backward, soft):
    r = _rng()
    x = r.standard_normal((2, 2, 8 if backward else 64, 128)).astype(F32)
    a = dict(grad_objects=x) if backward else dict(tokens=x)
    if soft:
        a["weights"] = r.random((2, 2, 64, 8)).astype(F32)
    else:
        a.update(labels=r.integers(-1, 8, (2, 2, 64)).astype(I64), n_clusters=8)
    return a


POOL = Op(
    "pool", "pool", lambda v: dict(tokens=v["tokens"], labels=v["labels"], n_clusters=K),
    _pool_public("labels", False), big=lambda: _pool_big(False, False),
    nonfinite={"tokens": E("pool: tokens must be finite, got NaN or infinity")},
    bad=[
        Bad("tokens-int", S(tokens=lambda x: x.astype(np.int16)), TypeError,
            E("pool: tokens must be a real floating-point array, got dtype int16"), "public"),
        Bad("tokens-complex", S(tokens=lambda x: x.astype(np.complex64)), TypeError,
            E("pool: tokens must be a real floating-point array, got dtype complex64"), "public"),
        Bad("labels-bool", S(labels=lambda x: x > 0), TypeError,
            E("pool: assignment must be integer labels (B, 2, N) or float weights (B, 2, N, K), "
              "got dtype bool"), "public"),
        Bad("labels-complex", S(labels=lambda x: x.astype(complex)), TypeError,
            E("pool: assignment must be integer labels (B, 2, N) or float weights (B, 2, N, K), "
              "got dtype complex128"), "public"),
        # Float "labels" are soft weights by design; a 3-D float array is a weights error.
        Bad("labels-float", S(labels=lambda x: x.astype(F32)), ValueError,
            E("pool: weights must have shape (B, 2, N, K), got (2, 2, 5)"), "public"),
        Bad("no-K", S(n_clusters=None), TypeError,
            E("pool: n_clusters must be an integer (required with integer labels), got None")),
        Bad("K0", S(n_clusters=0), ValueError,
            E("pool: n_clusters must be in [1, 2147483647], got 0")),
        Bad("K-big", S(n_clusters=BIG), ValueError,
            E("pool: n_clusters must be in [1, 2147483647], got 2147483648")),
        Bad("labels-high", S(labels=np.full((B, 2, N), K, I64)), ValueError,
            E("pool: labels must lie in [-1, 3), got 3")),
        Bad("labels-low", S(labels=np.full((B, 2, N), -2, I64)), ValueError,
            E("pool: labels must lie in [-1, 3), got -2")),
        Bad("tokens-3d", S(tokens=lambda x: x[0]), ValueError,
            E("pool: tokens must have shape (B, 2, N, d), got (2, 5, 4)")),
        Bad("labels-2d", S(labels=lambda x: x[0]), ValueError,
            E("pool: labels must have shape (B, 2, N), got (2, 5)")),
        Bad("N-mismatch", S(tokens=lambda x: _sub(x, 2, 3)), ValueError,
            E("pool: labels must have shape (2, 2, 3) to match tokens, got (2, 2, 5)")),
        Bad("B-mismatch", S(tokens=lambda x: _sub(x, 0, 1)), ValueError,
            E("pool: labels must have shape (1, 2, 5) to match tokens, got (2, 2, 5)")),
        Bad("N0", S(tokens=lambda x: x[:, :, :0], labels=lambda x: x[:, :, :0]), ValueError,
            E("pool: the number of tokens per view N must be at least 1, got 0")),
        Bad("B0", S(tokens=lambda x: x[:0], labels=lambda x: x[:0]), ValueError,
            E("pool: the batch size B must be at least 1, got 0")),
        Bad("D0", S(tokens=lambda x: x[..., :0]), ValueError,
            E("pool: the token width d must be at least 1, got 0")),
    ])

POOL_BACKWARD = Op(
    "pool_backward", "pool_backward",
    lambda v: dict(grad_objects=v["grad_objects"], labels=v["labels"], n_clusters=K),
    _pool_public("labels", True), big=lambda: _pool_big(True, False),
    nonfinite={"grad_objects": E("pool_backward: grad_objects must be finite, got NaN or "
                                 "infinity")},
    bad=[
        Bad("grad-int", S(grad_objects=lambda x: x.astype(int)), TypeError,
            E("pool_backward: grad_objects must be a real floating-point array, got dtype int64"),
            "public"),
        Bad("no-K", S(n_clusters=None), TypeError,
            E("pool_backward: n_clusters must be an integer (required with integer labels), "
              "got None")),
        Bad("K-mismatch", S(n_clusters=K + 1), ValueError,
            E("pool_backward: grad_objects must have shape (B, 2, 4, d) to match n_clusters, "
              "got (2, 2, 3, 4)")),
        Bad("K-mismatch-low", S(n_clusters=K - 1), ValueError,
            E("pool_backward: grad_objects must have shape (B, 2, 2, d) to match n_clusters, "
              "got (2, 2, 3, 4)")),
        Bad("labels-high", S(labels=lambda x: x + 1), ValueError,
            E("pool_backward: labels must lie in [-1, 3), got 3")),
        Bad("K0", S(n_clusters=0), ValueError,
            E("pool_backward: n_clusters must be in [1, 2147483647], got 0")),
    ])

POOL_SOFT = Op(
    "pool_soft", "pool", lambda v: dict(tokens=v["tokens"], weights=v["weights"]),
    _pool_public("weights", False), big=lambda: _pool_big(False, True),
    nonfinite={"tokens": E("pool: tokens must be finite, got NaN or infinity"),
               "weights": E("pool: weights must be finite, got NaN or infinity")},
    bad=[
        Bad("negative", S(weights=lambda x: -x), ValueError,
            E("pool: weights must be non-negative, got -")),
        Bad("K-mismatch", S(n_clusters=K + 2), ValueError,
            E("pool: weights must have shape (2, 2, 5, 5) to match tokens and n_clusters, got "
              "(2, 2, 5, 3)")),
        Bad("K-float", S(n_clusters=3.5), TypeError,
            E("pool: n_clusters must be an integer, got 3.5")),
        Bad("K0", S(weights=lambda x: x[..., :0]), ValueError,
            E("pool: the number of clusters K must be at least 1, got 0")),
        Bad("3d", S(weights=lambda x: x[0]), ValueError,
            E("pool: weights must have shape (B, 2, N, K), got (2, 5, 3)")),
        Bad("N-mismatch", S(weights=lambda x: _sub(x, 2, 3)), ValueError,
            E("pool: weights must have shape (2, 2, 5, K) to match tokens, got (2, 2, 3, 3)")),
        Bad("N0", S(tokens=lambda x: x[:, :, :0], weights=lambda x: x[:, :, :0]), ValueError,
            E("pool: the number of tokens per view N must be at least 1, got 0")),
        Bad("weights-only-rows", S(weights=lambda x: x[:, :, :2].copy()), ValueError,
            E("pool: weights must have shape (2, 2, 5, K) to match tokens, got (2, 2, 2, 3)")),
    ])

POOL_SOFT_BACKWARD = Op(
    "pool_soft_backward", "pool_backward",
    lambda v: dict(grad_objects=v["grad_objects"], weights=v["weights"]),
    _pool_public("weights", True), big=lambda: _pool_big(True, True),
    nonfinite={"grad_objects": E("pool_backward: grad_objects must be finite, got NaN or "
                                 "infinity"),
               "weights": E("pool_backward: weights must be finite, got NaN or infinity")},
    bad=[
        Bad("K-mismatch", S(weights=lambda x: _sub(x, 3, 2)), ValueError,
            E("pool_backward: weights must have shape (2, 2, N, 3) to match grad_objects, got "
              "(2, 2, 5, 2)")),
        Bad("negative", S(weights=lambda x: -x), ValueError,
            E("pool_backward: weights must be non-negative")),
        Bad("tokens-for-grad", S(grad_objects=valid()["tokens"]), ValueError,
            E("pool_backward: weights must have shape (2, 2, N, 5) to match grad_objects, got "
              "(2, 2, 5, 3)")),
    ])

# ---------------------------------------------------------------- topk_cosine

TOPK_COSINE = Op(
    "topk_cosine", "topk_cosine",
    lambda v: dict(queries=v["queries"], bank=v["bank"], k=2, query_ids=v["query_ids"],
                   bank_ids=v["bank_ids"]),
    _pub("topk_cosine"),
    big=lambda: dict(queries=_rng().standard_normal((64, 32)).astype(F32),
                     bank=_rng(8).standard_normal((300, 32)).astype(F32), k=8),
    nonfinite={"queries": E("topk_cosine: queries and bank must be finite, got NaN or infinity"),
               "bank": E("topk_cosine: queries and bank must be finite, got NaN or infinity")},
    bad=[
        Bad("int", S(queries=lambda x: x.astype(int)), TypeError,
            E("topk_cosine: queries must be a real floating-point array, got dtype int64"),
            "public"),
        Bad("bool", S(bank=lambda x: x > 0), TypeError,
            E("topk_cosine: bank must be a real floating-point array, got dtype bool"), "public"),
        Bad("complex", S(bank=lambda x: x.astype(np.complex64)), TypeError,
            E("topk_cosine: bank must be a real floating-point array, got dtype complex64"),
            "public"),
        Bad("1d", S(queries=lambda x: x[0]), ValueError,
            E("topk_cosine: queries must have shape (M, d), got (4,)")),
        Bad("bank-3d", S(bank=lambda x: x[None]), ValueError,
            E("topk_cosine: bank must have shape (Q, d), got (1, 6, 4)")),
        Bad("d", S(bank=lambda x: x[:, :3]), ValueError,
            E("topk_cosine: bank must have shape (Q, 4) to match queries, got (6, 3)")),
        Bad("k0", S(k=0), ValueError, E("topk_cosine: k must be in [1, 2147483647], got 0")),
        Bad("k>bank", S(k=Q + 1), ValueError,
            E("topk_cosine: k must be in [1, 6] (the bank size), got 7")),
        Bad("k-big", S(k=BIG), ValueError,
            E("topk_cosine: k must be in [1, 2147483647], got 2147483648")),
        Bad("k-huge", S(k=99), ValueError,
            E("topk_cosine: k must be in [1, 6] (the bank size), got 99")),
        Bad("k-float", S(k=1.0), TypeError, E("topk_cosine: k must be an integer, got 1.0")),
        Bad("empty-bank", S(bank=lambda x: x[:0], bank_ids=lambda x: x[:0]), ValueError,
            E("topk_cosine: the bank size Q must be at least 1, got 0")),
        Bad("d0", S(queries=lambda x: x[:, :0], bank=lambda x: x[:, :0]), ValueError,
            E("topk_cosine: the feature width d must be at least 1, got 0")),
        Bad("one-id", S(bank_ids=None), ValueError,
            E("topk_cosine: query_ids and bank_ids must be given together")),
        Bad("ids-float", S(query_ids=lambda x: x * 1.0), TypeError,
            E("topk_cosine: query_ids must be an integer array, got dtype float64"), "public"),
        Bad("ids-bool", S(bank_ids=lambda x: x > 0), TypeError,
            E("topk_cosine: bank_ids must be an integer array, got dtype bool"), "public"),
        Bad("ids-int32", S(query_ids=lambda x: x.astype(np.int32)), TypeError,
            E("topk_cosine: query_ids must be a native-endian int64 array, got dtype('int32')"),
            "C"),
        Bad("ids-list", S(query_ids=[0, 1, 2, 3]), TypeError,
            E("topk_cosine: query_ids must be a numpy array or None, got <class 'list'>"), "C"),
        Bad("qids-shape", S(query_ids=lambda x: x[:3]), ValueError,
            E("topk_cosine: query_ids must have shape (4,) to match queries, got (3,)")),
        Bad("bids-shape", S(bank_ids=lambda x: x[:5]), ValueError,
            E("topk_cosine: bank_ids must have shape (6,) to match bank, got (5,)")),
        Bad("ids-2d", S(query_ids=lambda x: x[:, None]), ValueError,
            E("topk_cosine: query_ids must have shape (M,), got (4, 1)")),
    ])


# ---------------------------------------------------------------- losses

_TEMP = "must be a finite number in (0, 100000], got "

SOFTMAX_CROSS_ENTROPY = Op(
    "softmax_cross_entropy", "softmax_cross_entropy",
    lambda v: dict(student_logits=v["student"], teacher_logits=v["teacher"], center=v["center"],
                   student_temp=0.1, teacher_temp=0.07),
    _pub("softmax_cross_entropy"),
    big=lambda: dict(student_logits=_rng().standard_normal((64, 256)).astype(F32),
                     teacher_logits=_rng(8).standard_normal((64, 256)).astype(F32)),
    nonfinite={
        "student_logits": E("softmax_cross_entropy: student_logits (divided by student_temp) "
                            "must be finite, got NaN or infinity"),
        "teacher_logits": E("softmax_cross_entropy: teacher_logits") + ".*" +
        E("must be finite, got NaN or infinity"),
        "center": E("softmax_cross_entropy: center must be finite, got NaN or infinity")},
    bad=[
        Bad("int", S(student_logits=lambda x: x.astype(int)), TypeError,
            E("softmax_cross_entropy: student_logits must be a real floating-point array, got "
              "dtype int64"), "public"),
        Bad("bool", S(teacher_logits=lambda x: x > 0), TypeError,
            E("softmax_cross_entropy: teacher_logits must be a real floating-point array, got "
              "dtype bool"), "public"),
        Bad("center-complex", S(center=lambda x: x.astype(complex)), TypeError,
            E("softmax_cross_entropy: center must be a real floating-point array, got dtype "
              "complex128"), "public"),
        Bad("center-list", S(center=[1.0] * L), TypeError,
            E("softmax_cross_entropy: center must be a numpy array or None"), "C"),
        Bad("center-float", S(center=1.0), TypeError,
            E("softmax_cross_entropy: center must be a numpy array or None"), "C"),
        Bad("1d", S(student_logits=lambda x: x[0]), ValueError,
            E("softmax_cross_entropy: student_logits must have shape (R, L), got (7,)")),
        Bad("3d", S(teacher_logits=lambda x: x[None]), ValueError,
            E("softmax_cross_entropy: teacher_logits must have shape (R, L), got (1, 3, 7)")),
        Bad("R-mismatch", S(teacher_logits=lambda x: x[:2]), ValueError,
            E("softmax_cross_entropy: teacher_logits must have shape (3, 7) to match "
              "student_logits, got (2, 7)")),
        Bad("L-mismatch", S(teacher_logits=lambda x: x[:, :5]), ValueError,
            E("softmax_cross_entropy: teacher_logits must have shape (3, 7) to match "
              "student_logits, got (3, 5)")),
        Bad("center-shape", S(center=lambda x: x[:3]), ValueError,
            E("softmax_cross_entropy: center must have shape (7,) to match student_logits, got "
              "(3,)")),
        Bad("center-2d", S(center=lambda x: x[None]), ValueError,
            E("softmax_cross_entropy: center must have shape (L,), got (1, 7)")),
        Bad("center-for-weight", S(center=np.ones(R, F32)), ValueError,
            E("softmax_cross_entropy: center must have shape (7,) to match student_logits, got "
              "(3,)")),
        Bad("L0", S(student_logits=lambda x: x[:, :0], teacher_logits=lambda x: x[:, :0],
                    center=DROP), ValueError,
            E("softmax_cross_entropy: the number of logits L must be at least 1, got 0")),
        *[Bad(f"{name}-{t}", S(**{name: t}), ValueError,
              E(f"softmax_cross_entropy: {name} {_TEMP}{float(t)!r}"))
          for name in ("student_temp", "teacher_temp")
          for t in (0.0, -0.1, float("nan"), float("inf"), -float("inf"), 1e9)],
        Bad("temp-str", S(student_temp="0.1"), TypeError,
            E("softmax_cross_entropy: student_temp must be a number, got '0.1'")),
        Bad("unknown-keyword", S(teacher_logits_b=valid()["teacher"]), TypeError,
            E("softmax_cross_entropy: unexpected keyword argument 'teacher_logits_b'"), "C"),
    ])

UPDATE_CENTER = Op(
    "update_center", "update_center",
    lambda v: dict(center=v["center"], teacher_logits=v["teacher"], momentum=0.9),
    _pub("update_center"),
    big=lambda: dict(center=np.zeros(8192, F32),
                     teacher_logits=_rng().standard_normal((2, 8192)).astype(F32)),
    nonfinite={"center": E("update_center: center must be finite, got NaN or infinity"),
               "teacher_logits": E("update_center: teacher_logits must be finite, got NaN or "
                                   "infinity")},
    bad=[
        Bad("int", S(center=lambda x: x.astype(int)), TypeError,
            E("update_center: center must be a real floating-point array, got dtype int64"),
            "public"),
        Bad("complex", S(teacher_logits=lambda x: x.astype(complex)), TypeError,
            E("update_center: teacher_logits must be a real floating-point array, got dtype "
              "complex128"), "public"),
        Bad("center-shape", S(center=lambda x: x[:3]), ValueError,
            E("update_center: teacher_logits must have shape (R, 3) to match center, got (3, 7)")),
        Bad("center-2", S(center=lambda x: x[:2]), ValueError,
            E("update_center: teacher_logits must have shape (R, 2) to match center, got (3, 7)")),
        Bad("center-2d", S(center=lambda x: x[None]), ValueError,
            E("update_center: center must have shape (L,), got (1, 7)")),
        Bad("1d", S(teacher_logits=lambda x: x[0]), ValueError,
            E("update_center: teacher_logits must have shape (R, L), got (7,)")),
        Bad("teacher-as-center", S(center=valid()["teacher"]), ValueError,
            E("update_center: center must have shape (L,), got (3, 7)")),
        *[Bad(f"momentum-{m}", S(momentum=m), ValueError,
              E(f"update_center: momentum must be a finite number in [0, 1], got {float(m)!r}"))
          for m in (1.5, -0.1, -0.5, float("nan"), float("inf"))],
        Bad("momentum-none", S(momentum=None), TypeError,
            E("update_center: momentum must be a number, got None")),
    ])


def _losses_args(v):
    return dict(student_global=v["sg"], teacher_global=v["tg"], student_objects=v["so"],
                teacher_objects=v["to"], teacher_neighbours=v["tn"], center_global=v["cg"],
                center_objects=v["co"])


def _losses_big():
    r = _rng()
    x = {k: r.standard_normal(s).astype(F32) for k, s in
         (("sg", (2, 32, 256)), ("tg", (2, 32, 256)), ("so", (2, 64, 256)), ("to", (2, 64, 256)),
          ("tn", (2, 64, 256)), ("cg", 256), ("co", 256))}
    a = _losses_args(x)
    a["mask1"] = np.arange(64) % 2 == 0
    return a


_LOSS_FINITE = r"( \([^)]*\))? must be finite, got NaN or infinity"

CRIBO_LOSSES = Op(
    "cribo_losses", "cribo_losses", _losses_args, _pub("cribo_losses"), big=_losses_big,
    nonfinite={name: E(f"cribo_losses: {name}") + _LOSS_FINITE for name in
               ("student_global", "teacher_global", "student_objects", "teacher_objects",
                "teacher_neighbours", "center_global", "center_objects")},
    bad=[
        Bad("sg-int", S(student_global=lambda x: x.astype(int)), TypeError,
            E("cribo_losses: student_global must be a real floating-point array, got dtype "
              "int64"), "public"),
        Bad("sg-2d", S(student_global=lambda x: x[0]), ValueError,
            E("cribo_losses: student_global must have shape (2, B, L), got (2, 7)")),
        Bad("tg-B", S(teacher_global=lambda x: x[:, :1]), ValueError,
            E("cribo_losses: teacher_global must have shape (2, 2, 7) to match student_global, "
              "got (2, 1, 7)")),
        Bad("to-M", S(teacher_objects=lambda x: x[:, :3]), ValueError,
            E("cribo_losses: teacher_objects must have shape (2, 4, 7) to match student_global "
              "and student_objects, got (2, 3, 7)")),
        Bad("tn-L", S(teacher_neighbours=lambda x: x[..., :3]), ValueError,
            E("cribo_losses: teacher_neighbours must have shape (2, 4, 7) to match "
              "student_global and student_objects, got (2, 4, 3)")),
        Bad("mask-float", S(mask1=np.ones(M)), TypeError,
            E("cribo_losses: mask1 must be a boolean array, got dtype float64"), "public"),
        Bad("mask-uint8", S(mask1=np.ones(M, np.uint8)), TypeError,
            E("cribo_losses: mask1 must be a native-endian bool array, got dtype('uint8')"), "C"),
        Bad("mask-shape", S(mask2=np.ones(M + 1, bool)), ValueError,
            E("cribo_losses: mask2 must have shape (4,) to match student_objects, got (5,)")),
        Bad("co-shape", S(center_objects=lambda x: x[:5]), ValueError,
            E("cribo_losses: center_objects must have shape (7,) to match student_global, got "
              "(5,)")),
        Bad("ts-0", S(student_temp=0.0), ValueError, E(f"cribo_losses: student_temp {_TEMP}0.0")),
        Bad("tt-neg", S(teacher_temp=-1.0), ValueError,
            E(f"cribo_losses: teacher_temp {_TEMP}-1.0")),
        Bad("tto-nan", S(teacher_temp_objects=float("nan")), ValueError,
            E(f"cribo_losses: teacher_temp_objects {_TEMP}nan")),
        Bad("weights-neg", S(weights=(1.0, -1.0, 1.0)), ValueError,
            E("cribo_losses: weights[1] must be a finite number in [0, 1000000], got -1.0")),
        Bad("weights-len", S(weights=(1.0, 1.0)), ValueError,
            E("cribo_losses: weights must be 3 numbers (w_global, w_objects, w_neighbours), got "
              "(1.0, 1.0)")),
        Bad("weights-str", S(weights="abc"), ValueError,
            E("cribo_losses: weights must be 3 numbers (w_global, w_objects, w_neighbours), got "
              "'abc'")),
        Bad("momentum", S(center_momentum=1.01), ValueError,
            E("cribo_losses: center_momentum must be a finite number in [0, 1], got 1.01")),
        Bad("B0", S(student_global=lambda x: x[:, :0], teacher_global=lambda x: x[:, :0]),
            ValueError, E("cribo_losses: the batch size B must be at least 1, got 0")),
        Bad("denominators-len", S(denominators=(1, 2)), ValueError,
            E("cribo_losses: denominators must be 4 integers (B, M, Z1, Z2), got (1, 2)")),
        Bad("denominators-small", S(denominators=(1, M, 0, 0)), ValueError,
            E("cribo_losses: denominators (1, 4, 0, 0) must be at least this call's counts "
              "(B=2, M=4, Z1=4, Z2=4)")),
        Bad("denominators-float", S(denominators=(2, 4, 4, 4.0)), TypeError,
            E("cribo_losses: denominators[3] must be an integer, got 4.0")),
        Bad("center-missing", S(center_global=DROP), TypeError,
            E("cribo_losses: missing required argument 'center_global'"), "C"),
    ])

# ---------------------------------------------------------------- threads

SET_NUM_THREADS = Op(
    "set_num_threads", "set_num_threads", lambda v: dict(n=cribo.get_num_threads()),
    _pub("set_num_threads"), big=lambda: dict(n=cribo.get_num_threads()),
    bad=[
        *[Bad(f"{n}", S(n=n), ValueError, E(f"set_num_threads: n must be in [1, 256], got {n}"))
          for n in (0, -1, 257, 2**40)],
        *[Bad(f"{n!r}", S(n=n), TypeError, E(f"set_num_threads: n must be an integer, got {n!r}"))
          for n in (2.0, 1.5, "2", True, None)],
    ])

# ---------------------------------------------------------------- ObjectQueue

def _push_public(a):
    q = cribo.ObjectQueue(4, a["dim"])
    q.push(a["objects1"], a["objects2"], a["counts"], a.get("image_ids"))
    return q.state_dict()


def _match_public(a):
    q = cribo.ObjectQueue(4, a["dim"])
    if a["dim"] == D:
        q.push(valid()["objects1"][::-1].copy(), valid()["objects2"], [2, 0, 3], [1, 2, 3])
    batch = (a["batch[0]"], a["batch[1]"]) if "batch[0]" in a else None
    return q.match(a["objects1"], a["objects2"], a.get("image_ids"), batch=batch,
                   offset=a.get("offset", 0))


_STATE_KEYS = ("capacity", "dim", "objects1", "objects2", "object_ids", "image_counts",
               "image_ids")


def _load_args(v):
    s = state(v)
    return {**{k: s[k] for k in _STATE_KEYS}, "queue_dim": D}


def _load_public(a):
    cribo.ObjectQueue(4, a["queue_dim"]).load_state_dict({k: a[k] for k in _STATE_KEYS if k in a})


def _queue_cycle():
    r = _rng()
    o = r.standard_normal((40, 32)).astype(F32)
    qq = cribo.ObjectQueue(16, 32)
    for _ in range(3):
        qq.match(o, o)
        qq.push(o, o, np.full(8, 5), np.arange(8))
    qq.match(o, o, image_ids=np.repeat(np.arange(8), 5))


OBJECT_QUEUE = Op(
    "ObjectQueue", "ObjectQueue", lambda v: dict(capacity=4, dim=D),
    lambda a: cribo.ObjectQueue(**a), big=lambda: dict(capacity=1000, dim=384),
    bad=[
        *[Bad(f"capacity-{c}", S(capacity=c), ValueError,
              E(f"ObjectQueue: capacity must be in [1, 2147483647], got {c}"))
          for c in (0, -1, BIG)],
        Bad("capacity-float", S(capacity=3.0), TypeError,
            E("ObjectQueue: capacity must be an integer, got 3.0")),
        Bad("dim-0", S(dim=0), ValueError, E("ObjectQueue: dim must be in [1, 2147483647], got 0")),
        Bad("dim-big", S(dim=BIG), ValueError,
            E("ObjectQueue: dim must be in [1, 2147483647], got 2147483648")),
    ])

_PUSH = "ObjectQueue.push: "
QUEUE_PUSH = Op(
    "ObjectQueue_push", "ObjectQueue.push",
    lambda v: dict(objects1=v["objects1"], objects2=v["objects2"], counts=v["counts"],
                   image_ids=v["image_ids"], dim=D),
    _push_public, memory_extra=[_queue_cycle],
    big=lambda: dict(objects1=np.ones((4000, 64), F32), objects2=np.ones((4000, 64), F32),
                     counts=np.full(100, 40, I64), dim=64),
    nonfinite={"objects1": E(_PUSH + "objects1 must be finite, got NaN or infinity"),
               "objects2": E(_PUSH + "objects2 must be finite, got NaN or infinity")},
    bad=[
        Bad("counts-sum", S(counts=np.array([2, 2], I64), image_ids=DROP), ValueError,
            E(_PUSH + "counts must sum to the number of objects 5, got 4")),
        Bad("counts-neg", S(counts=np.array([6, -1], I64), image_ids=DROP), ValueError,
            E(_PUSH + "counts must be non-negative, got -1")),
        # 2 (2^63 - 1) + 7 wraps to 5 in int64: a wrapped sum would pass (and crash the push).
        Bad("counts-wrap", S(counts=np.array([2**63 - 1, 2**63 - 1, 7], I64)), ValueError,
            E(_PUSH + "counts must sum to the number of objects 5, got a sum beyond the int64 "
              "range")),
        Bad("counts-float", S(counts=[2.0, 3.0], image_ids=DROP), TypeError,
            E(_PUSH + "counts must be an integer array, got dtype float64"), "public"),
        Bad("counts-2d", S(counts=np.array([[2, 3]], I64), image_ids=DROP), ValueError,
            E(_PUSH + "counts must have shape (B,), got (1, 2)")),
        Bad("shapes", S(objects2=lambda x: x[:4]), ValueError,
            E(_PUSH + "objects2 must have shape (5, 4) to match objects1 and dim, got (4, 4)")),
        Bad("dim", S(objects1=lambda x: x[:, :3], objects2=lambda x: x[:, :3]), ValueError,
            E(_PUSH + "objects1 must have shape (M, 4) to match dim, got (5, 3)")),
        Bad("1d", S(objects1=lambda x: x[0], objects2=lambda x: x[0]), ValueError,
            E(_PUSH + "objects1 must have shape (M, d), got (4,)")),
        Bad("int", S(objects1=lambda x: x.astype(int)), TypeError,
            E(_PUSH + "objects1 must be a real floating-point array, got dtype int64"), "public"),
        Bad("ids-shape", S(image_ids=np.array([1], I64)), ValueError,
            E(_PUSH + "image_ids must have shape (3,) to match counts, got (1,)")),
        Bad("ids-neg", S(image_ids=np.array([1, -2, 3], I64)), ValueError,
            E(_PUSH + "image_ids must be non-negative, got -2")),
        Bad("ids-float", S(image_ids=[1.0, 2.0, 3.0]), TypeError,
            E(_PUSH + "image_ids must be an integer array, got dtype float64"), "public"),
    ])

_MATCH = "ObjectQueue.match: "
QUEUE_MATCH = Op(
    "ObjectQueue_match", "ObjectQueue.match",
    lambda v: dict(objects1=v["objects1"], objects2=v["objects2"],
                   image_ids=np.repeat(v["image_ids"], v["counts"]), dim=D),
    _match_public,
    big=lambda: {"objects1": np.ones((4000, 64), F32), "objects2": np.ones((4000, 64), F32),
                 "batch[0]": np.ones((8000, 64), F32), "batch[1]": np.ones((8000, 64), F32),
                 "offset": 10, "dim": 64},
    nonfinite={"objects1": E(_MATCH + "objects1 must be finite, got NaN or infinity"),
               "objects2": E(_MATCH + "objects2 must be finite, got NaN or infinity")},
    bad=[
        Bad("shapes", S(objects2=lambda x: x[:4]), ValueError,
            E(_MATCH + "objects2 must have shape (5, 4) to match objects1 and dim, got (4, 4)")),
        Bad("dim", S(objects1=lambda x: x[:, :2], objects2=lambda x: x[:, :2]), ValueError,
            E(_MATCH + "objects1 must have shape (M, 4) to match dim, got (5, 2)")),
        Bad("complex", S(objects2=lambda x: x.astype(complex)), TypeError,
            E(_MATCH + "objects2 must be a real floating-point array, got dtype complex128"),
            "public"),
        Bad("ids-shape", S(image_ids=np.array([1], I64)), ValueError,
            E(_MATCH + "image_ids must have shape (5,) to match objects1, got (1,)")),
        Bad("ids-neg", S(image_ids=-np.ones(5, I64)), ValueError,
            E(_MATCH + "image_ids must be non-negative, got -1")),
        Bad("ids-float", S(image_ids=np.ones(5)), TypeError,
            E(_MATCH + "image_ids must be an integer array, got dtype float64"), "public"),
        Bad("batch-short", S(objects1=lambda x: x[:2], objects2=lambda x: x[:2], image_ids=DROP,
                             **{"batch[0]": valid()["objects1"][:1],
                                "batch[1]": valid()["objects2"][:1]}), ValueError,
            E(_MATCH + "batch must be two arrays holding the queries at rows 0..2 "
              "(offset..offset + M), got 1 rows")),
        Bad("batch-offset", S(image_ids=DROP, offset=1,
                              **{"batch[0]": valid()["objects1"], "batch[1]": valid()["objects2"]}),
            ValueError, E(_MATCH + "batch must be two arrays holding the queries at rows 1..6")),
        Bad("batch-offset-neg", S(image_ids=DROP, offset=-1,
                                  **{"batch[0]": valid()["objects1"],
                                     "batch[1]": valid()["objects2"]}),
            ValueError, E(_MATCH + "offset must be in [0, 4611686018427387904], got -1")),
        # offset is checked with or without batch (the old wrapper ignored it without)
        Bad("offset-neg", S(offset=-1), ValueError,
            E(_MATCH + "offset must be in [0, 4611686018427387904], got -1")),
        Bad("offset-float", S(offset=1.0), TypeError, E(_MATCH + "offset must be an integer, got 1.0")),
        Bad("batch-width", S(image_ids=DROP, **{"batch[0]": valid()["objects1"][:, :2].copy(),
                                                "batch[1]": valid()["objects2"][:, :2].copy()}),
            ValueError, E(_MATCH + "batch[0] must have shape (P, 4) to match dim, got (5, 2)")),
        Bad("batch-one", S(**{"batch[0]": valid()["objects1"]}), ValueError,
            E(_MATCH + "batch must be two arrays (all_objects1, all_objects2)"), "C"),
        Bad("batch-nan", S(**{"batch[0]": _poison(valid()["objects1"], np.nan),
                              "batch[1]": valid()["objects2"]}), ValueError,
            E(_MATCH + "batch[0] must be finite, got NaN or infinity")),
    ])

_LOAD = "ObjectQueue.load_state_dict: "
QUEUE_LOAD = Op(
    "ObjectQueue_load_state_dict", "ObjectQueue.load_state_dict", _load_args, _load_public,
    big=lambda: dict(capacity=100, dim=64, objects1=np.ones((4000, 64), F32),
                     objects2=np.ones((4000, 64), F32), object_ids=np.repeat(np.arange(100), 40),
                     image_counts=np.full(100, 40, I64), image_ids=np.arange(100, dtype=I64),
                     queue_dim=64),
    nonfinite={"objects1": E(_LOAD + "objects1 must be finite, got NaN or infinity"),
               "objects2": E(_LOAD + "objects2 must be finite, got NaN or infinity")},
    bad=[
        Bad("dim", S(queue_dim=D + 1), ValueError, E(_LOAD + "state has dim 4, this queue 5")),
        Bad("dim-consistent", S(dim=3, objects1=np.zeros((5, 3), F32),
                                objects2=np.zeros((5, 3), F32)), ValueError,
            E(_LOAD + "state has dim 3, this queue 4")),
        Bad("objects-width", S(objects1=np.zeros((5, 3), F32)), ValueError,
            E(_LOAD + "objects1 must have shape (M, 4) to match dim, got (5, 3)")),
        Bad("objects-rows", S(objects2=np.zeros((4, D))), ValueError,
            E(_LOAD + "objects2 must have shape (5, 4) to match dim and objects1, got (4, 4)"),
            "public"),
        Bad("counts-sum", S(image_counts=np.array([1, 0, 3], I64)), ValueError,
            E(_LOAD + "image_counts must sum to the number of objects 5, got 4")),
        Bad("counts-sum-2", S(image_counts=np.array([1, 1, 3], I64)), ValueError,
            E(_LOAD + "object_ids do not agree with image_ids and image_counts")),
        Bad("counts-neg", S(image_counts=np.array([6, 0, -1], I64)), ValueError,
            E(_LOAD + "image_counts must be non-negative, got -1")),
        # wraps to 5 in int64: a wrapped sum would send the object_ids check past the end
        Bad("counts-wrap", S(image_counts=np.array([2**63 - 1, 2**63 - 1, 7], I64)), ValueError,
            E(_LOAD + "image_counts must sum to the number of objects 5, got a sum beyond the "
              "int64 range")),
        Bad("counts-float", S(image_counts=np.array([2.0, 0, 3])), TypeError,
            E(_LOAD + "image_counts must be an integer array, got dtype float64"), "public"),
        Bad("object-ids", S(object_ids=np.arange(5, dtype=I64)), ValueError,
            E(_LOAD + "object_ids do not agree with image_ids and image_counts")),
        Bad("object-ids-shape", S(object_ids=np.arange(4, dtype=I64)), ValueError,
            E(_LOAD + "object_ids must have shape (5,) to match objects1, got (4,)")),
        Bad("image-ids-shape", S(image_ids=np.arange(2, dtype=I64)), ValueError,
            E(_LOAD + "image_ids must have shape")),
        Bad("image-ids-low", S(image_ids=np.array([7, -2, 9], I64)), ValueError,
            E(_LOAD + "image_ids must be non-negative (or -1: unknown), got -2")),
        Bad("capacity", S(capacity=2), ValueError,
            E(_LOAD + "state holds 3 images for capacity 2")),
        Bad("capacity-1", S(capacity=1), ValueError,
            E(_LOAD + "state holds 3 images for capacity 1")),
        Bad("capacity-0", S(capacity=0), ValueError,
            E(_LOAD + "capacity must be in [1, 2147483647], got 0")),
        Bad("capacity-str", S(capacity="x"), TypeError, E(_LOAD + "capacity must be an integer")),
        Bad("capacity-float", S(capacity=2.5), TypeError, E(_LOAD + "capacity must be an integer")),
        Bad("dim-str", S(dim="x"), TypeError, E(_LOAD + "dim must be an integer")),
        Bad("inf", S(objects1=np.full((5, D), np.inf, F32)), ValueError,
            E(_LOAD + "objects1 must be finite, got NaN or infinity")),
    ])

OPS = {op.name: op for op in (
    CLUSTER, DRAW_INIT, POOL, POOL_BACKWARD, POOL_SOFT, POOL_SOFT_BACKWARD, TOPK_COSINE,
    SOFTMAX_CROSS_ENTROPY, UPDATE_CENTER, CRIBO_LOSSES, SET_NUM_THREADS, OBJECT_QUEUE,
    QUEUE_PUSH, QUEUE_MATCH, QUEUE_LOAD)}


def test_the_registry_covers_every_entry_point_of_the_binding():
    entry_points = {n for n in dir(_C) if not n.startswith("_") and callable(getattr(_C, n))
                    and not isinstance(getattr(_C, n), type)}  # not the exception classes
    assert entry_points - {"get_num_threads"} == set(OPS)


# ============================================================================
# the tests the registry drives
# ============================================================================

def _bad_cases(via):
    return [pytest.param(name, b, id=f"{name}-{b.id}") for name, op in OPS.items()
            for b in op.bad if b.via in (via, "both")]


@pytest.mark.parametrize("name, bad", _bad_cases("public"))
def test_public_function_errors(name, bad):
    op = OPS[name]
    threads = cribo.get_num_threads()
    kw = bad.change(op.args(valid()))
    with pytest.raises(bad.exc, match=bad.msg) as e:
        op.public(kw)
    assert cribo.get_num_threads() == threads
    # the user's bad input, whether the binding or the conversion in cribo/ops/_arrays.py
    # refused it: the binding's own classes
    assert isinstance(e.value, (cribo.ArgumentError, cribo.ArgumentTypeError)), e.value


#: The binding's messages for a call that does not fit the signature (a bug of the
#: caller, cribo's own Python code: a plain TypeError, or ValueError for a missing
#: draw callback); every other refusal is a broken rule.
_MISFIT = ("missing required argument", "unexpected keyword argument", "takes at most",
           "given by position and by", "is required when draw is None")


@pytest.mark.parametrize("name, bad", _bad_cases("C"))
def test_binding_errors(name, bad):
    op = OPS[name]
    threads = cribo.get_num_threads()
    kw = bad.change(op.args(valid()))
    with pytest.raises(bad.exc, match=bad.msg) as e:
        op.C(kw)
    assert cribo.get_num_threads() == threads
    if any(m in str(e.value) for m in _MISFIT):
        assert type(e.value) in (TypeError, ValueError), e.value
    else:  # the user's bad input: the binding's own classes
        assert isinstance(e.value, (cribo.ArgumentError, cribo.ArgumentTypeError)), e.value


@pytest.mark.parametrize("name", list(OPS))
def test_valid_calls_pass_through_both_layers(name):
    op = OPS[name]
    op.C(op.args(valid()))
    op.public(op.args(valid()))
    op.C(op.big())


NONFINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name, arg", [pytest.param(n, a, id=f"{n}-{a}") for n, op in OPS.items()
                                       for a in op.nonfinite])
def test_nonfinite_inputs_are_rejected(name, arg, value):
    op = OPS[name]
    kw = op.args(valid())
    kw[arg] = _poison(kw[arg], value)
    for call in (op.C, op.public):
        with pytest.raises(ValueError, match=op.nonfinite[arg]):
            call(kw)


# ---------------------------------------------------------------- the raw binding

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


_DTYPE_MSG = "{fn}: {arg} must be a native-endian {kind} array, got {dt}"
_LAYOUT_MSG = ("{fn}: {arg} must be C-contiguous and aligned (use numpy.require(x, "
               "requirements='CA'))")


def _corruptions(dtype):
    """(name, transform, exception, message template, dtype repr) for one array dtype."""
    layout = [("strided", _strided, ValueError, _LAYOUT_MSG, None),
              ("fortran", _fortran, ValueError, _LAYOUT_MSG, None),
              ("unaligned", _unaligned, ValueError, _LAYOUT_MSG, None)]
    if dtype == F32:
        return [
            ("float64", lambda x: x.astype(F64), TypeError, _DTYPE_MSG, "dtype('float64')"),
            ("float16", lambda x: x.astype(np.float16), TypeError, _DTYPE_MSG, "dtype('float16')"),
            ("int32", lambda x: x.astype(np.int32), TypeError, _DTYPE_MSG, "dtype('int32')"),
            ("bool", lambda x: x > 0, TypeError, _DTYPE_MSG, "dtype('bool')"),
            ("complex64", lambda x: x.astype(np.complex64), TypeError, _DTYPE_MSG,
             "dtype('complex64')"),
            ("byteswapped", _swapped, TypeError, _DTYPE_MSG, "dtype('>f4')"),
        ] + layout
    if dtype == I64:
        return [
            ("int32", lambda x: x.astype(np.int32), TypeError, _DTYPE_MSG, "dtype('int32')"),
            ("uint64", lambda x: np.abs(x).astype(np.uint64), TypeError, _DTYPE_MSG,
             "dtype('uint64')"),
            ("float32", lambda x: x.astype(F32), TypeError, _DTYPE_MSG, "dtype('float32')"),
            ("byteswapped", _swapped, TypeError, _DTYPE_MSG, "dtype('>i8')"),
        ] + layout
    return [("uint8", lambda x: x.astype(np.uint8), TypeError, _DTYPE_MSG, "dtype('uint8')"),
            ("int64", lambda x: x.astype(I64), TypeError, _DTYPE_MSG, "dtype('int64')")] + layout


_KIND = {F32: "float32", I64: "int64", np.bool_: "bool"}


def _array_args(op):
    return [k for k, x in op.args(valid()).items() if isinstance(x, np.ndarray) and x.ndim > 0]


def _raw_cases():
    out = []
    for name, op in OPS.items():
        a = op.args(valid())
        for arg in _array_args(op):
            for cname, *_ in _corruptions(a[arg].dtype.type):
                if cname == "fortran" and a[arg].ndim < 2:
                    continue
                out.append(pytest.param(name, arg, cname, id=f"{name}-{arg}-{cname}"))
    return out


@pytest.mark.parametrize("name, arg, cname", _raw_cases())
def test_raw_C_refuses_what_the_public_API_converts(name, arg, cname):
    op = OPS[name]
    a = op.args(valid())
    (_, transform, exc, tmpl, dt), = [c for c in _corruptions(a[arg].dtype.type) if c[0] == cname]
    kind = _KIND[a[arg].dtype.type]
    a[arg] = transform(a[arg])
    with pytest.raises(exc, match=E(tmpl.format(fn=op.fn, arg=arg, kind=kind, dt=dt))):
        op.C(a)


@pytest.mark.parametrize("name", [n for n, op in OPS.items() if _array_args(op)])
def test_raw_C_refuses_non_arrays_and_wrong_ndim(name):
    op = OPS[name]
    a = op.args(valid())
    for arg in _array_args(op):
        bad = dict(a)
        bad[arg] = a[arg].tolist()
        with pytest.raises(TypeError, match=E(f"{op.fn}: {arg} must be a numpy array")):
            op.C(bad)
        bad[arg] = a[arg][None]
        got = str(bad[arg].shape)
        with pytest.raises(ValueError, match=E(f"{op.fn}: {arg} must have shape (")
                           + ".*" + E(f"got {got}")):
            op.C(bad)


@pytest.mark.parametrize("name", list(OPS))
def test_raw_C_refuses_missing_unknown_and_extra_arguments(name):
    op = OPS[name]
    a = op.args(valid())
    spec = getattr(_C, name).__doc__
    for arg in a:
        required = f"{arg}=" not in spec
        if required:
            with pytest.raises(TypeError, match=E(f"{op.fn}: missing required argument "
                                                  f"'{arg}'")):
                op.C({k: x for k, x in a.items() if k != arg})
    with pytest.raises(TypeError, match=E(f"{op.fn}: unexpected keyword argument 'nonsense'")):
        op.C({**a, "nonsense": 1})
    with pytest.raises(TypeError, match=E(f"{op.fn}: takes at most")):
        getattr(_C, name)(*([None] * 20))
    first = next(iter(a))
    with pytest.raises(TypeError, match=E(f"{op.fn}: argument '{first}' given by position and "
                                          "by keyword")):
        getattr(_C, name)(a[first], **a)


@pytest.mark.parametrize("name", list(OPS))
def test_raw_C_inputs_are_not_modified_even_on_failure(name):
    op = OPS[name]
    a = op.args(valid())
    snap = {k: x.copy() for k, x in a.items() if isinstance(x, np.ndarray)}
    op.C(a)
    for b in op.bad:
        if b.via == "public":
            continue
        bad = b.change(a)
        bad_snap = {k: x.copy() for k, x in bad.items() if isinstance(x, np.ndarray)}
        with pytest.raises((ValueError, TypeError)):
            op.C(bad)
        for k, x in bad_snap.items():
            assert bad[k].tobytes() == x.tobytes(), (b.id, k)
    for k, x in snap.items():
        assert a[k].tobytes() == x.tobytes(), k


# ---------------------------------------------------------------- reference counts

@pytest.mark.parametrize("name", list(OPS))
def test_refcounts_are_stable_over_1000_calls(name):
    op = OPS[name]
    good_kw = op.args(valid())
    bad_kws = [b.change(good_kw) for b in op.bad if b.via != "public"]
    watched = [x for kw in [good_kw] + bad_kws for x in kw.values() if isinstance(x, np.ndarray)]
    out = op.C(good_kw)  # held across the count, like each `out` of the loop
    for kw in bad_kws:
        with pytest.raises((ValueError, TypeError)):
            op.C(kw)
    before = [sys.getrefcount(x) for x in watched]
    for _ in range(1000):
        out = op.C(good_kw)
        for kw in bad_kws:
            try:
                op.C(kw)
            except (ValueError, TypeError):
                pass
    after = [sys.getrefcount(x) for x in watched]
    assert after == before
    # Outputs are owned by the caller alone (no reference leaked by the binding).
    del out
    r = op.C(good_kw)
    inputs = [id(x) for x in good_kw.values()]
    if isinstance(r, tuple):
        assert sys.getrefcount(r) == 2
        for e in r:
            if isinstance(e, np.ndarray) and id(e) not in inputs:
                assert sys.getrefcount(e) == 3  # the tuple, `e`, the argument
    elif isinstance(r, np.ndarray):
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


# ---------------------------------------------------------------- memory

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_calls(op):
    """The larger valid call (one leaked output or workspace per call is >= 16 KiB), its
    failing variants and the Op's extra calls."""
    big = op.big()
    fails = []
    for b in op.bad:
        if b.via == "public" or len(fails) == 4:
            continue
        try:
            kw = b.change(big)
        except Exception:  # a change written for the small shapes only
            continue
        fails.append(kw)

    def fail(kw):
        def run():
            try:
                op.C(kw)
            except (ValueError, TypeError):
                return
        return run

    return [lambda: op.C(big)] + [fail(kw) for kw in fails] + op.memory_extra


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("name", list(OPS))
def test_1000_calls_do_not_grow_memory(name):
    calls = _memory_calls(OPS[name])
    n = 200 if OPS[name].memory_extra and name.startswith("ObjectQueue") else 1000

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


# ============================================================================
# the public API's own behaviour around the binding
# ============================================================================

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


def test_load_state_dict_checks_the_container_in_python():
    v = valid()
    with pytest.raises(TypeError, match=E("ObjectQueue.load_state_dict: state must be a dict "
                                          "from state_dict(), got <class 'list'>")):
        cribo.ObjectQueue(4, D).load_state_dict([("capacity", 4)])
    for key in _STATE_KEYS:
        with pytest.raises(KeyError, match=E(f"ObjectQueue.load_state_dict: state is missing "
                                             f"['{key}']")):
            cribo.ObjectQueue(4, D).load_state_dict(state(v, **{key: None}))


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


def test_nonfinite_queries_are_refused_by_an_empty_queue_too():
    v = valid()
    o2 = _poison(v["objects2"], np.nan)
    with pytest.raises(ValueError, match=E("ObjectQueue.match: objects2 must be finite, got NaN "
                                           "or infinity")):
        cribo.ObjectQueue(3, D).match(v["objects1"], o2)


def test_nonfinite_top_k_inputs_without_ids():
    v = valid()
    for key in ("queries", "bank"):
        a = {"queries": v["queries"], "bank": v["bank"]}
        a[key] = _poison(a[key], np.inf)
        with pytest.raises(ValueError, match=E("topk_cosine: queries and bank must be finite")):
            cribo.topk_cosine(a["queries"], a["bank"], 2)


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


@pytest.mark.parametrize("w_nn", [1.0, 0.0])
def test_neighbour_rows_outside_the_masks_are_never_read(w_nn):
    # A neighbour row is read only where its mask is set (its weight is non-zero).
    v = valid()
    tn = v["tn"].copy()
    tn[0, 0] = np.nan
    tn[1, 2] = np.inf
    mask1 = np.array([False, True, True, True])
    mask2 = np.array([True, True, False, True])
    r = losses(v, teacher_neighbours=tn, mask1=mask1, mask2=mask2, weights=(1.0, 1.0, w_nn))
    assert np.isfinite([r.total, r.neighbours]).all() and np.isfinite(r.grad_objects).all()
    clean = losses(v, teacher_neighbours=np.where(np.isfinite(tn), tn, 0).astype(F32),
                   mask1=mask1, mask2=mask2, weights=(1.0, 1.0, w_nn))
    assert r.neighbours == clean.neighbours and r.total == clean.total
    with pytest.raises(ValueError, match=E("cribo_losses: teacher_neighbours (after centring "
                                           "and scaling) must be finite")):
        losses(v, teacher_neighbours=tn, weights=(1.0, 1.0, w_nn))


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


def _readonly(x):
    y = x.copy()
    y.flags.writeable = False
    return y


_LAYOUTS = {
    "float64/int32": lambda x: x.astype(F64) if x.dtype == F32 else x.astype(np.int32),
    "byteswapped": _swapped,
    "strided": _strided,
    "fortran": _fortran,
    "unaligned": _unaligned,
    "readonly": _readonly,
}


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
        # public API
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
        (lambda: cribo.cribo_losses(_huge((2, 0, BIG)), _huge((2, 0, BIG)), _huge((2, 0, 1)),
                                    _huge((2, 0, 1)), center_global=np.zeros(1, F32),
                                    center_objects=np.zeros(1, F32)),
         over.format(fn="cribo_losses", arg="student_global", i=2, n=BIG)),
        (lambda: cribo.ObjectQueue(1, 3).push(_huge((0, BIG)), _huge((0, BIG)), np.zeros(0, I64)),
         over.format(fn="ObjectQueue.push", arg="objects1", i=1, n=BIG)),
        # raw binding
        (lambda: _C.cluster(tokens=_huge((1, 2, 0, BIG)), positions=np.zeros((1, 2, 0, 2), F32),
                            n_clusters=1, init=np.zeros((1, 1), I64)),
         over.format(fn="cluster", arg="tokens", i=3, n=BIG)),
        (lambda: _C.cluster(tokens=v["tokens"], positions=v["positions"], n_clusters=K,
                            init=_huge((0, BIG), I64)),
         over.format(fn="cluster", arg="init", i=1, n=BIG)),
        (lambda: _C.pool_soft(tokens=_huge((BIG, 2, 0, 4)), weights=_huge((0, 2, 0, 3))),
         over.format(fn="pool", arg="tokens", i=0, n=BIG)),
        (lambda: _C.pool_soft_backward(grad_objects=_huge((0, 2, 3, 4)),
                                       weights=_huge((0, BIG, 0, 3))),
         over.format(fn="pool_backward", arg="weights", i=1, n=BIG)),
        (lambda: _C.softmax_cross_entropy(student_logits=_huge((0, 5)),
                                          teacher_logits=_huge((BIG, 0))),
         over.format(fn="softmax_cross_entropy", arg="teacher_logits", i=0, n=BIG)),
        # (1-D arguments -- ids, centres, masks -- cannot be size 0 with a huge dimension;
        # they are checked by the same code.)
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=E(msg)):
            call()


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


def test_a_broken_rule_raises_the_bindings_own_classes_and_a_misfit_call_a_plain_typeerror():
    """cribo.ArgumentError (a ValueError) and cribo.ArgumentTypeError (a TypeError)
    mark the user's bad input; a call that does not fit an entry point's signature
    is the caller's bug and raises a plain TypeError (cribo's CLI tells them apart)."""
    tok = np.zeros((1, 2, 4, 3), np.float32)
    pos = np.zeros((1, 2, 4, 2), np.float32)
    with pytest.raises(cribo.ArgumentError, match="n_clusters must be at most 2N"):
        cribo.cluster(tok, pos, 99)
    with pytest.raises(cribo.ArgumentTypeError, match="must be a native-endian float32"):
        _C.pool(tokens=tok.astype(np.float64), labels=np.zeros((1, 2, 4), np.int64),
                n_clusters=2)
    assert issubclass(cribo.ArgumentError, ValueError)
    assert issubclass(cribo.ArgumentTypeError, TypeError)
    for bad_call in (lambda: _C.pool(tokens=tok), lambda: _C.pool(tok, tok, 2, 3, 4),
                     lambda: _C.pool(tokens=tok, labels=tok, n_clusters=2, colour=1)):
        with pytest.raises(TypeError) as e:
            bad_call()
        assert type(e.value) is TypeError, e.value


def test_a_flag_takes_the_truth_value_of_anything_none_included():
    """update_marginals and return_plan are flags (csrc/binding/args.h, S_FLAG): None
    counts as False, as bool(None) does, rather than being refused as "not a number"."""
    v = valid()
    base = dict(tokens=v["tokens"], positions=v["positions"], n_clusters=K, init=v["init"])
    off = cribo.cluster(**base, update_marginals=False)
    none = cribo.cluster(**base, update_marginals=None, return_plan=None)
    on = cribo.cluster(**base, update_marginals=True, return_plan=[0])
    assert none.plan is None and on.plan is not None  # a non-empty list is true
    np.testing.assert_array_equal(none.labels, off.labels)
    np.testing.assert_array_equal(none.counts, off.counts)
