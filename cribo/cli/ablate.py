"""``cribo ablate``: named CrIBo variants over several seeds at equal compute
(:func:`cribo.evaluation.ablate.run_ablation`).

    cribo ablate                                   # the default variants, 3 seeds
    cribo ablate --variants full,global_only --seeds 0 1 2 3 -- --epochs 6
    cribo ablate --variants K8,K32 --seeds 0 1     # a sweep, into the same folder
    cribo ablate --table-only --variants full,global_only,K8,K32   # one table of both
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from ..evaluation import ablate
from ..evaluation.ablate import DEFAULT_VARIANTS, VARIANTS, run_ablation

__all__ = ["main", "add_options"]


def add_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``cribo ablate``'s own options (before a ``--``), added to ``p``; also read
    by ``cribo``'s checks before any work (:mod:`cribo.cli`)."""
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated names from {sorted(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--output-dir", default="runs/ablation", help="folder of runs and tables")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: rebuild the table from the finished runs in "
                   "--output-dir (e.g. after sweeps run with other seeds)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = add_options(argparse.ArgumentParser(
        prog="cribo ablate", description=ablate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False))
    args = p.parse_args(argv)
    table = run_ablation([v for v in args.variants.split(",") if v], args.seeds,
                         args.output_dir, extra, table_only=args.table_only)
    if not table["variants"]:
        print(f"cribo ablate: no finished run of these variants and seeds in "
              f"{args.output_dir}", file=sys.stderr)
        return 1
    return 0
