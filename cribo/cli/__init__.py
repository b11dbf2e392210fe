"""The ``cribo`` command line (also ``python -m cribo``).

    cribo [--debug] pretrain [options]                    CrIBo pretraining (--help)
    cribo [--debug] evaluate --checkpoint PATH [options]  dense NN retrieval / probe mIoU
    cribo [--debug] ablate [options] [-- pretrain flags]  variants x seeds (--help)
    cribo [--debug] demo [--seed S] [--clusters K] [--threads T]   tour of the C operators
    cribo info                                            versions, threads, BLAS

Before any work, each command checks its options (every pretrain option has a
type and a range: cribo pretrain --help) and what it will need: the files and
folders it reads, and the optional packages (torch, Pillow and tqdm from
"cribo[torch]"; matplotlib from "cribo[plot]" for the report cribo pretrain
writes after training, or pass --no-evaluate).

Errors are one line on stderr, "cribo: error: <what is wrong>", and an exit status:

  2    the command cannot run as given (a user error): a wrong option or
       config-file value, named as written (--lr, lr in run.toml); a missing or
       unreadable file or folder; a missing optional package (with its pip line);
       argparse's usage errors.
  1    the run stopped for a reason it states (a non-finite loss, no space left on
       the disk, ...), or an unexpected error, which is a bug: its line says
       "unexpected" and to run with --debug for the traceback.
  130  interrupted (Ctrl-C); cribo pretrain saves what it can first and says how to
       resume.

--debug, before the command or among its options (before a "--"), prints the
full traceback above that line; the exit status is the same.

For Python callers (cribo.cli.main returns the status): a ValueError or
TypeError raised by cribo's own checks, the file errors (FileNotFoundError,
PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) and a
missing package give 2; any other OSError and cribo's own run errors (a
non-finite loss, an unreadable checkpoint, a locked output folder, a rank that
stopped) give 1; any other exception is unexpected (1).
"""
from __future__ import annotations

import argparse
import importlib
import linecache
import os
import platform
import re
import sys
import traceback
from typing import TYPE_CHECKING, Any, List, NoReturn, Optional, Sequence, Tuple

from .._paths import check_writable_folder

if TYPE_CHECKING:
    from ..train.config import TrainConfig

__all__ = ["main", "MissingDependency"]

USAGE_ERROR, RUN_FAILED, INTERRUPTED = 2, 1, 130


class MissingDependency(ImportError):
    """An optional package a command needs is not installed; the message says
    which and gives the pip line."""


#: import name -> (distribution, how to install it)
_PACKAGES = {
    "torch": ("torch", 'pip install torch, then pip install "cribo[torch]"'),
    "PIL": ("Pillow", 'pip install "cribo[torch]"'),
    "tqdm": ("tqdm", 'pip install "cribo[torch]"'),
    "matplotlib": ("matplotlib", 'pip install "cribo[plot]"'),
    "yaml": ("PyYAML", "pip install pyyaml"),
    "tomli": ("tomli", "pip install tomli"),
}


def _int_in(low: int, high: Optional[int] = None) -> Any:
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cribo", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="on an error, print the full traceback above the one-line message")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pretrain", help="pretrain a ViT with CrIBo (cribo pretrain --help)",
                   add_help=False)
    sub.add_parser("ablate", help="CrIBo variants over seeds at equal compute "
                                  "(cribo ablate --help)", add_help=False)
    sub.add_parser("evaluate", help="dense evaluation of a checkpoint (cribo evaluate --help)",
                   add_help=False)
    d = sub.add_parser("demo", help="cluster two views of a drawn scene and run one "
                                    "object-level step with the C operators")
    d.add_argument("--seed", type=_int_in(0), default=0,
                   help="scene and initialisation seed (>= 0)")
    d.add_argument("--clusters", type=_int_in(1, 128), default=6,
                   help="number of clusters K, 1..128 (the two 64-px views hold 2 x 64 "
                   "patches)")
    d.add_argument("--threads", type=_int_in(1, 256), default=None,
                   help="kernel threads, 1..256 (default: cores)")
    sub.add_parser("info", help="print versions, thread count and the BLAS in use")
    return p


# =============================================================================
# before any work: what each command needs
# =============================================================================

def _require(module: str, needed_by: str, alternative: str = "") -> None:
    """Imports ``module`` or raises MissingDependency with the pip line."""
    try:
        importlib.import_module(module)
    except ImportError:
        dist, install = _PACKAGES[module.split(".")[0]]
        raise MissingDependency(f"{needed_by} needs {dist}: {install}"
                                + (f" (or {alternative})" if alternative else "")) from None


