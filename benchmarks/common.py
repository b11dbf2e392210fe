"""Shared pieces of the benchmark suite: sizes, synthetic inputs, timing,
memory probes, tolerance checks and the machine record.

Nothing here imports torch or cribo; ``run.py`` decides what is imported and
when (NumPy's BLAS reads its thread count from the environment at import, so
the thread environment is set before NumPy is first imported).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================
# Sizes
# ============================================================================


@dataclass(frozen=True)
class Sizes:
    """Benchmark shapes. ``reference()`` is ViT-S/16 at 224 px on COCO (docs/method.md §6)."""

    # clustering and pooling
    B: int
    N: int
    d: int
    K: int
    n_iters: int
    sinkhorn_iters: int
    sinkhorn_lambda: float
    pos_weight: float
    # queue
    queue_images: int
    objects_per_image: int  # mean; actual counts vary in [mean/2, 3*mean/2]
    queue_dim: int
    n_queries: int
    push_images: int
    # losses
    L: int
    M_objects: int
    B_global: int
    # timing budget per implementation and case (seconds, after warm-up)
    budget_s: float
    min_repeats: int
    max_repeats: int

    @staticmethod
    def reference() -> "Sizes":
        return Sizes(B=32, N=196, d=384, K=64, n_iters=5, sinkhorn_iters=5,
                     sinkhorn_lambda=20.0, pos_weight=2.0,
                     queue_images=25_000, objects_per_image=32, queue_dim=384,
                     n_queries=1_000, push_images=32,
                     L=65_536, M_objects=1_000, B_global=32,
                     budget_s=4.0, min_repeats=3, max_repeats=30)

    @staticmethod
    def quick() -> "Sizes":
        """The reference's hyper-parameters at small shapes and a short timing budget."""
        return replace(Sizes.reference(), B=4, N=36, d=32, K=8,
                       queue_images=200, objects_per_image=8, queue_dim=32,
                       n_queries=50, push_images=4,
                       L=512, M_objects=40, B_global=4,
                       budget_s=0.05, max_repeats=5)


# ============================================================================
# Synthetic inputs (fixed seeds)
# ============================================================================


