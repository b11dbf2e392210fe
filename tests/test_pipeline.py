"""The main job end to end at tiny sizes: `cribo pretrain` trains, evaluates against
the untrained floor and writes the report; `cribo ablate` refuses unknown variants."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from test_train import TINY  # noqa: E402

from cribo.ablate import run_ablation  # noqa: E402
from cribo.train import main  # noqa: E402


def test_pretrain_writes_a_report_with_floor_and_intervals(tmp_path, capsys):
    rc = main(TINY + ["--epochs", "1", "--batch-size", "16", "--output-dir", str(tmp_path),
                      "--eval-train-images", "12", "--eval-val-images", "6"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "retrieval mIoU" in out and "untrained" in out and "report:" in out
    rep = tmp_path / "report"
    for f in ("report.md", "report.html", "metrics.json", "curves.png", "clusters.png",
              "predictions.png"):
        assert (rep / f).exists() and (rep / f).stat().st_size > 0, f
    metrics = json.load(open(rep / "metrics.json"))
    flat = json.dumps(metrics)
    for name in ("retrieval mIoU", "retrieval fg/bg IoU", "linear probe mIoU"):
        assert name in flat
    md = (rep / "report.md").read_text()
    assert "floor" in md.lower() and "clusters.png" in md


def test_ablate_rejects_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        run_ablation(["full", "no_such_variant"], [0], str(tmp_path))
