"""Pretraining options: one dataclass, presets, flags and config files.

Every option is a field of :class:`TrainConfig` with its help text and its rule:
its type (from the annotation) and its range, declared beside it (``low``,
``high``, ``choices``, ``nargs``, ``check``).  The command line (``cribo
pretrain --help``, which prints each rule) and config files (TOML; YAML when
PyYAML is installed; JSON) set the same names.  Precedence: defaults < preset <
config file < flags.

Every value is checked where it is read, and an error names the option as the
user wrote it (``--lr`` on the command line, ``lr in run.toml`` in a file):

- booleans must be booleans (TOML/JSON ``true``/``false``, YAML ``true``/``no``...);
  a string such as ``"no"`` is refused, never taken as true;
- integers must be integers: ``2.5``, ``"two"`` and also ``2.0`` are refused;
- numbers must be finite (no option has a use for infinity or NaN) and inside
  the option's range, which for the loss weights, temperatures and clustering
  parameters is the range the C kernels accept, so a run never stops half-way
  on a value it was given at the start;
- unknown options are errors, in files as on the command line;
- then the checks across options (:func:`check_config`): the view a multiple of
  the patch, K <= 2N, the object terms starting before the last epoch, an epoch
  holding at least one step, ...

Errors are :class:`ConfigError` (a ``ValueError``); ``cribo`` prints them as one
line (``cribo: error: ...``) and exits with status 2.

Options renamed since a release (:data:`RENAMED`) are read under their old
names from checkpoints and files; an old flag is refused naming today's.

Over 500 lines on purpose: the options with their rules, and the flag and file
parsers that apply the rules, are one idea that changes together (an option is
added as one field here, and its flag, its file key, its ``--help`` line and
its checks follow); split, each part would import the other's private rules.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import (Any, Callable, Dict, List, Mapping, NamedTuple, NoReturn, Optional,
                    Sequence, Tuple, Union, get_type_hints)

import numpy as np

from ..distributed import launched_world_size
from .run_folder import CHECKPOINT

__all__ = ["TrainConfig", "PRESETS", "RENAMED", "ConfigError", "build_parser",
           "config_from_args", "config_and_origin", "load_config_file", "check_config",
           "check_option", "check_evaluation", "upgrade_saved_config"]


class ConfigError(ValueError):
    """An option has a wrong type or value; the message names the option as the user
    wrote it (``--lr``, ``lr in run.toml``) and what it must be."""


def _opt(default: Any, help: str, **rule: Any) -> Any:
    """A field with its help text and its rule (the field's metadata).

    Rule keys: ``low``/``high`` bound a number, or each number of a list option
    (closed, unless ``low_open``/``high_open``; ``None``: no bound -- every
    numeric option declares at least ``low``); ``choices`` (the strings
    allowed); ``check`` (a function returning what a string must be when it is
    wrong, else None); ``nargs`` (the length of a list option); ``type`` and
    ``boolean`` (how the flag parses an ``Optional`` option).
    """
    return field(default=default, metadata={"help": help, **rule})


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device(value: str) -> Optional[str]:
    return None if _DEVICE.fullmatch(value) else "'auto', 'cpu', 'cuda' or 'cuda:N'"


def _check_path(value: str) -> Optional[str]:
    return "a path (not empty)" if not value.strip() or "\0" in value else None


def _check_data(value: str) -> Optional[str]:
    # "" is the vit_small preset's "not set": cribo pretrain asks for --data before
    # any work (cribo.cli), and build_data refuses it.
    return "'synthetic' or the path of a folder of images" if "\0" in value else None


@dataclass
class TrainConfig:
    """All options of ``cribo pretrain`` (docs/method.md §6); see the field help texts."""

    # ------------------------------------------------------------------ run
    preset: str = _opt("cpu", "named defaults: 'cpu' (a small ViT on the synthetic scenes, "
                       "~6 min on 2 cores with its evaluation) or 'vit_small' (the "
                       "reference ViT-S/16 set-up)",
                       choices=("cpu", "vit_small"))
    output_dir: str = _opt("runs/cribo", "folder for checkpoints, logs and the report",
                           check=_check_path)
    seed: int = _opt(0, "seed of the data order, augmentations, initialisation and clustering",
                     low=0, high=2**32 - 1)
    device: str = _opt("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'",
                       check=_check_device)
    backend: str = _opt("auto", "engine of the CrIBo operators (clustering, pooling, queue, "
                        "losses): 'c' (the C core, on the host), 'torch' (torch on the "
                        "tensors' device, no host copies) or 'auto' ('c' when the networks "
                        "run on the CPU, 'torch' otherwise)",
                        choices=("auto", "c", "torch"))
    threads: int = _opt(1, "CPU threads for torch and the C kernels (0: this process's "
                        "share of the cores: all of them, divided among the processes torchrun "
                        "started on the machine); 1 is fastest on a 2-core machine, where the "
                        "data workers use the other core",
                        low=0, high=256)
    resume: Optional[bool] = _opt(
        None, f"continue from output_dir/{CHECKPOINT}. Unset (the default): continue when "
        "the folder holds a checkpoint written with the same options (a requeued job picks "
        "up where it stopped), refuse one written with different options, start afresh "
        "otherwise; --resume: the same, but a missing checkpoint is an error; --no-resume: "
        "start afresh, replacing what the folder holds", boolean=True)
    allow_config_change: bool = _opt(False, "on resume, accept options that differ from the "
                                     "checkpoint's (they are listed, and logged)")
    keep_checkpoints: int = _opt(0, f"epoch snapshots (checkpointNNNN.pth) kept beside "
                                 f"{CHECKPOINT}, the newest N; 0 keeps only the latest", low=0)
    dist_timeout: float = _opt(600.0, "seconds a process waits for the others in a "
                               "collective before stopping with the rank that stopped "
                               "answering (distributed runs); it must also cover rank 0 "
                               "writing a checkpoint, which the others wait for",
                               low=0, low_open=True, high=1e7)
    amp: bool = _opt(False, "mixed precision (bfloat16 autocast) for the networks")
    log_every: int = _opt(10, "iterations between JSON-lines log records", low=1)
    save_every: int = _opt(1, "epochs between checkpoints (one is always written at the end)",
                           low=1)
    progress: bool = _opt(True, "show a progress bar")
    profile: bool = _opt(False, "time every step's phases in detail (the device synchronised "
                         "between phases, which slows a GPU run) and log each epoch's mean "
                         "per phase; without it the logged steps carry the coarse split")
    # ------------------------------------------------------------------ data
    data: str = _opt("synthetic", "'synthetic' (the embedded procedural scenes) or the path "
                     "of a folder of images (searched recursively)", check=_check_data)
    n_images: int = _opt(2048, "synthetic training images", low=1)
    scene_size: int = _opt(96, "side of the rendered synthetic scenes, pixels", low=1)
    num_workers: int = _opt(2, "DataLoader worker processes", low=0, high=1024)
    # ------------------------------------------------------------------ views
    img_size: int = _opt(64, "side of each augmented view, pixels", low=1)
    crop_scale: List[float] = _opt((0.25, 1.0), "random-resized-crop area range",
                                   nargs=2, low=0, low_open=True, high=1)
    color_jitter: List[float] = _opt((0.4, 0.4, 0.2, 0.1), "colour-jitter amplitudes: "
                                     "brightness, contrast, saturation, hue (p=0.8)",
                                     nargs=4, low=0)
    grayscale_p: float = _opt(0.2, "probability of a grayscale view", low=0, high=1)
    blur_sigma: List[float] = _opt((0.1, 2.0), "Gaussian-blur sigma range in pixels of a 224-px "
                                   "view (the reference's); scaled by img_size / 224",
                                   nargs=2, low=0, low_open=True, high=100)
    # ------------------------------------------------------------------ model
    arch: str = _opt("custom", "'vit_tiny', 'vit_small', 'vit_base' or 'custom' (embed_dim, "
                     "depth, num_heads)", choices=("custom", "vit_tiny", "vit_small", "vit_base"))
    patch_size: int = _opt(8, "ViT patch size", low=1)
    embed_dim: int = _opt(128, "ViT width (arch 'custom')", low=1)
    depth: int = _opt(4, "ViT blocks (arch 'custom')", low=1)
    num_heads: int = _opt(4, "attention heads (arch 'custom')", low=1)
    drop_path: float = _opt(0.1, "stochastic depth of the student", low=0, high=1, high_open=True)
    out_dim: int = _opt(1024, "head output width L (65536 in the reference)", low=1, high=2**31 - 1)
    head_hidden_dim: int = _opt(1024, "head MLP width (2048 in the reference)", low=1)
    head_bottleneck_dim: int = _opt(64, "head bottleneck width (256 in the reference)", low=1)
    freeze_patch_embed: bool = _opt(True, "keep the patch embedding at its random "
                                    "initialisation (MoCo v3's stabiliser)")
    norm_last_layer: bool = _opt(False, "fix the gain of the heads' weight-normalised last layers")
    # ------------------------------------------------------------------ CrIBo
    n_clusters: int = _opt(16, "clusters K per image (64 in the reference)", low=1)
    queue_capacity: int = _opt(1024, "images the object queue holds (25000 in the reference)",
                               low=1, high=2**31 - 1)
    pos_weight_start: float = _opt(2.0, "positional weight alpha_pos at the first epoch",
                                   low=0, high=1e6)
    pos_weight_end: float = _opt(2.0, "positional weight alpha_pos at the last epoch",
                                 low=0, high=1e6)
    sinkhorn_lambda: float = _opt(20.0, "Sinkhorn inverse regularisation",
                                  low=0, low_open=True, high=1e6)
    sinkhorn_iters: int = _opt(5, "Sinkhorn row/column rounds per clustering iteration",
                               low=0, high=100000)
    cluster_n_iters: int = _opt(5, "clustering iterations", low=1, high=100000)
    w_global: float = _opt(1.0, "weight of the global cross-view term", low=0, high=1e6)
    w_objects: float = _opt(1.0, "weight of the cross-view object term", low=0, high=1e6)
    w_neighbours: float = _opt(1.0, "weight of the cross-image object term", low=0, high=1e6)
    objects_start_epoch: Optional[int] = _opt(
        None, "epoch at which the object terms start; before it only the global term "
        "trains, so the clusters are found in features it has shaped (default: half-way, "
        "epochs // 2; 0 in the reference)", type=int, low=0)
    nn_start_epoch: int = _opt(1, "epoch at which the cross-image term starts (counted "
                               "from objects_start_epoch)", low=0)
    exclude_same_image: bool = _opt(True, "never match an object to its own image in the queue")
    # ------------------------------------------------------------------ optimisation
    epochs: int = _opt(6, "training epochs", low=1)
    batch_size: int = _opt(64, "images per process per step", low=1)
    lr: float = _opt(2e-3, "peak learning rate for a total batch of 256 (scaled linearly)",
                     low=0, low_open=True)
    min_lr: float = _opt(1e-5, "final learning rate of the cosine schedule", low=0)
    warmup_epochs: int = _opt(1, "linear learning-rate warm-up epochs", low=0)
    weight_decay: float = _opt(0.04, "initial weight decay (cosine schedule)", low=0)
    weight_decay_end: float = _opt(0.4, "final weight decay", low=0)
    momentum_teacher: float = _opt(0.99, "initial EMA momentum of the teacher (cosine to 1)",
                                   low=0, high=1)
    clip_grad: float = _opt(3.0, "clip each parameter's gradient norm (0: off)", low=0)
    freeze_last_layer: int = _opt(1, "epochs during which the heads' last layers stay fixed", low=0)
    student_temp: float = _opt(0.1, "student temperature", low=0, low_open=True, high=1e5)
    teacher_temp: float = _opt(0.04, "final teacher temperature (0.07 in the reference)",
                               low=0, low_open=True, high=1e5)
    warmup_teacher_temp: float = _opt(0.04, "initial teacher temperature",
                                      low=0, low_open=True, high=1e5)
    warmup_teacher_temp_epochs: int = _opt(5, "epochs of the teacher temperature warm-up "
                                           "(30 in the reference)", low=0)
    teacher_temp_objects: Optional[float] = _opt(
        None, "final teacher temperature of the object terms (default: teacher_temp)",
        type=float, low=0, low_open=True, high=1e5)
    warmup_teacher_temp_objects: Optional[float] = _opt(
        None, "initial teacher temperature of the object terms (default: warmup_teacher_temp)",
        type=float, low=0, low_open=True, high=1e5)
    center_momentum: float = _opt(0.9, "centre EMA momentum", low=0, high=1)
    # ------------------------------------------------------------------ after training
    evaluate: bool = _opt(True, "after training on the synthetic scenes, evaluate the teacher "
                          "against its untrained start and write output_dir/report/")
    eval_train_images: int = _opt(200, "synthetic scenes in the dense-retrieval memory bank", low=1)
    eval_val_images: int = _opt(100, "synthetic validation scenes", low=1)
    eval_k: int = _opt(30, "neighbours per patch in the dense retrieval", low=1)

    @property
    def object_teacher_temps(self) -> tuple:
        """(initial, final) teacher temperature of the object terms; each falls back
        to the global term's when not set."""
        return (self.warmup_teacher_temp if self.warmup_teacher_temp_objects is None
                else self.warmup_teacher_temp_objects,
                self.teacher_temp if self.teacher_temp_objects is None
                else self.teacher_temp_objects)

    @property
    def objects_start(self) -> int:
        """The epoch at which the object terms start (``objects_start_epoch``, or
        half-way through the run when it is not set)."""
        return self.epochs // 2 if self.objects_start_epoch is None else self.objects_start_epoch

    @property
    def neighbours_start(self) -> int:
        """The epoch at which the cross-image term starts: nn_start_epoch epochs
        after the object terms."""
        return self.objects_start + self.nn_start_epoch

    @property
    def weights(self) -> tuple:
        return (self.w_global, self.w_objects, self.w_neighbours)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}


