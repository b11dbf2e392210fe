"""CrIBo pretraining (SPEC §6): ``cribo pretrain`` / ``python -m cribo pretrain``.

Laid out like DINO's training script: :func:`train` builds everything in banner
sections and runs :func:`train_one_epoch` per epoch.  Everything CrIBo-specific
lives in :mod:`cribo.objective`; this module is the orchestration: schedules, EMA
teacher, last-layer freeze, clipping, mixed precision, checkpoints (atomic, every
``save_every`` epochs and at the end, with all that is needed to continue
exactly), JSON-lines logs, a progress bar, and ``torch.distributed`` (run the same
command under ``torchrun --nproc_per_node=P``: gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import cribo

from .config import TrainConfig, config_from_args
from .objective import CriboObjective, CriboStudent
from .schedules import cosine_schedule, pos_weight_schedule, teacher_temp_schedule

__all__ = ["train", "train_one_epoch", "build_models", "build_data", "NonFiniteLoss",
           "main"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


# =============================================================================
# helpers
# =============================================================================

def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _git_revision() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _param_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """AdamW groups: weight decay on weights, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm to at most ``clip``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2)
    factors = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)


def _cancel_last_layer_gradients(head: nn.Module) -> None:
    for name, p in head.named_parameters():
        if "last_layer" in name:
            p.grad = None


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# =============================================================================
# building blocks
# =============================================================================

