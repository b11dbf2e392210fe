"""Pretraining options: one dataclass, presets, flags and config files.

Every option is a field of :class:`TrainConfig` with its help text; the command
line (``cribo pretrain --help``) and config files (TOML, or YAML when PyYAML is
installed) set the same names.  Precedence: defaults < preset < config file <
flags.  Unknown options are errors, in files as on the command line.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["TrainConfig", "PRESETS", "build_parser", "config_from_args", "load_config_file"]


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """All options of ``cribo pretrain`` (SPEC §6); see the field help texts."""

    # ------------------------------------------------------------------ run
    preset: str = _opt("cpu", "named defaults: 'cpu' (a small ViT on the synthetic scenes, "
                       "~6 min on 2 cores with its evaluation) or 'vit_small' (the "
                       "reference ViT-S/16 set-up)",
                       choices=("cpu", "vit_small"))
    output_dir: str = _opt("runs/cribo", "folder for checkpoints, logs and the report")
    seed: int = _opt(0, "seed of the data order, augmentations, initialisation and clustering")
    device: str = _opt("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    threads: int = _opt(1, "CPU threads for torch and the C kernels (0: all cores); 1 is "
                        "fastest on a 2-core machine, where the data workers use the other core")
    resume: Optional[bool] = _opt(
        None, "continue from output_dir/checkpoint.pth. Unset (the default): continue when "
        "the folder holds a checkpoint written with the same options (a requeued job picks "
        "up where it stopped), refuse one written with different options, start afresh "
        "otherwise; --resume: the same, but a missing checkpoint is an error; --no-resume: "
        "start afresh, replacing what the folder holds", boolean=True)
    allow_config_change: bool = _opt(False, "on resume, accept options that differ from the "
                                     "checkpoint's (they are listed, and logged)")
    keep_checkpoints: int = _opt(0, "epoch snapshots (checkpointNNNN.pth) kept beside "
                                 "checkpoint.pth, the newest N; 0 keeps only the latest")
    dist_timeout: float = _opt(600.0, "seconds a process waits for the others in a "
                               "collective before stopping with the rank that stopped "
                               "answering (distributed runs)")
    amp: bool = _opt(False, "mixed precision (bfloat16 autocast) for the networks")
    log_every: int = _opt(10, "iterations between JSON-lines log records")
    save_every: int = _opt(1, "epochs between checkpoints (one is always written at the end)")
    progress: bool = _opt(True, "show a progress bar")
    # ------------------------------------------------------------------ data
    data: str = _opt("synthetic", "'synthetic' (the embedded procedural scenes) or the path "
                     "of a folder of images (searched recursively)")
    n_images: int = _opt(2048, "synthetic training images")
    scene_size: int = _opt(96, "side of the rendered synthetic scenes, pixels")
    num_workers: int = _opt(2, "DataLoader worker processes")
    # ------------------------------------------------------------------ views
    img_size: int = _opt(64, "side of each augmented view, pixels")
    crop_scale: List[float] = _opt((0.25, 1.0), "random-resized-crop area range", nargs=2)
    color_jitter: List[float] = _opt((0.4, 0.4, 0.2, 0.1), "colour-jitter amplitudes: "
                                     "brightness, contrast, saturation, hue (p=0.8)", nargs=4)
    grayscale_p: float = _opt(0.2, "probability of a grayscale view")
    blur_sigma: List[float] = _opt((0.1, 2.0), "Gaussian-blur sigma range in pixels of a 224-px "
                                   "view (the reference's); scaled by img_size / 224", nargs=2)
    # ------------------------------------------------------------------ model
    arch: str = _opt("custom", "'vit_tiny', 'vit_small', 'vit_base' or 'custom' (embed_dim, "
                     "depth, num_heads)", choices=("custom", "vit_tiny", "vit_small", "vit_base"))
    patch_size: int = _opt(8, "ViT patch size")
    embed_dim: int = _opt(128, "ViT width (arch 'custom')")
    depth: int = _opt(4, "ViT blocks (arch 'custom')")
    num_heads: int = _opt(4, "attention heads (arch 'custom')")
    drop_path: float = _opt(0.1, "stochastic depth of the student")
    out_dim: int = _opt(1024, "head output width L (65536 in the reference)")
    head_hidden_dim: int = _opt(1024, "head MLP width (2048 in the reference)")
    head_bottleneck_dim: int = _opt(64, "head bottleneck width (256 in the reference)")
    freeze_patch_embed: bool = _opt(True, "keep the patch embedding at its random "
                                    "initialisation (MoCo v3's stabiliser)")
    norm_last_layer: bool = _opt(False, "fix the gain of the heads' weight-normalised last layers")
    # ------------------------------------------------------------------ CrIBo
    n_clusters: int = _opt(16, "clusters K per image (64 in the reference)")
    queue_size: int = _opt(1024, "images in the object queue (25000 in the reference)")
    pos_weight_start: float = _opt(2.0, "positional weight alpha_pos at the first epoch")
    pos_weight_end: float = _opt(2.0, "positional weight alpha_pos at the last epoch")
    sinkhorn_lambda: float = _opt(20.0, "Sinkhorn inverse regularisation")
    sinkhorn_iters: int = _opt(5, "Sinkhorn row/column rounds per clustering iteration")
    cluster_iters: int = _opt(5, "clustering iterations")
    w_global: float = _opt(1.0, "weight of the global cross-view term")
    w_objects: float = _opt(1.0, "weight of the cross-view object term")
    w_neighbours: float = _opt(1.0, "weight of the cross-image object term")
    objects_start_epoch: Optional[int] = _opt(
        None, "epoch at which the object terms start; before it only the global term "
        "trains, so the clusters are found in features it has shaped (default: half-way, "
        "epochs // 2; 0 in the reference)", type=int)
    nn_start_epoch: int = _opt(1, "epoch at which the cross-image term starts (counted "
                               "from objects_start_epoch)")
    exclude_same_image: bool = _opt(True, "never match an object to its own image in the queue")
    # ------------------------------------------------------------------ optimisation
    epochs: int = _opt(6, "training epochs")
    batch_size: int = _opt(64, "images per process per step")
    lr: float = _opt(2e-3, "peak learning rate for a total batch of 256 (scaled linearly)")
    min_lr: float = _opt(1e-5, "final learning rate of the cosine schedule")
    warmup_epochs: int = _opt(1, "linear learning-rate warm-up epochs")
    weight_decay: float = _opt(0.04, "initial weight decay (cosine schedule)")
    weight_decay_end: float = _opt(0.4, "final weight decay")
    momentum_teacher: float = _opt(0.99, "initial EMA momentum of the teacher (cosine to 1)")
    clip_grad: float = _opt(3.0, "clip each parameter's gradient norm (0: off)")
    freeze_last_layer: int = _opt(1, "epochs during which the heads' last layers stay fixed")
    student_temp: float = _opt(0.1, "student temperature")
    teacher_temp: float = _opt(0.04, "final teacher temperature (0.07 in the reference)")
    warmup_teacher_temp: float = _opt(0.04, "initial teacher temperature")
    warmup_teacher_temp_epochs: int = _opt(5, "epochs of the teacher temperature warm-up "
                                           "(30 in the reference)")
    teacher_temp_objects: Optional[float] = _opt(
        None, "final teacher temperature of the object terms (default: teacher_temp)",
        type=float)
    warmup_teacher_temp_objects: Optional[float] = _opt(
        None, "initial teacher temperature of the object terms (default: warmup_teacher_temp)",
        type=float)
    center_momentum: float = _opt(0.9, "centre EMA momentum")
    # ------------------------------------------------------------------ after training
    evaluate: bool = _opt(True, "after training on the synthetic scenes, evaluate the teacher "
                          "against its untrained start and write output_dir/report/")
    eval_train_images: int = _opt(200, "synthetic scenes in the dense-retrieval memory bank")
    eval_val_images: int = _opt(100, "synthetic validation scenes")
    eval_k: int = _opt(30, "neighbours per patch in the dense retrieval")

    @property
    def object_teacher_temps(self) -> tuple:
        """(initial, final) teacher temperature of the object terms; each falls back
        to the global term's when not set."""
        return (self.warmup_teacher_temp if self.warmup_teacher_temp_objects is None
                else self.warmup_teacher_temp_objects,
                self.teacher_temp if self.teacher_temp_objects is None
                else self.teacher_temp_objects)

    @property
    def objects_start(self) -> int:
        """The epoch at which the object terms start (``objects_start_epoch``, or
        half-way through the run when it is not set)."""
        return self.epochs // 2 if self.objects_start_epoch is None else self.objects_start_epoch

    @property
    def neighbours_start(self) -> int:
        """The epoch at which the cross-image term starts: nn_start_epoch epochs
        after the object terms."""
        return self.objects_start + self.nn_start_epoch

    @property
    def weights(self) -> tuple:
        return (self.w_global, self.w_objects, self.w_neighbours)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}


