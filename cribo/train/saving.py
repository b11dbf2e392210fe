"""What a checkpoint holds and how it is written (docs/method.md §6).

A checkpoint holds everything needed to continue exactly: the networks, the
optimizer, the objective (centres and object queue), where the run stands
(``epoch``, ``epoch_step``, the loss sums of a part-done epoch), the
configuration and every random generator's state (as tensors and plain values,
so that it loads with ``weights_only=True``).  :func:`_save` writes the teacher
export, then the checkpoint -- the commit point -- then the epoch snapshot
(:mod:`cribo.train.checkpoints` makes each write atomic), and never a state
that holds a NaN or an infinity (:func:`_check_state`).
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

import cribo

from ..nn.objective import CriboObjective
from .checkpoints import OutputWriteError, atomic_save, snapshot
from .config import TrainConfig
from .faults import NonFiniteLoss
from .run_folder import RunFolder

__all__: List[str] = []


@dataclasses.dataclass
class _Run:
    """Where the run stands, for the checkpoints and for the messages."""

    cfg: TrainConfig
    n_iter: int                              # steps per epoch
    saved: Optional[Tuple[int, int]] = None  # (epochs done, steps of the next) last saved
    seconds_before: float = 0.0              # training time of earlier invocations
    t_start: float = dataclasses.field(default_factory=time.time)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.cfg.output_dir)

    @property
    def checkpoint(self) -> str:
        return self.folder.checkpoint

    @property
    def teacher_file(self) -> str:
        return self.folder.teacher_backbone

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
# what is saved: finite state, random generators
# =============================================================================

def _float_entries(obj: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
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


def _teacher_backbone_state(teacher_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in teacher_state.items()
            if k.startswith("backbone.")}


# =============================================================================
# saving
# =============================================================================

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

