"""cribo pretrain's options: every option has a type and a range, checked where
its value is read (flags, TOML/JSON/YAML files, presets, overrides), with the
option named as the user wrote it; then the checks across options.

The bad values below are written by hand from what each option means and from
the limits of the C kernels that receive them (csrc/binding/_C.c);
``test_every_option_has_bad_values`` keeps the table complete when an option
is added.

One file, longer than most: the table of bad values and the option rules are
one list that must stay complete together."""
from __future__ import annotations

import json
import math
import re
import sys
import types
from dataclasses import fields

import numpy as np
import pytest

import cribo
from cribo.train import config as C
from cribo.train.config import (PRESETS, ConfigError, TrainConfig, check_config, check_option,
                          config_from_args, load_config_file)

NAN, INF = float("nan"), float("inf")

#: option -> values it must refuse (hand-written; see the module docstring).
BAD = {
    "preset": ["cpu2", 3],
    "output_dir": ["", "   ", 7],
    "seed": [-1, 2**32, 1.5, "0"],
    "device": ["gpu", "cuda:x", "CPU", 0],
    "backend": ["cuda", "C", "", 1],
    "threads": [-1, 257, 2.0],
    "resume": ["no", "false", 0, 1],
    "allow_config_change": ["yes", 1],
    "keep_checkpoints": [-1, 1.5, "3"],
    "dist_timeout": [0, -5, INF, NAN, 1e8, "600"],
    "amp": ["true", 0],
    "log_every": [0, -1, 10.0],
    "save_every": [0, "1"],
    "progress": ["off", 1],
    "profile": ["on", 1],
    "data": [3, ["a"]],  # any string is a path: cribo.cli checks the folder before work
    "n_images": [0, -3, 2048.5, "2048"],
    "scene_size": [0, 96.0],
    "num_workers": [-1, 1025, 2.5],
    "img_size": [0, -64, 64.0],
    "crop_scale": [[0.0, 1.0], [0.25, 1.5], [0.25, NAN], [0.25], [0.1, 0.5, 1.0], "0.25 1"],
    "color_jitter": [[-0.1, 0.4, 0.2, 0.1], [0.4, INF, 0.2, 0.1], [0.4, 0.4, 0.2],
                     ["0.4", 0.4, 0.2, 0.1]],
    "grayscale_p": [-0.1, 1.1, NAN],
    "blur_sigma": [[0.0, 2.0], [0.1, 1e3], [NAN, 2.0], [0.1]],
    "arch": ["vit_huge", "ViT_small"],
    "patch_size": [0, 8.0],
    "embed_dim": [0, -128],
    "depth": [0, 4.5],
    "num_heads": [0, "4"],
    "drop_path": [-0.1, 1.0, NAN],
    "out_dim": [0, 2**31],
    "head_hidden_dim": [0],
    "head_bottleneck_dim": [0],
    "freeze_patch_embed": ["true", 1],
    "norm_last_layer": ["no"],
    "n_clusters": [0, -1, 16.0],
    "queue_capacity": [0, 2**31],
    "pos_weight_start": [-1.0, 1.1e6, INF],
    "pos_weight_end": [-0.5, NAN],
    "sinkhorn_lambda": [0.0, -1.0, 2e6, INF],
    "sinkhorn_iters": [-1, 100001],
    "cluster_n_iters": [0, 100001],
    "w_global": [-1.0, 1e39, NAN],
    "w_objects": [1e39, -0.5, INF],
    "w_neighbours": [2e6, NAN],
    "objects_start_epoch": [-1, 1.5],
    "nn_start_epoch": [-1],
    "exclude_same_image": ["yes"],
    "epochs": [0, "two", 2.5, 2.0, True],
    "batch_size": [0, 64.0],
    "lr": [0.0, -1e-3, INF, NAN, "5e-4"],
    "min_lr": [-1e-6, NAN],
    "warmup_epochs": [-1],
    "weight_decay": [-0.1, NAN, INF],
    "weight_decay_end": [-0.1, INF],
    "momentum_teacher": [NAN, -0.1, 1.01],
    "clip_grad": [NAN, -1.0, INF],
    "freeze_last_layer": [-1],
    "student_temp": [0.0, -0.1, 2e5, NAN],
    "teacher_temp": [0.0, INF],
    "warmup_teacher_temp": [0.0, 1e6],
    "warmup_teacher_temp_epochs": [-1],
    "teacher_temp_objects": [0.0, NAN],
    "warmup_teacher_temp_objects": [-0.04],
    "center_momentum": [1.5, NAN],
    "evaluate": ["no"],
    "eval_train_images": [0],
    "eval_val_images": [0],
    "eval_k": [0],
}

