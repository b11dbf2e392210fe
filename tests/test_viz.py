"""cribo.viz pictures and cribo.viz.report: each plot writes a PNG of the expected
size; cluster colours agree across views; ignore pixels are black; queue
addresses map back to the right image and cluster; the report links its
pictures by relative path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

import cribo  # noqa: E402
from cribo import viz  # noqa: E402
from cribo.viz.report import metric_rows, write_report  # noqa: E402


def read_png(path):
    assert os.path.getsize(path) > 0
    return np.asarray(Image.open(path).convert("RGB"))


def expected_size(fig):
    w, h = fig.get_size_inches() * fig.dpi
    return int(round(h)), int(round(w))


def pixel(png, ax, x, y):
    """The PNG pixel at data point (x, y) of ``ax`` (display y runs upwards)."""
    X, Y = ax.transData.transform((x, y))
    return png[int(png.shape[0] - Y), int(X)].astype(int)


def test_import_does_not_import_matplotlib():
    code = "import sys, cribo.viz, cribo.viz.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_rgb_undoes_the_imagenet_normalisation(rng):
    from cribo.data import normalize

    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    back = viz.to_rgb(normalize(img))  # (3, 6, 5) normalised float
    np.testing.assert_allclose(back, img / 255.0, atol=1e-6)
    np.testing.assert_allclose(viz.to_rgb(img), img / 255.0, atol=1e-7)
    with pytest.raises(ValueError, match="to_rgb"):
        viz.to_rgb(np.zeros((2, 3, 4, 5)))


def test_cluster_colours_are_fixed_by_id():
    c8, c30 = viz.cluster_colors(8), viz.cluster_colors(30)
    np.testing.assert_array_equal(c8, c30[:8])
    assert len({tuple(np.round(c, 6)) for c in c30}) == 30
    assert np.all((c30 >= 0) & (c30 <= 1))


def test_plot_clusters_same_cluster_same_colour_in_both_views(tmp_path):
    g, S = 4, 32  # 4 x 4 patches of 8 px
    image = np.full((S, S, 3), 128, np.uint8)  # same pixels under both views
    l1 = np.array([[2, 2, 0, 0], [2, 2, 0, 0], [1, 1, 5, 5], [1, 1, 5, 5]])
    l2 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [3, 3, 2, 2], [3, 3, 2, 2]])
    path = tmp_path / "clusters.png"
    fig = viz.plot_clusters(image, image, l1.ravel(), l2.ravel(), grid=g, path=path)
    png = read_png(path)
    assert png.shape[:2] == expected_size(fig)
    ax1, ax2 = fig.axes[:2]
    centre = lambda r, c: ((c + 0.5) * 8, (r + 0.5) * 8)  # noqa: E731
    # cluster 2: view 1 patch (0, 0), view 2 patch (3, 3); cluster 0 and 1 likewise.
    for k, p1, p2 in ((2, (0, 0), (3, 3)), (0, (0, 3), (0, 0)), (1, (3, 0), (0, 3))):
        a, b = pixel(png, ax1, *centre(*p1)), pixel(png, ax2, *centre(*p2))
        np.testing.assert_array_equal(a, b, err_msg=f"cluster {k}")
    c2, c0 = pixel(png, ax1, *centre(0, 0)), pixel(png, ax1, *centre(0, 3))
    assert np.abs(c2 - c0).max() > 30  # different clusters, different colours
    # 5 (view 1 only) and 3 (view 2 only) are invalid: greyed (R = G = B).
    for ax, p in ((ax1, (3, 3)), (ax2, (3, 0))):
        grey = pixel(png, ax, *centre(*p))
        assert np.ptp(grey) <= 2, grey
    assert "3 of 5 seen in both" in fig._suptitle.get_text()  # clusters 0, 1, 2 of 0-3, 5


def test_plot_clusters_can_show_the_plain_views_beside_the_clusters(tmp_path):
    g, S = 4, 32
    image = np.zeros((S, S, 3), np.uint8)
    image[:, :, 0] = 200  # pure red under both views
    labels = np.repeat(np.arange(4), 4)
    path = tmp_path / "views.png"
    fig = viz.plot_clusters(image, image, labels, labels, grid=g, path=path, show_views=True,
                            gray_base=False, alpha=0.45)
    png = read_png(path)
    assert len(fig.axes) == 4 and png.shape[:2] == expected_size(fig)
    plain = pixel(png, fig.axes[0], 12.0, 12.0)
    np.testing.assert_allclose(plain, [200, 0, 0], atol=2)  # untinted
    tinted = pixel(png, fig.axes[2], 12.0, 12.0)
    assert np.abs(tinted.astype(int) - plain.astype(int)).max() > 20  # the cluster colour
    # the same cluster, the same colour in the two cluster panels
    np.testing.assert_array_equal(tinted, pixel(png, fig.axes[3], 12.0, 12.0))


def test_plot_clusters_takes_normalised_views_and_batches(tmp_path):
    from cribo.data import normalize

    rng = np.random.default_rng(0)
    B, S, g = 2, 16, 4
    views = np.stack([normalize(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
                      for _ in range(2 * B)]).reshape(B, 2, 3, S, S)
    labels = rng.integers(0, 3, (B, 2, g * g))
    valid = np.ones((B, 3), bool)
    path = tmp_path / "batch.png"
    fig = viz.plot_clusters(views[:, 0], views[:, 1], labels[:, 0], labels[:, 1], g, valid,
                            panel_size=1.5, path=path)
    assert len(fig.axes) == 2 * B
    assert read_png(path).shape[:2] == expected_size(fig)
    with pytest.raises(ValueError, match="grid"):
        viz.plot_clusters(views[0, 0], views[0, 1], labels[0, 0], labels[0, 1], grid=3)


def test_locate_queue_entries_skips_empty_images():
    slot, rank = viz.locate_queue_entries([0, 1, 2, 4, 5, -1, 9], [2, 0, 3, 1])
    np.testing.assert_array_equal(slot, [0, 0, 2, 2, 3, -1, -1])
    np.testing.assert_array_equal(rank, [0, 1, 0, 2, 0, -1, -1])


def _step(queue, buffer, objects, valid, images, labels, *, keep=True):
    """One training step as the objective does it: match, push; then the buffer."""
    t = objects[valid]
    counts_before = queue.image_counts.copy()
    m = queue.match(t, t)
    queue.push(t, t, valid.sum(1))
    if keep:
        buffer.push(images, labels, valid)
    return m, counts_before


def test_match_buffer_maps_addresses_back_to_images_and_clusters(tmp_path):
    rng = np.random.default_rng(1)
    K, d, g, S = 3, 16, 2, 8
    queue, buffer = cribo.ObjectQueue(capacity=50, dim=d), viz.MatchBuffer(max_batches=2)
    labels = np.broadcast_to(np.array([0, 1, 2, 2]), (3, 2, g * g)).copy()
    images = rng.integers(0, 256, (3, 2, S, S, 3), dtype=np.uint8)
    batches = []
    for valid in (np.array([[1, 0, 1], [1, 1, 1], [0, 0, 0]], bool),    # oldest
                  np.array([[0, 1, 0], [1, 1, 0], [1, 0, 1]], bool)):   # newest
        objects = rng.standard_normal((3, K, d)).astype(np.float32)
        _step(queue, buffer, objects, valid, images, labels)
        batches.append((objects, valid))
    np.testing.assert_array_equal(buffer.image_counts, queue.image_counts)
    # The current batch: image 0 copies (oldest batch, image 1, cluster 2) and
    # image 1 copies (newest batch, image 2, cluster 0).
    objects = np.zeros((2, K, d), np.float32)
    objects[0, 0] = batches[0][0][1, 2]
    objects[1, 1] = batches[1][0][2, 0]
    valid = np.array([[1, 0, 0], [0, 1, 0]], bool)
    t = objects[valid]
    m = queue.match(t, t)
    age, img, cl = buffer.lookup(m.index1, queue.image_counts)
    np.testing.assert_array_equal(age, [1, 0])
    np.testing.assert_array_equal(img, [1, 2])
    np.testing.assert_array_equal(cl, [2, 0])

    cur_images = rng.integers(0, 256, (2, 2, S, S, 3), dtype=np.uint8)
    cur_labels = np.broadcast_to(np.array([0, 1, 1, 0]), (2, 2, g * g)).copy()
    ex = viz.match_examples(buffer, cur_images, cur_labels, valid, m, max_examples=4,
                            image_counts=queue.image_counts)
    assert len(ex) == 2
    np.testing.assert_array_equal(ex[0].query_image, cur_images[0, 0])
    np.testing.assert_array_equal(ex[0].query_mask, [[True, False], [False, True]])
    np.testing.assert_array_equal(ex[0].neighbour_image, images[1, 0])
    np.testing.assert_array_equal(ex[0].neighbour_mask, [[False, False], [True, True]])
    np.testing.assert_array_equal(ex[1].neighbour_mask, [[True, False], [False, False]])
    assert [e.consistent for e in ex] == [bool(x) for x in m.mask1]
    with pytest.raises(ValueError, match="out of step"):
        buffer.lookup(m.index1, queue.image_counts[::-1])

    path = tmp_path / "matches.png"
    bad = viz.MatchExample(cur_images[1, 0], np.eye(4, dtype=bool), images[0, 1],
                           np.ones((2, 2), bool), consistent=False, similarity=0.5)
    fig = viz.plot_matches(ex + [bad], ncols=2, panel_size=1.2, path=path)
    png = read_png(path)
    assert png.shape[:2] == expected_size(fig)
    # The frame of a consistent pair is green, of an inconsistent one red.
    for e, sub in zip(ex + [bad], fig.subfigs):
        ax = sub.axes[0]
        rgb = pixel(png, ax, 0.0, S / 2)  # on the left spine
        green = rgb[1] > rgb[0] + 40
        assert green == e.consistent, (rgb, e.consistent)


def write_log(path, n_iter=12, per_epoch=4):
    with open(path, "w") as f:
        f.write(json.dumps({"type": "run", "config": {"epochs": 3}}) + "\n")
        for it in range(n_iter):
            rec = {"type": "iter", "epoch": it // per_epoch, "iter": it, "lr": 1e-3 * it,
                   "teacher_temp": 0.04, "loss_global": 5.0 - 0.1 * it, "loss_objects": 4.0,
                   "loss_neighbours": 0.0 if it < per_epoch else 3.0, "loss_total": 9.0,
                   "objects_per_image": 5.5, "consistent": 0.25}
            f.write(json.dumps(rec) + "\n")
            if it % per_epoch == per_epoch - 1:
                f.write(json.dumps({"type": "epoch", "epoch": it // per_epoch}) + "\n")
        f.write(json.dumps({"type": "iter", "epoch": 2, "iter": 11, "lr": 0.5,
                            "loss_total": 1.0}) + "\n")  # a resumed run re-logs iter 11
        f.write('{"type": "iter", "ep')  # killed mid-write


def test_plot_curves_reads_a_training_log(tmp_path):
    log = tmp_path / "log.jsonl"
    write_log(log)
    path = tmp_path / "curves.png"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fig = viz.plot_curves(tmp_path, path=path)  # the run folder works too
    assert any("not JSON" in str(x.message) for x in w)
    assert read_png(path).shape[:2] == expected_size(fig)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [p[1] for p in viz.CURVE_PANELS]
    lr = axes[6].lines[0].get_ydata()
    assert len(lr) == 12 and lr[-1] == 0.5  # the last record of an iteration wins
    glob = axes[1].lines[0].get_ydata()
    assert np.isnan(glob[-1]) and glob[0] == 5.0
    # epoch starts are marked: iterations 4 and 8
    vlines = [ln.get_xdata()[0] for ln in axes[0].lines[1:]]
    assert vlines == [4, 8]
    # records work as well as paths, and several runs overlay with a legend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = viz.read_log(log)
    fig2 = viz.plot_curves({"a": recs, "b": recs[:5]},
                           panels=[("loss_total", "total", "linear"), ("nope", "x", "log")])
    assert fig2.axes[0].get_legend() is not None
    assert fig2.axes[1].texts[0].get_text() == "not logged"


def test_plot_predictions_draws_ignore_black_and_a_legend(tmp_path):
    H = W = 24
    names = ["background", "disc", "square"]
    gt = np.zeros((H, W), np.int64)
    gt[4:12, 4:12] = 1
    gt[:, 18:] = 255  # ignore band on the right
    pr = np.full((H, W), 2, np.int64)
    pr[12:, :6] = 255
    image = np.full((H, W, 3), 200, np.uint8)
    path = tmp_path / "pred.png"
    fig = viz.plot_predictions([image, image], [gt, gt], [pr, gt], names, path=path)
    png = read_png(path)
    assert png.shape[:2] == expected_size(fig)
    ax_gt, ax_pr = fig.axes[1], fig.axes[2]
    np.testing.assert_array_equal(pixel(png, ax_gt, 21, 12), [0, 0, 0])
    np.testing.assert_array_equal(pixel(png, ax_pr, 3, 18), [0, 0, 0])
    colours = np.round(viz.class_colors(names) * 255)
    np.testing.assert_allclose(pixel(png, ax_gt, 8, 8), colours[1], atol=1)
    np.testing.assert_allclose(pixel(png, ax_pr, 8, 8), colours[2], atol=1)
    assert "acc 100%" in fig.axes[5].get_title()
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names + ["ignore (255)"]
    with pytest.raises(ValueError, match="labels must be in"):
        viz.plot_predictions([image], [gt], [gt + 7], names)


def test_write_report_md_html_json_with_relative_links(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    fig = viz.plot_curves([{"type": "iter", "iter": 0, "loss_total": 1.0}],
                          panels=[("loss_total", "total", "linear")])
    fig.savefig(out / "curves.png")
    outside = tmp_path / "elsewhere" / "clusters.png"
    outside.parent.mkdir()
    fig.savefig(outside)
    metrics = {"dense retrieval mIoU": {"value": np.float32(12.5), "floor": 10.0,
                                        "ci": (11.0, 14.0), "delta_ci": (1.2, 3.9)},
               "fg/bg IoU": {"value": 45.7, "std": 1.25, "floor": 34.6},
               "per-class IoU": {"disc": 0.3, "square": float("nan")},
               "steps": 310}
    config = {"epochs": 2, "lr": 5e-4, "output_dir": str(out)}
    paths = write_report(out, metrics=metrics, config=config, title="tiny run",
                         figures={"training curves": "curves.png", "clusters": outside})
    md = open(paths["md"]).read()
    page = open(paths["html"]).read()
    assert "| dense retrieval mIoU | 12.5 | [11, 14] | 10 | +2.5 | [1.2, 3.9] |" in md
    assert "| fg/bg IoU | 45.7 ± 1.25 |  | 34.6 | +11.1 |  |" in md
    assert "| per-class IoU / disc | 0.3 |" in md and "| steps | 310 |" in md
    assert "![training curves](curves.png)" in md
    assert "![clusters](figures/clusters.png)" in md
    assert (out / "figures" / "clusters.png").exists()
    assert '<img src="curves.png"' in page and '<img src="figures/clusters.png"' in page
    assert "<details>" in page and "<th>untrained floor</th>" in page
    assert "&quot;epochs&quot;: 2" in page and '"epochs": 2' in md
    assert str(tmp_path / "elsewhere") not in page
    got = json.load(open(paths["json"]))
    assert got["dense retrieval mIoU"]["value"] == 12.5 and got["steps"] == 310
    assert got["per-class IoU"]["square"] is None  # NaN is not JSON
    header, rows = metric_rows({"a": 1.0})
    assert header == ["metric", "value"] and rows == [["a", "1"]]
    with pytest.raises(FileNotFoundError, match="missing"):
        write_report(out, metrics={}, figures={"missing": "nope.png"})


def test_plot_curves_on_the_log_of_a_real_training_run(tmp_path):
    pytest.importorskip("torch")
    from cribo.train.config import config_from_args
    from cribo.train.loop import train
    from test_train import TINY

    train(config_from_args(TINY + ["--output-dir", str(tmp_path), "--epochs", "1",
                                   "--batch-size", "16"]))
    fig = viz.plot_curves(tmp_path / "log.jsonl", path=tmp_path / "curves.png")
    assert read_png(tmp_path / "curves.png").shape[:2] == expected_size(fig)
    for ax in fig.axes:  # every panel's key is in the trainer's log
        assert len(ax.lines) == 1 and not ax.texts, ax.get_title()
        assert len(ax.lines[0].get_ydata()) == 48 // 16
