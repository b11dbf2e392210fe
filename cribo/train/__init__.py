"""Pretraining (docs/method.md §6): the configuration, the loop, checkpoints.

=================================  ============================================
module                             holds
=================================  ============================================
``cribo.train.config``             :class:`TrainConfig`, presets, option rules
                                   and parsing (torch-free)
``cribo.train.run_folder``         the run folder's file names and the log's
                                   schema (torch-free)
``cribo.train.schedules``          cosine, teacher-temperature and positional-
                                   weight schedules
``cribo.train.checkpoints``        atomic writes, the folder lock, snapshots
                                   (torch-free)
``cribo.train.loop``               :func:`train`, :func:`train_one_epoch`: the
                                   orchestration and the step
``cribo.train.build``              the networks, data, objective, optimizer and
                                   schedules of a configuration
``cribo.train.resume``             what a run continues from
``cribo.train.saving``             what a checkpoint holds, written in order
``cribo.train.faults``             the exceptions, Ctrl-C, ranks that stop
``cribo.train.records``            the log's records, the progress bar
``cribo.train.profiler``           seconds per phase of each step
=================================  ============================================

>>> from cribo.train import config_from_args, train
>>> cfg = config_from_args(["--epochs", "2", "--output-dir", "runs/try"])
>>> summary = train(cfg)        # checkpoint.pth, teacher_backbone.pth, log.jsonl

``cribo pretrain`` (:mod:`cribo.cli.pretrain`) trains, then evaluates; this
package never imports the evaluation.  Importing it does not import torch: the
names that need torch load on first use.
"""
from __future__ import annotations

from typing import Any

from .checkpoints import FolderLocked, OutputWriteError, lock_folder
from .config import (PRESETS, ConfigError, TrainConfig, build_parser, check_config,
                     check_option, config_from_args)

#: The names that need torch, loaded on first use: name -> the module that holds it.
_LAZY = {"train": "loop", "train_one_epoch": "loop", "build_models": "build",
         "build_data": "build", "NonFiniteLoss": "faults", "ResumeError": "faults",
         "CheckpointError": "faults", "RankStopped": "faults",
         "TrainingInterrupted": "faults", "RUN_CONTROL": "resume",
         "config_differences": "resume", "StepProfiler": "profiler"}

__all__ = ["TrainConfig", "PRESETS", "ConfigError", "build_parser", "check_config",
           "check_option", "config_from_args", "FolderLocked", "OutputWriteError",
           "lock_folder", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # Plain imports, not importlib: the layer check (tests/test_architecture.py)
        # reads them.
        from . import build, faults, loop, profiler, resume

        modules = {"build": build, "faults": faults, "loop": loop, "profiler": profiler,
                   "resume": resume}
        return getattr(modules[_LAZY[name]], name)
    raise AttributeError(f"module 'cribo.train' has no attribute {name!r}")