#: values at the edges of the ranges, which must pass (the rules are not too strict).
GOOD = {
    "seed": 2**32 - 1, "threads": 0, "momentum_teacher": 1.0, "center_momentum": 0.0,
    "w_objects": 1e6, "w_neighbours": 0.0, "student_temp": 1e5, "teacher_temp": 1e-3,
    "pos_weight_start": 1e6, "sinkhorn_lambda": 1e6, "sinkhorn_iters": 0,
    "cluster_n_iters": 100000, "clip_grad": 0.0, "weight_decay": 0.0, "min_lr": 0.0,
    "lr": 1e40, "drop_path": 0.0, "grayscale_p": 1.0, "crop_scale": [1.0, 1.0],
    "blur_sigma": [100.0, 100.0], "dist_timeout": 1e7, "keep_checkpoints": 0,
    "num_workers": 0, "device": "cuda:3", "resume": False, "objects_start_epoch": 0,
}

FIELDS = {f.name: f for f in fields(TrainConfig)}
CASES = [(name, v) for name, values in BAD.items() for v in values]


def case_id(case):
    name, v = case
    return f"{name}={v!r}"


def field_kind(name):
    default = getattr(TrainConfig(), name)
    if FIELDS[name].metadata.get("boolean") or isinstance(default, bool):
        return "bool"
    if isinstance(default, (tuple, list)):
        return "floats"
    return {int: "int", float: "float", str: "str"}.get(
        FIELDS[name].metadata.get("type", type(default)))


def flag_words(name, value):
    """The command-line words for ``value``, or None when argparse itself refuses it
    (a word that is no int for an int flag, a list of the wrong length, ...)."""
    flag = "--" + name.replace("_", "-")
    kind = field_kind(name)
    if isinstance(value, bool) or kind == "bool":
        return None
    if kind == "floats":
        nargs = FIELDS[name].metadata["nargs"]
        if not isinstance(value, list) or len(value) != nargs or \
                not all(isinstance(x, (int, float)) for x in value):
            return None
        return [flag, *(repr(float(x)) for x in value)]
    if kind == "str":  # argparse checks the choices itself
        ok = isinstance(value, str) and "choices" not in FIELDS[name].metadata
        return [f"{flag}={value}"] if ok else None
    if isinstance(value, str) or (kind == "int" and isinstance(value, float)):
        return None
    return [f"{flag}={value!r}"]  # '=': argparse takes "-1e-06" alone for an option


def toml_literal(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, int):
        return str(v)
    return "[" + ", ".join(toml_literal(x) for x in v) + "]"


# ============================================================================
# every option has a rule
# ============================================================================

def test_every_option_declares_a_type_and_range_rule():
    """Walks the dataclass: a numeric option declares at least its lower bound, a
    list option its length and element range, a string option its choices or a
    check, a boolean option is annotated bool; every annotation has a rule."""
    rules = C._rules()
    assert set(rules) == set(FIELDS)
    for name, f in FIELDS.items():
        m, rule = f.metadata, rules[name]
        assert m.get("help"), name
        if rule.kind in ("int", "float"):
            assert "low" in m, f"{name}: declare low= (None for no lower bound)"
        elif rule.kind == "floats":
            assert "nargs" in m and "low" in m, name
        elif rule.kind == "str":
            assert "choices" in m or "check" in m, name
        else:
            assert rule.kind == "bool", name
        assert rule.kind == field_kind(name), name


def test_every_option_has_bad_values():
    assert set(BAD) == set(FIELDS), "add the new option's bad values to BAD"


def test_defaults_presets_and_edges_pass():
    check_config(TrainConfig())
    for preset in PRESETS:
        cfg = config_from_args(["--preset", preset])
        assert cfg.preset == preset
        for k, v in PRESETS[preset].items():
            assert getattr(cfg, k) == v, k
    for name, value in GOOD.items():
        got = check_option(name, value, "x")
        assert got == (tuple(value) if isinstance(value, list) else value), name
    cfg = config_from_args(["--w-objects", "1e6", "--momentum-teacher", "1",
                            "--teacher-temp", "1e5", "--lr", "1e40", "--threads", "0"])
    assert (cfg.w_objects, cfg.momentum_teacher, cfg.teacher_temp) == (1e6, 1.0, 1e5)


# ============================================================================
# bad values, through flags and through a TOML file
# ============================================================================

FLAG_CASES = [c for c in CASES if flag_words(*c) is not None]


