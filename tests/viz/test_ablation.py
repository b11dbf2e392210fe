"""cribo.viz.ablation: the ablation picture of a small hand-made table -- bars at the
mean gain in points, one dot per seed, the seed counts under unequal bars."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL.Image")

from cribo import viz  # noqa: E402
from viz_checks import expected_size, pixel, read_png  # noqa: E402

SCORES = [("retrieval_miou", "retrieval mIoU"), ("retrieval_fg_iou", "retrieval fg/bg IoU")]


def stats(per_seed):
    v = list(per_seed.values())
    return {"mean": float(np.mean(v)), "std": float(np.std(v)),
            "seeds": {str(s): x for s, x in per_seed.items()}}


def small_table():
    """Two variants; "full" over seeds 0 and 1, "K8" over seed 0 only; fractions."""
    gain = {"full": {"retrieval_miou": stats({0: 0.02, 1: 0.04}),
                     "retrieval_fg_iou": stats({0: 0.05, 1: 0.01})},
            "K8": {"retrieval_miou": stats({0: -0.01}), "retrieval_fg_iou": stats({0: 0.03})}}
    variants = {"full": {"retrieval_miou": stats({0: 0.27, 1: 0.29}),
                         "retrieval_fg_iou": stats({0: 0.40, 1: 0.36})},
                "K8": {"retrieval_miou": stats({0: 0.24}),
                       "retrieval_fg_iou": stats({0: 0.38})}}
    return {"variants": variants, "floor": {}, "gain": gain, "full_minus": {}}


def bars(ax):
    from matplotlib.container import BarContainer

    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_plot_ablation_draws_gains_in_points_with_every_seed(tmp_path):
    path = tmp_path / "out" / "ablation.png"
    fig = viz.plot_ablation(small_table(), path, scores=SCORES)
    png = read_png(path)
    assert png.shape[:2] == expected_size(fig)
    (ax,) = fig.axes
    b = bars(ax)
    assert len(b) == 2  # one bar container per score
    # full: mean gain 3 and 3 points; K8: -1 and 3 points
    np.testing.assert_allclose([r.get_height() for r in b[0]], [3.0, -1.0], atol=1e-9)
    np.testing.assert_allclose([r.get_height() for r in b[1]], [3.0, 3.0], atol=1e-9)
    dots = sorted(tuple(np.round(np.asarray(ln.get_ydata(), float), 9)) for ln in ax.lines
                  if ln.get_marker() == ".")  # not the error bars' caps
    assert dots == sorted([(2.0, 4.0), (5.0, 1.0), (-1.0,), (3.0,)])
    assert any(list(ln.get_ydata()) == [0.0, 0.0] for ln in ax.lines)  # the zero line
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full (2 seeds)", "K8 (1 seeds)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [lab for _, lab in SCORES]
    assert "points" in ax.get_ylabel()
    # The first score's bar of "full" is drawn in its colour (C0) in the PNG, off its
    # error bar, half-way up.
    r = b[0][0]
    x = r.get_x() + 0.2 * r.get_width()
    np.testing.assert_allclose(pixel(png, ax, x, r.get_height() / 2), [31, 119, 180], atol=2)


def test_plot_ablation_without_gains_draws_the_scores_and_checks_its_table():
    table = small_table()
    table["gain"] = {}
    fig = viz.plot_ablation(table)  # every score of the table, labelled by its key
    (ax,) = fig.axes
    np.testing.assert_allclose([r.get_height() for r in bars(ax)[0]], [28.0, 24.0], atol=1e-9)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [k for k, _ in SCORES]
    assert ax.get_ylabel() == "score (%)"
    with pytest.raises(ValueError, match="'variants'"):
        viz.plot_ablation({"gain": {}})
    empty = viz.plot_ablation({"variants": {}, "floor": {}, "gain": {}, "full_minus": {}})
    assert empty.axes[0].texts[0].get_text() == "no finished (variant, seed) yet"
    with pytest.raises(ValueError, match="no score"):
        viz.plot_ablation(table, scores=[("probe_miou", "probe mIoU")])
