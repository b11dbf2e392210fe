"""The main job's second half: after ``cribo pretrain`` trains, evaluate the teacher
against the untrained network it started from and write the report.

``cribo pretrain`` (no arguments) = the CPU preset on the synthetic scenes, then
:func:`evaluate_and_report`, which writes ``<output_dir>/report/``:

- ``report.md`` / ``report.html`` / ``metrics.json``: dense-retrieval mIoU,
  foreground/background IoU, per-class IoU and the linear probe, each beside the
  untrained floor with a paired-bootstrap 95% interval of the gain;
- ``curves.png`` (every loss term and statistic), ``clusters.png`` (the teacher's
  joint-space clusters on two views), ``matches.png`` (queue neighbours, cycle-
  consistent or not), ``predictions.png`` (retrieval next to ground truth).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..train.config import TrainConfig

__all__ = ["evaluate_and_report", "eval_datasets", "teacher_usage"]


def eval_datasets(cfg: TrainConfig):
    """(train, val) synthetic scenes for the dense evaluation (disjoint from nothing
    the network saw at test time: 'val' is its own stream)."""
    from ..data import SyntheticScenes

    train = SyntheticScenes("train", n_images=cfg.eval_train_images, size=cfg.scene_size,
                            seed=cfg.seed)
    val = SyntheticScenes("val", n_images=cfg.eval_val_images, size=cfg.scene_size,
                          seed=cfg.seed)
    return train, val


def teacher_backbone(cfg: TrainConfig) -> torch.nn.Module:
    from ..train.loop import build_models

    backbone = build_models(cfg)["teacher"].backbone
    state = torch.load(os.path.join(cfg.output_dir, "teacher_backbone.pth"), map_location="cpu",
                       weights_only=True)
    backbone.load_state_dict(state)
    return backbone.eval()


def _cluster_figure(cfg: TrainConfig, backbone: torch.nn.Module, path: str) -> None:
    """The teacher's joint-space clusters on two views of a few training scenes."""
    from .. import cluster, viz
    from ..data import SyntheticScenes, TwoViewTransform

    scenes = SyntheticScenes("train", n_images=8, size=cfg.scene_size, seed=cfg.seed)
    tf = TwoViewTransform(size=cfg.img_size, patch_size=cfg.patch_size)
    tf = tf.geometric_only()
    rng = np.random.default_rng(cfg.seed)
    views = [tf(scenes[i][0], rng) for i in range(3)]
    imgs = torch.from_numpy(np.stack([[v.image for v in pair] for pair in views]))
    pos = np.stack([[v.positions for v in pair] for pair in views]).astype(np.float32)
    B = imgs.shape[0]
    with torch.no_grad():
        _, tok = backbone(_normalize(imgs.flatten(0, 1)))
    tok = tok.view(B, 2, tok.shape[1], -1).numpy()
    c = cluster(tok, pos, cfg.n_clusters, pos_weight=cfg.pos_weight_end,
                sinkhorn_lambda=cfg.sinkhorn_lambda, seed=cfg.seed)
    g = cfg.img_size // cfg.patch_size
    rgb = _channels_last(imgs)
    viz.plot_clusters(rgb[:, 0], rgb[:, 1], c.labels[:, 0], c.labels[:, 1],
                      grid=(g, g), valid=c.valid, path=path, show_views=True,
                      gray_base=False, alpha=0.45,
                      title="Teacher's joint-space clusters: one colour = one cluster in both views")


