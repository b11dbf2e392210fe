#!/usr/bin/env python
"""Benchmark cribo's operators against a torch-on-CPU and a NumPy baseline.

    python benchmarks/run.py [--threads 1 2] [--quick] [--json PATH]
                             [--only cluster,pool,queue,loss] [--no-memory]

For every operator and thread count, one fresh worker process:
  1. builds fixed-seed inputs (the reference sizes of docs/method.md §6, or tiny
     ones with --quick);
  2. VALIDATES: torch and cribo outputs are checked against the NumPy
     baseline; an implementation that disagrees is not timed (the row records
     why, and the run exits 1);
  3. times each validated implementation: warm-up, then repeats until a time
     budget is used (at least 3), reporting median and IQR in ms.
Then (unless --no-memory) one fresh process per operator x implementation x
thread count measures the peak extra resident memory of a single call.

Threads: the worker gets OPENBLAS_NUM_THREADS / OMP_NUM_THREADS /
MKL_NUM_THREADS / CRIBO_NUM_THREADS = t in its environment BEFORE NumPy is imported (NumPy's
bundled OpenBLAS reads it at load time; threadpoolctl is used as well when it
is installed), calls torch.set_num_threads(t) and cribo.set_num_threads(t).
The thread counts each loaded OpenBLAS reports are recorded in the JSON.

Output: a markdown table on stdout and one JSON document (--json, default
benchmarks/results.json) with the machine (CPU model, core count, NumPy /
torch / OpenBLAS versions, git SHA), the sizes, validation details, all
timings and memory probes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

OPERATORS = ("cluster", "pool", "queue", "loss")
IMPLS = ("torch", "numpy", "cribo")


# ============================================================================
# Argument parsing
# ============================================================================


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="cribo operator benchmarks (torch / NumPy / cribo)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts to run with (default: 1 2)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--json", default=os.path.join(HERE, "results.json"),
                   help="where to write the JSON results (default: benchmarks/results.json)")
    p.add_argument("--only", default=",".join(OPERATORS),
                   help="comma-separated subset of " + ",".join(OPERATORS))
    p.add_argument("--seed", type=int, default=0, help="seed of all synthetic inputs")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory probes (run at the first --threads value only)")
    p.add_argument("--no-cribo", action="store_true",
                   help="run only the torch and NumPy baselines (development, before cribo builds)")
    # internal: one operator in a fresh process, or one memory probe
    p.add_argument("--_worker", metavar="OP", help=argparse.SUPPRESS)
    p.add_argument("--_probe", metavar="OP:IMPL", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p


def parse_only(s: str) -> list[str]:
    ops = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in ops if x not in OPERATORS]
    if bad or not ops:
        raise SystemExit(f"run.py: --only must be a comma-separated subset of "
                         f"{','.join(OPERATORS)}, got {s!r}")
    return ops


# ============================================================================
# Worker side: imports (after the thread environment is in place)
# ============================================================================


def import_cribo() -> Any:
    """``import cribo``; if that fails, retry with the repository root on the path
    (an in-place build that is not installed)."""
    try:
        import cribo  # noqa: PLC0415
        return cribo
    except ImportError:
        root = os.path.dirname(HERE)
        if root not in sys.path:
            sys.path.insert(0, root)
        import cribo  # noqa: PLC0415
        return cribo


class Env:
    """Modules and thread settings of a worker process."""

    def __init__(self, threads: int, want_cribo: bool) -> None:
        import numpy  # noqa: PLC0415 - after the env vars are set by the parent
        import torch  # noqa: PLC0415

        self.np = numpy
        self.torch = torch
        self.threads = threads
        torch.set_num_threads(threads)
        self._tpc = None
        try:
            import threadpoolctl  # noqa: PLC0415
            self._tpc = threadpoolctl.threadpool_limits(limits=threads)
            self.threadpoolctl = True
        except ImportError:
            self.threadpoolctl = False
        self.cribo = None
        if want_cribo:
            self.cribo = import_cribo()
            self.cribo.set_num_threads(threads)

    def impls(self) -> list[str]:
        return ["numpy", "torch"] + (["cribo"] if self.cribo is not None else [])

    def thread_record(self) -> dict[str, Any]:
        import common  # noqa: PLC0415
        rec: dict[str, Any] = {
            "requested": self.threads,
            "torch.get_num_threads": self.torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in common.THREAD_ENV_VARS},
            "threadpoolctl": self.threadpoolctl,
            "openblas_loaded": common.loaded_openblas(),
        }
        if self.cribo is not None:
            rec["cribo.get_num_threads"] = self.cribo.get_num_threads()
        if self.threadpoolctl:
            import threadpoolctl  # noqa: PLC0415
            rec["threadpool_info"] = threadpoolctl.threadpool_info()
        return rec


# ============================================================================
# Cases: one per operator. prepare(impl) builds per-implementation state,
# fn(impl) returns the callable that is timed, validate(impl) raises
# common.ValidationError if impl disagrees with the NumPy baseline.
# ============================================================================


class Case:
    operator = ""
    name = ""  # row label in the table

    def __init__(self, env: Env, S: Any, seed: int) -> None:
        self.env = env
        self.S = S
        self.seed = seed
        self.ref_s = 0.0  # wall time of the NumPy reference call made during validation
        # wall time (s) of validation calls identical to the timed call, per implementation
        self.call_s: dict[str, float] = {}

    def describe(self) -> str:
        raise NotImplementedError

    def prepare(self, impl: str) -> None:
        pass

    def fn(self, impl: str) -> Callable[[], Any]:
        raise NotImplementedError

    def validate(self, impl: str) -> dict[str, Any]:
        raise NotImplementedError

    def extra(self, impl: str, timing: Any) -> dict[str, Any]:
        return {}

    def secondary(self) -> list["Case"]:
        return []


class ClusterCase(Case):
    operator = "cluster"
    name = "cluster"

    def __init__(self, env: Env, S: Any, seed: int) -> None:
        super().__init__(env, S, seed)
        import common  # noqa: PLC0415
        self.tokens, self.positions = common.make_scene_views(seed, S.B, S.N, S.d)
        self.init = common.make_init(seed + 1, S.B, S.N, S.K)
        self.kw = dict(pos_weight=S.pos_weight, sinkhorn_lambda=S.sinkhorn_lambda,
                       sinkhorn_iters=S.sinkhorn_iters, update_marginals=True)
        self._ref: dict[int, Any] = {}

    def describe(self) -> str:
        S = self.S
        return (f"B={S.B} N={S.N}/view d={S.d} K={S.K} {S.n_iters} outer x {S.sinkhorn_iters} "
                f"Sinkhorn, lambda={S.sinkhorn_lambda:g}, pos_weight={S.pos_weight:g}")

    def run(self, impl: str, n_iters: int, plan: bool = False) -> dict[str, Any]:
        """Common output record: labels (B,2,N), counts, valid, plan or None."""
        np, torch = self.env.np, self.env.torch
        if impl == "numpy":
            import numpy_baseline as nb  # noqa: PLC0415
            c = nb.cluster(self.tokens, self.positions, self.S.K, init=self.init,
                           n_iters=n_iters, **self.kw)
            return {"labels": c.labels, "counts": c.counts, "valid": c.valid, "plan": c.plan}
        if impl == "torch":
            import torch_baseline as tb  # noqa: PLC0415
            c = tb.cluster(torch.from_numpy(self.tokens), torch.from_numpy(self.positions), self.S.K,
                           init=torch.from_numpy(self.init), n_iters=n_iters, **self.kw)
            return {"labels": c.labels.numpy(), "counts": c.counts.numpy(),
                    "valid": c.valid.numpy(), "plan": c.plan.numpy()}
        c = self.env.cribo.cluster(self.tokens, self.positions, self.S.K, init=self.init,
                                   n_iters=n_iters, return_plan=plan, **self.kw)
        return {"labels": np.asarray(c.labels), "counts": np.asarray(c.counts),
                "valid": np.asarray(c.valid), "plan": None if c.plan is None else np.asarray(c.plan),
                "init": np.asarray(c.init)}

    def fn(self, impl: str) -> Callable[[], Any]:
        torch = self.env.torch
        S = self.S
        if impl == "numpy":
            import numpy_baseline as nb  # noqa: PLC0415
            return lambda: nb.cluster(self.tokens, self.positions, S.K, init=self.init,
                                      n_iters=S.n_iters, **self.kw)
        if impl == "torch":
            import torch_baseline as tb  # noqa: PLC0415
            tt, tp, ti = (torch.from_numpy(self.tokens), torch.from_numpy(self.positions),
                          torch.from_numpy(self.init))
            return lambda: tb.cluster(tt, tp, S.K, init=ti, n_iters=S.n_iters, **self.kw)
        cribo = self.env.cribo
        return lambda: cribo.cluster(self.tokens, self.positions, S.K, init=self.init,
                                     n_iters=S.n_iters, **self.kw)

    def validate(self, impl: str) -> dict[str, Any]:
        import common  # noqa: PLC0415
        np = self.env.np
        K = self.S.K
        out: dict[str, Any] = {}
        for n_iters in sorted({1, self.S.n_iters}):
            if n_iters not in self._ref:
                t0 = time.perf_counter()
                self._ref[n_iters] = self.run("numpy", n_iters)
                if n_iters == self.S.n_iters:
                    self.ref_s = self.call_s["numpy"] = time.perf_counter() - t0
            ref = self._ref[n_iters]
            t0 = time.perf_counter()
            got = self.run(impl, n_iters, plan=True)
            if impl == "torch" and n_iters == self.S.n_iters:  # torch always returns the plan
                self.call_s[impl] = time.perf_counter() - t0
            tag = f"n_iters={n_iters}"
            if got["labels"].shape != ref["labels"].shape:
                raise common.ValidationError(f"cluster {tag}: labels shape {got['labels'].shape} "
                                             f"!= {ref['labels'].shape}")
            if "init" in got and not np.array_equal(got["init"], self.init):
                raise common.ValidationError(f"cluster {tag}: init not echoed back unchanged")
            lab = got["labels"]
            if lab.min() < 0 or lab.max() >= K:
                raise common.ValidationError(f"cluster {tag}: labels outside [0, {K})")
            counts = np.stack([np.stack([np.bincount(lab[b, v], minlength=K) for v in range(2)])
                               for b in range(lab.shape[0])])
            if not np.array_equal(got["counts"], counts):
                raise common.ValidationError(f"cluster {tag}: counts do not match its own labels")
            if not np.array_equal(got["valid"], (counts[:, 0] > 0) & (counts[:, 1] > 0)):
                raise common.ValidationError(f"cluster {tag}: valid does not match its own counts")
            agree = (lab == ref["labels"]).mean(axis=(1, 2))
            same = agree == 1.0
            rec: dict[str, Any] = {"label_agreement_mean": float(agree.mean()),
                                   "label_agreement_min": float(agree.min()),
                                   "images_identical": int(same.sum()), "images": int(len(agree)),
                                   "valid_clusters_ref": float(ref["valid"].sum(1).mean()),
                                   "valid_clusters_got": float(got["valid"].sum(1).mean())}
            # identical initial centroids: one outer iteration must agree almost exactly;
            # after 5, rare float near-ties may flip a token and the image diverges a little
            need = 0.999 if n_iters == 1 else 0.98
            if agree.mean() < need:
                raise common.ValidationError(
                    f"cluster {tag}: label agreement {agree.mean():.4f} < {need} "
                    f"(min over images {agree.min():.4f})")
            if got["plan"] is not None and same.any():
                rec["plan"] = common.check_close(f"cluster {tag} plan (identical images)",
                                                 got["plan"][same], ref["plan"][same],
                                                 rtol=1e-3, atol_rel=1e-5)
            out[tag] = rec
        return out


class PoolCase(Case):
    operator = "pool"
    name = "pool fwd+bwd"

    def __init__(self, env: Env, S: Any, seed: int) -> None:
        super().__init__(env, S, seed)
        import common  # noqa: PLC0415
        import numpy_baseline as nb  # noqa: PLC0415
        np = env.np
        self.tokens, positions = common.make_scene_views(seed, S.B, S.N, S.d)
        init = common.make_init(seed + 1, S.B, S.N, S.K)
        # realistic hard assignments (with empty and one-view clusters): the clustering's
        self.labels = nb.cluster(self.tokens, positions, S.K, init=init, n_iters=S.n_iters,
                                 pos_weight=S.pos_weight, sinkhorn_lambda=S.sinkhorn_lambda,
                                 sinkhorn_iters=S.sinkhorn_iters).labels
        rng = np.random.default_rng(seed + 2)
        self.grad = rng.standard_normal((S.B, 2, S.K, S.d), dtype=np.float32)
        self._ref: Any = None

    def describe(self) -> str:
        S = self.S
        return f"B={S.B} 2x N={S.N} d={S.d} K={S.K} hard labels, forward + backward"

    def fn(self, impl: str) -> Callable[[], Any]:
        K = self.S.K
        if impl == "numpy":
            import numpy_baseline as nb  # noqa: PLC0415
            return lambda: (nb.pool(self.tokens, self.labels, K),
                            nb.pool_backward(self.grad, self.labels, K))
        if impl == "torch":
            import torch_baseline as tb  # noqa: PLC0415
            torch = self.env.torch
            tt, tl, tg = (torch.from_numpy(self.tokens), torch.from_numpy(self.labels),
                          torch.from_numpy(self.grad))
            return lambda: tb.pool_forward_backward(tt, tl, K, tg)
        cribo = self.env.cribo
        return lambda: (cribo.pool(self.tokens, self.labels, n_clusters=K),
                        cribo.pool_backward(self.grad, self.labels, n_clusters=K))

    def validate(self, impl: str) -> dict[str, Any]:
        import common  # noqa: PLC0415
        np = self.env.np
        if self._ref is None:
            t0 = time.perf_counter()
            self._ref = self.fn("numpy")()
            self.ref_s = time.perf_counter() - t0
        ref_o, ref_g = self._ref
        o, g = self.fn(impl)()
        o, g = np.asarray(o), np.asarray(g)
        return {"objects": common.check_close("pool objects", o, ref_o, rtol=1e-4, atol_rel=1e-5),
                "grad_tokens": common.check_close("pool_backward grad", g, ref_g,
                                                  rtol=1e-4, atol_rel=1e-5)}

    def extra(self, impl: str, timing: Any) -> dict[str, Any]:
        S = self.S
        flops = 2 * (2 * S.B * S.N * S.K * S.d) * 2  # 2 views; fwd + bwd, as dense products
        return {"nominal_flops": flops, "nominal_gflops_per_s": flops / (timing.median_ms * 1e6)}


class QueueCase(Case):
    """Look-up of a batch of query objects in a full queue (match + cycle checks)."""

    operator = "queue"
    name = "queue match"

    def __init__(self, env: Env, S: Any, seed: int) -> None:
        super().__init__(env, S, seed)
        import common  # noqa: PLC0415
        self.data = common.make_queue_data(seed, S.queue_images, S.objects_per_image,
                                           S.queue_dim, S.n_queries)
        self.queues: dict[str, Any] = {}
        self.state_mib: dict[str, float] = {}
        self._ref: dict[str, Any] | None = None

    def describe(self) -> str:
        S = self.S
        R = self.data["q"].shape[1]
        return (f"match: queue {S.queue_images} images / {R} objects per view, d={S.queue_dim}; "
                f"{S.n_queries} queries, both views + cycle checks")

    def prepare(self, impl: str) -> None:
        import common  # noqa: PLC0415
        q, counts = self.data["q"], self.data["counts"]
        S = self.S
        if impl == "numpy":
            import numpy_baseline as nb  # noqa: PLC0415
            nq = nb.ObjectQueue(S.queue_images, S.queue_dim)
            nq.q1, nq.q2, nq.counts = q[0], q[1], counts.copy()  # views, no copy
            self.queues[impl] = nq
            self.state_mib[impl] = q.nbytes / 2**20
        elif impl == "torch":
            import torch_baseline as tb  # noqa: PLC0415
            torch = self.env.torch
            tq = tb.ObjectQueue(S.queue_images, S.queue_dim)
            tq.queue = torch.from_numpy(q)  # (2, R, d), no copy
            tq.cpv = torch.from_numpy(counts.copy())
            self.queues[impl] = tq
            self.state_mib[impl] = q.nbytes / 2**20
        else:
            before = common.rss_mib()
            cq = self.env.cribo.ObjectQueue(S.queue_images, S.queue_dim)
            cq.push(q[0], q[1], counts)  # one block: address order = array order
            self.queues[impl] = cq
            self.state_mib[impl] = common.rss_mib() - before

    def fn(self, impl: str) -> Callable[[], Any]:
        t1, t2 = self.data["t1"], self.data["t2"]
        queue = self.queues[impl]
        if impl == "torch":
            torch = self.env.torch
            tt1, tt2 = torch.from_numpy(t1), torch.from_numpy(t2)
            return lambda: queue.match(tt1, tt2)
        return lambda: queue.match(t1, t2)

    def _as_numpy(self, m: Any) -> dict[str, Any]:
        import common  # noqa: PLC0415
        np = self.env.np
        out = {}
        for k in common.MATCH_FIELDS:
            v = getattr(m, k)
            out[k] = v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)
        return out

    def validate(self, impl: str) -> dict[str, Any]:
        import common  # noqa: PLC0415
        np = self.env.np
        if "numpy" not in self.queues:
            self.prepare("numpy")
        if self._ref is None:
            t0 = time.perf_counter()
            self._ref = self._as_numpy(self.fn("numpy")())
            self.ref_s = self.call_s["numpy"] = time.perf_counter() - t0
        ref = self._ref
        t0 = time.perf_counter()
        got = self._as_numpy(self.fn(impl)())
        self.call_s[impl] = time.perf_counter() - t0
        q = self.data["q"]
        t = (self.data["t1"], self.data["t2"])
        rec: dict[str, Any] = {}
        for v, (ik, mk, tk, sk) in enumerate((("index1", "mask1", "targets1", "similarity1"),
                                              ("index2", "mask2", "targets2", "similarity2"))):
            gi, ri = got[ik].astype(np.int64), ref[ik].astype(np.int64)
            if gi.shape != ri.shape or gi.min() < 0 or gi.max() >= q.shape[1]:
                raise common.ValidationError(f"queue {ik}: bad shape or out-of-range index")
            diff = np.flatnonzero(gi != ri)
            # a different neighbour is acceptable only as a float32 near-tie
            worst_gap = 0.0
            if diff.size:
                qn = t[v][diff].astype(np.float64)
                qn /= np.linalg.norm(qn, axis=1, keepdims=True)

                def cos(rows: Any) -> Any:
                    e = q[v][rows].astype(np.float64)
                    return np.einsum("ij,ij->i", qn, e / np.linalg.norm(e, axis=1, keepdims=True))

                gap = cos(ri[diff]) - cos(gi[diff])
                worst_gap = float(gap.max())
                if worst_gap > 1e-5:
                    raise common.ValidationError(
                        f"queue {ik}: {diff.size} queries differ from the NumPy baseline, "
                        f"worst cosine gap {worst_gap:.3g} (not a near-tie)")
            if not np.array_equal(got[tk], q[v][gi]):
                raise common.ValidationError(f"queue {tk}: not the queue entries at {ik}")
            common.check_close(f"queue {sk}", got[sk], ref[sk], rtol=0, atol_rel=1e-5)
            m_agree = float((got[mk] == ref[mk]).mean())
            same = gi == ri
            m_agree_same = float((got[mk][same] == ref[mk][same]).mean()) if same.any() else 1.0
            if m_agree_same < 0.995:
                raise common.ValidationError(f"queue {mk}: agrees on only {m_agree_same:.4f} "
                                             f"of the queries with the same neighbour")
            rec[ik] = {"agreement": float(same.mean()), "near_tie_differences": int(diff.size),
                       "worst_cosine_gap": worst_gap, f"{mk}_agreement": m_agree,
                       f"{mk}_true_fraction": float(ref[mk].mean())}
        rec["push_semantics"] = self._validate_push(impl)
        return rec

    def _validate_push(self, impl: str) -> dict[str, Any]:
        """Small queue: several pushes past capacity (with an image of 0 objects),
        then a look-up; indices and targets must equal the NumPy baseline's."""
        import common  # noqa: PLC0415
        import numpy_baseline as nb  # noqa: PLC0415
        np = self.env.np
        rng = np.random.default_rng(self.seed + 11)
        d, cap = 16, 10
        batches = []
        for _ in range(4):
            counts = rng.integers(0, 5, 4).astype(np.int64)
            counts[rng.integers(4)] = 0
            M = int(counts.sum())
            o1 = rng.standard_normal((M, d), dtype=np.float32)
            batches.append((o1, o1 + 0.1 * rng.standard_normal((M, d), dtype=np.float32), counts))
        t1 = rng.standard_normal((12, d), dtype=np.float32)
        t2 = t1 + 0.1 * rng.standard_normal((12, d), dtype=np.float32)
        nq = nb.ObjectQueue(cap, d)
        if impl == "torch":
            import torch_baseline as tb  # noqa: PLC0415
            torch = self.env.torch
            q = tb.ObjectQueue(cap, d)
            for o1, o2, c in batches:
                nq.push(o1, o2, c)
                q.push(torch.from_numpy(o1), torch.from_numpy(o2), torch.from_numpy(c))
            got = self._as_numpy(q.match(torch.from_numpy(t1), torch.from_numpy(t2)))
        else:
            q = self.env.cribo.ObjectQueue(cap, d)
            for o1, o2, c in batches:
                nq.push(o1, o2, c)
                q.push(o1, o2, c)
            if len(q) != len(nq):
                raise common.ValidationError(f"queue push: len {len(q)} != {len(nq)} images")
            if q.n_objects != nq.q1.shape[0]:
                raise common.ValidationError(f"queue push: n_objects {q.n_objects} != "
                                             f"{nq.q1.shape[0]}")
            got = self._as_numpy(q.match(t1, t2))
        ref = self._as_numpy(nq.match(t1, t2))
        for k in ("index1", "index2", "mask1", "mask2"):
            if not np.array_equal(got[k].astype(ref[k].dtype), ref[k]):
                raise common.ValidationError(f"queue push/match on a small queue: {k} "
                                             f"{got[k].tolist()} != {ref[k].tolist()}")
        for k in ("targets1", "targets2"):
            if not np.array_equal(got[k], ref[k]):
                raise common.ValidationError(f"queue push/match on a small queue: {k} differ")
        return {"ok": True, "images": len(nq), "objects": int(nq.q1.shape[0])}

    def extra(self, impl: str, timing: Any) -> dict[str, Any]:
        S = self.S
        R = self.data["q"].shape[1]
        flops = 2 * 2 * S.n_queries * R * S.queue_dim
        return {"queue_rows_per_view": R, "queue_state_mib": self.state_mib.get(impl),
                "similarity_flops": flops, "gflops_per_s": flops / (timing.median_ms * 1e6)}

    def secondary(self) -> list[Case]:
        return [QueuePushCase(self)]


