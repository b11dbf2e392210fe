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
    "queue256": ["--queue-size", "256"],
    "queue4096": ["--queue-size", "4096"],
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
    from ..train.config import config_from_args
    from . import dense_evaluation, random_init_like
    from .job import teacher_backbone, eval_datasets
    from ..train.loop import train

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
            floors[seed] = json.load(open(floor_file))
        for name in variants:
            run_dir = os.path.join(output_dir, f"{name}-seed{seed}")
            cfg = config_from_args(list(extra) + VARIANTS[name] +
                                   ["--seed", str(seed), "--output-dir", run_dir,
                                    "--no-evaluate"])
            done = os.path.join(run_dir, "eval.json")
            if os.path.exists(done):  # resumable: a finished (variant, seed) is kept
                rows.setdefault(name, {})[seed] = json.load(open(done))
                continue
            if table_only:
                continue
            print(f"== {name}, seed {seed}", flush=True)
            train(cfg)
            train_set, val_set = eval_datasets(cfg)
            kw = dict(k=cfg.eval_k, image_size=cfg.scene_size, seed=cfg.seed,
                      progress=cfg.progress, keep_predictions=0)
            backbone = teacher_backbone(cfg)
            m = _metrics(*dense_evaluation(backbone, train_set, val_set, **kw))
            json.dump(m, open(done, "w"))
            rows.setdefault(name, {})[seed] = m
            if seed not in floors:  # every variant of a seed starts from this network
                floors[seed] = _metrics(*dense_evaluation(random_init_like(backbone, seed),
                                                          train_set, val_set, **kw))
                json.dump(floors[seed], open(floor_file, "w"))
    table = _summarise(rows, floors)
    _write(table, output_dir)
    return table


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
    keys = [("retrieval_miou", "retrieval mIoU"), ("retrieval_fg_iou", "retrieval fg/bg IoU"),
            ("probe_miou", "probe mIoU"), ("probe_fg_iou", "probe fg/bg IoU")]
    header = ["| variant | seeds | " + " | ".join(label for _, label in keys) + " |",
              "|---|---:|" + "---:|" * len(keys)]

    def pts(x: float) -> str:  # points, without a "-0.0"
        return f"{round(100 * x, 1) + 0.0:.1f}"

    def cell(d: Dict[str, Any]) -> str:  # one seed has no spread to show
        if len(d["seeds"]) == 1:
            return pts(d["mean"])
        return f"{pts(d['mean'])} ± {pts(d['std'])}"

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
    with open(os.path.join(output_dir, "ablation.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(output_dir, "ablation.json"), "w") as fh:
        json.dump(table, fh, indent=2)
    print(md)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    # The informative picture is each variant's gain over the untrained network of
    # the same seed (the scores themselves vary more between seeds than that).
    gain = bool(table.get("gain"))
    part = table["gain"] if gain else table["variants"]
    names = list(part)
    fig = Figure(figsize=(3 + 1.3 * len(names), 3.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    for j, (k, label) in enumerate(keys[:3]):
        means = [100 * part[n][k]["mean"] for n in names]
        stds = [100 * part[n][k]["std"] for n in names]
        ax.bar(x + (j - 1) * 0.27, means, 0.27, yerr=stds, label=label, capsize=2,
               color=f"C{j}")
        for i, n in enumerate(names):  # every seed as a dot
            seeds = [100 * v for v in part[n][k]["seeds"].values()]
            ax.plot(np.full(len(seeds), x[i] + (j - 1) * 0.27), seeds, "k.", ms=3)
    if gain:
        ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x)
    n_seeds = [len(part[n][keys[0][0]]["seeds"]) for n in names]
    if len(set(n_seeds)) > 1:  # means over different seeds: say so under each bar
        names = [f"{n} ({k} seeds)" for n, k in zip(names, n_seeds)]
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("gain over the untrained network (points)" if gain else "score (%)")
    ax.set_title("Ablation: mean ± std over seeds, dots = seeds" +
                 ("; 0 = the same seed's untrained network" if gain else ""), fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "ablation.png"))
