"""What a run continues from (docs/method.md §6): the checkpoint in its folder, if
it may.

Resuming (``resume``, tri-state): unset, a folder holding a checkpoint of the
same configuration continues it (a requeued job picks up where it stopped), one
of another configuration is refused (:class:`~cribo.train.faults.ResumeError`,
listing the options that differ, unless ``allow_config_change``), and an empty
folder starts afresh; ``--resume`` is the same but an empty folder is an error;
``--no-resume`` starts afresh, removing what the folder holds.  The options that
may differ freely are :data:`RUN_CONTROL`; a checkpoint written before an option
was renamed is read with today's names (:func:`cribo.train.config.upgrade_saved_config`).

The checkpoint is the commit point: continuing re-exports the teacher when the
export beside it differs (a kill between the two writes), and adds the epoch
snapshot it should have (:func:`_repair_exports`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn.checkpoints import read_checkpoint
from ..nn.objective import CriboObjective
from .checkpoints import atomic_save, list_snapshots, snapshot
from .config import TrainConfig, upgrade_saved_config
from .faults import CheckpointError, ResumeError
from .run_folder import CHECKPOINT
from .saving import _nonfinite_entries, _Run, _set_rng_state, _teacher_backbone_state

__all__ = ["RUN_CONTROL", "config_differences"]

#: Options that control how a run is carried out, not what it computes: they may
#: differ between a checkpoint and the run that continues it (where it writes and
#: what it keeps, how it reports, how many threads and workers load and compute,
#: how long it waits for other processes, what is done after training).  Every
#: other option must match the checkpoint's unless ``allow_config_change``.
#: (``preset`` only chooses defaults; the values it sets are compared one by one.)
RUN_CONTROL = frozenset({
    "preset", "output_dir", "resume", "allow_config_change", "keep_checkpoints",
    "dist_timeout", "device", "backend", "threads", "num_workers", "progress", "log_every",
    "save_every", "profile", "evaluate", "eval_train_images", "eval_val_images", "eval_k",
})


def config_differences(saved: Dict[str, Any], current: Dict[str, Any],
                       saved_world: int = 1, world: int = 1) -> List[Tuple[str, Any, Any]]:
    """(option, checkpoint's value, current value) of every option outside
    :data:`RUN_CONTROL` that differs, then ``processes`` if the world size does
    (it sets the total batch).  An option a checkpoint lacks (written before the
    option existed) counts as its default; one it holds under an older name
    counts under today's."""
    defaults = TrainConfig().to_dict()
    saved = upgrade_saved_config(saved)

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
            raise ResumeError(f"--resume: {cfg.output_dir} holds no {CHECKPOINT} to continue "
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


@dataclass
class _Start:
    """Where training starts: ``epoch`` epochs and ``step`` steps of the next are
    done; ``sums`` are those steps' loss sums (a run resumed mid-epoch)."""

    epoch: int = 0
    step: int = 0
    sums: Optional[Dict[str, float]] = None
    checkpoint: Optional[Dict[str, Any]] = None  # the checkpoint continued, if any
    changes: List[Tuple[str, Any, Any]] = field(default_factory=list)  # options changed


def _continue_or_start(cfg: TrainConfig, run: _Run, world: int, main: bool,
                       student: nn.Module, teacher: nn.Module, objective: CriboObjective,
                       optimizer: torch.optim.Optimizer) -> _Start:
    """Restores the networks, objective, optimizer and random generators from the
    checkpoint to continue (if any; ``cfg.resume`` decides) and says where
    training starts; rank 0 also puts the exports in step with the checkpoint."""
    ckpt, changes = _checkpoint_to_continue(cfg, run, world, main)
    if ckpt is None:
        return _Start(changes=changes)
    _restore(ckpt, student, teacher, objective, optimizer)
    start_epoch, first_step = int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))
    run.saved = (start_epoch, first_step)
    run.seconds_before = float(ckpt.get("train_seconds", 0.0))
    if first_step and int(ckpt.get("steps_per_epoch", run.n_iter)) != run.n_iter:
        if main:
            print(f"the steps per epoch changed ({ckpt.get('steps_per_epoch')} -> "
                  f"{run.n_iter}): epoch {start_epoch + 1} restarts from its first step")
        first_step = 0
    sums = dict(ckpt.get("epoch_sums") or {}) if first_step else None
    if main:
        print(f"resumed from {run.checkpoint} ({run.where(start_epoch, first_step)})")
        if changes:
            print("with changed options (--allow-config-change): " + _describe_changes(changes))
        _repair_exports(ckpt, run)
    return _Start(start_epoch, first_step, sums, ckpt, changes)


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
    """A checkpoint :func:`cribo.train.saving._save` wrote, complete and finite, or
    CheckpointError (read through :func:`cribo.nn.checkpoints.read_checkpoint`)."""
    advice = ("start afresh with --no-resume (which removes it), or put an epoch snapshot "
              "checkpointNNNN.pth in its place")
    try:
        ckpt = read_checkpoint(path, "cribo pretrain")
    except (ValueError, OSError) as e:
        # read_checkpoint's explanation, in cribo's words and without torch's own
        # advice (which suggests unsafe loading).
        raise CheckpointError(f"{e}; {advice}") from None
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


def _repair_exports(ckpt: Dict[str, Any], run: _Run) -> None:
    """After a kill between two writes: re-exports the teacher backbone from the
    checkpoint when it differs (or is missing), and adds the epoch snapshot the
    checkpoint should have."""
    want = _teacher_backbone_state(ckpt["teacher"])
    try:
        have = read_checkpoint(run.teacher_file, "cribo pretrain")
        same = isinstance(have, dict) and have.keys() == want.keys() and all(
            torch.equal(have[k], want[k]) for k in want)
    except Exception:  # noqa: BLE001 -- missing or unreadable: re-export
        same = False
    if not same:
        atomic_save(want, run.teacher_file, "the teacher backbone")
        print(f"re-exported {run.teacher_file} from {run.checkpoint} (it was missing or "
              f"did not match it)")
    epoch, step = int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))
    if run.cfg.keep_checkpoints > 0 and step == 0 and epoch > 0:
        if not os.path.exists(run.folder.snapshot(epoch - 1)):
            snapshot(run.checkpoint, epoch - 1, run.cfg.keep_checkpoints)