#: Preset overrides of the defaults.  The defaults are the 'cpu' preset, sized for
#: ~200 steps on 2 cores: a smaller, sharper head (L = 1024, bottleneck 64, teacher
#: temperature 0.04 throughout), a 4x learning rate, a faster-moving teacher
#: (momentum from 0.99), the random patch embedding kept fixed (MoCo v3), the
#: blur scaled to the 64-px views, and the object terms started half-way
#: (objects_start_epoch unset: epochs // 2).  Started at the first step, at this
#: budget, they train the tokens on clusters of the random network's features
#: and end below the untrained network (README, "What the CPU run shows").
#: 'vit_small' restores the reference values.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu": {},
    "vit_small": dict(arch="vit_small", patch_size=16, img_size=224, drop_path=0.1,
                      out_dim=65536, head_hidden_dim=2048, head_bottleneck_dim=256,
                      freeze_patch_embed=False, objects_start_epoch=0,
                      n_clusters=64, queue_capacity=25000,
                      lr=5e-4, momentum_teacher=0.996, teacher_temp=0.07,
                      epochs=300, batch_size=256, warmup_epochs=10,
                      warmup_teacher_temp_epochs=30, data="", scene_size=256, num_workers=8,
                      amp=True, n_images=100000, evaluate=False, threads=0),
}

