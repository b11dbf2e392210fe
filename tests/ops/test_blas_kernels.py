"""The BLAS-dependent tests under every OpenBLAS kernel (docs/guarantees.md).

cribo links the scipy-openblas32 wheel (cribo/_blas.py preloads it), an OpenBLAS
built for every x86-64 CPU that picks its kernels at load time -- or the ones
``OPENBLAS_CORETYPE`` names.  The kernels sum the terms of a dot product in
different orders, so a promise that holds under one kernel by luck fails under
another: "ties go to the lowest index" once held under SkylakeX and not under
Haswell.  This test re-runs, in a subprocess per kernel, every test of an
operator that calls sgemm or ssyrk -- the search and the queue
(test_queue), the clustering (test_cluster, ssyrk), soft pooling
(test_pool), their properties and float64 references (test_properties,
test_reference) and the evaluation vote -- plus the losses (no BLAS in the
kernel; their references use NumPy's).  First it checks that the setting really
changed the kernel cribo's OpenBLAS runs (its core name, which threadpoolctl
reports as ``architecture``), and that the search gives bitwise the same result
under every kernel, as docs/guarantees.md promises.

Kernels: unset (the CPU's own choice), Haswell (AVX2), SkylakeX (AVX-512, only
where /proc/cpuinfo lists avx512f: elsewhere its test id says it is skipped and
why) and Prescott (the generic SSE kernels; this OpenBLAS reports them as
"Katmai", an alias of the same kernel table).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cribo

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(TESTS))

BLAS_TESTS = [
    "tests/ops/test_queue.py",
    "tests/ops/test_cluster.py",
    "tests/ops/test_pool.py",
    "tests/ops/test_properties.py",
    "tests/ops/test_reference.py",
    "tests/ops/test_losses.py",
    "tests/evaluation/test_evaluate.py::test_vote_errors_and_chunking_do_not_change_the_result",
]

# Core names OpenBLAS reports for each forced kernel.
EXPECTED_CORE = {"Haswell": {"Haswell"}, "SkylakeX": {"SkylakeX"},
                 "Prescott": {"Prescott", "Katmai"}}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _kernel(name, flag):
    """A parameter; where the CPU lacks the kernel's instructions the id says so."""
    if flag is None or flag in _cpu_flags():
        return pytest.param(name, id=name or "unset")
    reason = f"this CPU has no {flag} (not in /proc/cpuinfo flags)"
    return pytest.param(name, id=f"{name}-skipped-no-{flag}-on-this-cpu",
                        marks=pytest.mark.skip(reason=reason))


KERNELS = [_kernel(None, None), _kernel("Haswell", "avx2"), _kernel("SkylakeX", "avx512f"),
           _kernel("Prescott", "pni")]


def openblas_core() -> str:
    """The core name of the OpenBLAS cribo links (scipy-openblas32), via its own API."""
    import scipy_openblas32
    path = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")
    fn = ctypes.CDLL(path).scipy_openblas_get_corename
    fn.restype = ctypes.c_char_p
    return fn().decode()


def threadpoolctl_core() -> str | None:
    """What threadpoolctl reports as the architecture of the same library (None
    where threadpoolctl is not installed)."""
    try:
        import scipy_openblas32
        import threadpoolctl
    except ImportError:
        return None
    lib_dir = os.path.realpath(scipy_openblas32.get_lib_dir())
    for info in threadpoolctl.threadpool_info():
        if os.path.realpath(info.get("filepath", "")).startswith(lib_dir):
            return info.get("architecture")
    return "(not found by threadpoolctl)"


def search_digest() -> str:
    """sha256 of the search's results on the adversarial banks of test_queue,
    with and without exclusion, on 1 and 2 threads."""
    sys.path.insert(0, TESTS)
    from test_queue import _adversarial, _adversarial_queries

    h = hashlib.sha256()
    rng = np.random.default_rng(2024)
    bank, base = _adversarial(rng)
    q = _adversarial_queries(rng, base)
    qids, bids = rng.integers(0, 3, len(q)), rng.integers(0, 3, len(bank))
    for t in (1, 2):
        with cribo.num_threads(t):
            for k, ids in ((1, {}), (40, {}), (40, dict(query_ids=qids, bank_ids=bids))):
                idx, sim = cribo.topk_cosine(q, bank, k, **ids)
                h.update(idx.tobytes())
                h.update(sim.tobytes())
    return h.hexdigest()


PROBE = f"""
import json, sys
sys.path[:0] = [{TESTS!r}, {os.path.dirname(TESTS)!r}]  # this folder; tests/ (reference)
import test_blas_kernels as t
print(json.dumps(dict(core=t.openblas_core(), threadpoolctl=t.threadpoolctl_core(),
                      search=t.search_digest())))
"""


def _env(kernel):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    if kernel is not None:
        env["OPENBLAS_CORETYPE"] = kernel
    env["CRIBO_NUM_THREADS"] = "2"
    return env


@pytest.fixture(scope="module")
def here():
    """This process's kernel and search digest (whatever OPENBLAS_CORETYPE it has)."""
    return dict(core=openblas_core(), search=search_digest())


@pytest.mark.parametrize("kernel", KERNELS)
def test_blas_dependent_tests_pass_under_kernel(kernel, here):
    env = _env(kernel)
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    if kernel is not None:
        assert info["core"] in EXPECTED_CORE[kernel], (
            f"OPENBLAS_CORETYPE={kernel} gave the {info['core']} kernel: the setting did not "
            "take effect, so this run would not test that kernel")
    if info["threadpoolctl"] is not None:
        assert info["threadpoolctl"] == info["core"], info
    # The search is exact by construction: the same bits under every kernel.
    assert info["search"] == here["search"], (
        f"the search differs between the {here['core']} and {info['core']} kernels")

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "not slow", *BLAS_TESTS], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert run.returncode == 0 and " passed" in last and "failed" not in last, (
        f"under the {info['core']} kernel (OPENBLAS_CORETYPE={kernel}):\n{out[-6000:]}")