class QueuePushCase(Case):
    """One training step's push (push_images images) onto the full queue."""

    operator = "queue"
    name = "queue push"

    def __init__(self, parent: QueueCase) -> None:
        super().__init__(parent.env, parent.S, parent.seed)
        import common  # noqa: PLC0415
        self.parent = parent
        S = self.S
        self.batch = common.make_push_batch(self.seed + 7, S.push_images, S.objects_per_image,
                                            S.queue_dim)

    def describe(self) -> str:
        b = self.batch
        return (f"push: {len(b['counts'])} images / {b['o1'].shape[0]} objects onto the full "
                f"queue (steady state, oldest dropped)")

    def fn(self, impl: str) -> Callable[[], Any]:
        b = self.batch
        q = self.parent.queues[impl]
        if impl == "torch":
            torch = self.env.torch
            o1, o2, c = (torch.from_numpy(b["o1"]), torch.from_numpy(b["o2"]),
                         torch.from_numpy(b["counts"]))
            return lambda: q.push(o1, o2, c)
        return lambda: q.push(b["o1"], b["o2"], b["counts"])

    def validate(self, impl: str) -> dict[str, Any]:
        return {"see": "queue match row, push_semantics"}

    def release(self, impl: str) -> None:
        self.parent.queues.pop(impl, None)
        gc.collect()