#: Preset overrides of the defaults.  The defaults are the 'cpu' preset, sized for
#: ~200 steps on 2 cores: a smaller, sharper head (L = 1024, bottleneck 64, teacher
#: temperature 0.04 throughout), a 4x learning rate, a faster-moving teacher
#: (momentum from 0.99), the random patch embedding kept fixed (MoCo v3), the
#: blur scaled to the 64-px views, and the object terms started half-way
#: (objects_start_epoch unset: epochs // 2).  Started at the first step, at this
#: budget, they train the tokens on clusters of the random network's features
#: and end below the untrained network (README, "What the CPU run shows").
#: 'vit_small' restores the reference values.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu": {},
    "vit_small": dict(arch="vit_small", patch_size=16, img_size=224, drop_path=0.1,
                      out_dim=65536, head_hidden_dim=2048, head_bottleneck_dim=256,
                      freeze_patch_embed=False, objects_start_epoch=0,
                      n_clusters=64, queue_size=25000,
                      lr=5e-4, momentum_teacher=0.996, teacher_temp=0.07,
                      epochs=300, batch_size=256, warmup_epochs=10,
                      warmup_teacher_temp_epochs=30, data="", scene_size=256, num_workers=8,
                      amp=True, n_images=100000, evaluate=False, threads=0),
}


