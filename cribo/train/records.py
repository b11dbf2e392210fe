"""What a run reports: the records of its log and its progress bar.

The log (:data:`cribo.train.run_folder.LOG`) holds one JSON record a line, of
the three types :mod:`cribo.train.run_folder` describes: :func:`run_record`
(one per invocation), :func:`iter_record` (one per logged step) and
:func:`epoch_record` (one per finished epoch).  Only rank 0 writes it
(:class:`_Log`; the others get a :class:`_NullLog`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

import cribo

from .checkpoints import OutputWriteError
from .config import TrainConfig
from .run_folder import EPOCH, ITER, RUN

__all__ = ["run_record", "iter_record", "epoch_record", "ProgressBar"]


def _git_revision() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(cfg: TrainConfig, world: int, device: torch.device, n_iter: int,
               start_epoch: int, start_step: int,
               changes: List[Tuple[str, Any, Any]]) -> Dict[str, Any]:
    """The ``"run"`` record (also written as config.json): the configuration, the
    versions, the machine's share of the run and where it starts."""
    return {"type": RUN, "config": cfg.to_dict(), "cribo": cribo.__version__,
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "git": _git_revision(),
            "world_size": world, "device": str(device),
            "threads": {"torch": torch.get_num_threads(), "cribo": cribo.get_num_threads()},
            "iters_per_epoch": n_iter, "start_epoch": start_epoch, "start_step": start_step,
            "config_changes": {k: [a, b] for k, a, b in changes},
            "time": datetime.datetime.now().isoformat(timespec="seconds")}


def iter_record(cfg: TrainConfig, epoch: int, it: int, schedules: Mapping[str, np.ndarray],
                terms: Mapping[str, float], stats: Mapping[str, float],
                timings: Mapping[str, float], seconds: float) -> Dict[str, Any]:
    """The ``"iter"`` record of global iteration ``it``: the schedules' values, the
    loss weights in force, every loss term (``loss_<term>``) and statistic, the
    seconds per phase (``t_<phase>``, :mod:`cribo.train.profiler`) and the
    seconds since the epoch started (``time``)."""
    return {"type": ITER, "epoch": epoch, "iter": it,
            "lr": float(schedules["lr"][it]), "wd": float(schedules["wd"][it]),
            "momentum": float(schedules["momentum"][it]),
            "teacher_temp": float(schedules["teacher_temp"][it]),
            "teacher_temp_objects": float(schedules["teacher_temp_objects"][it]),
            "pos_weight": float(schedules["pos_weight"][it]),
            "w_objects": cfg.w_objects if epoch >= cfg.objects_start else 0.0,
            "w_neighbours": cfg.w_neighbours if epoch >= cfg.neighbours_start else 0.0,
            **{f"loss_{k}": v for k, v in terms.items()}, **stats,
            **{f"t_{k}": round(v, 6) for k, v in timings.items()},
            "time": seconds}


def epoch_record(epoch: int, means: Mapping[str, float],
                 phase_means: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """The ``"epoch"`` record: the epoch's mean loss terms and statistics, and with
    ``--profile`` the mean seconds of each phase over its steps (``t_<phase>``)."""
    return {"type": EPOCH, "epoch": epoch, **{k: float(v) for k, v in means.items()},
            **{f"t_{k}": round(v, 6) for k, v in (phase_means or {}).items()}}


class _NullLog:
    """The log of a process that does not write it (not rank 0)."""

    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def record(self, record: Mapping[str, Any]) -> None:
        pass


class _Log:
    """The run's log; a failed write (a full disk) names the file."""

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

    def record(self, record: Mapping[str, Any]) -> None:
        """Writes one record (a line) and flushes it."""
        self.write(json.dumps(record) + "\n")
        self.flush()


class ProgressBar:
    """The epoch's progress bar (tqdm) with the step's loss terms; a no-op when
    ``enabled`` is false (``--no-progress``, or not rank 0)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=True,
                             dynamic_ncols=True)

    def step(self, terms: Mapping[str, float], stats: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{terms['total']:.3f}", g=f"{terms['global']:.3f}",
                                  o=f"{terms['objects']:.3f}", nn=f"{terms['neighbours']:.3f}",
                                  objs=f"{stats['objects_per_image']:.1f}",
                                  cyc=f"{stats['consistent']:.2f}")
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