#: Options renamed since a release, old name -> today's: an option that feeds an
#: operator's argument is named after it (``ObjectQueue(capacity)``,
#: ``cluster(n_iters)``), prefixed with the operator where the bare name would be
#: ambiguous.  Checkpoints, config.json and config files written with an old
#: name are read with today's (:func:`upgrade_saved_config`); an old flag is
#: refused with today's name.
RENAMED: Dict[str, str] = {
    "queue_size": "queue_capacity",
    "cluster_iters": "cluster_n_iters",
}


def upgrade_saved_config(saved: Mapping[str, Any]) -> Dict[str, Any]:
    """A saved configuration (a checkpoint's ``config``, config.json's) with the
    old names of :data:`RENAMED` read as today's; a key under both names keeps
    today's value."""
    out = dict(saved)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


# =============================================================================
# rules: every option's type and range, checked where its value is read
# =============================================================================

class _Rule(NamedTuple):
    """One option's rule, from its annotation and its field metadata."""

    kind: str  # "bool", "int", "float", "str" or "floats" (a list of numbers)
    optional: bool  # None (unset) is allowed
    low: Optional[float]
    high: Optional[float]
    low_open: bool
    high_open: bool
    choices: Optional[Tuple[str, ...]]
    nargs: Optional[int]
    check: Optional[Callable[[str], Optional[str]]]

    def bounds(self) -> str:
        """The range in words: '', ' >= 1', ' > 0', ' in [0, 1)'."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return (f" in {'(' if self.low_open else '['}{_num(lo)}, {_num(hi)}"
                    f"{')' if self.high_open else ']'}")
        if lo is not None:
            return f" {'>' if self.low_open else '>='} {_num(lo)}"
        if hi is not None:
            return f" {'<' if self.high_open else '<='} {_num(hi)}"
        return ""

    def describe(self) -> str:
        """What a value must be, e.g. 'an integer >= 1', 'a finite number in [0, 1]'."""
        if self.kind == "bool":
            what = "true or false"
        elif self.kind == "int":
            what = "an integer" + self.bounds()
        elif self.kind == "float":
            what = "a finite number" + self.bounds()
        elif self.kind == "floats":
            b = self.bounds()
            what = f"{self.nargs or 'one or more'} finite numbers" + (f", each{b}" if b else "")
        elif self.choices is not None:
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.check is not None:
            what = self.check("\0") or "a string"  # the check's own words
        else:
            what = "a string"
        return what + (" (or unset)" if self.optional and self.kind != "bool" else "")

    def in_range(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            return False
        return True


def _num(x: float) -> str:
    """A bound as people write it: 0, 1, 0.5, 1e6, 4294967295."""
    if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e5):
        return str(int(x))
    if 1e-4 <= abs(x) < 1e5:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@lru_cache(maxsize=None)
def _rules() -> Dict[str, _Rule]:
    """Each field's rule: the kind from its annotation, the range from its metadata."""
    hints = get_type_hints(TrainConfig)
    out: Dict[str, _Rule] = {}
    for f in fields(TrainConfig):
        t, optional = hints[f.name], False
        if getattr(t, "__origin__", None) is Union:
            args = [a for a in t.__args__ if a is not type(None)]
            optional, t = len(args) < len(t.__args__), args[0]
            if len(args) != 1:
                raise TypeError(f"TrainConfig.{f.name}: no rule for the type {hints[f.name]}")
        if t is bool:
            kind = "bool"
        elif t is int:
            kind = "int"
        elif t is float:
            kind = "float"
        elif t is str:
            kind = "str"
        elif getattr(t, "__origin__", None) in (list, tuple) and t.__args__[0] is float:
            kind = "floats"
        else:
            raise TypeError(f"TrainConfig.{f.name}: no rule for the type {t}")
        m = f.metadata
        out[f.name] = _Rule(kind, optional, m.get("low"), m.get("high"),
                            bool(m.get("low_open")), bool(m.get("high_open")),
                            tuple(m["choices"]) if "choices" in m else None, m.get("nargs"),
                            m.get("check"))
    return out