class _UsageError(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    """A parser that leaves usage errors to the command's own parser."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _check_output_dir(path: str, label: str) -> None:
    """The run can create ``path`` (or write into it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{label}: {path} is a file, not a folder")
    check_writable_folder(path, label, path)


def _check_device(device: str, label: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"{label} {device}: CUDA is not available to this torch "
                         f"({torch.__version__}); use --device cpu (or auto)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"{label} {device}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")


def _preflight_pretrain(argv: Sequence[str]) -> "TrainConfig":
    """Options, data, output folder, device and packages of ``cribo pretrain``;
    returns the configuration, parsed once here for the command."""
    from ..train.config import config_and_origin

    cfg, origin = config_and_origin(list(argv))  # --help prints and exits here

    def L(name: str) -> str:
        return origin.get(name, name)

    _require("torch", "cribo pretrain")
    _require("PIL.Image", "cribo pretrain (the image pipeline)")
    if cfg.progress:
        _require("tqdm", "the progress bar", "pass --no-progress")
    if cfg.evaluate and cfg.data == "synthetic":
        _require("matplotlib.backends.backend_agg", "the report written after training",
                 "pass --no-evaluate")
    if cfg.data != "synthetic":
        if not cfg.data:
            raise ValueError(f"no training data: the {cfg.preset!r} preset has none by "
                             f"default; pass --data FOLDER (a folder of images) or --data "
                             f"synthetic")
        if not os.path.isdir(cfg.data):
            kind = NotADirectoryError if os.path.exists(cfg.data) else FileNotFoundError
            raise kind(f"{L('data')}: no folder {cfg.data} (give 'synthetic' or a folder "
                       f"of images)")
    _check_output_dir(cfg.output_dir, L("output_dir"))
    _check_device(cfg.device, L("device"))
    return cfg


def _preflight_evaluate(argv: Sequence[str]) -> None:
    if "-h" in argv or "--help" in argv:
        return
    _require("torch", "cribo evaluate")
    _require("PIL.Image", "cribo evaluate (the image pipeline)")


def _preflight_ablate(argv: Sequence[str]) -> None:
    """Packages, and the pretrain options of every variant and seed, before the first
    run trains (a wrong option would otherwise stop the sweep hours in)."""
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    if "-h" in own or "--help" in own:
        return
    _require("torch", "cribo ablate")
    _require("PIL.Image", "cribo ablate (the image pipeline)")
    from ..evaluation.ablate import VARIANTS
    from ..train.config import ConfigError, check_evaluation, config_and_origin
    from .ablate import add_options

    p = add_options(_QuietParser(add_help=False, allow_abbrev=False))
    try:
        a, _ = p.parse_known_args(own)
    except _UsageError:  # cribo ablate's own parser reports it
        return
    try:
        importlib.import_module("matplotlib.figure")
    except ImportError:
        print('cribo: note: matplotlib is not installed, so ablation.png will not be drawn '
              '(the tables are written): pip install "cribo[plot]"', file=sys.stderr)
    if a.table_only:
        return
    cfg = None
    for name in (v for v in a.variants.split(",") if v in VARIANTS):
        for seed in a.seeds:
            try:  # the options run_ablation gives each run; every run is evaluated
                cfg, origin = config_and_origin(list(extra) + VARIANTS[name] +
                                                ["--seed", str(seed), "--no-evaluate"])
                check_evaluation(cfg, origin, hint="")
            except ConfigError as e:
                raise ConfigError(f"variant {name}, seed {seed}: {e}") from None
    if cfg is not None and cfg.progress:
        _require("tqdm", "the progress bar", "pass -- --no-progress")


# =============================================================================
# errors: one line, and an exit status
# =============================================================================

_CRIBO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # cribo/
_PREFIX = re.compile(r"^cribo(?: [a-z]+)?: ")


def _raised_in_cribo(e: BaseException) -> bool:
    """A ``raise`` statement of cribo's own code raised the exception: its deepest
    frame is in cribo/ and that frame's line is a ``raise``.  (An exception from a
    call that failed in cribo's code -- a wrong argument count, a NumPy method
    given a wrong shape -- has its deepest frame in cribo/ too, on another line:
    that is a bug, not the user's input.)"""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not os.path.abspath(filename).startswith(_CRIBO_DIR + os.sep):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def _one_line(text: str) -> str:
    return _PREFIX.sub("", " ".join(str(text).split()))


def _classify(e: BaseException) -> Tuple[int, str]:
    """(exit status, the line after 'cribo: error: ') of an exception.

    A ValueError/TypeError counts as the user's when cribo defines its class
    (ConfigError, ResumeError, the binding's ArgumentError / ArgumentTypeError for
    a broken argument rule, ...) or a ``raise`` statement of cribo's raised it; one
    raised inside NumPy or torch, or by a failed call in cribo's own code (a
    binding called against its signature raises a plain TypeError), is a bug.
    """
    defined_in_cribo = type(e).__module__.split(".")[0] == "cribo"
    if isinstance(e, MissingDependency):
        return USAGE_ERROR, _one_line(e)
    if isinstance(e, ImportError):
        # An optional package found missing after the checks.  Only the package
        # itself missing: a broken install (torch._C absent, a circular import)
        # keeps its own message below.
        if isinstance(e, ModuleNotFoundError) and e.name in _PACKAGES:
            dist, install = _PACKAGES[e.name]
            return USAGE_ERROR, f"{dist} is not installed: {install}"
        if "pip install" in str(e) and _raised_in_cribo(e):  # cribo's own message
            return USAGE_ERROR, _one_line(e)
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                      NotADirectoryError, FileExistsError)):
        return USAGE_ERROR, _os_error(e)
    if isinstance(e, (ValueError, TypeError)) and (defined_in_cribo or _raised_in_cribo(e)):
        return USAGE_ERROR, _one_line(e)
    if isinstance(e, OSError):  # the machine's: no space left, I/O error, ...
        return RUN_FAILED, _os_error(e)
    if defined_in_cribo:  # a failure cribo detects and explains (e.g. a non-finite loss)
        return RUN_FAILED, _one_line(e)
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    return RUN_FAILED, (f"unexpected {type(e).__name__}" + (f": {first.strip()}" if first else "")
                        + " (a bug in cribo? run with --debug for the traceback)")


def _os_error(e: OSError) -> str:
    if e.strerror and e.filename is not None:
        return (f"{e.strerror}: {e.filename}"
                + (f" -> {e.filename2}" if e.filename2 is not None else ""))
    return _one_line(e)


def _split_debug(argv: Sequence[str]) -> Tuple[bool, List[str]]:
    """(--debug given, argv without it); words after a '--' are left alone."""
    out: List[str] = []
    debug = False
    for i, word in enumerate(argv):
        if word == "--":
            out.extend(argv[i:])
            break
        if word == "--debug":
            debug = True
        else:
            out.append(word)
    return debug, out


# =============================================================================
# entry point
# =============================================================================

def main(argv: Optional[List[str]] = None) -> int:
    """Runs ``cribo ...``; returns the exit status (see the module docstring)."""
    debug, argv = _split_debug(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except SystemExit as e:  # argparse (usage already printed), --help, sys.exit(...)
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        status, line = USAGE_ERROR, _one_line(e.code)
        exc: BaseException = e
    except KeyboardInterrupt as e:
        status, line, exc = INTERRUPTED, "interrupted", e
    except Exception as e:  # noqa: BLE001 -- every error becomes one line
        (status, line), exc = _classify(e), e
    sys.stdout.flush()
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(f"cribo: {'error: ' if status != INTERRUPTED else ''}{line}", file=sys.stderr)
    return status


def _run(argv: List[str]) -> int:
    command = argv[0] if argv else None
    if command == "pretrain":
        cfg = _preflight_pretrain(argv[1:])
        from .pretrain import main as pretrain_main

        return pretrain_main(argv[1:], cfg)
    if command == "ablate":
        _preflight_ablate(argv[1:])
        from .ablate import main as ablate_main

        return ablate_main(argv[1:])
    if command == "evaluate":
        _preflight_evaluate(argv[1:])
        from .evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    args = _parser().parse_args(argv)
    import cribo

    if getattr(args, "threads", None) is not None:
        cribo.set_num_threads(args.threads)
    if args.command == "demo":
        from .demo import run

        run(seed=args.seed, n_clusters=args.clusters)
    elif args.command == "info":
        import numpy

        print(f"cribo {cribo.__version__}, Python {platform.python_version()}, "
              f"NumPy {numpy.__version__}")
        try:
            import scipy_openblas32

            print(f"BLAS: scipy-openblas32 {scipy_openblas32.__version__}")
        except ImportError:
            print("BLAS: system CBLAS")
        print(f"kernel threads: {cribo.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
