"""cribo.viz as a package: importing it (or any of its modules) does not import
matplotlib; every public name is re-exported from the module of its picture; the
queue's order and the log's format are used from their one home, not copied."""
from __future__ import annotations

import subprocess
import sys

MODULES = ("cribo.viz.clusters", "cribo.viz.matches", "cribo.viz.curves",
           "cribo.viz.predictions", "cribo.viz.ablation", "cribo.viz._figure")


def test_import_does_not_import_matplotlib():
    code = ("import sys, cribo.viz, cribo.viz.report, " + ", ".join(MODULES) +
            "; assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_is_re_exported_from_its_module():
    import importlib

    from cribo import viz

    homes = {"cluster_colors": "_figure", "class_colors": "_figure", "to_rgb": "_figure",
             "plot_clusters": "clusters",
             "MatchExample": "matches", "MatchBuffer": "matches", "match_examples": "matches",
             "plot_matches": "matches",
             "plot_curves": "curves", "CURVE_PANELS": "curves",
             "plot_predictions": "predictions",
             "plot_ablation": "ablation"}
    assert sorted(viz.__all__) == sorted(homes)
    for name, module in homes.items():
        assert getattr(viz, name) is getattr(importlib.import_module(f"cribo.viz.{module}"),
                                             name), name


def test_queue_order_and_log_format_have_one_home():
    from cribo.ops import queue
    from cribo.train import run_folder
    from cribo.viz import curves, matches

    assert matches.locate_entries is queue.locate_entries
    assert curves.read_log is run_folder.read_log
    assert curves.iteration_records is run_folder.iteration_records