def _show(value: Any) -> str:
    """A value as the user wrote it, with its type when that is the problem."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, (bool, np.bool_)):
        return f"{str(bool(value)).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, (list, tuple)):
        return f"{list(value)!r} (a list)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, numbers.Number):
        return repr(float(value)) if isinstance(value, float) else repr(value)
    return f"{value!r} (a {type(value).__name__})"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_option(name: str, value: Any, label: Optional[str] = None, note: str = "") -> Any:
    """``value`` of option ``name`` checked against its rule and normalised.

    Normalised: integers as ``int``, numbers as ``float``, lists as tuples of
    floats.  ``label`` is the option as the user wrote it (``--lr``, ``lr in
    run.toml``; default: ``name``), ``note`` a hint added to a type error.

    Raises:
        ConfigError: unknown option, wrong type (a string for a number or a
            boolean, 2.5 or 2.0 for an integer, ...) or out of range (NaN and
            infinity always are).
    """
    label = label or name
    rule = _rules().get(name)
    if rule is None:
        raise ConfigError(f"unknown option {label}; see 'cribo pretrain --help'")

    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{label} must be {rule.describe()}, got {_show(value)}{extra}")

    if value is None:
        if rule.optional:
            return None
        raise bad()
    if rule.kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise bad("; write true or false, without quotes" if isinstance(value, str) else "")
    if rule.kind in ("int", "float"):
        if not _is_number(value):
            raise bad(_number_hint(value, note))
        if rule.kind == "int":
            if not isinstance(value, numbers.Integral):
                raise bad("; write it without a decimal point" if float(value).is_integer()
                          else "")
            value = int(value)
        else:
            value = float(value)
        if not rule.in_range(value):
            raise bad()
        return value
    if rule.kind == "floats":
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
            raise bad(_number_hint(value, note))
        if rule.nargs is not None and len(value) != rule.nargs or len(value) == 0:
            raise bad()
        out = tuple(float(v) for v in value)
        if not all(rule.in_range(v) for v in out):
            raise bad()
        return out
    # str
    if not isinstance(value, str):
        raise bad()
    if rule.choices is not None and value not in rule.choices:
        raise bad()
    if rule.check is not None and rule.check(value) is not None:
        raise bad()
    return value


def _number_hint(value: Any, note: str) -> str:
    """Why a string is not a number, when it reads like one."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, str):
            try:
                float(v)
            except ValueError:
                continue
            return "; write numbers without quotes" + (f" ({note})" if note else "")
    return ""


