"""The ``cribo`` command's errors: one line ``cribo: error: ...`` and exit status 2
for what the user can fix, checked before any work (options, files, folders,
optional packages); 1 for a run that stopped for a stated reason or a bug
(which says to use --debug); 130 on Ctrl-C; --debug prints the traceback."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest

import cribo
import cribo.cli.demo
from cribo import cli
from cribo.cli import main

TINY = ["--n-images", "16", "--batch-size", "8", "--scene-size", "48", "--img-size", "32",
        "--n-clusters", "6", "--num-workers", "0", "--threads", "1"]


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err[:-1]


# ============================================================================
# bad options: one line, exit 2
# ============================================================================

@pytest.mark.parametrize("argv, line", [
    (["pretrain", "--lr", "inf"], "cribo: error: --lr must be a finite number > 0, got inf"),
    (["pretrain", "--w-objects", "1e39"],
     "cribo: error: --w-objects must be a finite number in [0, 1e6], got 1e+39"),
    (["pretrain", "--clip-grad", "nan"],
     "cribo: error: --clip-grad must be a finite number >= 0, got nan"),
    (["pretrain", "--epochs", "two"], "cribo: error: argument --epochs: invalid int value: "
                                      "'two' (the options: cribo pretrain --help)"),
    (["pretrain", "--no-such-flag"], "cribo: error: unrecognized arguments: --no-such-flag "
                                     "(the options: cribo pretrain --help)"),
])
def test_a_bad_option_is_one_line_and_exit_2(argv, line, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert one_line(err) == line and out == ""


def test_a_bad_config_file_value_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('resume = "no"\n')
    assert main(["pretrain", "--config", str(path)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"cribo: error: resume in {path} must be true or false, got 'no' (a string); "
        f"write true or false, without quotes")
    assert main(["pretrain", "--config", str(tmp_path / "nope.toml")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"cribo: error: config file not found: {tmp_path / 'nope.toml'}")


@pytest.mark.parametrize("argv", [["--debug", "pretrain", "--lr", "nan"],
                                  ["pretrain", "--lr", "nan", "--debug"]])
def test_debug_before_or_after_the_command_adds_the_traceback(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "cribo.train.config.ConfigError: --lr must be a finite number > 0, got nan" in err
    assert err.splitlines()[-1] == "cribo: error: --lr must be a finite number > 0, got nan"


def test_debug_after_a_double_dash_belongs_to_the_command():
    assert cli._split_debug(["ablate", "--debug", "--", "--debug", "--lr", "1"]) == (
        True, ["ablate", "--", "--debug", "--lr", "1"])
    assert cli._split_debug(["pretrain", "--lr", "1"]) == (False, ["pretrain", "--lr", "1"])


def test_the_real_entry_point(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = "two"\n')
    p = subprocess.run([sys.executable, "-m", "cribo", "pretrain", "--config", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert one_line(p.stderr) == (f"cribo: error: epochs in {path} must be an integer >= 1, "
                                  f"got 'two' (a string)")


def test_help_documents_the_errors_and_debug(capsys):
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("--debug", "cribo: error: <what is wrong>", "2 the command cannot run as "
                  "given", "1 the run stopped", "130 interrupted", 'matplotlib from "cribo[plot]"'):
        assert words in out, words


def test_demo_options_are_range_checked(capsys):
    for argv in (["demo", "--clusters", "0"], ["demo", "--clusters", "129"],
                 ["demo", "--seed", "-1"], ["demo", "--threads", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"cribo demo: error: argument {argv[1]}: must")


# ============================================================================
# before any work: data, output folder, device, the sweep's variants
# ============================================================================

def test_pretrain_checks_data_output_and_device_before_work(tmp_path, capsys):
    out = str(tmp_path / "run")
    cases = [
        (["--preset", "vit_small"], "cribo: error: no training data: the 'vit_small' preset "
                                    "has none by default; pass --data FOLDER"),
        (["--data", str(tmp_path / "nope")], f"cribo: error: --data: no folder "
                                             f"{tmp_path / 'nope'}"),
        (["--output-dir", __file__], f"cribo: error: --output-dir: {__file__} is a file"),
        (["--output-dir", __file__ + "/sub"], "cribo: error: --output-dir: cannot write"),
        (["--device", "cuda:99"], "cribo: error: --device cuda:99: "),
    ]
    for extra, start in cases:
        argv = ["pretrain", *TINY, "--output-dir", out, "--no-progress", *extra]
        assert main(argv) == 2, extra
        assert one_line(capsys.readouterr().err).startswith(start), extra
    assert not (tmp_path / "run").exists()  # nothing was started


def test_pretrain_refuses_an_output_folder_it_cannot_write(tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):  # root ignores permissions: the refusal is injected
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    argv = ["pretrain", *TINY, "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"cribo: error: --output-dir: cannot write {tmp_path / 'run'} (Permission denied")
    assert not (tmp_path / "run").exists()


def test_ablate_checks_every_variant_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "ablation"
    # 16-px views hold 2 x 4 patches: K32 cannot cluster them, the default K16 neither.
    argv = ["ablate", "--variants", "global_only,K32", "--seeds", "0", "--output-dir",
            str(out), "--", "--img-size", "16", "--patch-size", "8", "--no-progress"]
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err).startswith(
        "cribo: error: variant global_only, seed 0: n_clusters must be in [1, 2N = 8]")
    argv[2] = "global_only"
    argv += ["--n-clusters", "8", "--scene-size", "20"]
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == (
        "cribo: error: variant global_only, seed 0: --scene-size (20) must be a multiple "
        "of --patch-size (8): the evaluation after training encodes whole scenes")
    argv[-1] = "48"
    argv += ["--eval-train-images", "1", "--eval-k", "37"]  # 6 x 6 patches per scene
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == (
        "cribo: error: variant global_only, seed 0: --eval-k (37) must be at most the "
        "evaluation's memory bank, which is only sure to hold 36 patches "
        "(--eval-train-images 1 x 36)")
    assert main(["ablate", "--seeds", "-1", "--output-dir", str(out)]) == 2
    assert "--seed must be an integer in [0, 4294967295], got -1" in capsys.readouterr().err
    assert not out.exists()


# ============================================================================
# how each kind of exception is reported
# ============================================================================

def raise_here(exc):
    """Raises ``exc`` from this test file (not from cribo's code)."""
    raise exc


def cribo_value_error(seed, n_clusters):
    tok = np.zeros((1, 2, 4, 3), np.float32)
    # K > 2N: the binding refuses, with its own exception class (a ValueError)
    cribo.cluster(tok, np.zeros((1, 2, 4, 2), np.float32), 99)


def kernel_taking_nothing():
    pass


def cribo_calls_badly(kernel):
    """A failed call inside cribo's own code (not a ``raise`` of cribo's): ``kernel``
    replaces the C clustering, so cribo.cluster's call of it fails there."""
    def run(seed, n_clusters):
        import types

        real = cribo.ops.clustering._C
        cribo.ops.clustering._C = types.SimpleNamespace(cluster=kernel)
        try:
            cribo.cluster(np.zeros((1, 2, 4, 3), np.float32), np.zeros((1, 2, 4, 2), np.float32),
                          2)
        finally:
            cribo.ops.clustering._C = real
    return run


def non_finite(seed, n_clusters):
    pytest.importorskip("torch")
    from cribo.train.faults import NonFiniteLoss

    raise NonFiniteLoss("the loss is nan at epoch 2, iteration 40; stopping")


@pytest.mark.parametrize("run, status, line", [
    (lambda **_: raise_here(RuntimeError("boom\nsecond line")), 1,
     "cribo: error: unexpected RuntimeError: boom (a bug in cribo? run with --debug for the "
     "traceback)"),
    (lambda **_: raise_here(ValueError("not cribo's")), 1,
     "cribo: error: unexpected ValueError: not cribo's (a bug in cribo? run with --debug for "
     "the traceback)"),
    (lambda **kw: cribo_value_error(**kw), 2,
     "cribo: error: cluster: n_clusters must be at most 2N = 8 (the joint tokens of one "
     "image), got 99"),
    (lambda **_: raise_here(OSError(errno.ENOSPC, "No space left on device", "/r/ck.pth")), 1,
     "cribo: error: No space left on device: /r/ck.pth"),
    (lambda **_: raise_here(PermissionError(errno.EACCES, "Permission denied", "/r")), 2,
     "cribo: error: Permission denied: /r"),
    (lambda **_: raise_here(FileNotFoundError("cribo pretrain: data folder not found: d")), 2,
     "cribo: error: data folder not found: d"),
    (lambda **kw: non_finite(**kw), 1,
     "cribo: error: the loss is nan at epoch 2, iteration 40; stopping"),
    (lambda **_: raise_here(KeyboardInterrupt()), 130, "cribo: interrupted"),
    (lambda **_: raise_here(SystemExit("cribo evaluate: --n-train must be >= 1")), 2,
     "cribo: error: --n-train must be >= 1"),
    (lambda **_: raise_here(ModuleNotFoundError("No module named 'matplotlib'",
                                                name="matplotlib")), 2,
     'cribo: error: matplotlib is not installed: pip install "cribo[plot]"'),
    (lambda **_: raise_here(ModuleNotFoundError("No module named 'cribo._C'",
                                                name="cribo._C")), 1,
     "cribo: error: unexpected ModuleNotFoundError: No module named 'cribo._C' (a bug in "
     "cribo? run with --debug for the traceback)"),
    (lambda **kw: cribo_calls_badly(kernel_taking_nothing)(**kw), 1,
     "cribo: error: unexpected TypeError: kernel_taking_nothing() got an unexpected keyword "
     "argument 'tokens' (a bug in cribo? run with --debug for the traceback)"),
    (lambda **kw: cribo_calls_badly(divmod)(**kw), 1,  # a C function fails in cribo's line
     "cribo: error: unexpected TypeError: divmod() takes no keyword arguments (a bug in "
     "cribo? run with --debug for the traceback)"),
    (lambda **_: raise_here(ImportError("torch._C is missing", name="torch._C")), 1,
     "cribo: error: unexpected ImportError: torch._C is missing (a bug in cribo? run with "
     "--debug for the traceback)"),
], ids=["bug", "foreign-ValueError", "cribo-ValueError", "disk-full", "permission",
        "missing-file", "non-finite-loss", "ctrl-c", "sys.exit-message", "missing-extra",
        "broken-install", "cribo-wrong-arity", "numpy-fails-in-cribo", "broken-torch"])
def test_each_kind_of_error_is_one_line_with_its_status(run, status, line, monkeypatch,
                                                         capsys):
    monkeypatch.setattr(cribo.cli.demo, "run", run)
    assert main(["demo"]) == status
    assert one_line(capsys.readouterr().err) == line
    assert main(["--debug", "demo"]) == status
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1] == line


