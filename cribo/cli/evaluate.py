"""``cribo evaluate``: dense NN retrieval and linear-probe mIoU of a checkpoint.

Evaluates the checkpoint and (by default) the untrained-network floor -- a
freshly initialised ViT of the same architecture -- on the same bank and the
same validation images, prints a table, per-class IoUs and paired-bootstrap
intervals of the differences, and writes everything to a JSON file.

A VOC-style folder is scored with its own class list: --class-names FILE, else
classes.txt or labelmap.txt in the folder (one name per line, the first for
label 0, the background; or CVAT's name:r,g,b:: lines), else VOC 2012's 21
names for a folder that looks like VOC 2012, else 'class 1'..'class m' for its
masks' labels (up to 20; more need a list).  The output path, the class list
and every mask used are checked before any work.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from .._paths import check_writable_folder

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "cribo evaluate") -> argparse.ArgumentParser:
    """The argument parser of ``cribo evaluate``."""
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="teacher_backbone.pth, checkpoint.pth, a run folder, or a published "
                        "DINO/CrIBo checkpoint")
    g.add_argument("--key", default="teacher",
                   help="entry of a training checkpoint to evaluate (teacher or student)")
    g.add_argument("--num-heads", type=int, default=None,
                   help="attention heads when the checkpoint does not record them "
                        "(default: from config.json beside it, else embed_dim / 64)")
    g.add_argument("--compare", default=None,
                   help="a second checkpoint, evaluated the same way and compared by the "
                        "paired bootstrap")
    g.add_argument("--floor", action=B, default=True,
                   help="also evaluate the untrained floor: a fresh ViT of the same "
                        "architecture (cribo.evaluation.random_init_like)")
    g.add_argument("--init-seed", type=int, default=None,
                   help="initialisation seed of the floor (default: the training run's seed, "
                        "so the floor is the run's own starting point; else --seed)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (the embedded scenes) or a VOC-style folder "
                        "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)")
    g.add_argument("--class-names", default=None, metavar="FILE",
                   help="class list of a VOC-style folder: one name per line, the first for "
                        "label 0 (the background), or a labelmap.txt (name:r,g,b:: lines) "
                        "(default: classes.txt or labelmap.txt in the folder, else VOC 2012's "
                        "names for a VOC 2012 folder, else 'class 1'..'class m')")
    g.add_argument("--train-split", default="train", help="VOC list of the bank's images")
    g.add_argument("--val-split", default="val", help="VOC list of the validation images")
    g.add_argument("--n-train", type=int, default=400,
                   help="training images for the bank (VOC: the first n of the list; 0: all)")
    g.add_argument("--n-val", type=int, default=200,
                   help="validation images (VOC: the first n of the list; 0: all)")
    g.add_argument("--scene-size", type=int, default=96, help="synthetic scene side, pixels")
    g.add_argument("--n-classes", type=int, default=6, help="synthetic object classes")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic scenes")
    g = p.add_argument_group("protocol")
    g.add_argument("--image-size", type=int, default=None,
                   help="side of the training views and short side of the validation images, "
                        "a multiple of the patch size (default: the model's img_size)")
    g.add_argument("--k", type=int, default=30, help="neighbours per validation patch")
    g.add_argument("--temperature", type=float, default=0.02,
                   help="softmax temperature of the neighbour similarities")
    g.add_argument("--patches-per-image", type=int, default=100,
                   help="bank cap per training view, rarest classes kept first (0: no cap)")
    g.add_argument("--augment-passes", type=int, default=2,
                   help="augmented views (random resized crop + flip) per training image "
                        "(0: one plain view)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.5, 1.0),
                   metavar=("LO", "HI"), help="area range of the training views' crops")
    g.add_argument("--upsample", choices=("bilinear", "nearest"), default="bilinear",
                   help="how patch scores reach the mask's resolution")
    g.add_argument("--probe", action=B, default=True, help="also run the linear probe")
    g.add_argument("--probe-epochs", type=int, default=10, help="linear-probe epochs")
    g.add_argument("--probe-lr", type=float, default=1e-2, help="linear-probe AdamW learning rate")
    g.add_argument("--probe-batch-size", type=int, default=1024,
                   help="linear-probe patches per step")
    g.add_argument("--probe-balanced", action=B, default=False,
                   help="weigh the probe's loss by inverse class frequency (rare classes "
                        "count as much as the background)")
    g.add_argument("--bootstrap", type=int, default=1000,
                   help="paired-bootstrap resamples of the validation images (0: none)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the bank's views and sampling, the probe and the bootstrap")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    g.add_argument("--query-chunk", type=int, default=8192,
                   help="validation patches per top-k search call (bounds memory)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and the C search (0: leave as is)")
    g.add_argument("--device", default="auto",
                   help="torch device of the backbone and the top-k search: auto (cuda when "
                        "available, else cpu), cpu (the C search on the host), cuda or cuda:N")
    g.add_argument("--search-mb", type=int, default=256,
                   help="memory budget of one top-k search step on a GPU, MiB (the bank and "
                        "the queries are scanned in blocks sized from it; unused on the CPU)")
    g.add_argument("--out", default="evaluation.json", help="JSON file for all results")
    g.add_argument("--progress", action=B, default=True, help="show progress bars")
    return p


class _First:
    """The first ``n`` items of a data set (class names kept)."""

    def __init__(self, ds: Any, n: int) -> None:
        self.ds, self.n = ds, min(n, len(ds)) if n > 0 else len(ds)
        self.class_names = getattr(ds, "class_names", None)

    def check(self) -> Tuple[int, ...]:
        """The data set's mask check (:meth:`VOCSegmentation.check`) on these items."""
        return self.ds.check(self.n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]