# =============================================================================
# flags, files, presets
# =============================================================================

class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the options are in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        renamed = [f"--{o.replace('_', '-')} is now --{n.replace('_', '-')}"
                   for o, n in RENAMED.items()
                   if re.search(rf"--{o.replace('_', '-')}(?![\w-])", message)]
        why = f"; {', '.join(renamed)}" if renamed else ""
        self.exit(2, f"cribo: error: {message}{why} (the options: {self.prog} --help)\n")


def build_parser(prog: str = "cribo pretrain") -> argparse.ArgumentParser:
    """The argument parser of ``cribo pretrain``: one flag per option, its help
    with the default and the range.  A usage error prints one line and exits 2."""
    p = _Parser(
        prog=prog, description="Pretrain a ViT with CrIBo (docs/method.md §6). Defaults: the 'cpu' "
        "preset on the embedded synthetic scenes.", allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="TOML, YAML or JSON file of options (same names as the flags); its "
                   "values are checked like the flags'")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, also print the full traceback (also: cribo --debug "
                   "pretrain ...)")
    defaults = TrainConfig()
    rules = _rules()
    for f in fields(TrainConfig):
        rule = rules[f.name]
        flag = "--" + f.name.replace("_", "-")
        kw: Dict[str, Any] = {"help": f.metadata["help"], "dest": f.name,
                              "default": argparse.SUPPRESS}
        default = getattr(defaults, f.name)
        if rule.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif rule.kind == "floats":
            kw.update(type=float, nargs=rule.nargs or "+")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[rule.kind]
        if rule.choices is not None:
            kw["choices"] = rule.choices
        shown = list(default) if isinstance(default, tuple) else default
        kw["help"] += f" (default: {shown}" + (
            f"; {rule.describe()})" if rule.kind in ("int", "float", "floats") else ")")
        kw["help"] = kw["help"].replace("%", "%%")
        p.add_argument(flag, **kw)
    return p