def test_exit_codes_pass_through(monkeypatch, capsys):
    monkeypatch.setattr(cribo.cli.demo, "run", lambda **_: raise_here(SystemExit(3)))
    assert main(["demo"]) == 3
    assert capsys.readouterr().err == ""


# ============================================================================
# optional packages, checked at the start (a missing one simulated in a fresh
# process by a None in sys.modules, which makes its import fail)
# ============================================================================

def run_without(missing, calls, cwd):
    """Runs cli.main on each argv (or cli._preflight_pretrain on argv behind a
    'preflight' word) in a process where the modules ``missing`` cannot be
    imported; returns [(status, stderr)]."""
    code = f"""
import contextlib, io, json, sys
for m in {list(missing)!r}:
    sys.modules[m] = None
from cribo import cli
res = []
for argv in {calls!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        if argv[0] == "preflight":
            cli._preflight_pretrain(argv[1:])
            status = 0
        else:
            status = cli.main(argv)
    res.append((status, err.getvalue()))
print(json.dumps(res))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return [tuple(r) for r in json.loads(p.stdout.splitlines()[-1])]


def test_without_matplotlib_pretrain_stops_at_once_and_ablate_says_so(tmp_path):
    pytest.importorskip("torch")
    out = str(tmp_path / "run")
    res = run_without(["matplotlib"], [
        ["pretrain", *TINY, "--output-dir", out],
        ["preflight", *TINY, "--output-dir", out, "--no-evaluate"],
        ["ablate", "--table-only", "--output-dir", str(tmp_path / "abl")],
    ], tmp_path)
    assert res[0] == (2, 'cribo: error: the report written after training needs matplotlib: '
                         'pip install "cribo[plot]" (or pass --no-evaluate)\n')
    assert res[1] == (0, "")
    assert res[2][0] == 1 and res[2][1].splitlines()[0] == (
        'cribo: note: matplotlib is not installed, so ablation.png will not be drawn (the '
        'tables are written): pip install "cribo[plot]"')
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_without_tqdm_the_progress_bar_is_asked_off(tmp_path):
    pytest.importorskip("torch")
    res = run_without(["tqdm"], [
        ["pretrain", *TINY, "--output-dir", str(tmp_path / "r"), "--no-evaluate"],
        ["preflight", *TINY, "--output-dir", str(tmp_path / "r"), "--no-evaluate",
         "--no-progress"],
    ], tmp_path)
    assert res == [(2, 'cribo: error: the progress bar needs tqdm: pip install "cribo[torch]" '
                       '(or pass --no-progress)\n'), (0, "")]


def test_without_torch_each_command_gives_the_install_line(tmp_path):
    res = run_without(["torch"], [
        ["pretrain", *TINY, "--output-dir", str(tmp_path / "r")],
        ["evaluate", "--checkpoint", "x.pth"],
        ["ablate", "--output-dir", str(tmp_path / "a")],
        ["info"],
    ], tmp_path)
    line = 'needs torch: pip install torch, then pip install "cribo[torch]"\n'
    assert res[:3] == [(2, f"cribo: error: cribo {c} {line}")
                       for c in ("pretrain", "evaluate", "ablate")]
    assert res[3] == (0, "")


def test_without_pillow_or_pyyaml(tmp_path):
    pytest.importorskip("torch")
    yml = tmp_path / "run.yaml"
    yml.write_text("epochs: 2\n")
    res = run_without(["PIL", "yaml"], [
        ["pretrain", *TINY, "--output-dir", str(tmp_path / "r")],
        ["pretrain", "--config", str(yml)],
    ], tmp_path)
    assert res == [
        (2, 'cribo: error: cribo pretrain (the image pipeline) needs Pillow: pip install '
            '"cribo[torch]"\n'),
        (2, f"cribo: error: reading {yml} needs PyYAML: pip install pyyaml (or write the "
            f"options as TOML or JSON)\n")]
