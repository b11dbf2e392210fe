"""CrIBo pretraining (docs/method.md §6): ``cribo pretrain`` / ``python -m cribo pretrain``.

Laid out like DINO's training script: :func:`train` builds everything in banner
sections and runs :func:`train_one_epoch` per epoch.  Everything CrIBo-specific
lives in :mod:`cribo.nn.objective`; this module is the orchestration: schedules, EMA
teacher, last-layer freeze, clipping, mixed precision, checkpoints (every
``save_every`` epochs and at the end, with all that is needed to continue
exactly), JSON-lines logs, a progress bar, and ``torch.distributed`` (run the same
command under ``torchrun --nproc_per_node=P``: gloo on CPU, nccl on GPU).

Faults lose nothing (the files are written as :mod:`cribo.train.checkpoints` says):

- the run folder is locked for the run (:class:`~cribo.train.checkpoints.FolderLocked`
  for a second run into it); every file is replaced atomically, the teacher
  export first and ``checkpoint.pth`` last: the checkpoint is the commit point,
  and a run that continues or finds itself complete re-exports
  ``teacher_backbone.pth`` from it when the two differ;
- a diverging run stops with :class:`NonFiniteLoss` naming what became
  non-finite and where (the loss, a network's outputs, the gradients), and no
  state holding a NaN or an infinity is ever saved;
- Ctrl-C (SIGINT) stops after the current step with a checkpoint of that step
  (:class:`TrainingInterrupted`); continuing from it gives bit for bit the run
  that was not interrupted (the data of step t of epoch e depends only on the
  seed, e and the image index);
- a write that fails (a full disk) stops with
  :class:`~cribo.train.checkpoints.OutputWriteError`, the previous checkpoint intact;
- in a distributed run a process that stops answering stops the others after
  ``dist_timeout`` seconds with :class:`RankStopped`, naming it.

Resuming (``resume``, tri-state): unset, a folder holding a checkpoint of the
same configuration continues it (a requeued job picks up where it stopped), one
of another configuration is refused (:class:`ResumeError`, listing the options
that differ, unless ``allow_config_change``), and an empty folder starts afresh;
``--resume`` is the same but an empty folder is an error; ``--no-resume``
starts afresh.  The options that may differ freely are :data:`RUN_CONTROL`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

import cribo

from .checkpoints import (FolderLocked, OutputWriteError, atomic_save, atomic_write_text,
                         list_snapshots, lock_folder, remove_stale_temporaries, snapshot,
                         snapshot_name)
from .config import TrainConfig
from ..nn.objective import CriboObjective, CriboStudent, NonFiniteError
from .schedules import cosine_schedule, pos_weight_schedule, teacher_temp_schedule

__all__ = ["train", "train_one_epoch", "build_models", "build_data", "NonFiniteLoss",
           "ResumeError", "CheckpointError", "RankStopped", "TrainingInterrupted",
           "FolderLocked", "OutputWriteError", "RUN_CONTROL", "config_differences"]

#: Options that control how a run is carried out, not what it computes: they may
#: differ between a checkpoint and the run that continues it (where it writes and
#: what it keeps, how it reports, how many threads and workers load and compute,
#: how long it waits for other processes, what is done after training).  Every
#: other option must match the checkpoint's unless ``allow_config_change``.
#: (``preset`` only chooses defaults; the values it sets are compared one by one.)
RUN_CONTROL = frozenset({
    "preset", "output_dir", "resume", "allow_config_change", "keep_checkpoints",
    "dist_timeout", "device", "threads", "num_workers", "progress", "log_every",
    "save_every", "evaluate", "eval_train_images", "eval_val_images", "eval_k",
})


class NonFiniteLoss(RuntimeError):
    """The run diverged: the loss, a network's outputs or the gradients became NaN
    or infinite.  Nothing of it was saved; the last checkpoint is left as it was."""


class ResumeError(ValueError):
    """The run folder's checkpoint cannot be continued as asked: it was written with
    other options (listed), or ``--resume`` found none."""


class CheckpointError(RuntimeError):
    """The checkpoint to continue from is unreadable, incomplete or non-finite."""


class RankStopped(RuntimeError):
    """In a distributed run, another process stopped answering (frozen, killed or
    unreachable); the message names it."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped the run after a step; its checkpoint holds every step
    done (see ``checkpoint``, ``epoch``, ``step``, ``steps_per_epoch``)."""

    def __init__(self, message: str, checkpoint: str, epoch: int, step: int,
                 steps_per_epoch: int) -> None:
        super().__init__(message)
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step
        self.steps_per_epoch = steps_per_epoch


class _EpochInterrupted(Exception):
    """Raised inside an epoch when a stop was requested: ``step`` steps of the epoch
    are done; ``sums`` are their loss sums."""

    def __init__(self, step: int, sums: Dict[str, float]) -> None:
        super().__init__(step)
        self.step, self.sums = step, sums


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


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _git_revision() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _param_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """AdamW groups: weight decay on weights, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _clip_gradients(model: nn.Module, clip: float) -> Optional[str]:
    """DINO's clipping: each parameter's gradient norm to at most ``clip`` (0: none).

    Returns the name of the first parameter whose gradient norm is not finite (a
    diverging step; nothing is clipped then), or None.
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    grads = [g for _, g in named]
    norms = torch._foreach_norm(grads, 2)
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))
    if not bool(finite.all()):
        return named[int((~finite).nonzero()[0, 0])][0]
    if clip > 0:
        factors = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, factors)
    return None


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
    from .. import nn as models

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


# =============================================================================
# faults: divergence, interruption, processes that stop answering
# =============================================================================

def _float_entries(obj: Any, prefix: str = ""):
    """(name, tensor) of every floating-point tensor or array in a nested state."""
    if torch.is_tensor(obj):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, np.ndarray):
        if np.issubdtype(obj.dtype, np.floating):
            yield prefix, torch.from_numpy(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_entries(v, f"{prefix}.{i}" if prefix else str(i))


def _nonfinite_entries(state: Dict[str, Any]) -> List[str]:
    """Names of the entries of ``state`` that hold a NaN or an infinity."""
    return [name for name, t in _float_entries(state) if not bool(torch.isfinite(t).all())]


def _named_optimizer_state(optimizer: torch.optim.Optimizer,
                           model: nn.Module) -> Dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name (for messages)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names.get(id(p), f"parameter {i}"): st
            for i, (p, st) in enumerate(optimizer.state.items())}


def _rng_state() -> Dict[str, Any]:
    """Every random generator the loop draws from, as tensors and plain values (so
    checkpoints load with ``weights_only=True``)."""
    return {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(),
            "python": _python_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    _set_numpy_rng_state(s["numpy"])
    _set_python_rng_state(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class _StopRequest:
    """SIGINT (Ctrl-C) asks the loop to stop at the end of the current step.

    Installed only in the main thread (where Python delivers signals); a second
    SIGINT gets the previous handler back (Python's: KeyboardInterrupt at once).
    Calling the object tells whether a stop was asked; in a distributed run it is
    a collective (any process's request stops them all at the same step), so
    every process calls it at the same points.
    """

    def __init__(self, distributed: bool) -> None:
        self.requested, self.distributed = False, distributed
        self._installed, self._previous = False, None
        # Not where signals cannot be handled, nor where SIGINT is ignored on
        # purpose (a job started in the background by a shell script).
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except (ValueError, OSError):
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous if self._previous is not None
                      else signal.default_int_handler)

    def __call__(self) -> bool:
        if self.distributed:
            flag = torch.tensor([int(self.requested)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested

    def restore(self) -> None:
        if self._installed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)


class _Heartbeat:
    """Each process's liveness in the process group's store, to name the one that
    stopped answering when a collective fails.

    A daemon thread sets ``cribo/heartbeat/<rank>`` to "<beats> <iteration>" every
    ``interval`` seconds (0.05 s, longer with more than 16 processes, so that the
    store, in rank 0, serves at most ~320 beats a second).  A frozen (SIGSTOP) or
    killed process stops beating; a live one keeps beating even while it waits in
    a collective.  Clock-free: :meth:`diagnose` compares two readings of the
    counters, so a killed process is named within a few intervals.
    """

    def __init__(self) -> None:
        from torch.distributed import distributed_c10d

        self.store = distributed_c10d._get_default_store()
        self.rank, self.world = _rank(), _world()
        self.interval = 0.05 * max(1.0, self.world / 16)
        self.iteration = -1
        self.beats, self.failed = 0, False  # this process's beats that reached the store
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cribo-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls) -> Optional["_Heartbeat"]:
        """A heartbeat for this process, or None where the process group has no
        store to keep it in (the run then goes without the diagnosis)."""
        try:
            return cls()
        except Exception:  # noqa: BLE001 -- a torch without _get_default_store
            return None

    @staticmethod
    def _key(rank: int) -> str:
        return f"cribo/heartbeat/{rank}"

    def _beat(self) -> None:
        while not self._done.is_set():
            try:
                self.store.set(self._key(self.rank), f"{self.beats} {self.iteration}")
            except Exception:  # noqa: BLE001 -- the store is gone; diagnose() says so
                self.failed = True
                return
            self.beats += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()

    def _read(self) -> Dict[int, Tuple[int, int]]:
        out = {}
        for r in range(self.world):
            if self.store.check([self._key(r)]):
                beats, it = self.store.get(self._key(r)).decode().split()
                out[r] = (int(beats), int(it))
        return out

    def diagnose(self) -> Optional[str]:
        """Which processes stopped answering (a sentence), or None if all still beat.

        First this process's next beat tells whether the store is there (a
        failed beat: its host, rank 0, is gone, and no more is asked of it); then
        the others' heartbeats are read twice, 3 intervals apart, in a helper
        thread (a frozen store never answers a read): no answer within 3 s also
        means rank 0 stopped.
        """
        store_gone = None if self.rank == 0 else (
            "rank 0 stopped answering: the store it hosts for the processes does not "
            "respond (frozen, killed, stopped by an error of its own -- see its output -- or "
            "its machine unreachable)")
        seen, deadline = self.beats, time.time() + 3.0
        while self.beats == seen and not self.failed and time.time() < deadline:
            time.sleep(self.interval / 5)
        if self.failed or self.beats == seen:
            return store_gone
        reads: List[Dict[int, Tuple[int, int]]] = []

        def probe() -> None:
            try:
                reads.append(self._read())
                time.sleep(3 * self.interval)
                reads.append(self._read())
            except Exception:  # noqa: BLE001 -- the store went away meanwhile
                pass

        helper = threading.Thread(target=probe, name="cribo-diagnosis", daemon=True)
        helper.start()
        helper.join(3.0 + 3 * self.interval)
        if len(reads) < 2:
            return store_gone
        first, second = reads
        stopped = [r for r in range(self.world) if r != self.rank and
                   (r not in second or first.get(r, (None,))[0] == second[r][0])]
        if stopped:
            seen = ", ".join(str(second[r][1]) if r in second else "never" for r in stopped)
            ranks = ", ".join(str(r) for r in stopped)
            return (f"rank{'s' if len(stopped) > 1 else ''} {ranks} stopped answering (last "
                    f"seen at iteration {seen}): no heartbeat for {3 * self.interval:.2g} s "
                    f"(frozen, killed, stopped by an error of its own -- see its output -- or "
                    f"its machine unreachable)")
        behind = [r for r in second if r != self.rank and second[r][1] < self.iteration]
        if behind:
            who = ", ".join(f"rank {r} (at iteration {second[r][1]})" for r in behind)
            return f"{who} is alive but stuck behind this process"
        return None


@dataclasses.dataclass
class _Run:
    """Where the run stands, for the checkpoints and for the messages."""

    cfg: TrainConfig
    n_iter: int
    checkpoint: str
    teacher_file: str
    saved: Optional[Tuple[int, int]] = None  # (epochs done, steps of the next) last saved
    seconds_before: float = 0.0              # training time of earlier invocations
    t_start: float = dataclasses.field(default_factory=time.time)

    def where(self, epochs_done: int, step: int) -> str:
        if step == 0:
            return f"after epoch {epochs_done} of {self.cfg.epochs}"
        return f"epoch {epochs_done + 1} of {self.cfg.epochs}, step {step} of {self.n_iter}"

    def last_checkpoint(self) -> str:
        if self.saved is None:
            return "No checkpoint was written before it"
        return f"The last checkpoint, {self.checkpoint} ({self.where(*self.saved)}), is intact"

    def diverged(self, what: str, epoch: int, it: int) -> NonFiniteLoss:
        cfg = self.cfg
        then = ("then continue from the checkpoint with --allow-config-change, or start "
                "afresh with --no-resume" if self.saved is not None else "then start again")
        clip = (f"--clip-grad (now {cfg.clip_grad:g})" if cfg.clip_grad > 0 else
                "--clip-grad (now 0: off; e.g. 3)")
        return NonFiniteLoss(
            f"the run diverged: {what} at iteration {it} (epoch {epoch + 1} of {cfg.epochs}); "
            f"stopping without saving it. {self.last_checkpoint()}. Lower --lr (now "
            f"{cfg.lr:g}) or {clip}, or raise --teacher-temp (now {cfg.teacher_temp:g}); "
            f"{then}.")


# =============================================================================
# one epoch
# =============================================================================

def train_one_epoch(epoch: int, loader: Any, student: nn.Module, teacher: nn.Module,
                    objective: CriboObjective, optimizer: torch.optim.Optimizer,
                    schedules: Dict[str, np.ndarray], cfg: TrainConfig,
                    device: torch.device, log: Any, start_iter: int, *,
                    first_step: int = 0, sums: Optional[Dict[str, float]] = None,
                    rng_state: Optional[Dict[str, Any]] = None,
                    stop: Optional[Callable[[], bool]] = None,
                    heartbeat: Optional[_Heartbeat] = None,
                    run: Optional[_Run] = None) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean loss terms.

    Args:
        start_iter: the global iteration of the epoch's step 0.
        first_step: steps of this epoch already done (a run resumed mid-epoch; the
            loader starts at that batch: ``set_epoch(loader, epoch, first_step)``).
        sums: the loss sums of those steps.
        rng_state: random state to restore once the loader's iterator exists (it
            draws its seed from torch's generator), for a mid-epoch resume.
        stop: asked after every step but the last; when it says True the epoch
            stops there (``_EpochInterrupted`` carries the steps done and sums).
        heartbeat: told the iteration (distributed runs).
        run: for the messages of a divergence (:class:`NonFiniteLoss`).
    """
    raw_student = student.module if hasattr(student, "module") else student
    n_iter = len(loader)
    sums = dict(sums or {})
    diverged = run.diverged if run is not None else (
        lambda what, e, it: NonFiniteLoss(f"the run diverged: {what} at iteration {it} "
                                          f"(epoch {e + 1}); the last checkpoint is intact"))
    bar = None
    if cfg.progress and _is_main():
        from tqdm import tqdm

        bar = tqdm(total=n_iter, initial=first_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   leave=True, dynamic_ncols=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    t0 = time.time()
    tick = time.perf_counter
    batches = iter(loader)
    if rng_state is not None:
        _set_rng_state(rng_state)
    t_data = tick()
    try:
        for i, batch in enumerate(batches, start=first_step):
            it = start_iter + i
            if heartbeat is not None:
                heartbeat.iteration = it
            timings = {"data": tick() - t_data}
            t = tick()
            for j, group in enumerate(optimizer.param_groups):
                group["lr"] = float(schedules["lr"][it])
                if j == 0:
                    group["weight_decay"] = float(schedules["wd"][it])
            images = torch.stack([batch["view1"], batch["view2"]], 1).to(device,
                                                                         non_blocking=True)
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
            try:
                out = objective(student_fn, t_cls, t_tok, positions, teacher.head,
                                image_ids=ids, step=it,
                                teacher_temp=float(schedules["teacher_temp"][it]),
                                teacher_temp_objects=float(schedules["teacher_temp_objects"][it]),
                                pos_weight=float(schedules["pos_weight"][it]),
                                use_objects=use_objects, use_neighbours=use_neighbours)
            except NonFiniteError as e:  # a network's output: reported before the C checks
                raise diverged(str(e), epoch, it) from e
            if not math.isfinite(out.terms["total"]):
                terms = ", ".join(f"{k} {v:.4g}" for k, v in out.terms.items())
                raise diverged(f"the loss is {out.terms['total']} ({terms})", epoch, it)

            optimizer.zero_grad(set_to_none=True)
            t = tick()
            out.loss.backward()
            t_back = tick()
            ready = getattr(raw_student, "timings", {}).get("backbone_grad_ready", t)
            timings["heads_backward"] = max(ready - t, 0.0)
            timings["backbone_backward"] = max(t_back - max(ready, t), 0.0)
            if epoch < cfg.freeze_last_layer:
                _cancel_last_layer_gradients(raw_student.head)
            bad = _clip_gradients(raw_student, cfg.clip_grad)  # per parameter: order-free
            if bad is not None:
                raise diverged(f"the gradient of {bad} is not finite", epoch, it)
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
                bar.set_postfix(loss=f"{out.terms['total']:.3f}",
                                g=f"{out.terms['global']:.3f}",
                                o=f"{out.terms['objects']:.3f}",
                                nn=f"{out.terms['neighbours']:.3f}",
                                objs=f"{out.stats['objects_per_image']:.1f}",
                                cyc=f"{out.stats['consistent']:.2f}")
                bar.update(1)
            if _is_main() and (it % cfg.log_every == 0 or i == n_iter - 1):
                rec = {"type": "iter", "epoch": epoch, "iter": it,
                       "lr": float(schedules["lr"][it]),
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
            if stop is not None and i + 1 < n_iter and stop():
                raise _EpochInterrupted(i + 1, sums)
            t_data = tick()
    finally:
        if bar is not None:
            bar.close()
    return {k: v / max(n_iter, 1) for k, v in sums.items()}


# =============================================================================
# training
# =============================================================================

def train(cfg: TrainConfig,
          on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Dict[str, Any]:
    """Pretrains with CrIBo as ``cfg`` says; returns a summary.

    Continues the run in ``cfg.output_dir`` as ``cfg.resume`` says (module
    docstring); a run found complete trains nothing.  ``on_epoch_end(epoch,
    stats)`` is called after each epoch's checkpoint (e.g. to plot, or to stop:
    an exception it raises ends the run like an interruption).

    Returns:
        ``output_dir``, ``checkpoint``, ``teacher_backbone`` (paths), ``history``
        (the mean loss terms of each epoch trained by this call), ``start_epoch``
        (the epochs done before it), ``already_complete`` (nothing was left to
        train), ``seconds`` (the run's training time, earlier invocations
        included) and ``seconds_now`` (this call's).

    Raises:
        ResumeError: the folder's checkpoint was written with other options, or
            ``--resume`` found none.
        FolderLocked: another process is training into ``output_dir``.
        CheckpointError: the checkpoint to continue from is unreadable.
        NonFiniteLoss: the run diverged (nothing of it saved).
        OutputWriteError: a file could not be written (e.g. a full disk).
        RankStopped: another process of a distributed run stopped answering.
        TrainingInterrupted: SIGINT; the checkpoint holds every step done.
    """
    # ============ distributed, threads, seeds ============
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(cfg)
    if distributed and not torch.distributed.is_initialized():
        # gloo also on GPUs for the objective's small CPU collectives.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    main = _is_main()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        cribo.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)

    with contextlib.ExitStack() as stack:
        # ============ the run folder, interruptions, the other processes ============
        if main:
            stack.enter_context(lock_folder(cfg.output_dir))
            removed = remove_stale_temporaries(cfg.output_dir)
            if removed:
                print(f"removed {len(removed)} temporary file(s) left in {cfg.output_dir} by a "
                      f"writer that was killed: {', '.join(removed)}")
        heartbeat = _Heartbeat.start() if distributed else None
        if heartbeat is not None:
            stack.callback(heartbeat.stop)
        stop = _StopRequest(distributed)
        stack.callback(stop.restore)
        run: List[_Run] = []
        try:
            return _train(cfg, on_epoch_end, device, distributed, heartbeat, stop, run)
        except (NonFiniteLoss, ResumeError, CheckpointError, OutputWriteError, FolderLocked):
            raise
        except Exception as e:
            diagnosis = heartbeat.diagnose() if heartbeat is not None else None
            if diagnosis is None:
                raise
            waited = (f"it waited {cfg.dist_timeout:g} s (--dist-timeout) in a collective"
                      if "timed out" in str(e).lower() else _backend_error(e))
            then = ("once every process can run, start the same command again to continue "
                    "from it")
            last = (f"{run[0].last_checkpoint()}; {then}" if run and run[0].saved else
                    f"No checkpoint was written; {then.split(' to continue')[0]}")
            at = (f"at iteration {heartbeat.iteration}" if heartbeat.iteration >= 0
                  else "before training")
            raise RankStopped(f"{diagnosis}. This process (rank {_rank()}) stopped {at}: "
                              f"{waited}. {last}.") from e


def _backend_error(e: BaseException) -> str:
    """The gist of a communication error: gloo's "[file:line] Read error [addr]:port:
    Connection reset by peer. This is typically ..." -> "Read error ...: Connection
    reset by peer"."""
    text = " ".join(str(e).split())
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return f"{type(e).__name__}: {text.split('. ')[0].rstrip('.')}"


def _train(cfg: TrainConfig, on_epoch_end: Any, device: torch.device, distributed: bool,
           heartbeat: Optional[_Heartbeat], stop: _StopRequest, run_out: List[_Run]
           ) -> Dict[str, Any]:
    world, main = _world(), _is_main()

    # ============ data ============
    from ..data import make_loader, set_epoch

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

    # ============ continue, or start afresh ============
    run = _Run(cfg, n_iter, os.path.join(cfg.output_dir, "checkpoint.pth"),
               os.path.join(cfg.output_dir, "teacher_backbone.pth"))
    run_out.append(run)
    ckpt, changes = _checkpoint_to_continue(cfg, run, world, main)
    start_epoch, first_step, epoch_sums = 0, 0, None
    if ckpt is not None:
        _restore(ckpt, student, teacher, objective, optimizer)
        start_epoch, first_step = int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))
        run.saved = (start_epoch, first_step)
        run.seconds_before = float(ckpt.get("train_seconds", 0.0))
        if first_step and int(ckpt.get("steps_per_epoch", n_iter)) != n_iter:
            if main:
                print(f"the steps per epoch changed ({ckpt.get('steps_per_epoch')} -> "
                      f"{n_iter}): epoch {start_epoch + 1} restarts from its first step")
            first_step = 0
        epoch_sums = dict(ckpt.get("epoch_sums") or {}) if first_step else None
        if main:
            print(f"resumed from {run.checkpoint} ({run.where(start_epoch, first_step)})")
            if changes:
                print("with changed options (--allow-config-change): "
                      + _describe_changes(changes))
            _repair_exports(ckpt, run)
    if start_epoch >= cfg.epochs:
        if main:
            print(f"{cfg.output_dir} holds a complete run ({cfg.epochs} epochs): nothing to "
                  f"train")
        if stop.requested:  # Ctrl-C while setting up: stop before what follows training
            raise TrainingInterrupted(
                f"interrupted (SIGINT) before the evaluation; {cfg.output_dir} holds a "
                f"complete run", run.checkpoint,
                start_epoch, 0, n_iter)
        return _summary(run, [], start_epoch, already_complete=True)

    # ============ logging ============
    log = _Log(os.path.join(cfg.output_dir, "log.jsonl"), "a" if ckpt is not None else "w") \
        if main else _NullLog()
    if main:
        meta = {"type": "run", "config": cfg.to_dict(), "cribo": cribo.__version__,
                "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "git": _git_revision(),
                "world_size": world, "device": str(device),
                "threads": {"torch": torch.get_num_threads(),
                            "cribo": cribo.get_num_threads()},
                "iters_per_epoch": n_iter, "start_epoch": start_epoch,
                "start_step": first_step,
                "config_changes": {k: [a, b] for k, a, b in changes},
                "time": datetime.datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(json.dumps(meta, indent=2), os.path.join(cfg.output_dir,
                                                                   "config.json"), "config")
        log.write(json.dumps(meta) + "\n")

    # ============ training ============
    history: List[Dict[str, float]] = []
    run.t_start = time.time()
    parts = (cfg, run, student, teacher, objective, optimizer, world)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            resumed = epoch == start_epoch and first_step > 0
            set_epoch(loader, epoch, first_step if resumed else 0)
            try:
                stats = train_one_epoch(
                    epoch, loader, ddp_student, teacher, objective, optimizer, schedules, cfg,
                    device, log, epoch * n_iter, first_step=first_step if resumed else 0,
                    sums=epoch_sums if resumed else None,
                    rng_state=ckpt["rng"] if resumed else None, stop=stop,
                    heartbeat=heartbeat, run=run)
            except _EpochInterrupted as s:
                if main:
                    _save(*parts, epoch, s.step, s.sums)
                else:
                    _check_state(*parts, epoch, s.step)
                run.saved = (epoch, s.step)
                raise TrainingInterrupted(
                    f"interrupted (SIGINT) at epoch {epoch + 1} of {cfg.epochs}, step {s.step} "
                    f"of {n_iter}; {run.checkpoint} holds every step done", run.checkpoint,
                    epoch, s.step, n_iter) from None
            history.append(stats)
            if main:
                log.write(json.dumps({"type": "epoch", "epoch": epoch,
                                      **{k: float(v) for k, v in stats.items()}}) + "\n")
                log.flush()
            last = epoch == cfg.epochs - 1
            stopping = stop()  # in every process, after every epoch
            if (epoch + 1) % cfg.save_every == 0 or last or stopping:
                if main:
                    _save(*parts, epoch + 1, 0, None)
                else:
                    _check_state(*parts, epoch + 1, 0)
                run.saved = (epoch + 1, 0)
            if stopping:
                done = ("training is complete; run the same command again for what follows "
                        "it" if last else f"{run.checkpoint} holds every step done")
                raise TrainingInterrupted(
                    f"interrupted (SIGINT) after epoch {epoch + 1} of {cfg.epochs}; {done}",
                    run.checkpoint, epoch + 1, 0, n_iter)
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)
    finally:
        log.close()
    return _summary(run, history, start_epoch, already_complete=False)


def _summary(run: _Run, history: List[Dict[str, float]], start_epoch: int,
             already_complete: bool) -> Dict[str, Any]:
    now = 0.0 if already_complete else time.time() - run.t_start
    return {"output_dir": run.cfg.output_dir, "checkpoint": run.checkpoint,
            "teacher_backbone": run.teacher_file, "history": history,
            "start_epoch": start_epoch, "already_complete": already_complete,
            "seconds": run.seconds_before + now, "seconds_now": now}


class _NullLog:
    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Log:
    """log.jsonl; a failed write (a full disk) names the file."""

    def __init__(self, path: str, mode: str) -> None:
        self.path = path
        self.fh = self._do(lambda: open(path, mode))

    def _do(self, f: Callable[[], Any]) -> Any:
        try:
            return f()
        except OSError as e:
            raise OutputWriteError(f"cannot write the log {self.path}: "
                                   f"{os.strerror(e.errno) if e.errno else e}; the checkpoint "
                                   f"is not affected") from e

    def write(self, text: str) -> None:
        self._do(lambda: self.fh.write(text))

    def flush(self) -> None:
        self._do(self.fh.flush)

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass  # already reported by write/flush


# =============================================================================
# checkpoints
# =============================================================================

def config_differences(saved: Dict[str, Any], current: Dict[str, Any],
                       saved_world: int = 1, world: int = 1) -> List[Tuple[str, Any, Any]]:
    """(option, checkpoint's value, current value) of every option outside
    :data:`RUN_CONTROL` that differs, then ``processes`` if the world size does
    (it sets the total batch).  An option a checkpoint lacks (written before the
    option existed) counts as its default."""
    defaults = TrainConfig().to_dict()

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    out = []
    for k, v in current.items():
        if k in RUN_CONTROL:
            continue
        old = saved.get(k, defaults.get(k))
        if norm(old) != norm(v):
            out.append((k, old, v))
    if int(saved_world) != int(world):
        out.append(("processes", int(saved_world), int(world)))
    return out


def _describe_changes(changes: List[Tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k if k == 'processes' else '--' + k.replace('_', '-')} {a} -> {b}"
                     for k, a, b in changes)


def _checkpoint_to_continue(cfg: TrainConfig, run: _Run, world: int, main: bool
                            ) -> Tuple[Optional[Dict[str, Any]], List[Tuple[str, Any, Any]]]:
    """The checkpoint to continue from (None: start afresh) and the option changes
    it comes with; raises ResumeError as ``cfg.resume`` says (module docstring)."""
    if cfg.resume is False:
        if main:
            _clear_run(cfg, run)
        return None, []
    if not os.path.exists(run.checkpoint):
        if cfg.resume:
            raise ResumeError(f"--resume: {cfg.output_dir} holds no checkpoint.pth to continue "
                              f"from; leave --resume out to start afresh")
        return None, []
    ckpt = _read_checkpoint(run.checkpoint)
    changes = config_differences(ckpt.get("config", {}), cfg.to_dict(),
                                 ckpt.get("world_size", 1), world)
    if changes and not cfg.allow_config_change:
        where = run.where(int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0)))
        raise ResumeError(
            f"{cfg.output_dir} holds a checkpoint ({where}) written with other options: "
            f"{_describe_changes(changes)}. To continue it with the new options add "
            f"--allow-config-change; to start afresh there, --no-resume (it replaces what "
            f"the folder holds); or choose another --output-dir")
    return ckpt, changes


