"""cribo.viz.clusters: the PNG has the expected size; a cluster has one colour in
both views; clusters of one view only are greyed."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL.Image")

from cribo import viz  # noqa: E402
from viz_checks import expected_size, pixel, read_png  # noqa: E402


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
