"""The main job (cribo.evaluation.job): end to end at tiny sizes, `cribo pretrain` trains,
evaluates against the untrained floor and writes the report; its pieces: two views
encoded and clustered (the figures and the collapse check), the run's evaluation
settings, and checkpoints read through the one reader.  (`cribo ablate`: test_ablate.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from runs import TINY  # noqa: E402

import torch  # noqa: E402

from cribo.cli.pretrain import main  # noqa: E402
from cribo.evaluation.job import (encode_and_cluster, evaluate_backbone,  # noqa: E402
                                  evaluation_settings, teacher_backbone, teacher_usage)
from cribo.train.config import config_from_args  # noqa: E402
from cribo.train.build import build_models  # noqa: E402
from cribo.train.run_folder import RunFolder  # noqa: E402


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
    # Scores read as percentages with one decimal, their fractions stay in metrics.json.
    miou = metrics["retrieval mIoU"]
    assert 0.0 <= miou["value"] <= 1.0 and miou["unit"] == "%"
    row = next(line for line in md.splitlines() if line.startswith("| retrieval mIoU"))
    assert row.startswith("| retrieval mIoU (%) |") and f"{100 * miou['value']:.1f}" in row
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


def test_encode_and_cluster_is_cribo_cluster_on_the_tokens_of_two_geometric_views(tmp_path):
    from cribo import cluster
    from cribo.data import IMAGENET_MEAN, IMAGENET_STD, SyntheticScenes, TwoViewTransform

    cfg = config_from_args(TINY + ["--output-dir", str(tmp_path), "--seed", "2",
                                   "--batch-size", "16", "--sinkhorn-lambda", "7",
                                   "--pos-weight-end", "0.5"])  # not cluster()'s defaults
    torch.manual_seed(0)
    backbone = build_models(cfg)["teacher"].backbone.eval()
    src = SyntheticScenes("train", 5, size=cfg.scene_size, seed=2)
    scenes = [src[i][0] for i in range(3)]
    v = encode_and_cluster(cfg, backbone, scenes, np.random.default_rng(11), seed=4)
    B, S, N, D = 3, 32, (32 // 8) ** 2, 32                     # TINY: 32-px views, patch 8
    assert v.images.shape == (B, 2, 3, S, S) and v.images.dtype == np.float32
    assert v.positions.shape == (B, 2, N, 2) and v.cls.shape == (B, 2, D)
    assert v.tokens.shape == (B, 2, N, D) and v.clustering.labels.shape == (B, 2, N)
    assert v.clustering.valid.shape == (B, cfg.n_clusters)
    # By hand: the two views (crop + flip only) of each scene in turn from the same
    # generator, ImageNet-normalised through the backbone, then cribo.cluster.
    rng = np.random.default_rng(11)
    tf = TwoViewTransform(size=S, patch_size=8).geometric_only()
    pairs = [tf(scene, rng) for scene in scenes]
    images = np.array([[a.image, b.image] for a, b in pairs], np.float32)
    positions = np.array([[a.positions, b.positions] for a, b in pairs], np.float32)
    np.testing.assert_array_equal(v.images, images)
    np.testing.assert_array_equal(v.positions, positions)
    assert 0.0 <= images.min() and images.max() <= 1.0       # the pictures' views: not normalised
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        cls, tok = backbone((torch.from_numpy(images.reshape(2 * B, 3, S, S)) - mean) / std)
    tok = tok.numpy().reshape(B, 2, N, D)
    np.testing.assert_allclose(v.tokens, tok, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v.cls, cls.numpy().reshape(B, 2, D), rtol=1e-5, atol=1e-6)
    c = cluster(tok, positions, cfg.n_clusters, pos_weight=cfg.pos_weight_end,
                sinkhorn_lambda=cfg.sinkhorn_lambda, seed=4)
    np.testing.assert_array_equal(v.clustering.labels, c.labels)
    np.testing.assert_array_equal(v.clustering.valid, c.valid)
    np.testing.assert_array_equal(v.clustering.counts, c.counts)
    # the views for drawing: channels last, uint8
    rgb = v.rgb()
    assert rgb.shape == (B, 2, S, S, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, np.round(images.transpose(0, 1, 3, 4, 2) * 255))
    with pytest.raises(ValueError, match="encode_and_cluster: scenes must hold at least one"):
        encode_and_cluster(cfg, backbone, [], np.random.default_rng(0), seed=0)


def test_evaluate_backbone_is_dense_evaluation_with_the_run_settings(tmp_path):
    from cribo.data import SyntheticScenes
    from cribo.evaluation import dense_evaluation, random_init_like

    cfg = config_from_args(TINY + ["--output-dir", str(tmp_path), "--seed", "1",
                                   "--batch-size", "16",
                                   "--eval-train-images", "4", "--eval-val-images", "3",
                                   "--eval-k", "5"])
    assert evaluation_settings(cfg) == dict(k=5, image_size=48, seed=1, progress=False)
    vit = random_init_like(dict(img_size=32, patch_size=8, embed_dim=16, depth=1,
                                num_heads=1), seed=0)
    res, probe = evaluate_backbone(cfg, vit, keep_predictions=2)
    train = SyntheticScenes("train", n_images=4, size=48, seed=1)
    val = SyntheticScenes("val", n_images=3, size=48, seed=1)
    ref, ref_probe = dense_evaluation(vit, train, val, k=5, image_size=48, seed=1,
                                      progress=False, keep_predictions=2)
    np.testing.assert_array_equal(res.per_image_confusion, ref.per_image_confusion)
    np.testing.assert_array_equal(probe.per_image_confusion, ref_probe.per_image_confusion)
    assert len(res.per_image_confusion) == 3 and len(res.predictions) == 2
    assert res.bank_size == ref.bank_size


def test_the_job_reads_its_checkpoints_through_the_one_reader(tmp_path):
    cfg = config_from_args(TINY + ["--output-dir", str(tmp_path), "--batch-size", "16"])
    run = RunFolder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="teacher_backbone: no checkpoint file at "
                                                ".*teacher_backbone.pth"):
        teacher_backbone(cfg)
    torch.manual_seed(3)
    state = build_models(cfg)["teacher"].backbone.state_dict()
    torch.save(state, run.teacher_backbone)
    loaded = teacher_backbone(cfg)
    assert not loaded.training
    torch.testing.assert_close(loaded.state_dict(), state, rtol=0, atol=0)
    data = open(run.teacher_backbone, "rb").read()
    with open(run.teacher_backbone, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"teacher_backbone: cannot read the checkpoint "
                                         r".*teacher_backbone\.pth.*truncated"):
        teacher_backbone(cfg)
    with open(run.checkpoint, "w") as fh:
        fh.write("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(ValueError, match=r"teacher_usage: .*checkpoint\.pth.*Git LFS pointer"):
        teacher_usage(cfg)