def _datasets(a: argparse.Namespace) -> Tuple[Any, Any]:
    """The bank's and the validation data; a VOC folder's masks are checked here."""
    from ..data import SyntheticScenes, VOCSegmentation

    if a.data == "synthetic":
        # rendered once and kept (a few MB): every model evaluated reads the same arrays
        kw = dict(size=a.scene_size, seed=a.data_seed, n_classes=a.n_classes, in_memory=True)
        return (SyntheticScenes("train", a.n_train, **kw), SyntheticScenes("val", a.n_val, **kw))
    # Masks are read with check=False at construction and checked below on the
    # images this run uses (the first --n-train / --n-val), before any model runs.
    kw = dict(class_names=a.class_names, check=False)
    train = _First(VOCSegmentation(a.data, a.train_split, **kw), a.n_train)
    val = _First(VOCSegmentation(a.data, a.val_split, **kw), a.n_val)
    train.check()
    val.check()
    if train.class_names != val.class_names:  # both follow the same rule; never expected
        raise ValueError(f"--data: the class lists of --train-split {a.train_split} and "
                         f"--val-split {a.val_split} differ")
    ds = val.ds
    print(f"cribo evaluate: {len(ds.class_names)} classes from {ds.class_names_source}: "
          f"{', '.join(ds.class_names[:6])}{', ...' if len(ds.class_names) > 6 else ''}")
    if ds.class_names_note:
        print(f"note: {ds.class_names_note}")
    return train, val


def _check_paths(a: argparse.Namespace) -> None:
    """Inputs and outputs that the options name, checked before any work.

    Raises:
        FileNotFoundError / ValueError naming the option.
    """
    if a.data == "synthetic":
        if a.n_train < 1 or a.n_val < 1:
            raise ValueError("--n-train and --n-val must be >= 1 for the synthetic scenes")
        if a.class_names is not None:
            raise ValueError("--class-names applies to a VOC-style --data folder; the "
                             "synthetic scenes name their own classes")
    elif not os.path.isdir(a.data):
        raise FileNotFoundError(f"--data must be 'synthetic' or a VOC-style folder; "
                                f"{a.data!r} is neither")
    if a.class_names is not None and not os.path.isfile(a.class_names):
        raise FileNotFoundError(f"--class-names: no such file: {a.class_names}")
    if a.out:
        _check_output_file(a.out, "--out")


def _check_output_file(path: str, option: str) -> None:
    """That ``path`` can be written as a file: not a folder, under a writable folder.

    Folders missing on the way are allowed (they are created when writing);
    the nearest existing one must be a folder in which a file can be created
    (tried with a temporary file, so it holds for root and read-only mounts).

    Raises:
        ValueError: ``path`` is a folder or not a regular file.
        NotADirectoryError / PermissionError: it cannot be written.
    """
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{option}: {path} is a folder; give a file path, e.g. "
                         f"{os.path.join(path, 'evaluation.json')}")
    if os.path.exists(full) and not os.path.isfile(full):
        raise ValueError(f"{option}: {path} exists and is not a regular file")
    check_writable_folder(os.path.dirname(full), option, path)
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise PermissionError(f"{option}: cannot write {path}: the file is read-only")


