"""The C kernels under AddressSanitizer + UBSan, without Python (docs/contributing.md, tests 7).

tests/ops/sanitize/build_and_run.sh compiles csrc/*.c (not the binding) with
tests/ops/sanitize/harness.c and runs it; the harness calls every kernel on random
data with exactly-sized buffers and checks invariants.  Skipped only where there
is no gcc.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sanitize", "build_and_run.sh")


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="needs gcc")
def test_kernels_are_clean_under_asan_and_ubsan(tmp_path):
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    env["BUILD_DIR"] = str(tmp_path)  # parallel runs never share a binary
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sanitizer harness failed ({proc.returncode}):\n{out[-6000:]}"
    assert "harness: all" in proc.stdout and "checks passed" in proc.stdout, out[-3000:]
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
        assert marker not in out, out[-6000:]