class LossCase(Case):
    operator = "loss"
    name = "loss fwd+grad"

    def __init__(self, env: Env, S: Any, seed: int) -> None:
        super().__init__(env, S, seed)
        import common  # noqa: PLC0415
        self.x = common.make_loss_inputs(seed, S.B_global, S.M_objects, S.L)
        self.hp = dict(common.LOSS_HPARAMS)
        self._ref: Any = None

    def describe(self) -> str:
        S = self.S
        return (f"L={S.L}: 2x{S.B_global} global rows + 2x{S.M_objects} object rows "
                f"(+2x{S.M_objects} neighbour targets); losses + gradient + centre update")

    def fn(self, impl: str) -> Callable[[], Any]:
        x, hp = self.x, self.hp
        if impl == "numpy":
            import numpy_baseline as nb  # noqa: PLC0415
            return lambda: nb.cribo_losses(**x, **hp)
        if impl == "torch":
            import torch_baseline as tb  # noqa: PLC0415
            torch = self.env.torch
            tx = {k: torch.from_numpy(v) for k, v in x.items()}
            return lambda: tb.cribo_losses(**tx, **hp)
        cribo = self.env.cribo
        args = [x[k] for k in ("student_global", "teacher_global", "student_objects",
                               "teacher_objects", "teacher_neighbours", "mask1", "mask2")]
        return lambda: cribo.cribo_losses(*args, center_global=x["center_global"],
                                          center_objects=x["center_objects"], **hp)

    def validate(self, impl: str) -> dict[str, Any]:
        import common  # noqa: PLC0415
        np = self.env.np
        if self._ref is None:
            t0 = time.perf_counter()
            self._ref = self.fn("numpy")()
            self.ref_s = self.call_s["numpy"] = time.perf_counter() - t0
        ref = self._ref
        t0 = time.perf_counter()
        got = self.fn(impl)()
        self.call_s[impl] = time.perf_counter() - t0
        rec: dict[str, Any] = {}
        for k in ("total", "global_", "objects", "neighbours"):
            g, r = float(getattr(got, k)), float(getattr(ref, k))
            if not np.isfinite(g) or abs(g - r) > 1e-4 * max(1.0, abs(r)):
                raise common.ValidationError(f"loss {k}: {g!r} != reference {r!r}")
            rec[k] = {"got": g, "ref": r}

        def arr(v: Any) -> Any:
            return v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)

        rec["grad_global"] = common.check_close("loss grad_global", arr(got.grad_global),
                                                ref.grad_global, rtol=1e-3, atol_rel=1e-4)
        rec["grad_objects"] = common.check_close("loss grad_objects", arr(got.grad_objects),
                                                 ref.grad_objects, rtol=1e-3, atol_rel=1e-4)
        for k in ("center_global", "center_objects"):
            rec[k] = common.check_close(f"loss {k}", arr(getattr(got, k)), getattr(ref, k),
                                        rtol=1e-4, atol_rel=1e-5)
        return rec