@pytest.mark.parametrize("case", FLAG_CASES, ids=case_id)
def test_bad_value_through_a_flag_names_the_flag(case):
    name, value = case
    words = flag_words(name, value)
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match="^" + re.escape(flag) + " must be "):
        config_from_args(words)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_value_in_a_toml_file_names_the_key_and_file(case, tmp_path):
    name, value = case
    path = tmp_path / "run.toml"
    path.write_text(f"{name} = {toml_literal(value)}\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{name} in {path} must be ")):
        config_from_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="^" + re.escape(f"{name} in {path} must be ")):
        load_config_file(str(path))


def test_every_option_is_refused_through_a_flag_or_argparse():
    """Each option has at least one case through its flag, except booleans and
    choices (argparse refuses their words) and the free data path (checked
    before work by cribo.cli)."""
    covered = {name for name, _ in FLAG_CASES}
    by_argparse = {n for n in FIELDS if field_kind(n) == "bool"
                   or "choices" in FIELDS[n].metadata}
    assert set(FIELDS) - covered == by_argparse | {"data"}


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c[1], (int, float, list))
                                  and not isinstance(c[1], bool)], ids=case_id)
def test_range_cases_fail_because_of_the_declared_range(case, monkeypatch):
    """Without its declared range (low, high, nargs, choices, check), an option
    accepts a finite value of the right type: the rejection above is the rule's."""
    name, value = case
    rule = C._rules()[name]
    loose = rule._replace(low=None, high=None, nargs=None, choices=None, check=None)
    monkeypatch.setitem(C._rules(), name, loose)
    flat = value if isinstance(value, list) else [value]
    right_type = {"int": lambda x: isinstance(x, int),
                  "float": lambda x: isinstance(x, (int, float)),
                  "floats": lambda x: isinstance(x, (int, float))}.get(rule.kind, lambda x: 0)
    if isinstance(value, list) != (rule.kind == "floats") or \
            not all(right_type(x) and math.isfinite(x) for x in flat):
        with pytest.raises(ConfigError):  # a type error, or NaN/infinity: no range needed
            check_option(name, value)
    else:
        check_option(name, value)


def test_flags_argparse_refuses_words_of_the_wrong_type(capsys):
    for words in (["--epochs", "two"], ["--epochs", "2.5"], ["--lr", "fast"],
                  ["--crop-scale", "0.5"], ["--resume=no"], ["--preset", "huge"],
                  ["--arch", "vit_huge"]):
        with pytest.raises(SystemExit) as e:
            config_from_args(words)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("cribo: error: ") and err.count("\n") == 1, err


# ============================================================================
# the probes of the issue
# ============================================================================

def test_issue_probes(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('resume = "no"\n')
    with pytest.raises(ConfigError, match=r"resume in .*c\.toml must be true or false, got "
                                          r"'no' \(a string\); write true or false"):
        config_from_args(["--config", str(toml)])
    toml.write_text('epochs = "two"\n')
    with pytest.raises(ConfigError, match=r"epochs in .* must be an integer >= 1, got 'two'"):
        config_from_args(["--config", str(toml)])
    for flag, word, what in (("--lr", "inf", "a finite number > 0"),
                             ("--momentum-teacher", "nan", "a finite number in [0, 1]"),
                             ("--weight-decay", "nan", "a finite number >= 0"),
                             ("--w-objects", "1e39", "a finite number in [0, 1e6]"),
                             ("--clip-grad", "nan", "a finite number >= 0")):
        with pytest.raises(ConfigError, match=re.escape(f"{flag} must be {what}, got ")):
            config_from_args([flag, word])
    toml.write_text("resume = false\n")
    assert config_from_args(["--config", str(toml)]).resume is False
    assert config_from_args(["--resume"]).resume is True
    assert config_from_args([]).resume is None


# ============================================================================
# files: formats, names, normalisation
# ============================================================================

def test_file_values_are_normalised_and_flags_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 1\nw-objects = 0\ncrop_scale = [0.5, 1]\nepochs = 7\n'
                    'device = "cpu"\nresume = true\n')
    cfg = config_from_args(["--config", str(path), "--epochs", "9"])
    assert type(cfg.lr) is float and cfg.lr == 1.0 and cfg.w_objects == 0.0
    assert cfg.crop_scale == (0.5, 1.0) and type(cfg.crop_scale[1]) is float
    assert cfg.epochs == 9 and cfg.device == "cpu" and cfg.resume is True


