"""Pictures of what CrIBo does, one module per picture; the report.

==================================  ===================================================
module                              draws
==================================  ===================================================
:mod:`cribo.viz.clusters`           :func:`plot_clusters`: the joint-space clusters of two
                                    views (docs/method.md §2); the same colour is the
                                    same cluster in both views
:mod:`cribo.viz.matches`            :func:`plot_matches`: neighbour matches
                                    (docs/method.md §4), a query object's region next to
                                    the queue entry it retrieved, framed green
                                    (cycle-consistent) or red; :class:`MatchBuffer` and
                                    :func:`match_examples` find them during training
:mod:`cribo.viz.curves`             :func:`plot_curves`: every loss term and statistic of
                                    a run's ``log.jsonl``
:mod:`cribo.viz.predictions`        :func:`plot_predictions`: dense-retrieval label maps
                                    next to the ground truth (docs/method.md §7)
:mod:`cribo.viz.ablation`           :func:`plot_ablation`: the variants of ``cribo
                                    ablate``, mean ± std and every seed
:mod:`cribo.viz.report`             no picture: ``report.md``, ``report.html`` and
                                    ``metrics.json`` of a run (no matplotlib), and
                                    :func:`~cribo.viz.report.percent`, the one
                                    percentage format
``cribo.viz._figure``               what the pictures share: matplotlib, figures,
                                    colours (:func:`cluster_colors`,
                                    :func:`class_colors`, :func:`to_rgb`), patch grids
==================================  ===================================================

Every ``plot_*`` returns a :class:`matplotlib.figure.Figure` drawn on the Agg
canvas (pyplot is never used, so nothing piles up in pyplot's figure list and
the caller's backend is left alone) and, given ``path=``, also writes it as a
PNG of exactly ``figsize * dpi`` pixels.  matplotlib is imported on the first
call, so ``import cribo.viz`` works without it (``pip install cribo[plot]``).

Images are accepted as ``(H, W, 3)`` uint8, ``(H, W, 3)`` float in [0, 1], or a
network input ``(3, S, S)`` float normalised with the ImageNet mean and std (as
:class:`cribo.data.View` holds it); torch tensors are moved to NumPy.

>>> from cribo import viz
>>> fig = viz.plot_clusters(view1, view2, c.labels[0, 0], c.labels[0, 1], path="clusters.png")
"""
from __future__ import annotations

from ._figure import class_colors, cluster_colors, to_rgb
from .ablation import plot_ablation
from .clusters import plot_clusters
from .curves import CURVE_PANELS, plot_curves
from .matches import MatchBuffer, MatchExample, match_examples, plot_matches
from .predictions import plot_predictions

__all__ = [
    "cluster_colors", "class_colors", "to_rgb",
    "plot_clusters",
    "MatchExample", "MatchBuffer", "match_examples", "plot_matches",
    "plot_curves", "CURVE_PANELS",
    "plot_predictions",
    "plot_ablation",
]