def _channels_last(views: torch.Tensor) -> np.ndarray:
    """Un-normalised views (..., 3, H, W) in [0, 1] -> (..., H, W, 3) uint8 for
    drawing (viz reads a channels-first float image as an ImageNet-normalised one)."""
    x = np.moveaxis(views.numpy(), -3, -1)
    return np.ascontiguousarray(np.clip(np.round(x * 255), 0, 255).astype(np.uint8))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    from ..data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _match_figure(cfg: TrainConfig, backbone: torch.nn.Module, path: str) -> None:
    """Nearest queue neighbours of a batch's objects, with the trained teacher."""
    from .. import ObjectQueue, cluster, pool, viz
    from ..data import SyntheticScenes, TwoViewTransform

    scenes = SyntheticScenes("val", n_images=64, size=cfg.scene_size, seed=cfg.seed + 1)
    tf = TwoViewTransform(size=cfg.img_size, patch_size=cfg.patch_size).geometric_only()
    rng = np.random.default_rng(cfg.seed + 1)
    queue = ObjectQueue(capacity=64, dim=backbone.embed_dim)
    buffer = viz.MatchBuffer(max_batches=4)
    g = cfg.img_size // cfg.patch_size
    examples = []
    for b0 in range(0, 64, 16):
        pairs = [tf(scenes[i][0], rng) for i in range(b0, b0 + 16)]
        imgs = torch.from_numpy(np.stack([[v.image for v in p] for p in pairs]))
        pos = np.stack([[v.positions for v in p] for p in pairs]).astype(np.float32)
        with torch.no_grad():
            _, tok = backbone(_normalize(imgs.flatten(0, 1)))
        tok = tok.view(16, 2, tok.shape[1], -1).numpy()
        c = cluster(tok, pos, cfg.n_clusters, pos_weight=cfg.pos_weight_end, seed=b0)
        obj = pool(tok, c.labels, cfg.n_clusters)
        t1, t2 = obj[:, 0][c.valid], obj[:, 1][c.valid]
        match = queue.match(t1, t2)
        rgb = _channels_last(imgs)
        if b0 == 48:
            examples = viz.match_examples(buffer, rgb, c.labels, c.valid, match,
                                          grid=(g, g), max_examples=8,
                                          image_counts=queue.image_counts)
        buffer.push(rgb, c.labels, c.valid)
        queue.push(t1, t2, c.valid.sum(1))
    if examples:
        viz.plot_matches(examples, path=path,
                         title="Queue neighbours (green: passes the cycle check)")


def teacher_usage(cfg: TrainConfig, n_images: int = 64) -> Dict[str, float]:
    """How many of its L outputs the trained teacher really uses: a collapse check.

    Runs the teacher of ``<output_dir>/checkpoint.pth`` on two views of
    ``n_images`` training scenes, clusters and pools as in training, and applies
    its centred, sharpened heads (final temperatures).  For the global (CLS) and
    the object outputs separately it returns the mean entropy of one output
    distribution and ``exp`` of the entropy of their average, the effective
    number of outputs in use: near L when the outputs are spread, a few when the
    teacher has (partly) collapsed onto them.  Both are in nats / counts.
    """
    from .. import cluster, pool
    from ..train.loop import build_data, build_models

    ck = torch.load(os.path.join(cfg.output_dir, "checkpoint.pth"), map_location="cpu",
                    weights_only=True)
    teacher = build_models(cfg)["teacher"]
    teacher.load_state_dict(ck["teacher"])
    teacher.eval()
    data = build_data(cfg)
    items = [data[i] for i in range(min(n_images, len(data)))]
    B = len(items)
    imgs = torch.stack([torch.stack([torch.as_tensor(it["view1"]), torch.as_tensor(it["view2"])])
                        for it in items])
    pos = np.stack([np.stack([it["pos1"], it["pos2"]]) for it in items]).astype(np.float32)
    with torch.no_grad():
        cls, tok = teacher.backbone(imgs.flatten(0, 1))
        tok_np = tok.view(B, 2, tok.shape[1], -1).numpy()
        c = cluster(tok_np, pos, cfg.n_clusters, pos_weight=cfg.pos_weight_end,
                    sinkhorn_lambda=cfg.sinkhorn_lambda, seed=cfg.seed)
        objects = pool(tok_np, c.labels, cfg.n_clusters)
        objects = torch.from_numpy(np.concatenate([objects[:, 0][c.valid],
                                                   objects[:, 1][c.valid]]))
        temp_o = cfg.object_teacher_temps[1]
        out: Dict[str, float] = {"output width L": float(cfg.out_dim)}
        for name, logits, centre, temp in (
                ("global", teacher.head.forward_global(cls), ck["objective"]["center_global"],
                 cfg.teacher_temp),
                ("objects", teacher.head.forward_objects(objects),
                 ck["objective"]["center_objects"], temp_o)):
            p = torch.softmax((logits - centre) / temp, dim=-1).double()
            mean = p.mean(0)
            out[f"{name}: mean entropy"] = float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())
            out[f"{name}: effective outputs"] = float(
                (-(mean * mean.clamp_min(1e-30).log()).sum()).exp())
    return out


def _terms_schedule(cfg: TrainConfig) -> str:
    """One sentence: which loss terms trained in which epochs."""
    if cfg.w_objects == 0 and cfg.w_neighbours == 0:
        return "Loss: the global term only (DINO)."
    parts = ["Loss: the global term from epoch 1"]
    if cfg.w_objects > 0:
        parts.append(f"the cross-view object term from epoch {cfg.objects_start + 1}")
    if cfg.w_neighbours > 0 and cfg.neighbours_start < cfg.epochs:
        parts.append(f"the cross-image term from epoch {cfg.neighbours_start + 1}")
    return ", ".join(parts) + f" (of {cfg.epochs})."