def _toml_module(path: str) -> Any:
    """tomllib (Python >= 3.11), else the tomli package it came from."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise ImportError(f"reading {path} on Python {sys.version_info[0]}."
                          f"{sys.version_info[1]} needs the tomli package: pip install tomli "
                          f"(or write the options as JSON)") from None
    return tomli


def load_config_file(path: str) -> Dict[str, Any]:
    """Options from a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file.

    Every value is checked like the flag of the same name (:func:`check_option`)
    and named ``key in path`` in errors.

    Returns:
        {option name: value}, normalised (dashes in names read as underscores).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: no readable file.
        ConfigError: unknown extension, a syntax error, an unknown option, a
            wrong type or a value out of range.
        ImportError: a YAML file without PyYAML, or TOML on Python < 3.11
            without tomli (the message gives the pip line).
    """
    return _read_config_file(path)[0]


def _read_config_file(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(options, {option: label as written in the file}) of a config file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"config file {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    low = path.lower()
    note = ""
    try:
        if low.endswith(".toml"):
            fmt = "TOML"
            toml = _toml_module(path)
            with open(path, "rb") as fh:
                data = toml.load(fh)
        elif low.endswith((".yaml", ".yml")):
            fmt, note = "YAML", "YAML reads 5e-4 as text: write 5.0e-4"
            try:
                import yaml
            except ImportError:
                raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml "
                                  f"(or write the options as TOML or JSON)") from None
            with open(path, encoding="utf-8") as fh:
                try:
                    data = yaml.safe_load(fh)
                except yaml.YAMLError as e:
                    raise ValueError(" ".join(str(e).split())) from None
            data = {} if data is None else data
        elif low.endswith(".json"):
            fmt = "JSON"
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            raise ConfigError(f"config file {path}: use .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except ValueError as e:  # syntax errors of the three parsers, and bad UTF-8
        raise ConfigError(f"config file {path} is not valid {fmt}: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: expected a table of options "
                          f"(name = value), got {_show(data)}")
    names = {f.name for f in fields(TrainConfig)}
    values: Dict[str, Any] = {}
    labels: Dict[str, str] = {}
    unknown: List[str] = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config file {path}: option names must be strings, got "
                              f"{key!r}")
        name = key.replace("-", "_")
        name = RENAMED.get(name, name)  # a file written before a rename
        if name not in names:
            unknown.append(key)
            continue
        if name in values:
            raise ConfigError(f"config file {path}: {labels[name].split(' in ')[0]} and "
                              f"{key} set the same option")
        labels[name] = f"{key} in {path}"
        values[name] = check_option(name, value, labels[name], note)
    if unknown:
        import difflib

        close = {k: difflib.get_close_matches(k.replace("-", "_"), names, n=1)
                 for k in unknown}
        hints = [f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c]
        raise ConfigError(f"config file {path}: unknown option(s) {sorted(unknown)}"
                          + (f" ({'; '.join(hints)})" if hints else "")
                          + "; see 'cribo pretrain --help'")
    return values, labels


def config_from_args(argv: Optional[Sequence[str]] = None,
                     overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """defaults < preset < config file < flags (< overrides, for programmatic use).

    Each value is checked where it is read (:func:`check_option`), then the
    options together (:func:`check_config`); errors name the option as it was
    given: ``--lr``, ``lr in run.toml``, ``overrides['lr']``.

    Raises:
        ConfigError (a ValueError): a wrong option (see :func:`check_option`).
        FileNotFoundError, IsADirectoryError, PermissionError, ImportError: the
            config file (see :func:`load_config_file`).
        SystemExit: argparse's usage errors (an unknown flag, ``--epochs two``)
            and ``--help``.
    """
    return config_and_origin(argv, overrides)[0]


def config_and_origin(argv: Optional[Sequence[str]] = None,
                      overrides: Optional[Dict[str, Any]] = None
                      ) -> Tuple[TrainConfig, Dict[str, str]]:
    """:func:`config_from_args`'s configuration, and where each option not at its
    default came from, as the user wrote it ({``"lr"``: ``"--lr"``}; ``cribo``'s
    checks name the options this way)."""
    ns = vars(build_parser().parse_args(argv))
    ns.pop("debug", None)
    path = ns.pop("config", None)
    file_opts, origin = _read_config_file(path) if path else ({}, {})
    flags = {k: check_option(k, v, "--" + k.replace("_", "-")) for k, v in ns.items()}
    over = {k: check_option(k, v, f"overrides[{k!r}]") for k, v in (overrides or {}).items()}
    preset = over.get("preset", flags.get("preset", file_opts.get("preset", "cpu")))
    if preset not in PRESETS:  # a preset added to the choices but not to PRESETS
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    merged = {k: check_option(k, v, f"{k} (preset {preset})")
              for k, v in PRESETS[preset].items()}
    origin = {**{k: f"{k} (preset {preset})" for k in merged}, **origin}
    merged.update(file_opts)
    merged.update(flags)
    merged.update(over)
    merged["preset"] = preset
    origin.update({k: "--" + k.replace("_", "-") for k in flags})
    origin.update({k: f"overrides[{k!r}]" for k in over})
    cfg = TrainConfig(**merged)
    check_config(cfg, origin)
    return cfg, origin


def check_config(cfg: TrainConfig, origin: Optional[Mapping[str, str]] = None) -> None:
    """Checks every option of ``cfg`` (its type and range), then the options
    together; ``origin`` maps option names to how the user wrote them
    (``--lr``, ``lr in run.toml``).

    Raises:
        ConfigError: the first option found wrong, named, with what it must be.
    """
    origin = dict(origin or {})
    for f in fields(TrainConfig):
        check_option(f.name, getattr(cfg, f.name), origin.get(f.name))
    _validate(cfg, origin)


def _validate(cfg: TrainConfig, origin: Optional[Mapping[str, str]] = None) -> None:
    """The checks across options (each option alone is checked by its rule)."""
    origin = origin or {}

    def L(name: str) -> str:  # the option as the user wrote it
        return origin.get(name, name)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.img_size % cfg.patch_size == 0,
         f"{L('img_size')} ({cfg.img_size}) must be a multiple of {L('patch_size')} "
         f"({cfg.patch_size})")
    n_tokens = (cfg.img_size // cfg.patch_size) ** 2
    need(cfg.n_clusters <= 2 * n_tokens,
         f"{L('n_clusters')} must be in [1, 2N = {2 * n_tokens}] for N = {n_tokens} tokens "
         f"per view ({cfg.img_size}-px views, patch {cfg.patch_size}), got {cfg.n_clusters}")
    need(cfg.arch != "custom" or cfg.embed_dim % cfg.num_heads == 0,
         f"{L('embed_dim')} ({cfg.embed_dim}) must be divisible by {L('num_heads')} "
         f"({cfg.num_heads})")
    need(cfg.w_objects == 0 or cfg.objects_start < cfg.epochs,
         f"{L('objects_start_epoch')} ({cfg.objects_start}) must be < {L('epochs')} "
         f"({cfg.epochs}), or the object terms never train (--w-objects 0 trains the "
         f"global term alone)")
    need(max(cfg.weights) > 0, f"{L('w_global')}, {L('w_objects')} and {L('w_neighbours')} "
         f"are all 0: nothing would train")
    need(cfg.color_jitter[3] <= 0.5,
         f"{L('color_jitter')}: the hue amplitude (the 4th number) must be <= 0.5, got "
         f"{cfg.color_jitter[3]}")
    need(cfg.blur_sigma[0] <= cfg.blur_sigma[1],
         f"{L('blur_sigma')} must be two numbers lo <= hi, got {list(cfg.blur_sigma)}")
    need(cfg.crop_scale[0] <= cfg.crop_scale[1],
         f"{L('crop_scale')} must be two numbers lo <= hi, got {list(cfg.crop_scale)}")
    world = launched_world_size()
    if cfg.data == "synthetic":
        need(cfg.n_images >= cfg.batch_size * world,
             f"{L('n_images')} ({cfg.n_images}) is less than one step of "
             f"{L('batch_size')} ({cfg.batch_size}) x {world} process(es): an epoch would "
             f"have no step")
        if cfg.evaluate:
            check_evaluation(cfg, origin)


def check_evaluation(cfg: TrainConfig, origin: Optional[Mapping[str, str]] = None,
                     hint: str = " (or pass --no-evaluate)") -> None:
    """The options of the dense evaluation on the synthetic scenes that follows
    training (``cribo pretrain`` with ``evaluate``; every run of ``cribo ablate``).

    ``hint``: what the user can do instead, added to the message.

    Raises:
        ConfigError: scenes that are no whole number of patches, or a retrieval
            asking for more neighbours than the memory bank is sure to hold.
    """
    origin = origin or {}

    def L(name: str) -> str:
        return origin.get(name, name)

    if cfg.scene_size % cfg.patch_size:
        raise ConfigError(f"{L('scene_size')} ({cfg.scene_size}) must be a multiple of "
                          f"{L('patch_size')} ({cfg.patch_size}): the evaluation after "
                          f"training encodes whole scenes{hint}")
    # The memory bank holds at least min(100, patches per scene) patches of each
    # training scene (dense_evaluation's cap per view; every synthetic pixel is
    # labelled), and the retrieval needs eval_k of them.
    per_scene = min(100, (cfg.scene_size // cfg.patch_size) ** 2)
    bank = cfg.eval_train_images * per_scene
    if cfg.eval_k > bank:
        raise ConfigError(f"{L('eval_k')} ({cfg.eval_k}) must be at most the evaluation's "
                          f"memory bank, which is only sure to hold {bank} patches "
                          f"({L('eval_train_images')} {cfg.eval_train_images} x {per_scene})"
                          f"{hint}")