def build_parser(prog: str = "cribo pretrain") -> argparse.ArgumentParser:
    """The argument parser of ``cribo pretrain``: one flag per option."""
    p = argparse.ArgumentParser(
        prog=prog, description="Pretrain a ViT with CrIBo (SPEC §6). Defaults: the 'cpu' "
        "preset on the embedded synthetic scenes.", allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="TOML or YAML file of options (same names as the flags)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: Dict[str, Any] = {"help": f.metadata["help"], "dest": f.name,
                              "default": argparse.SUPPRESS}
        default = getattr(defaults, f.name)
        if isinstance(default, bool) or f.metadata.get("boolean"):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, (tuple, list)):
            kw.update(type=float, nargs=f.metadata.get("nargs", "+"))
        else:
            kw["type"] = f.metadata.get("type", type(default))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        kw["help"] += f" (default: {default})"
        p.add_argument(flag, **kw)
    return p


def load_config_file(path: str) -> Dict[str, Any]:
    """Options from a TOML (.toml) or YAML (.yaml/.yml) file; unknown keys are errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if path.endswith(".toml"):
        import tomllib

        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    elif path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml), "
                              f"or write the options as TOML") from None
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    elif path.endswith(".json"):
        with open(path) as fh:
            data = json.load(fh)
    else:
        raise ValueError(f"config file {path}: use .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a table of options")
    names = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config file {path}: unknown option(s) {unknown}; see "
                         f"'cribo pretrain --help'")
    return data


def config_from_args(argv: Optional[Sequence[str]] = None,
                     overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """defaults < preset < config file < flags (< overrides, for programmatic use)."""
    ns = vars(build_parser().parse_args(argv))
    file_opts = load_config_file(ns.pop("config")) if ns.get("config") else {}
    ns.pop("config", None)
    merged: Dict[str, Any] = {}
    preset = (overrides or {}).get("preset", ns.get("preset", file_opts.get("preset", "cpu")))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    merged.update(PRESETS[preset])
    merged.update(file_opts)
    merged.update(ns)
    merged.update(overrides or {})
    merged["preset"] = preset
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}")
    for k in ("crop_scale", "color_jitter", "blur_sigma"):
        if k in merged:
            merged[k] = tuple(float(x) for x in merged[k])
    cfg = TrainConfig(**merged)
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"cribo pretrain: {msg}")

    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.img_size % cfg.patch_size == 0,
         f"img_size ({cfg.img_size}) must be a multiple of patch_size ({cfg.patch_size})")
    n_tokens = (cfg.img_size // cfg.patch_size) ** 2
    need(1 <= cfg.n_clusters <= 2 * n_tokens,
         f"n_clusters must be in [1, 2N = {2 * n_tokens}] for {n_tokens} tokens per view, "
         f"got {cfg.n_clusters}")
    need(cfg.objects_start >= 0 and cfg.nn_start_epoch >= 0,
         f"objects_start_epoch and nn_start_epoch must be >= 0, got "
         f"{cfg.objects_start_epoch} and {cfg.nn_start_epoch}")
    need(cfg.w_objects == 0 or cfg.objects_start < cfg.epochs,
         f"objects_start_epoch ({cfg.objects_start}) must be < epochs ({cfg.epochs}), or the "
         f"object terms never train (set --w-objects 0 for the global term alone)")
    need(cfg.queue_size >= 1, f"queue_size must be >= 1, got {cfg.queue_size}")
    need(cfg.warmup_epochs >= 0 and cfg.warmup_teacher_temp_epochs >= 0,
         "warmup_epochs and warmup_teacher_temp_epochs must be >= 0")
    need(cfg.lr > 0 and cfg.min_lr >= 0, "lr must be > 0 and min_lr >= 0")
    need(min(cfg.weights) >= 0 and max(cfg.weights) > 0,
         "w_global, w_objects, w_neighbours must be >= 0 and not all 0")
    need(cfg.log_every >= 1 and cfg.save_every >= 1, "log_every and save_every must be >= 1")
    temps = [cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.student_temp,
             cfg.teacher_temp_objects, cfg.warmup_teacher_temp_objects]
    need(all(t is None or t > 0 for t in temps), f"temperatures must be > 0, got {temps}")
    need(len(cfg.color_jitter) == 4 and min(cfg.color_jitter) >= 0
         and cfg.color_jitter[3] <= 0.5,
         f"color_jitter must be 4 amplitudes >= 0 (hue <= 0.5), got {cfg.color_jitter}")
    need(0 <= cfg.grayscale_p <= 1, f"grayscale_p must be in [0, 1], got {cfg.grayscale_p}")
    need(len(cfg.blur_sigma) == 2 and 0 < cfg.blur_sigma[0] <= cfg.blur_sigma[1],
         f"blur_sigma must be two numbers 0 < lo <= hi, got {cfg.blur_sigma}")
    need(len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
         f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {cfg.crop_scale}")