def _write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` to ``path`` whole or not at all (temporary file, then rename)."""
    from ..train.checkpoints import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(json.dumps(obj, indent=2), path, "the results")


def _load(option: str, path: str, a: argparse.Namespace) -> Any:
    """:func:`load_backbone` with the option's name in its errors."""
    from ..evaluation.features import load_backbone

    try:
        return load_backbone(path, key=a.key, num_heads=a.num_heads, verbose=True)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{option}: {e}") from None


def _pct(v: Optional[float]) -> str:
    """A score in [0, 1] as a percentage with one decimal (the house rule,
    :func:`cribo.viz.report.percent`), five wide; "-" if none."""
    from ..viz.report import percent

    return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{percent(v):>5}"


def _table(models: Dict[str, Dict[str, Any]]) -> str:
    """The results table: per model, the retrieval and probe scores, then the
    per-class IoUs, all in percent with one decimal.

    Args:
        models: name -> {"retrieval": scores or None, "probe": scores or None}
            (:class:`cribo.evaluation.SegmentationScores`: ``miou``, ``fg_iou``,
            ``pixel_acc``, ``per_class_iou``, ``class_names``).
    """
    cols = [("NN mIoU", "retrieval", "miou"), ("NN fg-IoU", "retrieval", "fg_iou"),
            ("NN acc", "retrieval", "pixel_acc"), ("probe mIoU", "probe", "miou"),
            ("probe fg-IoU", "probe", "fg_iou")]
    w = max(12, *(len(m) for m in models))
    lines = ["scores (%):",
             f"{'model':<{w}}  " + "  ".join(f"{c[0]:>12}" for c in cols)]
    for name, r in models.items():
        cells = [_pct(getattr(r.get(kind), key, None)) if r.get(kind) is not None else "    -"
                 for _, kind, key in cols]
        lines.append(f"{name:<{w}}  " + "  ".join(f"{c:>12}" for c in cells))
    # per-class IoU
    first = next(iter(models.values()))
    res = first.get("retrieval") or first.get("probe")
    heads = [(m, kind) for m in models for kind in ("retrieval", "probe")
             if models[m].get(kind) is not None]
    lines.append("")
    lines.append("per-class IoU (%): " + ", ".join(
        f"[{i}] {m} {'NN' if kind == 'retrieval' else 'probe'}" for i, (m, kind) in
        enumerate(heads)))
    cw = max(len(c) for c in res.class_names)
    lines.append(f"{'class':<{cw}}  " + "  ".join(f"{f'[{i}]':>7}" for i in range(len(heads))))
    for c in res.class_names:
        lines.append(f"{c:<{cw}}  " + "  ".join(
            f"{_pct(models[m][kind].per_class_iou[c]):>7}" for m, kind in heads))
    return "\n".join(lines)


def _check(a: argparse.Namespace) -> None:
    """Range checks of the options, before any work: a ValueError naming the option
    (``cribo`` prints it as one line and exits with status 2)."""
    fin = math.isfinite
    rules = [
        (a.k >= 1, "--k must be >= 1", a.k),
        (fin(a.temperature) and a.temperature > 0, "--temperature must be a finite number > 0",
         a.temperature),
        (a.n_train >= 0, "--n-train must be >= 0", a.n_train),
        (a.n_val >= 0, "--n-val must be >= 0", a.n_val),
        (a.patches_per_image >= 0, "--patches-per-image must be >= 0 (0: no cap)",
         a.patches_per_image),
        (a.augment_passes >= 0, "--augment-passes must be >= 0", a.augment_passes),
        (all(fin(x) for x in a.crop_scale) and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
         "--crop-scale must be two numbers 0 < LO <= HI <= 1", list(a.crop_scale)),
        (a.probe_epochs >= 1, "--probe-epochs must be >= 1", a.probe_epochs),
        (fin(a.probe_lr) and a.probe_lr > 0, "--probe-lr must be a finite number > 0",
         a.probe_lr),
        (a.probe_batch_size >= 1, "--probe-batch-size must be >= 1", a.probe_batch_size),
        (a.bootstrap >= 0, "--bootstrap must be >= 0", a.bootstrap),
        (a.batch_size >= 1, "--batch-size must be >= 1", a.batch_size),
        (a.query_chunk >= 1, "--query-chunk must be >= 1", a.query_chunk),
        (a.threads >= 0, "--threads must be >= 0", a.threads),
        (a.search_mb >= 1, "--search-mb must be >= 1", a.search_mb),
        (a.image_size is None or a.image_size >= 1, "--image-size must be >= 1", a.image_size),
        (a.n_classes >= 1, "--n-classes must be >= 1", a.n_classes),
        (a.scene_size >= 1, "--scene-size must be >= 1", a.scene_size),
    ]
    for ok, msg, value in rules:
        if not ok:
            raise ValueError(f"{msg}, got {value}")
    for option, path in (("--checkpoint", a.checkpoint), ("--compare", a.compare)):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{option}: no checkpoint at {path}")


def _device(name: str) -> Any:
    """The torch device that ``--device`` names ("auto": cuda when available, else cpu).

    Raises:
        ValueError naming --device: not a device name, or CUDA asked for but absent.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (use --device auto "
                         "or cpu)")
    return device


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cribo evaluate`` (see ``--help``)."""
    parser = build_parser()
    a = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    _check(a)
    _check_paths(a)
    import torch

    import cribo

    from ..evaluation.dense import dense_evaluation
    from ..evaluation.features import class_names_of, random_init_like
    from ..evaluation.metrics import paired_bootstrap

    if a.threads > 0:
        torch.set_num_threads(a.threads)
        cribo.set_num_threads(a.threads)
    device = _device(a.device)
    train_set, val_set = _datasets(a)

    models: Dict[str, Any] = {"checkpoint": _load("--checkpoint", a.checkpoint, a)}
    if a.compare:
        models["compare"] = _load("--compare", a.compare, a)
    init_seed = a.init_seed
    if init_seed is None:
        run = models["checkpoint"].training_config or {}
        init_seed = int(run.get("seed", a.seed))
    if a.floor:
        models["random init"] = random_init_like(models["checkpoint"], init_seed)
    image_size = a.image_size or models["checkpoint"].img_size
    opts = dict(k=a.k, temperature=a.temperature, image_size=image_size,
                patches_per_image=a.patches_per_image or None,
                augment_passes=a.augment_passes, crop_scale=tuple(a.crop_scale),
                batch_size=a.batch_size, query_chunk=a.query_chunk, upsample=a.upsample,
                probe=a.probe, probe_epochs=a.probe_epochs, probe_lr=a.probe_lr,
                probe_batch_size=a.probe_batch_size, probe_balanced=a.probe_balanced,
                seed=a.seed, device=device, progress=a.progress,
                search_bytes=a.search_mb << 20)
    print(f"cribo evaluate: {len(train_set)} training images x {max(a.augment_passes, 1)} "
          f"view(s) for the bank, {len(val_set)} validation images, {image_size} px, "
          f"{len(class_names_of(val_set))} classes")
    results: Dict[str, Dict[str, Any]] = {}
    for name, net in models.items():
        net.to(device)
        nn_r, probe_r = dense_evaluation(net, train_set, val_set, **opts)
        results[name] = {"retrieval": nn_r, "probe": probe_r}
        r = nn_r or probe_r
        seed_note = f" (initialisation seed {init_seed})" if name == "random init" else ""
        print(f"  {name}{seed_note}: bank of {r.bank_size} patches, {r.seconds:.1f} s")
    print()
    print(_table(results))

    boot: Dict[str, Dict[str, Any]] = {}
    if a.bootstrap > 0:
        others = [m for m in results if m != "checkpoint"]
        if others:
            print()
            print(f"paired bootstrap over {len(val_set)} validation images, {a.bootstrap} "
                  f"resamples (difference in percentage points, 95% interval):")
        for other in others:
            pair = f"checkpoint - {other}"
            boot[pair] = {}
            for kind in ("retrieval", "probe"):
                ra, rb = results["checkpoint"][kind], results[other][kind]
                if ra is None or rb is None:
                    continue
                b = paired_bootstrap(ra, rb, n=a.bootstrap, seed=a.seed)
                boot[pair][kind] = b.to_dict()
                label = "NN" if kind == "retrieval" else "probe"
                print(f"  {pair:<26} {label:>5} mIoU {b.miou}   fg-IoU {b.fg_iou}")

    out = {"type": "evaluation", "time": datetime.datetime.now().isoformat(timespec="seconds"),
           "cribo": cribo.__version__, "args": vars(a) | {"crop_scale": list(a.crop_scale)},
           "device": str(device), "image_size": image_size, "init_seed": init_seed,
           "n_train": len(train_set), "n_val": len(val_set),
           "models": {m: {kind: (r.to_dict() if r is not None else None)
                          for kind, r in rs.items()} for m, rs in results.items()},
           "bootstrap": boot}
    if a.out:
        _write_json(a.out, _json_safe(out))
        print(f"\nwrote {a.out}")
    return 0


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
