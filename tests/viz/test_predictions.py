"""cribo.viz.predictions: ignore pixels are black, classes have their colours, the
legend names them, the accuracy is a percentage with one decimal."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL.Image")

from cribo import viz  # noqa: E402
from viz_checks import expected_size, pixel, read_png  # noqa: E402


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
    assert "acc 100.0%" in fig.axes[5].get_title()
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names + ["ignore (255)"]
    with pytest.raises(ValueError, match="labels must be in"):
        viz.plot_predictions([image], [gt], [gt + 7], names)


def test_plot_predictions_titles_the_accuracy_as_a_percentage_with_one_decimal():
    H = W = 24  # 576 pixels; 2 wrong rows = 48 wrong, 24 ignored: 504 of 552 right
    gt = np.zeros((H, W), np.int64)
    gt[-1] = 255
    pr = gt.copy()
    pr[:2] = 1
    image = np.zeros((H, W, 3), np.uint8)
    fig = viz.plot_predictions([image], [gt], [pr], ["background", "disc"])
    assert fig.axes[2].get_title() == "prediction · acc 91.3%"  # 504 / 552 = 0.91304...
