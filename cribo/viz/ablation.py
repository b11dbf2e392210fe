"""The ablation picture: each variant's scores over seeds, as bars with one dot per seed.

:func:`plot_ablation` draws the table that :func:`cribo.evaluation.ablate.run_ablation`
returns (and writes as ``ablation.json``); ``cribo ablate`` writes it as
``ablation.png``.  Scores in the table are fractions in [0, 1]; the picture shows
them in points (percent).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._figure import PathLike, _figure, _finish

__all__ = ["plot_ablation"]


def plot_ablation(table: Mapping[str, Any], path: Optional[PathLike] = None, *,
                  scores: Optional[Sequence[Tuple[str, str]]] = None, dpi: int = 100) -> Any:
    """Each variant's mean ± std over seeds as bars, every seed as a dot.

    The informative picture is each variant's gain over the untrained network of
    the same seed (the scores themselves vary more between seeds than that), so
    ``table["gain"]`` is drawn when it holds anything, with a line at 0; otherwise
    ``table["variants"]``.  Variants measured over different numbers of seeds are
    labelled with their count.

    Args:
        table: ``{"variants": {name: {score: stats}}, "gain": {name: {score: stats}}, ...}``
            where ``stats`` is ``{"mean": float, "std": float, "seeds": {seed: float}}``,
            scores as fractions in [0, 1] (the table of
            :func:`cribo.evaluation.ablate.run_ablation`).
        path: also write a PNG here (exactly ``figsize * dpi`` pixels).
        scores: ``(key, label)`` of the scores to draw, one bar each per variant
            (default: every score of the first variant, labelled by its key).
        dpi: resolution; the figure is ``3 + 1.3 * n_variants`` by 3.4 inches.

    Returns:
        The Figure; its one axes holds ``len(scores)`` bar containers in score order
        (heights in points) and one line of dots per (score, variant).  A table of
        no variant gives a picture that says so.
    """
    fn = "plot_ablation"
    if not isinstance(table, Mapping) or not isinstance(table.get("variants"), Mapping):
        raise ValueError(f"{fn}: table must be a mapping with a 'variants' mapping (the table "
                         f"of cribo.evaluation.ablate.run_ablation), got {type(table).__name__}")
    gain = bool(table.get("gain"))
    part = table["gain"] if gain else table["variants"]
    names = list(part)
    if not names:  # a valid table of no finished run (``cribo ablate --table-only``)
        fig = _figure(4.3, 3.4, dpi)
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished (variant, seed) yet", ha="center", va="center",
                color="0.4", transform=ax.transAxes)
        return _finish(fig, path)
    if scores is None:
        scores = [(str(k), str(k)) for k in part[names[0]]]
    scores = list(scores)
    if not scores:
        raise ValueError(f"{fn}: scores must name at least one (key, label), got none")
    for n in names:
        missing = [k for k, _ in scores if k not in part[n]]
        if missing:
            raise ValueError(f"{fn}: variant {n!r} has no score(s) {missing}; it has "
                             f"{sorted(part[n])}")
    fig = _figure(3 + 1.3 * len(names), 3.4, dpi)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    width = 0.81 / len(scores)  # 0.27 for three scores
    for j, (k, label) in enumerate(scores):
        offset = (j - (len(scores) - 1) / 2) * width
        means = [100 * part[n][k]["mean"] for n in names]
        stds = [100 * part[n][k]["std"] for n in names]
        ax.bar(x + offset, means, width, yerr=stds, label=label, capsize=2, color=f"C{j}")
        for i, n in enumerate(names):  # every seed as a dot
            seeds = [100 * v for v in part[n][k]["seeds"].values()]
            ax.plot(np.full(len(seeds), x[i] + offset), seeds, "k.", ms=3)
    if gain:
        ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x)
    n_seeds = [len(part[n][scores[0][0]]["seeds"]) for n in names]
    if len(set(n_seeds)) > 1:  # means over different seeds: say so under each bar
        names = [f"{n} ({k} seeds)" for n, k in zip(names, n_seeds)]
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("gain over the untrained\nnetwork (points)" if gain else "score (%)")
    ax.set_title("Ablation: mean ± std over seeds, dots = seeds" +
                 ("\n0 = the same seed's untrained network" if gain else ""), fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _finish(fig, path)
