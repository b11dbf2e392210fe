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

Shared with ``cribo ablate``: :func:`evaluation_settings` (the one place for a
run's dense-evaluation options), :func:`evaluate_backbone`, :func:`teacher_backbone`
and :func:`eval_datasets`.  :func:`encode_and_cluster` (two views of a few scenes,
through a backbone, clustered as in training) feeds both figures and the
collapse check.  File names come from :class:`cribo.train.run_folder.RunFolder`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..ops.clustering import Clustering
from ..train.config import TrainConfig
from ..train.run_folder import RunFolder

__all__ = ["evaluate_and_report", "evaluate_backbone", "evaluation_settings", "eval_datasets",
           "teacher_backbone", "teacher_usage", "ClusteredViews", "encode_and_cluster"]


def eval_datasets(cfg: TrainConfig) -> Tuple[Any, Any]:
    """(train, val) :class:`cribo.data.SyntheticScenes` for the dense evaluation
    ('val' is its own stream of scenes, disjoint from 'train')."""
    from ..data import SyntheticScenes

    train = SyntheticScenes("train", n_images=cfg.eval_train_images, size=cfg.scene_size,
                            seed=cfg.seed)
    val = SyntheticScenes("val", n_images=cfg.eval_val_images, size=cfg.scene_size,
                          seed=cfg.seed)
    return train, val


def evaluation_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """The dense-evaluation options of a run (the one place for them): the main
    job's report and ``cribo ablate`` both score with these.

    Returns:
        keyword arguments of :func:`cribo.evaluation.dense_evaluation`: ``k``
        (``--eval-k``), ``image_size`` (the scene side, ``--scene-size``), ``seed``
        (the run's) and ``progress``.
    """
    return dict(k=cfg.eval_k, image_size=cfg.scene_size, seed=cfg.seed, progress=cfg.progress)


def evaluate_backbone(cfg: TrainConfig, backbone: torch.nn.Module,
                      datasets: Optional[Tuple[Any, Any]] = None, *,
                      keep_predictions: int = 0) -> Tuple[Any, Any]:
    """Dense retrieval and linear probe of ``backbone`` with the run's settings.

    Args:
        cfg: the run's configuration (:func:`evaluation_settings`).
        backbone: a ViT returning ``(cls, patches)``.
        datasets: ``(train, val)``; default :func:`eval_datasets` (pass them to
            score several backbones on the same scenes without rendering them again).
        keep_predictions: validation predictions kept for pictures.

    Returns:
        ``(RetrievalResult, ProbeResult)`` of :func:`cribo.evaluation.dense_evaluation`.
    """
    from .dense import dense_evaluation

    train_set, val_set = eval_datasets(cfg) if datasets is None else datasets
    return dense_evaluation(backbone, train_set, val_set, keep_predictions=keep_predictions,
                            **evaluation_settings(cfg))


def teacher_backbone(cfg: TrainConfig) -> torch.nn.Module:
    """The trained teacher's ViT of the run in ``cfg.output_dir``, in eval mode.

    Raises:
        FileNotFoundError / ValueError: no or an unreadable ``teacher_backbone.pth``
            (the message names the file and says what is wrong with it).
    """
    from ..nn.checkpoints import read_checkpoint
    from ..train.build import build_models

    backbone = build_models(cfg)["teacher"].backbone
    state = read_checkpoint(RunFolder(cfg.output_dir).teacher_backbone, who="teacher_backbone")
    backbone.load_state_dict(state)
    return backbone.eval()


# =============================================================================
# two views of a few scenes, encoded and clustered (the figures, the collapse check)
# =============================================================================

@dataclass(frozen=True)
class ClusteredViews:
    """Two geometric views of B scenes, encoded by a backbone and clustered jointly.

    Attributes:
        images: (B, 2, 3, S, S) float32 in [0, 1], the views before normalisation.
        positions: (B, 2, N, 2) float32, each patch centre's (x, y) in its scene.
        cls: (B, 2, D) float32, the backbone's class tokens.
        tokens: (B, 2, N, D) float32, its final patch tokens (as the backbone
            gives them, not normalised).
        clustering: :func:`cribo.cluster` of ``(tokens, positions)``.
    """

    images: np.ndarray
    positions: np.ndarray
    cls: np.ndarray
    tokens: np.ndarray
    clustering: Clustering

    def rgb(self) -> np.ndarray:
        """(B, 2, S, S, 3) uint8, the views for drawing."""
        return _channels_last(self.images)


def encode_and_cluster(cfg: TrainConfig, backbone: torch.nn.Module,
                       scenes: Sequence[np.ndarray], rng: np.random.Generator, *,
                       seed: int) -> ClusteredViews:
    """Two views of each scene, through the backbone, clustered as in training.

    The views are CrIBo's two global crops with their flips and nothing
    photometric (``TwoViewTransform(cfg.img_size, cfg.patch_size).geometric_only()``),
    drawn from ``rng`` scene after scene, view 1 first; they are normalised with
    the ImageNet mean/std for the backbone.  The clustering is
    :func:`cribo.cluster` with the run's ``n_clusters``, its final positional
    weight ``pos_weight_end`` and its ``sinkhorn_lambda``.

    Args:
        cfg: the run's configuration.
        backbone: a ViT returning ``(cls (B, D), patches (B, N, D))``.
        scenes: B >= 1 images, (H, W, 3) uint8.
        rng: the generator of the crops and flips.
        seed: the clustering's seed (its initial tokens).

    Returns:
        :class:`ClusteredViews`, N = (cfg.img_size / cfg.patch_size)^2.
    """
    from ..data import TwoViewTransform
    from ..ops.clustering import cluster
    from .features import _device_of

    if len(scenes) < 1:
        raise ValueError("encode_and_cluster: scenes must hold at least one image, got none")
    tf = TwoViewTransform(size=cfg.img_size, patch_size=cfg.patch_size).geometric_only()
    pairs = [tf(np.asarray(scene), rng) for scene in scenes]
    images = np.stack([[v.image for v in pair] for pair in pairs]).astype(np.float32)
    positions = np.stack([[v.positions for v in pair] for pair in pairs]).astype(np.float32)
    B = images.shape[0]
    with torch.no_grad():
        x = _normalize(torch.from_numpy(images).flatten(0, 1)).to(_device_of(backbone))
        cls, tok = backbone(x)
    cls_np = cls.float().cpu().numpy().reshape(B, 2, -1)
    tok_np = tok.float().cpu().numpy().reshape(B, 2, tok.shape[1], -1)
    c = cluster(tok_np, positions, cfg.n_clusters, pos_weight=cfg.pos_weight_end,
                sinkhorn_lambda=cfg.sinkhorn_lambda, seed=seed)
    return ClusteredViews(images=images, positions=positions, cls=cls_np, tokens=tok_np,
                          clustering=c)


def _channels_last(views: np.ndarray) -> np.ndarray:
    """Un-normalised views (..., 3, H, W) in [0, 1] -> (..., H, W, 3) uint8 for
    drawing (viz reads a channels-first float image as an ImageNet-normalised one)."""
    x = np.moveaxis(np.asarray(views), -3, -1)
    return np.ascontiguousarray(np.clip(np.round(x * 255), 0, 255).astype(np.uint8))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    from ..data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _cluster_figure(cfg: TrainConfig, backbone: torch.nn.Module, path: str) -> None:
    """The teacher's joint-space clusters on two views of a few training scenes."""
    from .. import viz
    from ..data import SyntheticScenes

    scenes = SyntheticScenes("train", n_images=8, size=cfg.scene_size, seed=cfg.seed)
    v = encode_and_cluster(cfg, backbone, [scenes[i][0] for i in range(3)],
                           np.random.default_rng(cfg.seed), seed=cfg.seed)
    g = cfg.img_size // cfg.patch_size
    rgb, c = v.rgb(), v.clustering
    viz.plot_clusters(rgb[:, 0], rgb[:, 1], c.labels[:, 0], c.labels[:, 1],
                      grid=(g, g), valid=c.valid, path=path, show_views=True,
                      gray_base=False, alpha=0.45,
                      title="Teacher's joint-space clusters: one colour = one cluster in both views")


def _match_figure(cfg: TrainConfig, backbone: torch.nn.Module, path: str) -> None:
    """Nearest queue neighbours of a batch's objects, with the trained teacher."""
    from .. import viz
    from ..data import SyntheticScenes
    from ..ops.pooling import pool
    from ..ops.queue import ObjectQueue

    scenes = SyntheticScenes("val", n_images=64, size=cfg.scene_size, seed=cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    queue = ObjectQueue(capacity=64, dim=backbone.embed_dim)
    buffer = viz.MatchBuffer(max_batches=4)
    g = cfg.img_size // cfg.patch_size
    examples = []
    for b0 in range(0, 64, 16):
        v = encode_and_cluster(cfg, backbone, [scenes[i][0] for i in range(b0, b0 + 16)],
                               rng, seed=b0)
        c = v.clustering
        obj = pool(v.tokens, c.labels, cfg.n_clusters)
        t1, t2 = obj[:, 0][c.valid], obj[:, 1][c.valid]
        match = queue.match(t1, t2)
        rgb = v.rgb()
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

    Runs the teacher of ``<output_dir>/checkpoint.pth`` on two views of the first
    ``n_images`` training images (:func:`encode_and_cluster`: the crops and flips
    of training, nothing photometric), clusters and pools as in training, and
    applies its centred, sharpened heads (final temperatures).  For the global
    (CLS) and the object outputs separately it returns the mean entropy of one
    output distribution and ``exp`` of the entropy of their average, the effective
    number of outputs in use: near L when the outputs are spread, a few when the
    teacher has (partly) collapsed onto them.  Both are in nats / counts.

    Raises:
        FileNotFoundError / ValueError: no or an unreadable ``checkpoint.pth``.
    """
    from ..nn.checkpoints import read_checkpoint
    from ..ops.pooling import pool
    from ..train.build import build_data, build_models

    ck = read_checkpoint(RunFolder(cfg.output_dir).checkpoint, who="teacher_usage")
    teacher = build_models(cfg)["teacher"]
    teacher.load_state_dict(ck["teacher"])
    teacher.eval()
    source = build_data(cfg).source
    scenes = [_image_of(source[i]) for i in range(min(n_images, len(source)))]
    v = encode_and_cluster(cfg, teacher.backbone, scenes, np.random.default_rng(cfg.seed),
                           seed=cfg.seed)
    c = v.clustering
    objects = pool(v.tokens, c.labels, cfg.n_clusters)
    objects = torch.from_numpy(np.concatenate([objects[:, 0][c.valid], objects[:, 1][c.valid]]))
    cls = torch.from_numpy(v.cls.reshape(-1, v.cls.shape[-1]))
    temp_o = cfg.object_teacher_temps[1]
    out: Dict[str, float] = {"output width L": float(cfg.out_dim)}
    with torch.no_grad():
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


def _image_of(item: Any) -> np.ndarray:
    """A data set item's image (the item itself, or the first of a tuple)."""
    return np.asarray(item[0] if isinstance(item, tuple) else item)


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
    from ..viz.report import write_report
    from .features import random_init_like
    from .metrics import paired_bootstrap

    run = RunFolder(cfg.output_dir)
    out = run.report
    os.makedirs(out, exist_ok=True)
    trained = teacher_backbone(cfg)
    floor = random_init_like(trained, seed=cfg.seed)
    train_set, val_set = eval_datasets(cfg)
    res_t, probe_t = evaluate_backbone(cfg, trained, (train_set, val_set), keep_predictions=4)
    res_f, probe_f = evaluate_backbone(cfg, floor, (train_set, val_set), keep_predictions=4)
    boot = paired_bootstrap(res_t, res_f, n=1000, seed=cfg.seed)
    boot_p = paired_bootstrap(probe_t, probe_f, n=1000, seed=cfg.seed)

    def entry(value: float, floor_value: float, iv: Any = None) -> Dict[str, Any]:
        # fractions in metrics.json; the report shows them as percentages
        e: Dict[str, Any] = {"value": value, "floor": floor_value, "unit": "%"}
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
    if os.path.exists(run.checkpoint):
        metrics["teacher head usage (collapse check)"] = teacher_usage(cfg)
    figures: Dict[str, str] = {}
    if os.path.exists(run.log):
        figures["Training curves"] = os.path.join(out, "curves.png")
        viz.plot_curves(run.log, path=figures["Training curves"])
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
