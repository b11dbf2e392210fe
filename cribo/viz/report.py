"""A run's report folder: ``report.md``, ``report.html`` and ``metrics.json``.

:func:`write_report` puts the metrics table, the pictures (PNGs, linked by
relative path, so the folder can be moved or zipped as a whole) and the
configuration (in a collapsible block) into one Markdown and one
self-contained HTML page; ``metrics.json`` holds the metrics as given.  Each
file is written whole or not at all (:func:`cribo.train.checkpoints.atomic_write_text`);
nothing else beyond the standard library is used.

A metric is a number, or a mapping with ``"value"`` and any of::

    {"value": 45.7,              # the trained network
     "std": 1.2,                 # spread over seeds: shown as value ± std
     "ci": (44.1, 47.0),         # an interval for the value
     "floor": 34.6,              # the untrained network: adds the floor and Δ columns
     "delta_ci": (8.9, 13.1)}    # an interval for value - floor (e.g. paired bootstrap)

With ``"unit": "%"`` the numbers of the metric are fractions (an IoU of 0.457)
and the table shows them as percentages with one decimal, the metric's name
followed by ``(%)``: the value, std, intervals, floor and Δ alike (Δ and its
interval in percentage points), so every number of a row is in one unit.
``metrics.json`` keeps the fractions.  Other numbers are shown with 4
significant digits.  :func:`percent` is that percentage rule, for every number
cribo shows people as a percentage (``cribo evaluate``'s table, the ablation
table, bootstrap intervals).

A mapping without ``"value"`` is a group: ``{"per-class IoU": {"disc": 0.3, ...}}``
gives the rows ``per-class IoU / disc``, ....
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import shutil
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..train.checkpoints import atomic_write_text

__all__ = ["write_report", "metric_rows", "percent"]

PathLike = Union[str, "os.PathLike[str]"]

_COLUMNS = (("value", "value"), ("ci", "95% CI"), ("floor", "untrained floor"),
            ("delta", "Δ vs floor"), ("delta_ci", "Δ 95% CI"))


# --------------------------------------------------------------------------- values

def _jsonable(x: Any) -> Any:
    """Plain JSON: NumPy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # NumPy scalar or array, torch tensor
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _fmt(x: Any) -> str:
    """A number for a table: 4 significant digits, thousands separated when large."""
    if x is None:
        return ""
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, int):
        return f"{x:,}"
    v = _num(x)
    if v is None:
        return str(x)
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def percent(x: Any, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal (0.4567 -> "45.7"), never "-0.0";
    with ``signed``, a difference in signed percentage points (0.0123 -> "+1.2",
    0 -> "+0.0").  Anything but a finite number is shown as it is."""
    v = _num(x)
    if v is None or not math.isfinite(v):
        return _fmt(x)
    return f"{round(100 * v, 1) + 0.0:{'+' if signed else ''}.1f}"


def _interval(ci: Any, fmt: Any = _fmt) -> str:
    lo, hi = ci
    return f"[{fmt(lo)}, {fmt(hi)}]"


#: The units a metric may name, and how each shows its numbers.
_UNITS = {"%": percent}


def metric_rows(metrics: Mapping[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """The metrics table: ``(header, rows)`` of strings.

    Columns beyond the metric and its value appear only when some metric has
    them (module docstring for the keys, and for ``"unit"``).  Δ is ``value - floor``.
    """
    flat: List[Tuple[str, Dict[str, Any]]] = []

    def walk(m: Mapping[str, Any], prefix: str) -> None:
        for name, v in m.items():
            if isinstance(v, Mapping) and "value" not in v:
                walk(v, f"{prefix}{name} / ")
            elif isinstance(v, Mapping):
                flat.append((f"{prefix}{name}", dict(v)))
            else:
                flat.append((f"{prefix}{name}", {"value": v}))

    walk(metrics, "")
    for _, m in flat:
        value, floor = _num(m.get("value")), _num(m.get("floor"))
        if value is not None and floor is not None and "delta" not in m:
            m["delta"] = value - floor
    used = [(k, head) for k, head in _COLUMNS
            if k == "value" or any(m.get(k) is not None for _, m in flat)]
    header = ["metric"] + [head for _, head in used]
    rows = []
    for name, m in flat:
        unit = m.get("unit")
        if unit is not None and unit not in _UNITS:
            raise ValueError(f"metric_rows: metric {name!r} has unit {unit!r}; the units are "
                             f"{sorted(_UNITS)} ('%': fractions shown as percentages)")
        fmt = _fmt if unit is None else _UNITS[unit]
        row = [name if unit is None else f"{name} ({unit})"]
        for k, _ in used:
            v = m.get(k)
            if v is None:
                row.append("")
            elif k in ("ci", "delta_ci"):
                row.append(_interval(v, fmt))
            elif k == "value" and m.get("std") is not None:
                row.append(f"{fmt(v)} ± {fmt(m['std'])}")
            elif k == "delta":
                text = fmt(v)  # "+" on a gain, but not on one that rounds to "0.0"
                plus = (_num(v) or 0.0) > 0 and text.strip("0.") != ""
                row.append(("+" if plus else "") + text)
            else:
                row.append(fmt(v))
        rows.append(row)
    return header, rows


# --------------------------------------------------------------------------- figures

def _place_figures(output_dir: str, figures: Mapping[str, PathLike]) -> List[Tuple[str, str]]:
    """``(name, link)`` of each figure, the link relative to ``output_dir``.

    A relative path is looked up in ``output_dir`` first, then in the working
    directory; a picture outside ``output_dir`` is copied into
    ``output_dir/figures/`` so that the folder is self-contained.
    """
    out = []
    root = os.path.realpath(output_dir)
    for name, p in figures.items():
        p = os.fspath(p)
        cand = p if os.path.isabs(p) else os.path.join(output_dir, p)
        src = cand if os.path.exists(cand) else os.path.abspath(p)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"write_report: figure {name!r} not found: {p}")
        real = os.path.realpath(src)
        if os.path.commonpath([root, real]) != root:
            os.makedirs(os.path.join(output_dir, "figures"), exist_ok=True)
            dst = os.path.join(output_dir, "figures", os.path.basename(src))
            stem, ext = os.path.splitext(dst)
            n = 1
            while os.path.exists(dst) and not os.path.samefile(dst, src):
                dst, n = f"{stem}_{n}{ext}", n + 1
            shutil.copyfile(src, dst)
            real = os.path.realpath(dst)
        rel = os.path.relpath(real, root).replace(os.sep, "/")
        out.append((str(name), rel))
    return out


# --------------------------------------------------------------------------- writers

def _markdown(title: str, stamp: str, notes: Sequence[str], header: List[str],
              rows: List[List[str]], figs: List[Tuple[str, str]], config_json: str) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"# {title}", "", f"*{stamp}*", ""]
    for p in notes:
        lines += [p, ""]
    lines += ["## Metrics", ""]
    if rows:
        lines.append("| " + " | ".join(cell(h) for h in header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    else:
        lines.append("(none)")
    lines.append("")
    if figs:
        lines += ["## Figures", ""]
        for name, link in figs:
            lines += [f"### {name}", "", f"![{name}]({urllib.parse.quote(link)})", ""]
    lines += ["## Configuration", "", "<details><summary>configuration (JSON)</summary>", "",
              "```json", config_json, "```", "", "</details>", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; }
.stamp { color: #777; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; }
th { background: #f4f4f4; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.95em; margin-top: 0.3em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
summary { cursor: pointer; }
"""


def _html(title: str, stamp: str, notes: Sequence[str], header: List[str],
          rows: List[List[str]], figs: List[Tuple[str, str]], config_json: str) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{e(title)}</h1>", f'<p class="stamp">{e(stamp)}</p>']
    parts += [f"<p>{e(p)}</p>" for p in notes]
    parts.append("<h2>Metrics</h2>")
    if rows:
        parts.append("<table>")
        parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    else:
        parts.append("<p>(none)</p>")
    if figs:
        parts.append("<h2>Figures</h2>")
        for name, link in figs:
            parts.append(f'<figure><img src="{e(urllib.parse.quote(link))}" alt="{e(name)}">'
                         f"<figcaption>{e(name)}</figcaption></figure>")
    parts += ["<h2>Configuration</h2>",
              "<details><summary>configuration (JSON)</summary>",
              f"<pre>{e(config_json)}</pre>", "</details>", "</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(output_dir: PathLike, *, metrics: Mapping[str, Any],
                 figures: Optional[Mapping[str, PathLike]] = None,
                 config: Optional[Mapping[str, Any]] = None,
                 title: str = "CrIBo report", notes: Union[str, Sequence[str], None] = None
                 ) -> Dict[str, str]:
    """Write ``report.md``, ``report.html`` and ``metrics.json`` into ``output_dir``.

    Args:
        output_dir: the report folder (created if needed).
        metrics: name -> number, or name -> ``{"value", "std", "ci", "floor",
            "delta_ci", "unit"}`` (module docstring), or name -> a group of those.
        figures: caption -> PNG path, in display order.  Linked by path relative
            to ``output_dir``; pictures outside it are copied into
            ``output_dir/figures/``.
        config: the run's configuration, shown as JSON in a collapsible block.
        title: the page title.
        notes: a paragraph, or several, shown under the title (plain text).

    Returns:
        ``{"md": path, "html": path, "json": path}``.
    """
    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    figs = _place_figures(out, figures or {})
    header, rows = metric_rows(metrics)
    config_json = json.dumps(_jsonable(dict(config or {})), indent=2, sort_keys=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        from .. import __version__ as version
    except ImportError:  # pragma: no cover - a broken build still gets its report
        version = "?"
    stamp = f"written {when} by cribo {version}"
    paras = [notes] if isinstance(notes, str) else list(notes or [])
    paths = {"md": os.path.join(out, "report.md"), "html": os.path.join(out, "report.html"),
             "json": os.path.join(out, "metrics.json")}
    texts = {"md": _markdown(title, stamp, paras, header, rows, figs, config_json),
             "html": _html(title, stamp, paras, header, rows, figs, config_json),
             "json": json.dumps(_jsonable(dict(metrics)), indent=2, allow_nan=False) + "\n"}
    for k, p in paths.items():
        atomic_write_text(texts[k], p, "the report file")
    return paths
