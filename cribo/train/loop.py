"""CrIBo pretraining (docs/method.md §6): ``cribo pretrain`` / ``python -m cribo pretrain``.

Laid out like DINO's training script: :func:`train` builds everything in banner
sections and runs :func:`train_one_epoch` per epoch.  Everything CrIBo-specific
lives in :mod:`cribo.nn.objective`; this module is the orchestration and the
step: schedules, EMA teacher, last-layer freeze, clipping, mixed precision, and
``torch.distributed`` (run the same command under ``torchrun
--nproc_per_node=P``: gloo on CPU, nccl on GPU).  The rest is in the modules
beside it (build, resume, saving, faults, records, profiler: the table of
:mod:`cribo.train`).

Faults lose nothing (the files are written as :mod:`cribo.train.checkpoints` says):

- the run folder is locked for the run (:class:`~cribo.train.checkpoints.FolderLocked`
  for a second run into it); every file is replaced atomically, the teacher
  export first and the checkpoint last: the checkpoint is the commit point,
  and a run that continues or finds itself complete re-exports the teacher
  from it when the two differ;
- a diverging run stops with :class:`~cribo.train.faults.NonFiniteLoss` naming
  what became non-finite and where (the loss, a network's outputs, the
  gradients), and no state holding a NaN or an infinity is ever saved;
- Ctrl-C (SIGINT) stops after the current step with a checkpoint of that step
  (:class:`~cribo.train.faults.TrainingInterrupted`); continuing from it gives
  bit for bit the run that was not interrupted (the data of step t of epoch e
  depends only on the seed, e and the image index);
- a write that fails (a full disk) stops with
  :class:`~cribo.train.checkpoints.OutputWriteError`, the previous checkpoint intact;
- in a distributed run a process that stops answering stops the others after
  ``dist_timeout`` seconds with :class:`~cribo.train.faults.RankStopped`, naming it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

import cribo

from .. import distributed as dist
from ..nn.objective import CriboObjective, NonFiniteError
from .build import build_data, build_models, build_objective, build_optimizer, build_schedules
from .checkpoints import (FolderLocked, OutputWriteError, atomic_write_text, lock_folder,
                          remove_stale_temporaries)
from .config import TrainConfig
from .faults import (CheckpointError, NonFiniteLoss, ResumeError, TrainingInterrupted,
                     _EpochInterrupted, _Heartbeat, _rank_stopped, _StopRequest)
from .profiler import StepProfiler
from .records import ProgressBar, _Log, _NullLog, epoch_record, iter_record, run_record
from .resume import _continue_or_start
from .run_folder import RunFolder
from .saving import _check_state, _Run, _save, _set_rng_state

__all__ = ["train", "train_one_epoch"]


# =============================================================================
# one step's pieces
# =============================================================================

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


def _set_schedules(optimizer: torch.optim.Optimizer, schedules: Dict[str, np.ndarray],
                   it: int) -> None:
    """The learning rate (every group) and weight decay (the first group: weights)
    of iteration ``it``."""
    for j, group in enumerate(optimizer.param_groups):
        group["lr"] = float(schedules["lr"][it])
        if j == 0:
            group["weight_decay"] = float(schedules["wd"][it])


@torch.no_grad()
def _update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA of the student's trained parameters into the teacher's."""
    pairs = [(t, s.detach()) for t, s in zip(teacher.parameters(), student.parameters())
             if s.requires_grad]  # frozen parameters stay bit-identical
    t_params = [t for t, _ in pairs]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [s for _, s in pairs], alpha=1 - momentum)


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
                    run: Optional[_Run] = None,
                    profiler: Optional[StepProfiler] = None) -> Dict[str, float]:
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
        profiler: times the steps (default: as rank 0's log records need).
    """
    raw_student = student.module if hasattr(student, "module") else student
    n_iter = len(loader)
    sums = dict(sums or {})
    diverged = run.diverged if run is not None else (
        lambda what, e, it: NonFiniteLoss(f"the run diverged: {what} at iteration {it} "
                                          f"(epoch {e + 1}); the last checkpoint is intact"))
    main = dist.is_main()
    prof = profiler if profiler is not None else StepProfiler(enabled=main, device=device)
    bar = ProgressBar(cfg.progress and main, n_iter, first_step,
                      f"epoch {epoch + 1}/{cfg.epochs}")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    use_objects, use_neighbours = epoch >= cfg.objects_start, epoch >= cfg.neighbours_start
    t0 = time.time()
    batches = iter(loader)
    if rng_state is not None:
        _set_rng_state(rng_state)
    prof.waiting()
    try:
        for i, batch in enumerate(batches, start=first_step):
            it = start_iter + i
            if heartbeat is not None:
                heartbeat.iteration = it
            prof.mark("start")
            _set_schedules(optimizer, schedules, it)
            images = torch.stack([batch["view1"], batch["view2"]], 1).to(device,
                                                                         non_blocking=True)
            positions = torch.stack([batch["pos1"], batch["pos2"]], 1).numpy()
            ids = batch["image_id"].numpy()
            B = images.shape[0]
            prof.mark("batch_on_device")

            with torch.no_grad(), amp:
                t_cls, t_tok = teacher.backbone(images.flatten(0, 1))
            t_cls = t_cls.float().view(B, 2, -1)
            t_tok = t_tok.float().view(B, 2, t_tok.shape[1], -1)
            prof.mark("teacher_forward")

            def student_fn(labels: np.ndarray, valid: np.ndarray):
                with amp:
                    g, o = student(images, labels, valid)
                return g.float(), o.float()

            try:
                out = objective(student_fn, t_cls, t_tok, positions, teacher.head,
                                image_ids=ids, step=it,
                                teacher_temp=float(schedules["teacher_temp"][it]),
                                teacher_temp_objects=float(schedules["teacher_temp_objects"][it]),
                                pos_weight=float(schedules["pos_weight"][it]),
                                use_objects=use_objects, use_neighbours=use_neighbours)
            except NonFiniteError as e:  # a network's output: reported before the C checks
                raise diverged(str(e), epoch, it) from e
            prof.mark("objective_done")
            if not math.isfinite(out.terms["total"]):
                terms = ", ".join(f"{k} {v:.4g}" for k, v in out.terms.items())
                raise diverged(f"the loss is {out.terms['total']} ({terms})", epoch, it)

            optimizer.zero_grad(set_to_none=True)
            prof.mark("backward_start")
            out.loss.backward()
            prof.mark("backward_end")
            if epoch < cfg.freeze_last_layer:
                _cancel_last_layer_gradients(raw_student.head)
            bad = _clip_gradients(raw_student, cfg.clip_grad)  # per parameter: order-free
            prof.mark("clipped")
            if bad is not None:
                raise diverged(f"the gradient of {bad} is not finite", epoch, it)
            optimizer.step()
            prof.mark("optimizer_stepped")
            _update_teacher(teacher, raw_student, float(schedules["momentum"][it]))
            prof.mark("ema_done")
            timings = prof.step_done(out.timings, getattr(raw_student, "timings", None))

            for k, v in {**out.terms, **out.stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.step(out.terms, out.stats)
            if main and (it % cfg.log_every == 0 or i == n_iter - 1):
                log.record(iter_record(cfg, epoch, it, schedules, out.terms, out.stats,
                                       timings, time.time() - t0))
            if stop is not None and i + 1 < n_iter and stop():
                raise _EpochInterrupted(i + 1, sums)
            prof.waiting()
    finally:
        bar.close()
    return {k: v / max(n_iter, 1) for k, v in sums.items()}


# =============================================================================
# training
# =============================================================================

def _device(cfg: TrainConfig) -> torch.device:
    """The device ``cfg.device`` names ('auto': cuda when available)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def train(cfg: TrainConfig,
          on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Dict[str, Any]:
    """Pretrains with CrIBo as ``cfg`` says; returns a summary.

    Continues the run in ``cfg.output_dir`` as ``cfg.resume`` says
    (:mod:`cribo.train.resume`); a run found complete trains nothing.  ``on_epoch_end(epoch,
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
    distributed = dist.launched_world_size() > 1
    device = _device(cfg)
    if distributed and not dist.initialized():
        # gloo also on GPUs for the objective's small CPU collectives.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    main = dist.is_main()
    threads = cfg.threads if cfg.threads > 0 else dist.cpu_share()
    torch.set_num_threads(threads)
    cribo.set_num_threads(threads)
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
            last = run[0].last_checkpoint() if run and run[0].saved else None
            raise _rank_stopped(e, diagnosis, heartbeat, cfg.dist_timeout, last) from e


def _train(cfg: TrainConfig, on_epoch_end: Any, device: torch.device, distributed: bool,
           heartbeat: Optional[_Heartbeat], stop: _StopRequest, run_out: List[_Run]
           ) -> Dict[str, Any]:
    world, main = dist.world_size(), dist.is_main()

    # ============ data ============
    from ..data import make_loader, set_epoch

    dataset = build_data(cfg)
    loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers, shuffle=True,
                         seed=cfg.seed, drop_last=True, distributed=distributed,
                         pin_memory=device.type == "cuda")
    n_iter = len(loader)

    # ============ models, objective, optimizer, schedules ============
    nets = build_models(cfg)
    student, teacher = nets["student"].to(device), nets["teacher"].to(device)
    objective = build_objective(cfg, student.backbone.embed_dim).to(device)
    ddp_student: nn.Module = student
    if distributed:
        ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(student)
    schedules = build_schedules(cfg, n_iter, world)

    # ============ continue, or start afresh ============
    run = _Run(cfg, n_iter)
    run_out.append(run)
    start = _continue_or_start(cfg, run, world, main, student, teacher, objective, optimizer)
    if start.epoch >= cfg.epochs:
        if main:
            print(f"{cfg.output_dir} holds a complete run ({cfg.epochs} epochs): nothing to "
                  f"train")
        if stop.requested:  # Ctrl-C while setting up: stop before what follows training
            raise TrainingInterrupted(
                f"interrupted (SIGINT) before the evaluation; {cfg.output_dir} holds a "
                f"complete run", run.checkpoint, start.epoch, 0, n_iter)
        return _summary(run, [], start.epoch, already_complete=True)

    # ============ logging ============
    folder = RunFolder(cfg.output_dir)
    log = _Log(folder.log, "a" if start.checkpoint is not None else "w") if main \
        else _NullLog()
    if main:
        meta = run_record(cfg, world, device, n_iter, start.epoch, start.step, start.changes)
        atomic_write_text(json.dumps(meta, indent=2), folder.config, "config")
        log.write(json.dumps(meta) + "\n")  # flushed with the first step's record
    profiler = StepProfiler(enabled=main, detailed=cfg.profile, device=device)

    # ============ training ============
    history: List[Dict[str, float]] = []
    run.t_start = time.time()
    parts = (cfg, run, student, teacher, objective, optimizer, world)
    try:
        for epoch in range(start.epoch, cfg.epochs):
            resumed = epoch == start.epoch and start.step > 0
            set_epoch(loader, epoch, start.step if resumed else 0)
            try:
                stats = train_one_epoch(
                    epoch, loader, ddp_student, teacher, objective, optimizer, schedules, cfg,
                    device, log, epoch * n_iter, first_step=start.step if resumed else 0,
                    sums=start.sums if resumed else None,
                    rng_state=start.checkpoint["rng"] if resumed else None, stop=stop,
                    heartbeat=heartbeat, run=run, profiler=profiler)
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
            phase_means = profiler.epoch_means()
            if main:
                log.record(epoch_record(epoch, stats, phase_means))
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
    return _summary(run, history, start.epoch, already_complete=False)


def _summary(run: _Run, history: List[Dict[str, float]], start_epoch: int,
             already_complete: bool) -> Dict[str, Any]:
    now = 0.0 if already_complete else time.time() - run.t_start
    return {"output_dir": run.cfg.output_dir, "checkpoint": run.checkpoint,
            "teacher_backbone": run.teacher_file, "history": history,
            "start_epoch": start_epoch, "already_complete": already_complete,
            "seconds": run.seconds_before + now, "seconds_now": now}
