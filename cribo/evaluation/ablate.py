"""``cribo ablate``: named CrIBo variants over several seeds at equal compute.

Every variant trains with the same preset, epochs, batch and data (so the same
number of steps on the same images), then is evaluated with the same dense
retrieval and linear probe as the main job; the untrained network of each seed
is the floor.  Writes ``<output_dir>/ablation.md`` (mean ± std over seeds),
``ablation.json`` and ``ablation.png``.

    cribo ablate                                   # the default variants, 3 seeds
    cribo ablate --variants full,global_only --seeds 0 1 2 3 -- --epochs 6
    cribo ablate --variants K8,K32 --seeds 0 1     # a sweep, into the same folder
    cribo ablate --table-only --variants full,global_only,K8,K32   # one table of both
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "run_ablation"]

#: Variant name -> `cribo pretrain` flags on top of the common ones.
VARIANTS: Dict[str, List[str]] = {
    "full": [],
    "no_cross_image": ["--w-neighbours", "0"],
    "global_only": ["--w-objects", "0", "--w-neighbours", "0"],
    "no_curriculum": ["--objects-start-epoch", "0"],
    "no_positional": ["--pos-weight-start", "0", "--pos-weight-end", "0"],
    "K8": ["--n-clusters", "8"],
    "K32": ["--n-clusters", "32"],
    "queue256": ["--queue-capacity", "256"],
    "queue4096": ["--queue-capacity", "4096"],
}
DEFAULT_VARIANTS = ["full", "no_cross_image", "global_only", "no_positional", "no_curriculum"]


def _metrics(res: Any, probe: Any) -> Dict[str, float]:
    return {"retrieval_miou": res.miou, "retrieval_fg_iou": res.fg_iou,
            "probe_miou": probe.miou, "probe_fg_iou": probe.fg_iou}


def run_ablation(variants: Sequence[str], seeds: Sequence[int], output_dir: str,
                 extra: Sequence[str] = (), table_only: bool = False) -> Dict[str, Any]:
    """Trains and evaluates every (variant, seed); returns and writes the table.

    A (variant, seed) whose ``eval.json`` exists in ``output_dir`` is read, not
    trained again.  With ``table_only`` nothing is trained: the table is built
    from the finished runs among ``variants`` x ``seeds`` (to combine several
    invocations, e.g. sweeps run with fewer seeds).
    """
    from ..train.checkpoints import atomic_write_text
    from ..train.config import config_from_args
    from ..train.loop import train
    from ..train.run_folder import RunFolder
    from .features import random_init_like
    from .job import eval_datasets, evaluate_backbone, teacher_backbone

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"cribo ablate: unknown variant(s) {unknown}; choose from "
                         f"{sorted(VARIANTS)}")
    os.makedirs(output_dir, exist_ok=True)
    rows: Dict[str, Dict[int, Dict[str, float]]] = {}
    floors: Dict[int, Dict[str, float]] = {}
    for seed in seeds:
        floor_file = os.path.join(output_dir, f"floor-seed{seed}.json")
        if os.path.exists(floor_file):
            floors[seed] = _read_json(floor_file)
        for name in variants:
            run_dir = os.path.join(output_dir, f"{name}-seed{seed}")
            cfg = config_from_args(list(extra) + VARIANTS[name] +
                                   ["--seed", str(seed), "--output-dir", run_dir,
                                    "--no-evaluate"])
            done = RunFolder(run_dir).eval
            if os.path.exists(done):  # resumable: a finished (variant, seed) is kept
                rows.setdefault(name, {})[seed] = _read_json(done)
                continue
            if table_only:
                continue
            print(f"== {name}, seed {seed}", flush=True)
            train(cfg)
            data = eval_datasets(cfg)
            backbone = teacher_backbone(cfg)
            m = _metrics(*evaluate_backbone(cfg, backbone, data))
            # whole or not at all: a run killed here is evaluated again next time
            atomic_write_text(json.dumps(m), done, "the variant's scores")
            rows.setdefault(name, {})[seed] = m
            if seed not in floors:  # every variant of a seed starts from this network
                floors[seed] = _metrics(*evaluate_backbone(
                    cfg, random_init_like(backbone, seed), data))
                atomic_write_text(json.dumps(floors[seed]), floor_file, "the floor's scores")
    table = _summarise(rows, floors)
    _write(table, output_dir)
    return table


def _read_json(path: str) -> Dict[str, float]:
    with open(path) as fh:
        return json.load(fh)


def _summarise(rows: Dict[str, Dict[int, Dict[str, float]]],
               floors: Dict[int, Dict[str, float]]) -> Dict[str, Any]:
    """Mean ± std over seeds of every score, of its gain over the same seed's
    untrained floor, and of full CrIBo's paired (same seed) lead over each variant."""
    keys = ["retrieval_miou", "retrieval_fg_iou", "probe_miou", "probe_fg_iou"]

    def stats(values: Dict[int, float]) -> Dict[str, Any]:
        v = list(values.values())
        return {"mean": float(np.mean(v)), "std": float(np.std(v)),
                "seeds": {str(s): float(x) for s, x in values.items()}}

    out: Dict[str, Any] = {"variants": {}, "floor": {}, "gain": {}, "full_minus": {}}
    for name, per_seed in rows.items():
        out["variants"][name] = {k: stats({s: m[k] for s, m in per_seed.items()})
                                 for k in keys}
        paired = [s for s in per_seed if s in floors]
        if paired:
            out["gain"][name] = {k: stats({s: per_seed[s][k] - floors[s][k] for s in paired})
                                 for k in keys}
        if name != "full" and "full" in rows:
            both = [s for s in per_seed if s in rows["full"]]
            if both:
                out["full_minus"][name] = {
                    k: stats({s: rows["full"][s][k] - per_seed[s][k] for s in both})
                    for k in keys}
    if floors:
        out["floor"] = {k: stats({s: m[k] for s, m in floors.items()}) for k in keys}
    return out