def test_json_file_is_checked_like_toml(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"resume": "no"}')
    with pytest.raises(ConfigError, match=r"^resume in .*run\.json must be true or false"):
        load_config_file(str(path))
    path.write_text('{"lr": NaN}')  # Python's json reads NaN
    with pytest.raises(ConfigError, match=r"^lr in .*run\.json must be a finite number"):
        load_config_file(str(path))
    path.write_text('{"epochs": 3, "resume": false, "objects_start_epoch": null}')
    assert load_config_file(str(path)) == {"epochs": 3, "resume": False,
                                           "objects_start_epoch": None}
    path.write_text('[1, 2]')
    with pytest.raises(ConfigError, match="expected a table of options"):
        load_config_file(str(path))


def test_yaml_file_or_the_pip_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("resume: no\nlr: 5e-4\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"needs PyYAML: pip install pyyaml"):
            load_config_file(str(path))
        return
    # YAML reads `no` as false, and 5e-4 (no decimal point) as text.
    with pytest.raises(ConfigError, match=r"^lr in .* got '5e-4' \(a string\); write numbers "
                                          r"without quotes \(YAML reads 5e-4 as text"):
        load_config_file(str(path))
    path.write_text("resume: no\nlr: 5.0e-4\n")
    assert load_config_file(str(path)) == {"resume": False, "lr": 5e-4}


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = \n")
    with pytest.raises(ConfigError, match=r"config file .*bad\.toml is not valid TOML"):
        load_config_file(str(bad))
    bad.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['epoch'\] \('epoch': did "
                                          r"you mean 'epochs'\?\)"):
        load_config_file(str(bad))
    bad.write_text("w_objects = 1.0\nw-objects = 2.0\n")
    with pytest.raises(ConfigError, match="w_objects and w-objects set the same option"):
        load_config_file(str(bad))
    bad.write_bytes(b"lr = 0.1 # \xff\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(str(bad))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_config_file(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_config_file(str(tmp_path / "missing.toml"))
    other = tmp_path / "run.ini"
    other.write_text("")
    with pytest.raises(ConfigError, match=r"use \.toml, \.yaml/\.yml or \.json"):
        load_config_file(str(other))


def test_toml_below_python_311_uses_tomli_or_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib

    # the real parser, as the fake tomli below (tomli itself below Python 3.11)
    tomllib = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    path = tmp_path / "run.toml"
    path.write_text("epochs = 3\n")
    monkeypatch.setattr(sys, "version_info", (3, 10, 0, "final", 0))
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ImportError, match=r"on Python 3\.10 needs the tomli package: "
                                          r"pip install tomli"):
        load_config_file(str(path))
    fake = types.ModuleType("tomli")
    fake.load = tomllib.load
    fake.TOMLDecodeError = tomllib.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomli", fake)
    assert load_config_file(str(path)) == {"epochs": 3}


# ============================================================================
# across options; labels of each origin
# ============================================================================

def test_cross_checks_name_each_option_as_written(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("img_size = 60\n")
    with pytest.raises(ConfigError, match=re.escape(f"img_size in {path} (60) must be a "
                                                    f"multiple of --patch-size (8)")):
        config_from_args(["--config", str(path), "--patch-size", "8"])
    with pytest.raises(ConfigError, match=re.escape("img_size (preset vit_small) (224) must be "
                                                    "a multiple of --patch-size (10)")):
        config_from_args(["--preset", "vit_small", "--patch-size", "10"])
    with pytest.raises(ConfigError, match=re.escape("overrides['lr'] must be a finite")):
        config_from_args([], overrides={"lr": INF})
    with pytest.raises(ConfigError, match=r"unknown option overrides\['lrate'\]"):
        config_from_args([], overrides={"lrate": 1.0})


@pytest.mark.parametrize("argv, message", [
    (["--img-size", "60"], "--img-size (60) must be a multiple of patch_size (8)"),
    (["--n-clusters", "129"], "--n-clusters must be in [1, 2N = 128]"),
    (["--embed-dim", "130"], "--embed-dim (130) must be divisible by num_heads (4)"),
    (["--epochs", "4", "--objects-start-epoch", "4"],
     "--objects-start-epoch (4) must be < --epochs (4)"),
    (["--w-global", "0", "--w-objects", "0", "--w-neighbours", "0"], "are all 0"),
    (["--color-jitter", "0.4", "0.4", "0.2", "0.6"], "hue amplitude (the 4th number)"),
    (["--blur-sigma", "2", "1"], "--blur-sigma must be two numbers lo <= hi"),
    (["--crop-scale", "0.9", "0.5"], "--crop-scale must be two numbers lo <= hi"),
    (["--n-images", "63"], "--n-images (63) is less than one step of batch_size (64)"),
    (["--scene-size", "100"], "--scene-size (100) must be a multiple of patch_size (8)"),
    (["--eval-train-images", "2", "--eval-k", "201"],  # 96-px scenes: 144 patches, cap 100
     "--eval-k (201) must be at most the evaluation's memory bank, which is only sure to "
     "hold 200 patches (--eval-train-images 2 x 100) (or pass --no-evaluate)"),
])
def test_cross_option_checks(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_args(argv)


def test_cross_checks_allow_what_makes_sense():
    config_from_args(["--epochs", "4", "--objects-start-epoch", "4", "--w-objects", "0"])
    config_from_args(["--arch", "vit_tiny", "--embed-dim", "130"])  # embed_dim unused
    config_from_args(["--scene-size", "100", "--no-evaluate"])  # nothing evaluates on it
    config_from_args(["--n-images", "10", "--data", "some/folder"])  # n_images unused
    config_from_args(["--n-images", "64"])
    config_from_args(["--eval-train-images", "2", "--eval-k", "200"])
    config_from_args(["--eval-train-images", "2", "--eval-k", "201", "--no-evaluate"])


def test_an_epoch_needs_one_step_of_every_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"--n-images \(200\) is less than one step of "
                                          r"--batch-size \(64\) x 4 process"):
        config_from_args(["--n-images", "200", "--batch-size", "64"])
    config_from_args(["--n-images", "256", "--batch-size", "64"])


def test_help_gives_each_numeric_range():
    text = " ".join(C.build_parser().format_help().split())
    assert "--momentum-teacher MOMENTUM_TEACHER initial EMA momentum" in text
    for words in ("(default: 0.99; a finite number in [0, 1])",
                  "(default: 1.0; a finite number in [0, 1e6])",
                  "(default: 6; an integer >= 1)", "(default: [0.25, 1.0]; 2 finite numbers, "
                  "each in (0, 1])", "--debug"):
        assert words in text, words


# ============================================================================
# the ranges are what the kernels accept
# ============================================================================

def test_the_kernels_accept_every_value_the_options_accept():
    """The extreme values the rules allow reach the C kernels without an error,
    so a run is never stopped half-way by a value accepted at its start."""
    r = C._rules()
    rng = np.random.default_rng(0)
    L, B, M = 6, 2, 3
    g = rng.standard_normal((2, B, L)).astype(np.float32)
    o = rng.standard_normal((2, M, L)).astype(np.float32)
    c = np.zeros(L, np.float32)
    for t in (r["student_temp"].high, r["teacher_temp"].high, 1e-3):
        for w in (r["w_objects"].high, r["w_global"].low):
            for mom in (r["center_momentum"].low, r["center_momentum"].high):
                out = cribo.cribo_losses(g, g, o, o, o, center_global=c, center_objects=c,
                                         student_temp=t, teacher_temp=t,
                                         teacher_temp_objects=t, weights=(w, w, 1.0),
                                         center_momentum=mom)
                assert np.isfinite(out.total)
    tok = rng.standard_normal((1, 2, 4, 3)).astype(np.float32)
    pos = rng.uniform(0, 1, (1, 2, 4, 2)).astype(np.float32)
    for kw in (dict(pos_weight=r["pos_weight_start"].high,
                    sinkhorn_lambda=r["sinkhorn_lambda"].high),
               dict(pos_weight=r["pos_weight_end"].low, sinkhorn_iters=r["sinkhorn_iters"].high,
                    n_iters=r["cluster_n_iters"].low),
               dict(sinkhorn_iters=r["sinkhorn_iters"].low, n_iters=r["cluster_n_iters"].high)):
        cribo.cluster(tok, pos, 2, **kw)
    old = cribo.get_num_threads()
    try:
        cribo.set_num_threads(r["threads"].high)
    finally:
        cribo.set_num_threads(old)
    np.random.seed(r["seed"].high)
    q = cribo.ObjectQueue(r["queue_capacity"].low, 4)
    assert q.capacity == 1
    # just past each bound, the option refuses
    for name in ("student_temp", "w_objects", "pos_weight_start", "sinkhorn_lambda",
                 "sinkhorn_iters", "cluster_n_iters", "threads", "seed", "queue_capacity"):
        high = r[name].high
        past = high + 1 if isinstance(high, int) else high * (1 + 1e-9)
        with pytest.raises(ConfigError):
            check_option(name, int(past) if r[name].kind == "int" else past)
