"""cribo.viz.report: the report links its pictures by relative path, writes plain JSON,
and shows fractions marked "%" as percentages with one decimal."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL.Image")

from cribo import viz  # noqa: E402
from cribo.viz.report import metric_rows, write_report  # noqa: E402


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


def test_report_shows_fractions_marked_percent_with_one_decimal_in_one_unit(tmp_path):
    metrics = {"retrieval mIoU": {"value": 0.27234, "floor": 0.27512, "ci": (0.2651, 0.2799),
                                  "delta_ci": (-0.0081, 0.0024), "unit": "%"},
               "fg/bg IoU": {"value": 0.3984, "std": 0.0123, "floor": 0.3762, "unit": "%"},
               "tiny gain": {"value": 0.5004, "floor": 0.5, "unit": "%"},
               "per-class IoU": {"disc": {"value": 0.3, "unit": "%"}},
               "effective outputs": 41.234}
    header, rows = metric_rows(metrics)
    assert header == ["metric", "value", "95% CI", "untrained floor", "Δ vs floor", "Δ 95% CI"]
    # Δ = 27.234 - 27.512 = -0.278 points; every number of a row in percent (points).
    assert rows[0] == ["retrieval mIoU (%)", "27.2", "[26.5, 28.0]", "27.5", "-0.3",
                       "[-0.8, 0.2]"]
    assert rows[1] == ["fg/bg IoU (%)", "39.8 ± 1.2", "", "37.6", "+2.2", ""]
    assert rows[2][4] == "0.0"  # a gain of 0.04 points rounds to 0.0, shown without a sign
    assert rows[3][:2] == ["per-class IoU / disc (%)", "30.0"]
    assert rows[4][:2] == ["effective outputs", "41.23"]  # no unit: 4 significant digits
    paths = write_report(tmp_path, metrics=metrics)
    assert "| retrieval mIoU (%) | 27.2 | [26.5, 28.0] | 27.5 | -0.3 | [-0.8, 0.2] |" in \
        open(paths["md"]).read()
    assert json.load(open(paths["json"]))["retrieval mIoU"]["value"] == 0.27234  # fractions
    with pytest.raises(ValueError, match="unit 'points'"):
        metric_rows({"x": {"value": 1.0, "unit": "points"}})


def test_percent_is_the_one_percentage_format():
    from cribo.evaluation import metrics
    from cribo.viz.report import percent

    assert percent(0.4567) == "45.7" and percent(1) == "100.0"
    assert percent(-0.0004) == "0.0"                            # never "-0.0"
    assert percent(0.0123, signed=True) == "+1.2" and percent(-0.155, signed=True) == "-15.5"
    assert percent(-0.0004, signed=True) == "+0.0"
    assert percent(None) == "" and percent(float("nan")) == "nan"
    assert metrics.percent is percent                          # the intervals' format