def _write(table: Dict[str, Any], output_dir: str) -> None:
    """``ablation.md`` (percentages with one decimal), ``ablation.json`` and, with
    matplotlib, ``ablation.png`` of :func:`_summarise`'s table."""
    from ..train.checkpoints import atomic_write_text
    from ..viz.report import percent

    keys = [("retrieval_miou", "retrieval mIoU"), ("retrieval_fg_iou", "retrieval fg/bg IoU"),
            ("probe_miou", "probe mIoU"), ("probe_fg_iou", "probe fg/bg IoU")]
    header = ["| variant | seeds | " + " | ".join(label for _, label in keys) + " |",
              "|---|---:|" + "---:|" * len(keys)]

    def cell(d: Dict[str, Any]) -> str:  # one seed has no spread to show
        if len(d["seeds"]) == 1:
            return percent(d["mean"])
        return f"{percent(d['mean'])} ± {percent(d['std'])}"

    def row(name: str, m: Dict[str, Any]) -> str:
        return (f"| {name} | {len(m[keys[0][0]]['seeds'])} | "
                + " | ".join(cell(m[k]) for k, _ in keys) + " |")

    lines = header + [row(name, m) for name, m in table["variants"].items()]
    if table["floor"]:
        lines.append(row("untrained floor", table["floor"]))
    for title, part in (("Gain over the untrained floor (same seed)", "gain"),
                        ("Full CrIBo minus each variant (same seed)", "full_minus")):
        if table.get(part):
            lines += ["", f"{title}, mean ± std over seeds:", ""] + header
            lines += [row(name, m) for name, m in table[part].items()]
    md = "\n".join(lines) + "\n"
    atomic_write_text(md, os.path.join(output_dir, "ablation.md"), "the ablation table")
    atomic_write_text(json.dumps(table, indent=2), os.path.join(output_dir, "ablation.json"),
                      "the ablation table")
    print(md)
    try:
        import matplotlib  # noqa: F401  (the picture needs the plot extra; the table does not)
    except ImportError:
        return
    from ..viz.ablation import plot_ablation

    plot_ablation(table, os.path.join(output_dir, "ablation.png"), scores=keys[:3])
