"""The main job end to end at tiny sizes: `cribo pretrain` trains, evaluates against
the untrained floor and writes the report; `cribo ablate` refuses unknown variants."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from test_train import TINY  # noqa: E402

from cribo.evaluation.ablate import run_ablation  # noqa: E402
from cribo.cli.pretrain import main  # noqa: E402


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
    # TINY starts the object terms at epoch 0 (1-based: 1); the report says so.
    assert "cross-view object term from epoch 1, the cross-image term" not in md  # 1 epoch
    assert "the cross-view object term from epoch 1 (of 1)" in md
    # The views are drawn in their own colours: the scenes' palette is saturated
    # (a view wrongly de-normalised comes out grey-pink, spread < 60).
    from matplotlib.image import imread

    png = imread(rep / "clusters.png")[..., :3]
    spread = 255 * (png.max(-1) - png.min(-1))
    assert np.percentile(spread, 99) > 150
    usage = metrics["teacher head usage (collapse check)"]
    L = usage["output width L"]
    assert L == 64  # TINY's --out-dim
    for part in ("global", "objects"):
        assert 1.0 <= usage[f"{part}: effective outputs"] <= L + 1e-6
        assert 0.0 <= usage[f"{part}: mean entropy"] <= np.log(L) + 1e-9
        # the average distribution is at least as spread as a single one (concavity)
        assert np.log(usage[f"{part}: effective outputs"]) >= usage[f"{part}: mean entropy"] - 1e-9


def test_ablate_rejects_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        run_ablation(["full", "no_such_variant"], [0], str(tmp_path))


def test_ablation_table_pairs_seeds_and_resumes_without_retraining(tmp_path, monkeypatch):
    import cribo.train.loop

    common = TINY + ["--epochs", "1", "--batch-size", "16", "--eval-train-images", "6",
                     "--eval-val-images", "4", "--eval-k", "5"]
    table = run_ablation(["full", "global_only"], [0, 1], str(tmp_path), common)
    raw = {name: {s: json.load(open(tmp_path / f"{name}-seed{s}" / "eval.json"))
                  for s in (0, 1)} for name in ("full", "global_only")}
    floor = {s: json.load(open(tmp_path / f"floor-seed{s}.json")) for s in (0, 1)}
    for key in ("retrieval_miou", "retrieval_fg_iou", "probe_miou"):
        for name in raw:
            vals = [raw[name][s][key] for s in (0, 1)]
            assert table["variants"][name][key]["mean"] == pytest.approx(sum(vals) / 2)
            assert table["variants"][name][key]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2)
            gains = [raw[name][s][key] - floor[s][key] for s in (0, 1)]
            assert table["gain"][name][key]["mean"] == pytest.approx(sum(gains) / 2)
        lead = [raw["full"][s][key] - raw["global_only"][s][key] for s in (0, 1)]
        assert table["full_minus"]["global_only"][key]["mean"] == pytest.approx(sum(lead) / 2)
    md = (tmp_path / "ablation.md").read_text()
    assert "untrained floor" in md and "Full CrIBo minus" in md
    g = table["gain"]["global_only"]["retrieval_miou"]
    assert f"| global_only | 2 | {100 * g['mean']:.1f} ± {100 * g['std']:.1f} |" in md
    assert (tmp_path / "ablation.png").stat().st_size > 0

    def no_training(cfg):
        raise AssertionError("a finished (variant, seed) was trained again")

    monkeypatch.setattr(cribo.train.loop, "train", no_training)
    again = run_ablation(["full", "global_only"], [0, 1], str(tmp_path), common)
    assert again == json.loads(json.dumps(table))
    # --table-only combines what is there and trains nothing (K8 never ran).
    from cribo.cli.ablate import main as ablate_main

    assert ablate_main(["--variants", "full,K8", "--seeds", "0", "1", "2", "--table-only",
                        "--output-dir", str(tmp_path)]) == 0
    combined = json.load(open(tmp_path / "ablation.json"))
    assert list(combined["variants"]) == ["full"]
    assert combined["variants"]["full"] == json.loads(json.dumps(table["variants"]["full"]))
    assert ablate_main(["--variants", "K8", "--table-only", "--output-dir", str(tmp_path)]) == 1


def test_ablation_table_counts_seeds_and_shows_no_spread_for_one(tmp_path):
    from cribo.evaluation.ablate import _summarise, _write

    m = {"retrieval_miou": 0.25, "retrieval_fg_iou": 0.4, "probe_miou": 0.1, "probe_fg_iou": 0.02}
    m2 = {k: v + 0.01 for k, v in m.items()}
    m3 = {k: v + 0.0004 for k, v in m.items()}  # full minus K32 = -0.04 points
    rows = {"full": {0: m, 1: m2}, "K8": {0: m2}, "K32": {0: m3}}
    _write(_summarise(rows, {0: m, 1: m}), str(tmp_path))
    md = (tmp_path / "ablation.md").read_text()
    assert "| K32 | 1 | 0.0 | 0.0 | 0.0 | 0.0 |" in md and "-0.0" not in md
    assert "| full | 2 | 25.5 ± 0.5 | 40.5 ± 0.5 |" in md
    assert "| K8 | 1 | 26.0 | 41.0 | 11.0 | 3.0 |" in md
    assert "| untrained floor | 2 | 25.0 ± 0.0 |" in md
    assert "| K8 | 1 | -1.0 | -1.0 | -1.0 | -1.0 |" in md  # full minus K8, seed 0
