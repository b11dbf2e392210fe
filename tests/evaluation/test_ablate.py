"""``cribo ablate``'s evaluation layer (:func:`cribo.evaluation.ablate.run_ablation`): unknown
variants refused, the table paired by seed and resumable, each variant scored with the
main job's settings, and the Markdown table's numbers."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from runs import TINY  # noqa: E402

from cribo.evaluation.ablate import run_ablation  # noqa: E402


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


def test_each_variant_and_its_floor_are_scored_with_the_main_jobs_settings(tmp_path,
                                                                             monkeypatch):
    """No copy of the evaluation options in ablate: it scores through
    job.evaluate_backbone, with job.evaluation_settings, and writes RunFolder's eval.json."""
    import cribo.evaluation.dense
    import cribo.evaluation.job
    import cribo.train.loop
    from cribo.evaluation import random_init_like
    from cribo.train.config import config_from_args
    from cribo.train.run_folder import RunFolder

    common = TINY + ["--batch-size", "16", "--eval-train-images", "5", "--eval-val-images",
                     "3", "--eval-k", "7", "--scene-size", "40"]
    vit = random_init_like(dict(img_size=32, patch_size=8, embed_dim=16, depth=1,
                                num_heads=1), seed=0)
    calls = []

    class Scores:
        miou, fg_iou = 0.5, 0.25

    def recorded(backbone, train_set, val_set, **kw):
        calls.append((backbone, len(train_set), len(val_set), kw))
        return Scores(), Scores()

    def no_training(cfg):  # as train() leaves it: the run folder
        os.makedirs(cfg.output_dir, exist_ok=True)

    monkeypatch.setattr(cribo.train.loop, "train", no_training)
    monkeypatch.setattr(cribo.evaluation.job, "teacher_backbone", lambda cfg: vit)
    monkeypatch.setattr(cribo.evaluation.dense, "dense_evaluation", recorded)
    run_ablation(["full"], [3], str(tmp_path), common)
    cfg = config_from_args(common + ["--seed", "3", "--output-dir", str(tmp_path / "full-seed3"),
                                     "--no-evaluate"])
    settings = cribo.evaluation.job.evaluation_settings(cfg)
    assert settings == dict(k=7, image_size=40, seed=3, progress=cfg.progress)
    assert len(calls) == 2                                   # the variant, then its floor
    assert calls[0][0] is vit and calls[1][0] is not vit
    for _, n_train, n_val, kw in calls:
        assert (n_train, n_val) == (5, 3)
        assert kw == dict(settings, keep_predictions=0)
    assert json.load(open(RunFolder(cfg.output_dir).eval)) == {
        "retrieval_miou": 0.5, "retrieval_fg_iou": 0.25, "probe_miou": 0.5, "probe_fg_iou": 0.25}
    assert json.load(open(tmp_path / "floor-seed3.json"))["probe_fg_iou"] == 0.25