def _clear_run(cfg: TrainConfig, run: _Run) -> None:
    """--no-resume: removes the previous run's checkpoint, snapshots and export."""
    gone = [p for p in [run.checkpoint, run.teacher_file]
            + [p for _, p in list_snapshots(cfg.output_dir)] if os.path.exists(p)]
    for p in gone:
        os.unlink(p)
    if gone:
        names = ", ".join(os.path.basename(p) for p in gone)
        print(f"starting afresh (--no-resume): removed {names} from {cfg.output_dir}")


def _read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint this module wrote, complete and finite, or CheckpointError."""
    advice = ("start afresh with --no-resume (which removes it), or put an epoch snapshot "
              "checkpointNNNN.pth in its place")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file
        from ..nn.checkpoints import _unreadable_checkpoint

        # Said in cribo's words, and without torch's own (which advises unsafe loading).
        raise CheckpointError(f"{_unreadable_checkpoint(path, e, 'cribo pretrain')}; "
                              f"{advice}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a training checkpoint; {advice}")
    for key in ("student", "teacher", "optimizer", "objective", "epoch", "rng"):
        if key not in ckpt:
            raise CheckpointError(f"the checkpoint {path} lacks '{key}'; {advice}")
    bad = _nonfinite_entries({k: ckpt[k] for k in ("student", "teacher", "optimizer",
                                                   "objective")})
    if bad:
        raise CheckpointError(
            f"the checkpoint {path} holds non-finite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}: written by a diverged run, before cribo "
            f"checked); {advice}")
    return ckpt


def _restore(ckpt: Dict[str, Any], student: nn.Module, teacher: nn.Module,
             objective: CriboObjective, optimizer: torch.optim.Optimizer) -> None:
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    objective.load_state_dict(ckpt["objective"])
    _set_rng_state(ckpt["rng"])


def _teacher_backbone_state(teacher_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in teacher_state.items()
            if k.startswith("backbone.")}


def _repair_exports(ckpt: Dict[str, Any], run: _Run) -> None:
    """After a kill between two writes: re-exports teacher_backbone.pth from the
    checkpoint when it differs (or is missing), and adds the epoch snapshot the
    checkpoint should have."""
    want = _teacher_backbone_state(ckpt["teacher"])
    try:
        have = torch.load(run.teacher_file, map_location="cpu", weights_only=True)
        same = isinstance(have, dict) and have.keys() == want.keys() and all(
            torch.equal(have[k], want[k]) for k in want)
    except Exception:  # noqa: BLE001 -- missing or unreadable: re-export
        same = False
    if not same:
        atomic_save(want, run.teacher_file, "teacher backbone")
        print(f"re-exported {run.teacher_file} from {run.checkpoint} (it was missing or "
              f"did not match it)")
    epoch, step = int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))
    if run.cfg.keep_checkpoints > 0 and step == 0 and epoch > 0:
        path = os.path.join(run.cfg.output_dir, snapshot_name(epoch - 1))
        if not os.path.exists(path):
            snapshot(run.checkpoint, epoch - 1, run.cfg.keep_checkpoints)


def _check_state(cfg: TrainConfig, run: _Run, student: nn.Module, teacher: nn.Module,
                 objective: CriboObjective, optimizer: torch.optim.Optimizer, world: int,
                 epoch: int, step: int) -> Dict[str, Any]:
    """The state to save, checked finite (NonFiniteLoss otherwise, nothing saved)."""
    state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
             "optimizer": optimizer.state_dict(), "objective": objective.state_dict()}
    bad = _nonfinite_entries({**{k: state[k] for k in ("student", "teacher", "objective")},
                              "optimizer": _named_optimizer_state(optimizer, student)})
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise run.diverged(f"the state to save holds non-finite values ({names})",
                           epoch if step else epoch - 1, epoch * run.n_iter + step - 1)
    return state


def _save(cfg: TrainConfig, run: _Run, student: nn.Module, teacher: nn.Module,
          objective: CriboObjective, optimizer: torch.optim.Optimizer, world: int,
          epoch: int, step: int, sums: Optional[Dict[str, float]]) -> None:
    """Writes the teacher export, then the checkpoint (the commit point), then the
    epoch snapshot.  ``epoch`` epochs and ``step`` steps of the next are done."""
    state = _check_state(cfg, run, student, teacher, objective, optimizer, world, epoch, step)
    state.update({
        "epoch": epoch, "iteration": epoch * run.n_iter + step, "epoch_step": step,
        "steps_per_epoch": run.n_iter, "epoch_sums": dict(sums or {}), "world_size": world,
        "train_seconds": run.seconds_before + time.time() - run.t_start,
        "config": cfg.to_dict(), "rng": _rng_state(), "cribo": cribo.__version__,
    })
    exported = False
    try:
        atomic_save(_teacher_backbone_state(state["teacher"]), run.teacher_file,
                    "the teacher backbone")
        exported = True
        atomic_save(state, run.checkpoint, "the checkpoint")
        run.saved = (epoch, step)
        if step == 0 and cfg.keep_checkpoints > 0:
            snapshot(run.checkpoint, epoch - 1, cfg.keep_checkpoints)
    except OutputWriteError as e:
        if run.saved == (epoch, step):  # only the snapshot failed
            after = f"{run.checkpoint} ({run.where(epoch, step)}) was written"
        elif run.saved is not None:
            after = (f"The last checkpoint, {run.checkpoint}, holds the state "
                     f"{run.where(*run.saved)}: once there is room, run the same command "
                     f"again to continue from it")
        else:
            after = "No checkpoint was written yet"
        if exported and run.saved != (epoch, step):
            after += (f". {run.teacher_file} already holds the teacher {run.where(epoch, step)}, "
                      f"ahead of the checkpoint; continuing the run rewrites it from the "
                      f"checkpoint")
        raise OutputWriteError(f"{e}. {after}") from e


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
