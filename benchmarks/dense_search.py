"""Throughput of the dense-evaluation search against the machine's sgemm (issue 4).

    python benchmarks/dense_search.py            # 20 images x 196 patches vs 10^6 x 384, ~2 min
    python benchmarks/dense_search.py --full     # 200 images (the issue's figure; ~10x longer)

Issue 4 asks that "dense evaluation of 200 validation images against a bank of
10^6 patches runs in the C search at >= 50% of the machine's sgemm
throughput".  This measures ``cribo.topk_cosine`` (the search
``cribo.evaluation.knn_vote`` calls) on M = images x patches queries against a
Q x d bank, as GFLOP/s = 2 M Q d / time, and NumPy's sgemm at the same thread
count (threadpoolctl limits NumPy's BLAS) on a large block of the same inner
width d, and prints the ratio.

What the C search does besides the gemm: it copies each 1024-row bank block
and each 1024-row query chunk L2-normalised before its sgemm (norms in double),
scans each similarity row for the top k (skipping rows whose maximum plus the
gemm's error bound cannot reach the current k-th) and re-scores the rows that
can with a fixed-order double dot product (the ranking is exact and the same on
every BLAS kernel).  Those copies, scans and re-scores are counted as overhead:
the flop count is the gemm's alone.

The default run uses 20 validation images' worth of queries: the throughput
per flop does not depend on M beyond a few thousand queries (every 1024 x 1024
tile is the same gemm), and 200 images would take ~10 minutes at 1 and 2
threads on a 2-core machine; ``--full`` runs them.  The bank is 10^6 x 384
float32 (1.5 GB); where that (plus the queries) does not fit in half the
available memory or ``--max-gb``, the largest bank that does is used and the
output says so.

Inputs are seeded: bank rows are noisy copies of 64 random centres (clustered,
like real patch features), queries likewise.  Before timing, the top-k of the
first queries is checked against a float64 NumPy reference; a wrong result is
never timed.  Output: a table and one JSON document (``--json``, default
``benchmarks/dense_search.json``) with the machine, versions, git state and,
per thread count, the median and IQR of the times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

import common  # benchmarks/common.py: the suite's machine record (CPU model, git state)

REPO = common.REPO_ROOT


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=20, help="validation images (queries / patches)")
    p.add_argument("--full", action="store_true", help="200 images, the issue's configuration")
    p.add_argument("--patches", type=int, default=196, help="patches per image (ViT-S/16, 224 px)")
    p.add_argument("--bank", type=int, default=1_000_000, help="bank rows Q")
    p.add_argument("--dim", type=int, default=384, help="feature width d")
    p.add_argument("--k", type=int, default=30, help="neighbours")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1 and all usable cores)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of the search per count")
    p.add_argument("--gemm-seconds", type=float, default=2.0,
                   help="time budget of each NumPy sgemm measurement")
    p.add_argument("--max-gb", type=float, default=4.0, help="memory cap for bank + queries")
    p.add_argument("--seed", type=int, default=0, help="input seed")
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "dense_search.json"),
                   help="output file ('' for none)")
    return p


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _clustered(rng: np.random.Generator, centres: np.ndarray, n: int,
               chunk: int = 65536) -> np.ndarray:
    """(n, d) float32: random centres plus unit noise, filled in chunks (bounded memory)."""
    d = centres.shape[1]
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        out[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] += centres[rng.integers(0, len(centres), e - s)]
    return out


def _validate(topk: Callable, queries: np.ndarray, bank: np.ndarray, k: int) -> float:
    """Top-k of 32 queries vs a float64 reference; returns the largest similarity error."""
    q = queries[:32].astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best = np.full((len(q), k), -np.inf)                         # running top-k similarities
    for s in range(0, len(bank), 131072):
        b = bank[s:s + 131072].astype(np.float64)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        cand = np.concatenate([best, q @ b.T], axis=1)
        best = np.take_along_axis(cand, np.argpartition(-cand, k - 1, axis=1)[:, :k], 1)
    ref = -np.sort(-best, axis=1)
    _, sim = topk(queries[:32], bank, k)
    err = float(np.abs(sim.astype(np.float64) - ref).max())
    if err > 1e-4:
        raise SystemExit(f"dense_search: cribo.topk_cosine disagrees with the reference "
                         f"(max similarity error {err:.2e}); refusing to time it")
    return err


def _time(fn: Callable[[], Any], repeats: int) -> List[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _gemm_rate(a: np.ndarray, b: np.ndarray, seconds: float) -> Dict[str, float]:
    """GFLOP/s of ``a @ b.T`` into a preallocated output, median over a time budget."""
    out = np.empty((a.shape[0], b.shape[0]), np.float32)
    np.matmul(a, b.T, out=out)                                   # warm-up
    times: List[float] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 3:
        t = time.perf_counter()
        np.matmul(a, b.T, out=out)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"gflops": 2.0 * a.shape[0] * b.shape[0] * a.shape[1] / med / 1e9,
            "median_s": med, "runs": len(times)}


def main(argv: List[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.full:
        a.images = 200
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = ([int(t) for t in a.threads.split(",")] if a.threads
               else sorted({1, int(cores or 1)}))

    from threadpoolctl import threadpool_info, threadpool_limits

    import cribo

    M, d, k = a.images * a.patches, a.dim, a.k
    q_bytes = M * d * 4
    budget = min(0.5 * _available_bytes(), a.max_gb * 2**30)
    Q = a.bank
    note = None
    if Q * d * 4 + q_bytes > budget:
        Q = int((budget - q_bytes) // (d * 4))
        note = (f"a {a.bank} x {d} float32 bank ({a.bank * d * 4 / 2**30:.2f} GiB) plus the "
                f"queries does not fit in {budget / 2**30:.2f} GiB (half the available memory "
                f"or --max-gb); using the largest that does, {Q} rows")
        print("note:", note)
    if Q < k:
        raise SystemExit("dense_search: not enough memory for a bank of k rows")

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average before the run: {load[0]:.2f} on {cores} core(s) "
              "(other processes' load lowers every figure below)")
    rng = np.random.default_rng(a.seed)
    centres = 2.0 * rng.standard_normal((64, d)).astype(np.float32)
    t = time.perf_counter()
    bank = _clustered(rng, centres, Q)
    queries = _clustered(rng, centres, M)
    print(f"inputs: {M} queries ({a.images} images x {a.patches} patches) vs a {Q} x {d} bank "
          f"({Q * d * 4 / 2**30:.2f} GiB), k={k}; made in {time.perf_counter() - t:.1f} s")
    err = _validate(cribo.topk_cosine, queries, bank, k)
    print(f"validated against float64 NumPy: max similarity error {err:.1e}")

    flops = 2.0 * M * Q * d
    records = []
    for T in threads:
        cribo.set_num_threads(T)
        with threadpool_limits(limits=T, user_api="blas"):
            big = _gemm_rate(queries[:min(M, 4096)], bank[:16384], a.gemm_seconds)
            with threadpool_limits(limits=1, user_api="blas"):
                tile = _gemm_rate(queries[:1024], bank[:1024], a.gemm_seconds / 2)
            times = _time(lambda: cribo.topk_cosine(queries, bank, k), a.repeats)
        med = float(np.median(times))
        q25, q75 = (float(v) for v in np.percentile(times, [25, 75]))
        rate = flops / med / 1e9
        rec = {"threads": T, "search_median_s": med, "search_iqr_s": [q25, q75],
               "search_times_s": times, "search_gflops": rate,
               "numpy_sgemm": {"shape": [min(M, 4096), 16384, d], **big},
               "numpy_sgemm_tile_1thread": {"shape": [1024, 1024, d], **tile},
               "ratio_vs_numpy_sgemm": rate / big["gflops"],
               "ratio_vs_tile_x_threads": rate / (T * tile["gflops"])}
        records.append(rec)
        print(f"threads {T}: search {med:7.2f} s = {rate:7.1f} GFLOP/s | NumPy sgemm "
              f"{big['gflops']:7.1f} GFLOP/s (ratio {rec['ratio_vs_numpy_sgemm']:.2f}) | "
              f"1024x1024 tile on 1 thread {tile['gflops']:6.1f} GFLOP/s x {T} "
              f"(ratio {rec['ratio_vs_tile_x_threads']:.2f})")

    doc = {"benchmark": "dense_search", "M": M, "images": a.images, "patches": a.patches,
           "Q": Q, "Q_requested": a.bank, "d": d, "k": k, "gflop_per_search": flops / 1e9,
           "note": note, "results": records,
           "machine": {"cpu": common.cpu_model(), "cores": cores, "platform": platform.platform(),
                       "load_average_before": list(load) if load is not None else None},
           "versions": {"python": platform.python_version(), "numpy": np.__version__,
                        "cribo": cribo.__version__,
                        "blas": [{k2: v for k2, v in i.items()
                                  if k2 in ("internal_api", "version", "filepath",
                                            "architecture")}
                                 for i in threadpool_info() if i.get("user_api") == "blas"]},
           "git": common.git_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