def build_models(cfg: TrainConfig) -> Dict[str, nn.Module]:
    """Student and teacher (identical at start; the teacher without drop-path)."""
    from . import models

    if cfg.arch == "custom":
        make = lambda dp: models.vit(cfg.embed_dim, cfg.depth, cfg.num_heads,  # noqa: E731
                                     patch_size=cfg.patch_size, img_size=cfg.img_size,
                                     drop_path_rate=dp)
    else:
        preset = getattr(models, cfg.arch)
        make = lambda dp: preset(patch_size=cfg.patch_size, img_size=cfg.img_size,  # noqa: E731
                                 drop_path_rate=dp)
    backbone = make(cfg.drop_path)
    head = models.CriboHead(backbone.embed_dim, cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
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


def build_data(cfg: TrainConfig):
    """The pretraining data set of two views with positions."""
    from .data import ImageFolder, SyntheticScenes, TwoViewDataset, TwoViewTransform

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


# =============================================================================
# one epoch
# =============================================================================

def train_one_epoch(epoch: int, loader: Any, student: nn.Module, teacher: nn.Module,
                    objective: CriboObjective, optimizer: torch.optim.Optimizer,
                    schedules: Dict[str, np.ndarray], cfg: TrainConfig,
                    device: torch.device, log: Any, start_iter: int) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean loss terms."""
    raw_student = student.module if hasattr(student, "module") else student
    n_iter = len(loader)
    sums: Dict[str, float] = {}
    bar = None
    if cfg.progress and _is_main():
        from tqdm import tqdm

        bar = tqdm(total=n_iter, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=True,
                   dynamic_ncols=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    t0 = time.time()
    tick = time.perf_counter
    t_data = tick()
    for i, batch in enumerate(loader):
        it = start_iter + i
        timings = {"data": tick() - t_data}
        t = tick()
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(schedules["lr"][it])
            if j == 0:
                group["weight_decay"] = float(schedules["wd"][it])
        images = torch.stack([batch["view1"], batch["view2"]], 1).to(device, non_blocking=True)
        positions = torch.stack([batch["pos1"], batch["pos2"]], 1).numpy()
        ids = batch["image_id"].numpy()
        B = images.shape[0]

        with torch.no_grad(), amp:
            t_cls, t_tok = teacher.backbone(images.flatten(0, 1))
        t_cls = t_cls.float().view(B, 2, -1)
        t_tok = t_tok.float().view(B, 2, t_tok.shape[1], -1)
        timings["teacher_backbone_forward"] = tick() - t

        def student_fn(labels: np.ndarray, valid: np.ndarray):
            with amp:
                g, o = student(images, labels, valid)
            return g.float(), o.float()

        use_objects = epoch >= cfg.objects_start
        use_neighbours = epoch >= cfg.neighbours_start
        out = objective(student_fn, t_cls, t_tok, positions, teacher.head, image_ids=ids,
                        step=it, teacher_temp=float(schedules["teacher_temp"][it]),
                        teacher_temp_objects=float(schedules["teacher_temp_objects"][it]),
                        pos_weight=float(schedules["pos_weight"][it]),
                        use_objects=use_objects, use_neighbours=use_neighbours)
        if not math.isfinite(out.terms["total"]):
            raise NonFiniteLoss(
                f"the loss is {out.terms['total']} at epoch {epoch}, iteration {it} "
                f"(terms {out.terms}); stopping. The last checkpoint in {cfg.output_dir} is "
                f"left intact; try a lower --lr, --clip-grad or a higher --teacher-temp.")

        optimizer.zero_grad(set_to_none=True)
        t = tick()
        out.loss.backward()
        t_back = tick()
        ready = getattr(raw_student, "timings", {}).get("backbone_grad_ready", t)
        timings["heads_backward"] = max(ready - t, 0.0)
        timings["backbone_backward"] = max(t_back - max(ready, t), 0.0)
        if cfg.clip_grad > 0:
            _clip_gradients(raw_student, cfg.clip_grad)
        if epoch < cfg.freeze_last_layer:
            _cancel_last_layer_gradients(raw_student.head)
        optimizer.step()

        # EMA update of the teacher.
        with torch.no_grad():
            m = float(schedules["momentum"][it])
            pairs = [(t, s.detach()) for t, s in zip(teacher.parameters(),
                                                      raw_student.parameters())
                     if s.requires_grad]  # frozen parameters stay bit-identical
            t_params = [t for t, _ in pairs]
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, [s for _, s in pairs], alpha=1 - m)
        timings["optimizer_ema"] = tick() - t_back
        timings.update(out.timings)
        st = getattr(raw_student, "timings", {})
        for key in ("student_backbone_forward", "student_heads_forward"):
            if key in st:
                timings[key] = st[key]
        timings["step"] = tick() - t_data - timings["data"]

        for k, v in {**out.terms, **out.stats}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if bar is not None:
            bar.set_postfix(loss=f"{out.terms['total']:.3f}", g=f"{out.terms['global']:.3f}",
                            o=f"{out.terms['objects']:.3f}", nn=f"{out.terms['neighbours']:.3f}",
                            objs=f"{out.stats['objects_per_image']:.1f}",
                            cyc=f"{out.stats['consistent']:.2f}")
            bar.update(1)
        if _is_main() and (it % cfg.log_every == 0 or i == n_iter - 1):
            rec = {"type": "iter", "epoch": epoch, "iter": it, "lr": float(schedules["lr"][it]),
                   "wd": float(schedules["wd"][it]), "momentum": m,
                   "teacher_temp": float(schedules["teacher_temp"][it]),
                   "teacher_temp_objects": float(schedules["teacher_temp_objects"][it]),
                   "pos_weight": float(schedules["pos_weight"][it]),
                   "w_objects": cfg.w_objects if use_objects else 0.0,
                   "w_neighbours": cfg.w_neighbours if use_neighbours else 0.0,
                   **{f"loss_{k}": v for k, v in out.terms.items()}, **out.stats,
                   **{f"t_{k}": round(v, 6) for k, v in timings.items()},
                   "time": time.time() - t0}
            log.write(json.dumps(rec) + "\n")
            log.flush()
        t_data = tick()
    if bar is not None:
        bar.close()
    return {k: v / max(n_iter, 1) for k, v in sums.items()}


# =============================================================================
# training
# =============================================================================

def train(cfg: TrainConfig,
          on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Dict[str, Any]:
    """Pretrains with CrIBo as ``cfg`` says; returns a summary (paths, per-epoch losses).

    ``on_epoch_end(epoch, stats)`` is called after each epoch's checkpoint (e.g. to
    plot, or to stop: an exception it raises ends the run like an interruption).
    """
    # ============ distributed, threads, seeds ============
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(cfg)
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    world, main = _world(), _is_main()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        cribo.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)

    # ============ data ============
    from .data import make_loader, set_epoch

    dataset = build_data(cfg)
    loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers, shuffle=True,
                         seed=cfg.seed, drop_last=True, distributed=distributed,
                         pin_memory=device.type == "cuda")
    n_iter = len(loader)

    # ============ models, objective, optimizer ============
    nets = build_models(cfg)
    student, teacher = nets["student"].to(device), nets["teacher"].to(device)
    objective = CriboObjective(
        cfg.out_dim, student.backbone.embed_dim, n_clusters=cfg.n_clusters,
        queue_size=cfg.queue_size, pos_weight=cfg.pos_weight_start,
        sinkhorn_lambda=cfg.sinkhorn_lambda, sinkhorn_iters=cfg.sinkhorn_iters,
        n_iters=cfg.cluster_iters, student_temp=cfg.student_temp,
        center_momentum=cfg.center_momentum, weights=cfg.weights,
        exclude_same_image=cfg.exclude_same_image, seed=cfg.seed).to(device)
    ddp_student: nn.Module = student
    if distributed:
        ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    # The fused AdamW is one kernel per step instead of a few per parameter: on a
    # small CPU model the per-op overhead otherwise dominates the update.
    optimizer = torch.optim.AdamW(_param_groups(student), fused=True)

    # ============ schedules ============
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

    # ============ resume ============
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pth")
    start_epoch = 0
    if cfg.resume and os.path.exists(ckpt_path):
        start_epoch = _load_checkpoint(ckpt_path, student, teacher, objective, optimizer)
        if main:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    # ============ logging ============
    log = open(os.path.join(cfg.output_dir, "log.jsonl"), "a") if main else _NullLog()
    if main:
        meta = {"type": "run", "config": cfg.to_dict(), "cribo": cribo.__version__,
                "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "git": _git_revision(),
                "world_size": world, "device": str(device),
                "threads": {"torch": torch.get_num_threads(),
                            "cribo": cribo.get_num_threads()},
                "iters_per_epoch": n_iter, "start_epoch": start_epoch,
                "time": datetime.datetime.now().isoformat(timespec="seconds")}
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as fh:
            json.dump(meta, fh, indent=2)
        log.write(json.dumps(meta) + "\n")

    # ============ training ============
    history: List[Dict[str, float]] = []
    t_start = time.time()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            set_epoch(loader, epoch)
            stats = train_one_epoch(epoch, loader, ddp_student, teacher, objective, optimizer,
                                    schedules, cfg, device, log, epoch * n_iter)
            history.append(stats)
            if main:
                log.write(json.dumps({"type": "epoch", "epoch": epoch,
                                      **{k: float(v) for k, v in stats.items()}}) + "\n")
                log.flush()
            last = epoch == cfg.epochs - 1
            if main and ((epoch + 1) % cfg.save_every == 0 or last):
                _save_checkpoint(ckpt_path, cfg, epoch + 1, (epoch + 1) * n_iter, student,
                                 teacher, objective, optimizer)
                _atomic_save(teacher.backbone.state_dict(),
                             os.path.join(cfg.output_dir, "teacher_backbone.pth"))
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)
    finally:
        log.close()
    return {"output_dir": cfg.output_dir, "checkpoint": ckpt_path,
            "teacher_backbone": os.path.join(cfg.output_dir, "teacher_backbone.pth"),
            "history": history, "seconds": time.time() - t_start}


class _NullLog:
    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _save_checkpoint(path: str, cfg: TrainConfig, epoch: int, iteration: int,
                     student: nn.Module, teacher: nn.Module, objective: CriboObjective,
                     optimizer: torch.optim.Optimizer) -> None:
    _atomic_save({
        "student": student.state_dict(), "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(), "objective": objective.state_dict(),
        "epoch": epoch, "iteration": iteration, "config": cfg.to_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(),
                "python": _python_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "cribo": cribo.__version__,
    }, path)


# RNG states as tensors and plain values, so checkpoints load with weights_only=True.
def _numpy_rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_rng_state(s: Dict[str, Any]) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"],
                         s["has_gauss"], s["gauss"]))


def _python_rng_state() -> Dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _set_python_rng_state(s: Dict[str, Any]) -> None:
    random.setstate((s["version"], tuple(int(x) for x in s["internal"]), s["gauss"]))


def _load_checkpoint(path: str, student: nn.Module, teacher: nn.Module,
                     objective: CriboObjective, optimizer: torch.optim.Optimizer) -> int:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file
        raise RuntimeError(f"cribo pretrain: cannot read checkpoint {path}: {e}") from e
    for key in ("student", "teacher", "optimizer", "objective", "epoch", "rng"):
        if key not in ckpt:
            raise RuntimeError(f"cribo pretrain: checkpoint {path} lacks '{key}'")
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    objective.load_state_dict(ckpt["objective"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    _set_numpy_rng_state(ckpt["rng"]["numpy"])
    _set_python_rng_state(ckpt["rng"]["python"])
    if ckpt["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return int(ckpt["epoch"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``cribo pretrain [options]``: see ``--help``."""
    cfg = config_from_args(argv)
    try:
        summary = train(cfg)
    except NonFiniteLoss as e:
        print(f"cribo pretrain: {e}", file=sys.stderr)
        return 1
    if _is_main():
        h = summary["history"]
        if h:
            terms = ", ".join(f"{k} {h[0][k]:.3f} -> {h[-1][k]:.3f}"
                              for k in ("global", "objects", "neighbours"))
            print(f"done in {summary['seconds']:.0f} s; epoch-mean losses, first -> last: "
                  f"{terms}; checkpoint {summary['checkpoint']}")
        if cfg.evaluate and cfg.data == "synthetic":
            from .pipeline import evaluate_and_report

            res = evaluate_and_report(cfg, summary)
            m = res["metrics"]
            for name in ("retrieval mIoU", "retrieval fg/bg IoU", "linear probe mIoU"):
                e = m[name]
                lo, hi = e["delta_ci"]
                print(f"{name}: {100 * e['value']:.1f} (untrained {100 * e['floor']:.1f}; "
                      f"gain 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}])")
            print(f"report: {os.path.join(res['report_dir'], 'report.html')}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
