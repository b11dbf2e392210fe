"""What a run trains, built from its configuration: the networks, the data set,
the objective, the optimizer and the schedules (docs/method.md §6)."""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from ..nn.architectures import architecture
from ..nn.objective import CriboObjective, CriboStudent
from .config import TrainConfig
from .schedules import cosine_schedule, pos_weight_schedule, teacher_temp_schedule

__all__ = ["build_models", "build_data", "build_objective", "build_optimizer",
           "build_schedules"]


def build_models(cfg: TrainConfig) -> Dict[str, nn.Module]:
    """Student and teacher (identical at start; the teacher without drop-path)."""
    from ..nn import CriboHead, vit

    # A named architecture's sizes come from the one table (cribo.nn.architectures).
    dims = ((cfg.embed_dim, cfg.depth, cfg.num_heads) if cfg.arch == "custom"
            else tuple(architecture(cfg.arch)))

    def make(drop_path: float) -> nn.Module:
        return vit(*dims, patch_size=cfg.patch_size, img_size=cfg.img_size,
                   drop_path_rate=drop_path)

    backbone = make(cfg.drop_path)
    head = CriboHead(backbone.embed_dim, cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
                     bottleneck_dim=cfg.head_bottleneck_dim,
                     norm_last_layer=cfg.norm_last_layer)
    if cfg.freeze_patch_embed:  # a fixed random patch projection (Chen et al., MoCo v3)
        for p in backbone.patch_embed.parameters():
            p.requires_grad_(False)
    student = CriboStudent(backbone, head)
    teacher = CriboStudent(make(0.0), copy.deepcopy(head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return {"student": student, "teacher": teacher}


def build_data(cfg: TrainConfig) -> Any:
    """The pretraining data set of two views with positions."""
    from ..data import ImageFolder, SyntheticScenes, TwoViewDataset, TwoViewTransform

    if cfg.data == "synthetic":
        source = SyntheticScenes("train", n_images=cfg.n_images, size=cfg.scene_size,
                                 seed=cfg.seed)
    else:
        if not os.path.isdir(cfg.data):
            raise FileNotFoundError(f"cribo pretrain: data folder not found: {cfg.data}")
        source = ImageFolder(cfg.data)
    tf = TwoViewTransform(size=cfg.img_size, patch_size=cfg.patch_size)
    # The reference blurs 224-px views with sigma in [0.1, 2] px; a smaller view
    # gets the same blur relative to its size, or fine textures would vanish.
    blur = tuple(s * cfg.img_size / 224 for s in cfg.blur_sigma)
    b, c, s, h = cfg.color_jitter
    common = dict(scale=tuple(cfg.crop_scale), blur_sigma=blur, brightness=b, contrast=c,
                  saturation=s, hue=h, grayscale_p=cfg.grayscale_p)
    tf = dataclasses.replace(tf, view1=dataclasses.replace(tf.view1, **common),
                             view2=dataclasses.replace(tf.view2, **common))
    return TwoViewDataset(source, tf, seed=cfg.seed)


def build_objective(cfg: TrainConfig, embed_dim: int) -> CriboObjective:
    """The CrIBo objective (clustering, object queue, losses and centres) of ``cfg``
    for backbone tokens of width ``embed_dim``."""
    return CriboObjective(
        cfg.out_dim, embed_dim, n_clusters=cfg.n_clusters, queue_capacity=cfg.queue_capacity,
        pos_weight=cfg.pos_weight_start, sinkhorn_lambda=cfg.sinkhorn_lambda,
        sinkhorn_iters=cfg.sinkhorn_iters, n_iters=cfg.cluster_n_iters,
        student_temp=cfg.student_temp, center_momentum=cfg.center_momentum,
        weights=cfg.weights, exclude_same_image=cfg.exclude_same_image, seed=cfg.seed,
        backend=cfg.backend)


def _param_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """AdamW groups: weight decay on weights, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over :func:`_param_groups`; the learning rate and weight decay are set
    from the schedules at every step."""
    # The fused AdamW is one kernel per step instead of a few per parameter: on a
    # small CPU model the per-op overhead otherwise dominates the update.
    return torch.optim.AdamW(_param_groups(student), fused=True)


def build_schedules(cfg: TrainConfig, n_iter: int, world: int) -> Dict[str, np.ndarray]:
    """Per-iteration values (epochs x ``n_iter``,) of the learning rate (scaled by the
    total batch of ``world`` processes), weight decay, teacher momentum, teacher
    temperatures and positional weight."""
    total_batch = cfg.batch_size * world
    schedules = {
        "lr": cosine_schedule(cfg.lr * total_batch / 256.0, cfg.min_lr, cfg.epochs, n_iter,
                              cfg.warmup_epochs),
        "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, n_iter),
        "momentum": cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, n_iter),
        "teacher_temp": teacher_temp_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                              cfg.warmup_teacher_temp_epochs, cfg.epochs,
                                              n_iter),
        "pos_weight": pos_weight_schedule(cfg.pos_weight_start, cfg.pos_weight_end,
                                          cfg.epochs, n_iter),
    }
    schedules["teacher_temp_objects"] = teacher_temp_schedule(
        *cfg.object_teacher_temps, cfg.warmup_teacher_temp_epochs, cfg.epochs, n_iter)
    return schedules