def make_scene_views(seed: int, B: int, N: int, d: int,
                     n_objects: int = 8, noise: float = 0.6
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Two random-resized-crop views of B synthetic scenes, as token features.

    Each scene is a 448x448 image holding ``n_objects`` discs on a background;
    every region has its own random prototype in R^d. A view is a crop of
    area scale U(0.25, 1) and aspect ratio log-U(3/4, 4/3), flipped with
    probability 0.5 (docs/method.md §1); a token is the prototype of the region under its
    patch centre plus Gaussian noise, and its position is the patch centre in
    the original image's frame. This gives the clustering realistic structure
    (semantic regions that are spatially compact, shared across the views)
    instead of pure noise full of near-ties.

    Returns:
        tokens (B, 2, N, d) float32 and positions (B, 2, N, 2) float32 (x, y).
    """
    rng = np.random.default_rng(seed)
    S = int(round(np.sqrt(N)))
    if S * S != N:
        raise ValueError(f"make_scene_views: N must be a square, got {N}")
    H = W = 448.0
    tokens = np.empty((B, 2, N, d), np.float32)
    positions = np.empty((B, 2, N, 2), np.float32)
    grid = (np.arange(S) + 0.5) / S
    for b in range(B):
        protos = rng.standard_normal((n_objects + 1, d)).astype(np.float32)
        cx = rng.uniform(0, W, n_objects)
        cy = rng.uniform(0, H, n_objects)
        rad = rng.uniform(40, 150, n_objects)
        for v in range(2):
            area = rng.uniform(0.25, 1.0) * H * W
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = min(W, np.sqrt(area * ratio))
            h = min(H, np.sqrt(area / ratio))
            top = rng.uniform(0, H - h)
            left = rng.uniform(0, W - w)
            flip = rng.random() < 0.5
            gx = grid[::-1] if flip else grid
            xs = left + gx * w
            ys = top + grid * h
            X, Y = np.meshgrid(xs, ys)  # row-major patches: (S, S)
            X, Y = X.ravel(), Y.ravel()
            region = np.zeros(N, np.int64)
            for o in range(n_objects):  # later discs are drawn on top
                inside = (X - cx[o]) ** 2 + (Y - cy[o]) ** 2 <= rad[o] ** 2
                region[inside] = o + 1
            tokens[b, v] = protos[region] + noise * rng.standard_normal((N, d)).astype(np.float32)
            positions[b, v, :, 0] = X
            positions[b, v, :, 1] = Y
    return tokens, positions


def make_init(seed: int, B: int, N: int, K: int) -> np.ndarray:
    """(B, K) int64 distinct indices into each image's 2N joint tokens."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(2 * N, size=K, replace=False) for _ in range(B)]).astype(np.int64)


def make_queue_data(seed: int, n_images: int, mean_objects: int, d: int, n_queries: int,
                    n_protos: int = 4096) -> dict[str, np.ndarray]:
    """A full object queue (newest first) and a batch of query objects.

    Queue entries are random prototypes plus uniform noise (uniform because
    drawing ~600M normal variates takes seconds), view 2 a noisy copy of
    view 1 (the same object seen twice). Half the queries are fresh noisy
    copies of random queue entries (so nearest neighbours and cycle checks
    are meaningful), the other half fresh random objects.

    Returns dict with q (2, R, d) float32 (view 1, view 2; R = sum(counts)),
    counts (n_images,) int64, t1, t2 (n_queries, d) float32.
    """
    rng = np.random.default_rng(seed)
    lo, hi = max(0, mean_objects // 2), mean_objects + mean_objects // 2
    counts = rng.integers(lo, hi + 1, n_images).astype(np.int64)
    R = int(counts.sum())
    protos = rng.standard_normal((n_protos, d), dtype=np.float32)
    q = np.empty((2, R, d), np.float32)
    chunk = 65536
    for s in range(0, R, chunk):
        e = min(R, s + chunk)
        rng.random(out=q[0, s:e], dtype=np.float32)
        q[0, s:e] -= 0.5
        q[0, s:e] *= 2.8  # uniform noise with std ~0.8
        q[0, s:e] += protos[rng.integers(0, n_protos, e - s)]
        rng.random(out=q[1, s:e], dtype=np.float32)
        q[1, s:e] -= 0.5
        q[1, s:e] *= 1.0  # std ~0.3
        q[1, s:e] += q[0, s:e]
    half = n_queries // 2
    src = rng.choice(R, size=half, replace=False)
    t1 = np.empty((n_queries, d), np.float32)
    t2 = np.empty((n_queries, d), np.float32)
    t1[:half] = q[0, src] + 0.3 * rng.standard_normal((half, d), dtype=np.float32)
    t2[:half] = q[1, src] + 0.3 * rng.standard_normal((half, d), dtype=np.float32)
    rest = n_queries - half
    t1[half:] = rng.standard_normal((rest, d), dtype=np.float32)
    t2[half:] = t1[half:] + 0.3 * rng.standard_normal((rest, d), dtype=np.float32)
    perm = rng.permutation(n_queries)
    return {"q": q, "counts": counts, "t1": t1[perm], "t2": t2[perm]}


def make_push_batch(seed: int, n_images: int, mean_objects: int, d: int) -> dict[str, np.ndarray]:
    """One training batch to push: objects (M, d) per view and counts (B,)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(mean_objects // 2, mean_objects + mean_objects // 2 + 1,
                          n_images).astype(np.int64)
    M = int(counts.sum())
    o1 = rng.standard_normal((M, d), dtype=np.float32)
    o2 = o1 + 0.3 * rng.standard_normal((M, d), dtype=np.float32)
    return {"o1": o1, "o2": o2, "counts": counts}


def make_loss_inputs(seed: int, B: int, M: int, L: int) -> dict[str, Any]:
    """Head outputs for the three CrIBo losses (docs/method.md §5), float32.

    Teacher rows are correlated with the student rows (a half-trained
    network), scaled like the logits of a weight-normalised DINO head.
    """
    rng = np.random.default_rng(seed)

    def logits(shape: tuple[int, ...]) -> np.ndarray:
        # uniform with std 3 (drawing ~800M normal variates would take ~8 s)
        x = rng.random(shape, dtype=np.float32)
        x -= 0.5
        x *= np.float32(3.0 * np.sqrt(12.0))
        return x

    sg = logits((2, B, L))
    tg = sg[::-1] + logits((2, B, L))  # teacher view i ~ student view 3-i
    so = logits((2, M, L))
    to = so[::-1] + logits((2, M, L))
    tn = to + logits((2, M, L))
    mask1 = rng.random(M) < 0.6
    mask2 = rng.random(M) < 0.4
    cg = 0.1 * rng.standard_normal(L, dtype=np.float32)
    co = 0.1 * rng.standard_normal(L, dtype=np.float32)
    return {"student_global": np.ascontiguousarray(sg), "teacher_global": np.ascontiguousarray(tg),
            "student_objects": np.ascontiguousarray(so), "teacher_objects": np.ascontiguousarray(to),
            "teacher_neighbours": np.ascontiguousarray(tn), "mask1": mask1, "mask2": mask2,
            "center_global": cg, "center_objects": co}


LOSS_HPARAMS = {"student_temp": 0.1, "teacher_temp": 0.04, "teacher_temp_objects": 0.07,
                "weights": (1.0, 1.0, 1.0), "center_momentum": 0.9}


# ============================================================================
# What the baselines return (NumPy arrays or torch tensors; run.py compares
# them with cribo's results field by field)
# ============================================================================


@dataclass
class Match:
    """``ObjectQueue.match``: per query, the queue row each view matched, the
    two cycle checks, the matched rows and their cosine similarities."""

    index1: Any  # (M,) int64
    index2: Any  # (M,) int64
    mask1: Any  # (M,) bool
    mask2: Any  # (M,) bool
    targets1: Any  # (M, d) float32
    targets2: Any  # (M, d) float32
    similarity1: Any  # (M,) float32
    similarity2: Any  # (M,) float32


MATCH_FIELDS = tuple(f.name for f in fields(Match))


@dataclass
class CriboLosses:
    """``cribo_losses``: the three losses, their weighted total, the gradients
    w.r.t. the student logits and the updated centres."""

    total: float
    global_: float
    objects: float
    neighbours: float
    grad_global: Any  # (2, B, L)
    grad_objects: Any  # (2, M, L)
    center_global: Any  # (L,)
    center_objects: Any  # (L,)


# ============================================================================
# Timing
# ============================================================================


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    repeats: int
    warmup: int
    times_ms: list[float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def time_fn(fn: Callable[[], Any], *, warmup: int, budget_s: float, min_repeats: int,
            max_repeats: int, setup: Callable[[], Any] | None = None,
            prior_ms: list[float] | None = None) -> Timing:
    """Median/IQR of ``fn()`` wall time in ms.

    Up to ``warmup`` untimed calls first (only one if it takes > 2 s); then as many timed calls as fit in
    ``budget_s`` (estimated from the last warm-up), clamped to
    [min_repeats, max_repeats]. ``setup`` (untimed) runs before every call.
    Results are dropped and garbage collected outside the timed region.
    ``prior_ms``: samples already taken of exactly this call (the validation
    call of a slow implementation); they count towards the repeats.
    """
    last = 0.0
    done = 0
    while done < warmup and not (done and last > 2.0):  # one warm-up is enough for slow calls
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        out = fn()
        last = time.perf_counter() - t0
        del out
        gc.collect()
        done += 1
    times = list(prior_ms or [])
    if last <= 0 and times:
        last = times[-1] / 1e3
    n = min_repeats if last <= 0 else int(budget_s / last)
    n = max(min_repeats, min(max_repeats, n))
    for _ in range(n - len(times)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
        gc.collect()
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return Timing(median_ms=float(med), iqr_ms=float(q3 - q1), q1_ms=float(q1), q3_ms=float(q3),
                  min_ms=float(min(times)), repeats=len(times), warmup=done,
                  times_ms=[round(t, 4) for t in times])


# ============================================================================
# Memory: peak resident set size of this process (Linux)
# ============================================================================


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def _reset_hwm() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_extra(fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS above the pre-call RSS while ``fn()`` runs, in MiB.

    Method: read VmRSS, reset the kernel's peak-RSS counter (write "5" to
    /proc/self/clear_refs), call ``fn``, read VmHWM. This counts every page
    the process touches (NumPy, torch's allocator, C mallocs alike), which
    tracemalloc would not. Where the reset is not allowed, falls back to
    polling VmRSS from a thread every 0.5 ms (can miss a brief spike).
    """
    gc.collect()
    before = _status_kb("VmRSS")
    if _reset_hwm():
        out = fn()
        peak = _status_kb("VmHWM")
        method = "VmHWM after /proc/self/clear_refs reset"
    else:
        stop = threading.Event()
        seen = [before]

        def poll() -> None:
            while not stop.is_set():
                seen[0] = max(seen[0], _status_kb("VmRSS"))
                time.sleep(0.0005)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        out = fn()
        stop.set()
        th.join()
        peak = max(seen[0], _status_kb("VmRSS"))
        method = "VmRSS polled every 0.5 ms"
    del out
    gc.collect()
    after = _status_kb("VmRSS")
    return {"extra_peak_mib": (peak - before) / 1024.0, "rss_before_mib": before / 1024.0,
            "retained_mib": (after - before) / 1024.0, "method": method}


def rss_mib() -> float:
    return _status_kb("VmRSS") / 1024.0


# ============================================================================
# Validation helpers
# ============================================================================


class ValidationError(AssertionError):
    """An implementation disagrees with the NumPy baseline: do not time it."""


def check_close(name: str, got: np.ndarray, ref: np.ndarray, *, rtol: float,
                atol_rel: float) -> dict[str, float]:
    """|got - ref| <= atol + rtol*|ref| elementwise, atol = atol_rel * max|ref|.

    Returns the worst absolute and relative errors; raises ValidationError on
    a shape mismatch, a non-finite value or any element out of tolerance.
    """
    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        raise ValidationError(f"{name}: shape {got.shape} != reference {ref.shape}")
    g = got.astype(np.float64)
    r = ref.astype(np.float64)
    if not np.all(np.isfinite(g)):
        raise ValidationError(f"{name}: non-finite values")
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    atol = atol_rel * scale
    err = np.abs(g - r)
    bad = err > atol + rtol * np.abs(r)
    max_abs = float(err.max()) if err.size else 0.0
    if np.any(bad):
        i = np.unravel_index(int(np.argmax(err - rtol * np.abs(r))), err.shape)
        raise ValidationError(
            f"{name}: {int(bad.sum())}/{bad.size} elements out of tolerance "
            f"(rtol={rtol}, atol={atol:.3g}); worst at {tuple(int(x) for x in i)}: "
            f"got {g[i]!r}, ref {r[i]!r}")
    return {"max_abs_err": max_abs, "ref_scale": scale}


# ============================================================================
# Machine record
# ============================================================================


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha or "none", "dirty": bool(status) if status is not None else None}


def loaded_openblas() -> list[dict[str, Any]]:
    """Every OpenBLAS loaded in this process, with its version string and the
    thread count it will use (queried through ctypes), e.g. NumPy's bundled
    scipy-openblas64 and the scipy-openblas32 that cribo links."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
        libs = sorted(p for p in paths
                      if ".so" in p and "openblas" in os.path.basename(p).lower())
    except OSError:
        return out
    for path in libs:
        if not os.path.exists(path):
            continue
        rec: dict[str, Any] = {"path": path}
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            rec["error"] = str(e)
            out.append(rec)
            continue
        config = _call_first(lib, "get_config", ctypes.c_char_p)
        if config is not None:
            rec["config"] = config.decode(errors="replace")
        n_threads = _call_first(lib, "get_num_threads", ctypes.c_int)
        if n_threads is not None:
            rec["num_threads"] = int(n_threads)
        out.append(rec)
    return out


def _call_first(lib: ctypes.CDLL, name: str, restype: Any) -> Any:
    """``openblas_<name>()`` under the first of its exported spellings (the
    scipy-openblas wheels prefix ``scipy_``, 64-bit builds suffix ``64_``) with
    the given return type; None where the library has none of them."""
    for sym in (f"scipy_openblas_{name}64_", f"scipy_openblas_{name}",
                f"openblas_{name}64_", f"openblas_{name}"):
        fn = getattr(lib, sym, None)
        if fn is not None:
            fn.restype = restype
            return fn()
    return None


def numpy_blas() -> dict[str, Any]:
    try:
        cfg = np.show_config(mode="dicts")  # type: ignore[call-arg]
        blas = cfg["Build Dependencies"]["blas"]
        return {"name": blas.get("name"), "version": blas.get("version")}
    except Exception:  # noqa: BLE001 - best effort record only
        return {}


THREAD_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                   "CRIBO_NUM_THREADS")
