"""Training curves: every loss term and statistic of a run's log against iterations.

The log is read with :func:`cribo.train.run_folder.read_log` and its
iteration records taken with :func:`cribo.train.run_folder.iteration_records`
(the one home of the log's format: record types, a resumed run's repeated
steps); this module only draws them.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..train.run_folder import iteration_records, read_log
from ._figure import PathLike, _figure, _finish

__all__ = ["plot_curves", "CURVE_PANELS"]


#: (log key, panel title, y-axis scale) of each panel of :func:`plot_curves`.
CURVE_PANELS: Tuple[Tuple[str, str, str], ...] = (
    ("loss_total", "total loss", "linear"),
    ("loss_global", "global loss (image)", "linear"),
    ("loss_objects", "object loss (same image)", "linear"),
    ("loss_neighbours", "neighbour loss (cross-image)", "linear"),
    ("objects_per_image", "objects per image", "linear"),
    ("consistent", "cycle-consistent fraction", "linear"),
    ("lr", "learning rate", "linear"),
    ("teacher_temp", "teacher temperature", "linear"),
)


def _iter_series(log: Any) -> Tuple[np.ndarray, List[Dict[str, Any]], np.ndarray]:
    """(iterations, records, epoch-start iterations) of one run's iteration records.

    Args:
        log: a ``log.jsonl`` path (or its run folder), or its records.
    """
    records = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    recs = iteration_records(records)
    its = np.array([int(r.get("iter", n)) for n, r in enumerate(recs)], np.int64)
    epochs = np.array([r.get("epoch", 0) for r in recs])
    starts = its[1:][np.diff(epochs) != 0] if len(its) > 1 else its[:0]
    return its, recs, starts


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that ignores NaN (shorter at the ends)."""
    ok = np.isfinite(y)
    k = np.ones(window)
    num = np.convolve(np.where(ok, y, 0.0), k, mode="same")
    den = np.convolve(ok.astype(float), k, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def plot_curves(log_path_or_records: Any, path: Optional[PathLike] = None, *,
                panels: Sequence[Tuple[str, str, str]] = CURVE_PANELS, ncols: int = 4,
                title: Optional[str] = "Training curves",
                panel_size: Tuple[float, float] = (2.6, 2.0),
                dpi: int = 100) -> Any:
    """Every loss term and statistic of a training log against iterations.

    One small panel per quantity (:data:`CURVE_PANELS`: the total, global,
    object and neighbour losses, objects per image, the cycle-consistent
    fraction, learning rate, teacher temperature); dotted lines mark epoch
    starts.  Beyond 60 points the raw values are drawn faint with a moving
    average on top.

    Args:
        log_path_or_records: a ``log.jsonl`` path (or its run folder), a list of
            its records, or ``{name: log}`` to overlay several runs (ablations).
        path: also write a PNG here.
        panels: ``(key, title, "linear" | "log")`` of each panel.
        ncols: panels per row.
        title: figure title (None for none).
        panel_size: (width, height) of a panel in inches.
        dpi: resolution.

    Returns:
        The Figure; a key never logged gives an empty panel saying so.
    """
    if isinstance(log_path_or_records, Mapping):
        runs = {str(k): _iter_series(v) for k, v in log_path_or_records.items()}
    else:
        runs = {"": _iter_series(log_path_or_records)}
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(ncols * panel_size[0], nrows * panel_size[1] + (0.35 if title else 0), dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
    from matplotlib.ticker import MaxNLocator

    for ax, (key, name, scale) in zip(axes, panels):
        drawn = False
        for ci, (run, (its, recs, starts)) in enumerate(runs.items()):
            y = np.array([float(r[key]) if r.get(key) is not None else np.nan for r in recs])
            if not np.isfinite(y).any():
                continue
            color = f"C{ci}"
            if len(y) > 60:
                ax.plot(its, y, color=color, lw=0.6, alpha=0.3)
                ax.plot(its, _smooth(y, max(3, len(y) // 30)), color=color, lw=1.4,
                        label=run or None)
            else:
                ax.plot(its, y, color=color, lw=1.3, marker="." if len(y) < 25 else None,
                        ms=3, label=run or None)
            if ci == 0:
                for s in starts:
                    ax.axvline(s, color="0.75", lw=0.7, ls=":", zorder=0)
            drawn = True
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.25, lw=0.5)
        if drawn:
            if scale == "log":
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
            ax.yaxis.get_offset_text().set_fontsize(7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", color="0.5",
                    fontsize=8, transform=ax.transAxes)
            ax.set_yticks([])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(panels) - ncols):len(panels)]:  # the lowest panel of each column
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("iteration", fontsize=8)
    if len(runs) > 1:
        axes[0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)