def evaluate_and_report(cfg: TrainConfig, summary: Optional[Dict[str, Any]] = None
                        ) -> Dict[str, Any]:
    """Dense evaluation of the trained teacher and of its untrained starting point,
    pictures, and the report folder.  Returns the metrics dict."""
    from .. import viz
    from . import dense_evaluation, paired_bootstrap, random_init_like
    from ..viz.report import write_report

    out = os.path.join(cfg.output_dir, "report")
    os.makedirs(out, exist_ok=True)
    trained = teacher_backbone(cfg)
    floor = random_init_like(trained, seed=cfg.seed)
    train_set, val_set = eval_datasets(cfg)
    kw = dict(k=cfg.eval_k, image_size=cfg.scene_size, seed=cfg.seed,
              progress=cfg.progress, keep_predictions=4)
    res_t, probe_t = dense_evaluation(trained, train_set, val_set, **kw)
    res_f, probe_f = dense_evaluation(floor, train_set, val_set, **kw)
    boot = paired_bootstrap(res_t, res_f, n=1000, seed=cfg.seed)
    boot_p = paired_bootstrap(probe_t, probe_f, n=1000, seed=cfg.seed)

    def entry(value: float, floor_value: float, iv: Any = None) -> Dict[str, Any]:
        e: Dict[str, Any] = {"value": value, "floor": floor_value}
        if iv is not None:
            e["delta_ci"] = [iv.low, iv.high]
        return e

    metrics: Dict[str, Any] = {
        "retrieval mIoU": entry(res_t.miou, res_f.miou, boot.miou),
        "retrieval fg/bg IoU": entry(res_t.fg_iou, res_f.fg_iou, boot.fg_iou),
        "retrieval pixel accuracy": entry(res_t.pixel_acc, res_f.pixel_acc, boot.pixel_acc),
        "linear probe mIoU": entry(probe_t.miou, probe_f.miou, boot_p.miou),
        "linear probe fg/bg IoU": entry(probe_t.fg_iou, probe_f.fg_iou, boot_p.fg_iou),
        "retrieval per-class IoU": {name: entry(v, res_f.per_class_iou.get(name, float("nan")))
                                    for name, v in res_t.per_class_iou.items()},
    }
    if os.path.exists(os.path.join(cfg.output_dir, "checkpoint.pth")):
        metrics["teacher head usage (collapse check)"] = teacher_usage(cfg)
    figures: Dict[str, str] = {}
    log = os.path.join(cfg.output_dir, "log.jsonl")
    if os.path.exists(log):
        figures["Training curves"] = os.path.join(out, "curves.png")
        viz.plot_curves(log, path=figures["Training curves"])
    figures["Joint-space clusters"] = os.path.join(out, "clusters.png")
    _cluster_figure(cfg, trained, figures["Joint-space clusters"])
    figures["Queue neighbours"] = os.path.join(out, "matches.png")
    _match_figure(cfg, trained, figures["Queue neighbours"])
    if not os.path.exists(figures["Queue neighbours"]):
        figures.pop("Queue neighbours")
    if res_t.predictions:
        idx = sorted(res_t.predictions)[:4]
        figures["Dense retrieval"] = os.path.join(out, "predictions.png")
        viz.plot_predictions([val_set[i][0] for i in idx], [val_set[i][1] for i in idx],
                             [res_t.predictions[i] for i in idx], list(val_set.class_names),
                             path=figures["Dense retrieval"])
    notes = [
        f"Trained for {cfg.epochs} epochs on {cfg.n_images} synthetic scenes "
        f"({summary['seconds'] / 60:.1f} min)." if summary else "",
        _terms_schedule(cfg),
        "Untrained floor: the same ViT at its initialisation (same seed). Intervals: "
        "paired bootstrap over validation images (1000 resamples) of trained - floor.",
        f"Dense retrieval: k={cfg.eval_k}, temperature 0.02, bank of "
        f"{res_t.bank_size} patches from {len(train_set)} training scenes, "
        f"{len(val_set)} validation scenes at {cfg.scene_size} px.",
    ]
    write_report(out, metrics=metrics, figures=figures, config=cfg.to_dict(),
                 title="CrIBo pretraining report", notes=[n for n in notes if n])
    return {"metrics": metrics, "bootstrap": {"retrieval": boot.to_dict(),
                                              "probe": boot_p.to_dict()}, "report_dir": out}
