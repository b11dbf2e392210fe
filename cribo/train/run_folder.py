"""A run folder's layout and its log's schema: the one place that names the files.

``cribo pretrain --output-dir runs/cribo`` writes::

    runs/cribo/
        checkpoint.pth           everything needed to continue (the commit point)
        checkpoint0003.pth       snapshots of earlier epochs (--keep-checkpoints)
        teacher_backbone.pth     the teacher's ViT, for evaluation and transfer
        config.json              the configuration, as written at the start
        log.jsonl                one JSON record per line (see below)
        cribo.lock               held while a process works in the folder
        report/                  the main job's report (report.html, metrics.json, ...)
        eval.json                scores of a ``cribo ablate`` run

``log.jsonl`` holds records of three types, told apart by ``"type"``:

- ``"run"``: one per invocation (``config``, ``cribo`` version, ``start_epoch``, ...);
- ``"iter"``: one per logged step (``epoch``, ``iter``, every loss term and
  statistic, the seconds of each phase of the step, ``t_<phase>``: see
  :mod:`cribo.train.profiler`);
- ``"epoch"``: one per finished epoch (``epoch`` and the epoch means; with
  ``--profile`` also each phase's mean seconds over the epoch, ``t_<phase>``).

A resumed run appends; a step logged twice keeps its last record
(:func:`iteration_records`).

>>> run = RunFolder("runs/cribo")
>>> run.checkpoint, run.teacher_backbone
('runs/cribo/checkpoint.pth', 'runs/cribo/teacher_backbone.pth')
>>> iters = iteration_records(read_log(run.log))
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Union

__all__ = ["RunFolder", "read_log", "iteration_records", "snapshot_name", "CHECKPOINT",
           "TEACHER_BACKBONE", "CONFIG", "LOG", "LOCK", "REPORT", "EVAL", "RUN", "ITER",
           "EPOCH"]

CHECKPOINT = "checkpoint.pth"
TEACHER_BACKBONE = "teacher_backbone.pth"
CONFIG = "config.json"
LOG = "log.jsonl"
LOCK = "cribo.lock"
REPORT = "report"
EVAL = "eval.json"

#: The values of a log record's ``"type"``.
RUN, ITER, EPOCH = "run", "iter", "epoch"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is created or read here)."""

    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoint(self) -> str:
        return self._file(CHECKPOINT)

    @property
    def teacher_backbone(self) -> str:
        return self._file(TEACHER_BACKBONE)

    @property
    def config(self) -> str:
        return self._file(CONFIG)

    @property
    def log(self) -> str:
        return self._file(LOG)

    @property
    def lock(self) -> str:
        return self._file(LOCK)

    @property
    def report(self) -> str:
        return self._file(REPORT)

    @property
    def eval(self) -> str:
        return self._file(EVAL)

    def snapshot(self, epoch_index: int) -> str:
        """The snapshot written after epoch ``epoch_index`` (0-based)."""
        return self._file(snapshot_name(epoch_index))


def snapshot_name(epoch_index: int) -> str:
    """``checkpoint0003.pth`` for epoch index 3 (the checkpoint's name, numbered)."""
    stem, ext = os.path.splitext(CHECKPOINT)
    return f"{stem}{int(epoch_index):04d}{ext}"


def read_log(path: PathLike) -> List[Dict[str, Any]]:
    """The records of a ``log.jsonl`` (or of ``<run folder>/log.jsonl``).

    A line that does not parse (a run killed mid-write) is skipped with a warning.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, LOG)
    records = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"read_log: {p}:{n} is not JSON; skipped", stacklevel=2)
    return records


def iteration_records(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The ``"iter"`` records in step order, the last record of each step kept (a
    resumed run logs the steps after its checkpoint again).  A record without a
    ``"type"`` counts as an iteration record, one without ``"iter"`` takes its
    position."""
    by_iter: Dict[int, Dict[str, Any]] = {}
    for n, r in enumerate(rec for rec in records if rec.get("type", ITER) == ITER):
        by_iter[int(r.get("iter", n))] = r
    return [by_iter[i] for i in sorted(by_iter)]
