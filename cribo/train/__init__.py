"""Pretraining (docs/method.md §6): the configuration, the loop, checkpoints.

=================================  ============================================
module                             holds
=================================  ============================================
``cribo.train.config``             :class:`TrainConfig`, presets, option rules
                                   and parsing (torch-free)
``cribo.train.schedules``          cosine, teacher-temperature and positional-
                                   weight schedules
``cribo.train.checkpoints``        atomic writes, the folder lock, snapshots
                                   (torch-free)
``cribo.train.loop``               :func:`train`, :func:`train_one_epoch`,
                                   resume, faults, ``torch.distributed``
=================================  ============================================

>>> from cribo.train import config_from_args, train
>>> cfg = config_from_args(["--epochs", "2", "--output-dir", "runs/try"])
>>> summary = train(cfg)        # checkpoint.pth, teacher_backbone.pth, log.jsonl

``cribo pretrain`` (:mod:`cribo.cli.pretrain`) trains, then evaluates; this
package never imports the evaluation.  Importing it does not import torch: the
names of :mod:`cribo.train.loop` load on first use.
"""
from __future__ import annotations

from typing import Any

from .checkpoints import FolderLocked, OutputWriteError, lock_folder
from .config import (PRESETS, ConfigError, TrainConfig, build_parser, check_config,
                     check_option, config_from_args)

_LOOP = ("train", "train_one_epoch", "build_models", "build_data", "NonFiniteLoss",
         "ResumeError", "CheckpointError", "RankStopped", "TrainingInterrupted",
         "RUN_CONTROL", "config_differences")

__all__ = ["TrainConfig", "PRESETS", "ConfigError", "build_parser", "check_config",
           "check_option", "config_from_args", "FolderLocked", "OutputWriteError",
           "lock_folder", *_LOOP]


def __getattr__(name: str) -> Any:
    if name in _LOOP:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'cribo.train' has no attribute {name!r}")
