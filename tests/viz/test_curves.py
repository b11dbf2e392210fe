"""cribo.viz.curves: the curves of a training log (read through cribo.train.run_folder),
of records, of several runs, and of a real run's log."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL.Image")

from cribo import viz  # noqa: E402
from cribo.train.run_folder import read_log  # noqa: E402
from viz_checks import expected_size, read_png  # noqa: E402


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
        recs = read_log(log)
    fig2 = viz.plot_curves({"a": recs, "b": recs[:5]},
                           panels=[("loss_total", "total", "linear"), ("nope", "x", "log")])
    assert fig2.axes[0].get_legend() is not None
    assert fig2.axes[1].texts[0].get_text() == "not logged"


def test_plot_curves_on_the_log_of_a_real_training_run(tmp_path):
    pytest.importorskip("torch")
    from cribo.train.config import config_from_args
    from cribo.train.loop import train
    from runs import TINY

    train(config_from_args(TINY + ["--output-dir", str(tmp_path), "--epochs", "1",
                                   "--batch-size", "16"]))
    fig = viz.plot_curves(tmp_path / "log.jsonl", path=tmp_path / "curves.png")
    assert read_png(tmp_path / "curves.png").shape[:2] == expected_size(fig)
    for ax in fig.axes:  # every panel's key is in the trainer's log
        assert len(ax.lines) == 1 and not ax.texts, ax.get_title()
        assert len(ax.lines[0].get_ydata()) == 48 // 16