CASES: dict[str, type[Case]] = {"cluster": ClusterCase, "pool": PoolCase, "queue": QueueCase,
                                "loss": LossCase}


# ============================================================================
# Worker: validate then time one operator (fresh process)
# ============================================================================


def sizes(quick: bool) -> Any:
    import common  # noqa: PLC0415
    return common.Sizes.quick() if quick else common.Sizes.reference()


def run_worker(op: str, args: argparse.Namespace) -> dict[str, Any]:
    import common  # noqa: PLC0415
    threads = args.threads[0]
    env = Env(threads, want_cribo=not args.no_cribo)
    S = sizes(args.quick)
    t0 = time.perf_counter()
    case = CASES[op](env, S, args.seed)
    log(f"[{op} t={threads}] inputs ready in {time.perf_counter() - t0:.1f}s: {case.describe()}")
    impls = env.impls()
    for impl in impls:
        case.prepare(impl)
    rows = []
    for c in [case] + case.secondary():
        row: dict[str, Any] = {"operator": op, "name": c.name, "case": c.describe(),
                               "threads": threads, "validation": {}, "timings": {}, "extra": {},
                               "loadavg_before": os.getloadavg()}
        ok: dict[str, float] = {"numpy": 0.0}
        for impl in impls:
            if impl == "numpy":
                continue
            t = time.perf_counter()
            try:
                detail = c.validate(impl)
                row["validation"][impl] = {"ok": True, "against": "numpy", **detail}
                ok[impl] = time.perf_counter() - t
                log(f"[{op} t={threads}] {impl}: validated against numpy")
            except common.ValidationError as e:
                row["validation"][impl] = {"ok": False, "against": "numpy", "error": str(e)}
                log(f"[{op} t={threads}] {impl}: VALIDATION FAILED, not timed: {e}")
            gc.collect()
        ok["numpy"] = c.ref_s
        for impl in IMPLS:
            if impl not in ok:
                continue
            # a call slower than 2 s was warmed by its validation call (numpy's produced the
            # reference there); faster ones get two warm-up calls right before their repeats
            warm = 0 if ok[impl] > 2.0 else 2
            # a call slower than 5 s: its validation call (same function, same inputs) is
            # the first sample, so that the full run stays under 15 minutes
            prior = c.call_s.get(impl, 0.0)
            prior_ms = [prior * 1e3] if prior > 5.0 else []
            time.sleep(0.3)  # let the previous library's spinning worker threads go to sleep
            tm = common.time_fn(c.fn(impl), warmup=warm, budget_s=S.budget_s,
                                min_repeats=S.min_repeats, max_repeats=S.max_repeats,
                                prior_ms=prior_ms)
            row["timings"][impl] = tm.to_json()
            row["timings"][impl]["first_sample_is_validation_call"] = bool(prior_ms)
            row["extra"][impl] = c.extra(impl, tm)
            log(f"[{op} t={threads}] {impl}: median {tm.median_ms:.3f} ms "
                f"(IQR {tm.iqr_ms:.3f}, n={tm.repeats})")
            if isinstance(c, QueuePushCase):
                c.release(impl)  # each pushed queue holds its own copy now: free it
            gc.collect()
        row["loadavg_after"] = os.getloadavg()
        rows.append(row)
    return {"rows": rows, "threads": env.thread_record()}


