"""The ``cribo`` command line (also ``python -m cribo``).

    cribo pretrain [options]                             CrIBo pretraining (--help)
    cribo evaluate --checkpoint PATH [options]           dense NN retrieval / probe mIoU (--help)
    cribo ablate [options] [-- pretrain flags]           variants x seeds (--help)
    cribo demo [--seed S] [--clusters K] [--threads T]   tour of the C operators
    cribo info                                           versions, threads, BLAS
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cribo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pretrain", help="pretrain a ViT with CrIBo (cribo pretrain --help)",
                   add_help=False)
    sub.add_parser("ablate", help="CrIBo variants over seeds at equal compute "
                                  "(cribo ablate --help)", add_help=False)
    sub.add_parser("evaluate", help="dense evaluation of a checkpoint (cribo evaluate --help)",
                   add_help=False)
    d = sub.add_parser("demo", help="cluster two views of a drawn scene and run one "
                                    "object-level step with the C operators")
    d.add_argument("--seed", type=int, default=0, help="scene and initialisation seed")
    d.add_argument("--clusters", type=int, default=6, help="number of clusters K")
    d.add_argument("--threads", type=int, default=None, help="kernel threads (default: cores)")
    sub.add_parser("info", help="print versions, thread count and the BLAS in use")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pretrain":
        from .train import main as pretrain_main

        return pretrain_main(argv[1:])
    if argv and argv[0] == "ablate":
        from .ablate import main as ablate_main

        return ablate_main(argv[1:])
    if argv and argv[0] == "evaluate":
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
