"""Smoke test of the benchmark suite: `benchmarks/run.py --quick --threads 1`
validates cribo against the NumPy baseline (and the torch baseline against it)
and must exit 0 with a JSON record of all four operators. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~1 min: a dozen fresh processes, each importing torch
def test_run_quick_writes_all_operators(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--threads", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert {r["operator"] for r in res["rows"]} == {"cluster", "pool", "queue", "loss"}
    assert not res["errors"]
    for row in res["rows"]:
        assert all(v["ok"] for v in row["validation"].values()), row["validation"]
        assert set(row["timings"]) == {"torch", "numpy", "cribo"}, row["name"]
        assert row["timings"]["cribo"]["median_ms"] > 0
    assert res["meta"]["cpu_model"] and res["meta"]["git"]["sha"]


def _gpu_check(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_gpu_check_compares_each_torch_operator_with_the_c_core_on_cpu():
    proc = _gpu_check("--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [x.split() for x in proc.stdout.splitlines() if x.startswith("  ")]
    assert [x[1] for x in lines] == ["cluster", "pool", "topk_cosine", "softmax_cross_entropy"]
    assert all(x[0] == "OK" for x in lines), proc.stdout


def test_gpu_check_runs_as_is_on_any_machine():
    """Without a GPU it says so and exits 0; with one it checks the GPU."""
    import torch

    proc = _gpu_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if torch.cuda.is_available():
        assert proc.stdout.count("  OK ") == 4, proc.stdout
    else:
        assert "no CUDA device here" in proc.stdout
