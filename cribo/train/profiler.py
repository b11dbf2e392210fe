"""Where a training step's time goes: :class:`StepProfiler`.

The loop marks the boundaries of a step's phases; the profiler turns them into
seconds per phase, the ``t_<phase>`` fields of the log's ``"iter"`` records
(:mod:`cribo.train.run_folder`), read by ``benchmarks/step_profile.py``:

============================  ===============================================
phase                         from ... to ...
============================  ===============================================
``data``                      the end of the previous step to the batch
``teacher_backbone_forward``  the batch to the teacher's tokens (the learning
                              rate set and the batch moved to the device too)
``heads_backward``            the backward pass through the heads and pooling
``backbone_backward``         the backward pass through the student backbone
``optimizer_ema``             clipping, the optimizer step, the EMA teacher
``step``                      the batch to the end of the step
============================  ===============================================

together with the objective's own parts (``clustering``, ``pooling``,
``queue``, ``student_forward``, ``teacher_heads``, ``losses``: see
:class:`cribo.nn.objective.ObjectiveOutput`) and the student's
(``student_backbone_forward``, ``student_heads_forward``).

``--profile`` (``detailed``) adds the sub-phases ``batch_to_device`` (in
``teacher_backbone_forward``), ``objective`` (the objective's call),
``clip_grad``, ``optimizer_step`` and ``ema`` (in ``optimizer_ema``),
synchronises a GPU at every boundary (its kernels run asynchronously: without
it, a phase measures the launches), and keeps every step's timings, not only
the logged ones', for the epoch means (:meth:`StepProfiler.epoch_means`).
Without it the profiler costs a few clock reads per step, and nothing in a
process that does not log.
"""
from __future__ import annotations

import time
from typing import Dict, Mapping, Optional

import torch

__all__ = ["StepProfiler"]

#: The marks only ``--profile`` takes, and the sub-phases they bound.
_DETAIL_MARKS = frozenset({"batch_on_device", "objective_done", "clipped", "optimizer_stepped"})


class StepProfiler:
    """Seconds per phase of each training step (module docstring).

    The loop calls :meth:`waiting` where a step starts waiting for its batch,
    :meth:`mark` at each boundary (``"start"``, ``"batch_on_device"``,
    ``"teacher_forward"``, ``"objective_done"``, ``"backward_start"``,
    ``"backward_end"``, ``"clipped"``, ``"optimizer_stepped"``, ``"ema_done"``)
    and :meth:`step_done` at the end, which returns the step's timings.

    Args:
        enabled: time the steps (the process logs them); off, every call is a
            no-op and :meth:`step_done` returns {}.
        detailed: ``--profile``: the sub-phases, device synchronisation and
            epoch means (implies ``enabled``).
        device: the device the step runs on (synchronised when ``detailed`` and
            a GPU).
    """

    def __init__(self, enabled: bool, detailed: bool = False,
                 device: Optional[torch.device] = None) -> None:
        self.detailed = bool(detailed)
        self.enabled = bool(enabled) or self.detailed
        self._sync = self.detailed and device is not None and device.type == "cuda"
        self._marks: Dict[str, float] = {}
        self._totals: Dict[str, float] = {}
        self._steps = 0

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def waiting(self) -> None:
        """The step starts waiting for its batch (the end of the previous step)."""
        if self.enabled:
            self._marks = {"waiting": self._now()}

    def mark(self, name: str) -> None:
        """The step reached boundary ``name`` (the class docstring's names)."""
        if self.enabled and (self.detailed or name not in _DETAIL_MARKS):
            self._marks[name] = self._now()

    def step_done(self, objective: Optional[Mapping[str, float]] = None,
                  student: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """The step's seconds per phase, the objective's and the student's parts
        included (their ``timings``); {} when not enabled."""
        if not self.enabled:
            return {}
        end = self._now()
        m, objective, student = self._marks, dict(objective or {}), dict(student or {})
        t = {"data": m["start"] - m["waiting"],
             "teacher_backbone_forward": m["teacher_forward"] - m["start"]}
        # The student's hook stamps the moment the backbone's gradient is ready:
        # before it the heads' backward ran, after it the backbone's.
        ready = student.get("backbone_grad_ready", m["backward_start"])
        t["heads_backward"] = max(ready - m["backward_start"], 0.0)
        t["backbone_backward"] = max(m["backward_end"] - max(ready, m["backward_start"]), 0.0)
        t["optimizer_ema"] = m["ema_done"] - m["backward_end"]
        t.update(objective)
        for key in ("student_backbone_forward", "student_heads_forward"):
            if key in student:
                t[key] = student[key]
        t["step"] = end - m["start"]
        if self.detailed:
            t.update(batch_to_device=m["batch_on_device"] - m["start"],
                     objective=m["objective_done"] - m["teacher_forward"],
                     clip_grad=m["clipped"] - m["backward_end"],
                     optimizer_step=m["optimizer_stepped"] - m["clipped"],
                     ema=m["ema_done"] - m["optimizer_stepped"])
            for k, v in t.items():
                self._totals[k] = self._totals.get(k, 0.0) + v
            self._steps += 1
        return t

    def epoch_means(self) -> Dict[str, float]:
        """Mean seconds per phase over the steps timed since the last call (only
        ``detailed``: {} otherwise), and starts counting afresh."""
        means = {k: v / self._steps for k, v in self._totals.items()} if self._steps else {}
        self._totals, self._steps = {}, 0
        return means