def run_probe(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak extra RSS of one call of one implementation, in this fresh process."""
    import common  # noqa: PLC0415
    op, impl = spec.split(":")
    threads = args.threads[0]
    env = Env(threads, want_cribo=(impl == "cribo"))
    S = sizes(args.quick)
    case = CASES[op](env, S, args.seed)
    case.prepare(impl)
    fn = case.fn(impl)
    mem = common.measure_peak_extra(fn)
    if isinstance(case, QueueCase):
        mem["queue_state_mib"] = case.state_mib.get(impl)
    return {"operator": op, "impl": impl, "threads": threads, **mem}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================
# Parent: spawn workers, collect, print, write JSON
# ============================================================================


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CRIBO_NUM_THREADS"):
        env[k] = str(threads)
    return env


def spawn(extra: list[str], threads: int, args: argparse.Namespace) -> tuple[int, Any, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, os.path.abspath(__file__), *extra, "--threads", str(threads),
               "--seed", str(args.seed), "--_out", out]
        if args.quick:
            cmd.append("--quick")
        if args.no_cribo:
            cmd.append("--no-cribo")
        proc = subprocess.run(cmd, env=child_env(threads), stdout=subprocess.PIPE,
                              stderr=None, text=True)
        data = None
        if os.path.exists(out):
            with open(out) as f:
                data = json.load(f)
        return proc.returncode, data, proc.stdout


def machine_record(args: argparse.Namespace) -> dict[str, Any]:
    import common  # noqa: PLC0415
    import numpy  # noqa: PLC0415
    rec: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": common.cpu_model(), "logical_cpus": os.cpu_count(),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "numpy": numpy.__version__, "numpy_blas": common.numpy_blas(),
        "git": common.git_info(), "argv": sys.argv[1:],
    }
    try:
        mem_kb = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0])
        rec["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        import torch  # noqa: PLC0415
        rec["torch"] = torch.__version__
        rec["torch_blas"] = ("mkl" if torch.backends.mkl.is_available() else "other")
        rec["torch_parallel_info"] = torch.__config__.parallel_info()
    except ImportError:
        rec["torch"] = None
    try:
        import importlib.metadata as md  # noqa: PLC0415
        rec["scipy_openblas32"] = md.version("scipy-openblas32")
    except Exception:  # noqa: BLE001
        pass
    if not args.no_cribo:
        try:
            cribo = import_cribo()
            rec["cribo"] = {"version": getattr(cribo, "__version__", None),
                            "file": getattr(cribo, "__file__", None)}
        except ImportError as e:
            rec["cribo"] = {"error": str(e)}
    return rec


def fmt_ms(t: dict[str, Any] | None) -> str:
    if not t:
        return "—"
    m = t["median_ms"]
    p = 1 if m >= 100 else 2 if m >= 1 else 3
    return f"{m:.{p}f} ± {t['iqr_ms']:.{p}f}"


def fmt_mib(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x / 1024:.2f} GiB" if abs(x) >= 1024 else f"{x:.0f} MiB"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| operator | threads | torch ms | numpy ms | cribo ms | torch/cribo | numpy/cribo "
             "| extra memory (peak RSS, 1 call) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tm = r["timings"]
        label = r["name"]
        mem = r.get("memory") or {}
        mem_s = " / ".join(f"{i} {fmt_mib(mem[i].get('extra_peak_mib'))}"
                           for i in IMPLS if i in mem and "extra_peak_mib" in mem[i])
        ratios = r.get("ratios", {})
        bad = [i for i, v in r["validation"].items() if not v.get("ok")]
        cribo_ms = fmt_ms(tm.get("cribo")) if "cribo" not in bad else "INVALID"
        torch_ms = fmt_ms(tm.get("torch")) if "torch" not in bad else "INVALID"

        def ratio(k: str) -> str:
            v = ratios.get(k)
            return f"{v:.1f}x" if v is not None else "—"

        lines.append(f"| {label} | {r['threads']} | {torch_ms} | {fmt_ms(tm.get('numpy'))} | "
                     f"{cribo_ms} | {ratio('torch/cribo')} | {ratio('numpy/cribo')} | "
                     f"{mem_s or '—'} |")
    return "\n".join(lines)


def main() -> int:
    args = get_args_parser().parse_args()
    ops = parse_only(args.only)

    # ---------------- internal modes (fresh processes) ----------------
    if args._worker or args._probe:
        if len(args.threads) != 1:
            raise SystemExit("run.py: internal modes take one --threads value")
        try:
            res = run_worker(args._worker, args) if args._worker else run_probe(args._probe, args)
            rc = 0
        except Exception as e:  # noqa: BLE001 - reported to the parent, non-zero exit
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
            rc = 1
        with open(args._out, "w") as f:
            json.dump(res, f, default=str)
        return rc

    # ---------------- parent ----------------
    if any(t < 1 for t in args.threads):
        raise SystemExit(f"run.py: --threads must be >= 1, got {args.threads}")
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise SystemExit("run.py: torch is required for the torch baseline "
                         "(pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)")
    if not args.no_cribo:
        try:
            import_cribo()
        except ImportError as e:
            raise SystemExit(f"run.py: cannot import cribo ({e}); build it with `pip install -e .` "
                             "or pass --no-cribo to run the baselines only")

    t_start = time.perf_counter()
    meta = machine_record(args)
    S = sizes(args.quick)
    result: dict[str, Any] = {"meta": meta, "sizes": asdict(S), "methodology": METHODOLOGY,
                              "rows": [], "threads": {}, "errors": []}
    import numpy_baseline  # noqa: PLC0415
    import torch_baseline  # noqa: PLC0415
    result["implementations"] = {"torch": torch_baseline.describe(),
                                 "numpy": numpy_baseline.describe(),
                                 "cribo": "cribo public API (cribo.cluster, pool/pool_backward, "
                                          "ObjectQueue.match/push, cribo_losses)"}
    failed = False
    for t in args.threads:
        for op in ops:
            log(f"== {op}, {t} thread(s) ==")
            rc, data, _ = spawn(["--_worker", op], t, args)
            if rc != 0 or not data or "rows" not in data:
                err = (data or {}).get("error", f"worker exited with {rc}")
                result["errors"].append({"operator": op, "threads": t, "error": err})
                log(f"[{op} t={t}] WORKER FAILED: {err}")
                failed = True
                continue
            result["threads"][str(t)] = data["threads"]
            for row in data["rows"]:
                tm = row["timings"]
                row["ratios"] = {}
                if "cribo" in tm:
                    for base in ("torch", "numpy"):
                        if base in tm:
                            row["ratios"][f"{base}/cribo"] = tm[base]["median_ms"] / tm["cribo"]["median_ms"]
                if any(not v.get("ok") for v in row["validation"].values()):
                    failed = True
                row["memory"] = {}
                result["rows"].append(row)
            if not args.no_memory and t == args.threads[0]:
                impls = ["torch", "numpy"] + ([] if args.no_cribo else ["cribo"])
                main_row = next(r for r in result["rows"] if r["operator"] == op
                                and r["threads"] == t)  # the first row: the main case
                for impl in impls:
                    v = main_row["validation"].get(impl, {"ok": True})
                    if not v.get("ok"):
                        continue
                    prc, pdata, _ = spawn(["--_probe", f"{op}:{impl}"], t, args)
                    if prc != 0 or not pdata or "error" in pdata:
                        main_row["memory"][impl] = {"error": (pdata or {}).get("error", prc)}
                        failed = True
                    else:
                        main_row["memory"][impl] = pdata
                        log(f"[{op} t={t}] {impl}: peak extra "
                            f"{fmt_mib(pdata['extra_peak_mib'])} ({pdata['method']})")
    result["wall_s"] = time.perf_counter() - t_start
    md = table(result["rows"])
    result["table_markdown"] = md
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print()
    print(f"cribo benchmarks — {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs, "
          f"numpy {meta['numpy']}, torch {meta.get('torch')}, git {meta['git']['sha'][:12]}"
          f"{' (dirty)' if meta['git'].get('dirty') else ''}"
          f"{' — QUICK sizes' if args.quick else ''}")
    print("times: median ± IQR over repeats after warm-up; ratios of medians (>1: cribo faster)")
    loads = [x for r in result["rows"] for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    if loads:
        result["loadavg_1min_range"] = [min(loads), max(loads)]
        print(f"1-min load average before/after each row: {min(loads):.2f} .. {max(loads):.2f} "
              f"on {meta['logical_cpus']} CPUs (includes this run; much above the thread "
              "count means other processes competed)")
    if not args.no_memory:
        print(f"extra memory: peak RSS above the pre-call RSS during one call, fresh process, "
              f"probed at threads={args.threads[0]} only")
    print()
    print(md)
    print()
    for e in result["errors"]:
        print(f"ERROR {e['operator']} threads={e['threads']}: {e['error']}")
    for r in result["rows"]:
        for impl, v in r["validation"].items():
            if not v.get("ok"):
                print(f"NOT TIMED {r['operator']} threads={r['threads']} {impl}: {v['error']}")
    print(f"wrote {args.json} ({result['wall_s']:.0f} s)")
    return 1 if failed else 0


METHODOLOGY = {
    "process": "one fresh worker process per operator x thread count (memory freed between "
               "benchmarks); inputs from fixed seeds",
    "validation": "torch and cribo outputs checked against the NumPy baseline before timing; "
                  "an implementation that fails is not timed and the run exits 1. cluster: "
                  "identical init passed to all; label agreement >= 0.999 after 1 outer "
                  "iteration and >= 0.98 after all, transport plans close on identical images; "
                  "pool: objects and token gradients; queue: neighbour indices (differences "
                  "only as float32 near-ties, cosine gap <= 1e-5), targets, similarities, "
                  "cycle masks, plus push semantics on a small queue; loss: values, gradients, "
                  "updated centres",
    "timing": "time.perf_counter around one call; warm-up calls (none when the validation call "
              "took > 2 s, which then served as warm-up), then repeats filling a per-case "
              "budget, at least 3; for a call slower than 5 s the validation call (same "
              "function, same inputs) is the first of the 3 samples; median and IQR (q3 - q1) "
              "in ms; gc between calls, untimed",
    "threads": "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS/MKL_NUM_THREADS/CRIBO_NUM_THREADS=t in "
               "the worker's "
               "environment before NumPy is imported (threadpoolctl additionally if installed), "
               "torch.set_num_threads(t), cribo.set_num_threads(t); the counts each loaded "
               "OpenBLAS reports are recorded under threads",
    "memory": "fresh process per operator x implementation, at the first thread count only "
              "(memory barely depends on it; this keeps the full run under 15 min): inputs and state "
              "built first (for the queue: numpy/torch hold the data arrays zero-copy, cribo "
              "its pushed copy, whose size is queue_state_mib), then VmRSS read, the kernel's "
              "peak-RSS counter reset (/proc/self/clear_refs = 5) and VmHWM read after ONE "
              "call; extra = peak - before. Counts every touched page (NumPy, torch, C "
              "mallocs), unlike tracemalloc",
}


if __name__ == "__main__":
    sys.exit(main())
