"""``cribo pretrain``: train (:mod:`cribo.train`), then evaluate and report
(:mod:`cribo.evaluation.job`) -- the main job.

The training loop never imports the evaluation; this command chains the two.
Exit statuses: 0; 1 after a divergence; 130 after Ctrl-C (with the command that
continues).  ``cribo`` parses the options once, in its checks before any work
(:mod:`cribo.cli`), and hands the configuration over.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from typing import Any, Dict, Optional, Sequence

from .. import distributed as dist
from ..train import (NonFiniteLoss, TrainConfig, TrainingInterrupted, config_from_args,
                     lock_folder, train)
from ..train.run_folder import RunFolder

__all__ = ["main"]


def _resume_command(argv: Sequence[str], world: int) -> str:
    """``cribo pretrain`` with ``argv``, --resume instead of any --(no-)resume."""
    args = [a for a in argv if a not in ("--resume", "--no-resume")] + ["--resume"]
    cmd = shlex.join(["cribo", "pretrain", *args])
    return cmd + (f" (launched as before, with {world} processes)" if world > 1 else "")


def main(argv: Optional[Sequence[str]] = None, cfg: Optional[TrainConfig] = None) -> int:
    """``cribo pretrain [options]``: see ``--help``.

    ``cfg``: the configuration ``argv`` gives, when the caller has parsed it
    already (``cribo``'s checks do); else it is parsed here.  ``argv`` is still
    needed for the command that continues an interrupted run.

    Returns 0; 1 after a divergence (:class:`NonFiniteLoss`), having printed
    ``cribo: error: <why>``; or 130 after SIGINT, having printed one line with
    where it stopped and the command that continues.  Other errors propagate
    (``cribo`` prints them as one line).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if cfg is None:
        cfg = config_from_args(argv)
    # The folder's lock, through training and the evaluation after it.  A single
    # process takes it at once; in a distributed run rank 0 takes it inside
    # train(), once the processes have met (refused before, it would leave the
    # others waiting for it), and again here for the evaluation.
    single = dist.launched_world_size() == 1
    try:
        with lock_folder(cfg.output_dir) if single else contextlib.nullcontext():
            try:
                summary = train(cfg)
            except NonFiniteLoss as e:  # the line cribo's other errors get
                print(f"cribo: error: {e}", file=sys.stderr)
                return 1
            except TrainingInterrupted as e:
                if dist.is_main():
                    print(f"cribo: {e}; to continue: {_resume_command(argv, dist.world_size())}",
                          file=sys.stderr)
                return 130
            if dist.is_main():
                with lock_folder(cfg.output_dir):  # re-entrant for a single process
                    _report(cfg, summary)
    except KeyboardInterrupt:  # a second Ctrl-C, or one during the evaluation
        if dist.is_main():
            print(f"cribo: interrupted; {RunFolder(cfg.output_dir).checkpoint} holds the last "
                  f"saved state; to continue: {_resume_command(argv, dist.world_size())}",
                  file=sys.stderr)
        return 130
    if dist.initialized():
        import torch

        torch.distributed.destroy_process_group()
    return 0


def _report(cfg: TrainConfig, summary: Dict[str, Any]) -> None:
    """The end-of-run lines, then the evaluation and report (synthetic data)."""
    h = summary["history"]
    if h:
        terms = ", ".join(f"{k} {h[0][k]:.3f} -> {h[-1][k]:.3f}"
                          for k in ("global", "objects", "neighbours"))
        print(f"done in {summary['seconds_now']:.0f} s; epoch-mean losses, first -> last: "
              f"{terms}; checkpoint {summary['checkpoint']}")
    if cfg.evaluate and cfg.data == "synthetic":
        from ..evaluation.job import evaluate_and_report

        res = evaluate_and_report(cfg, summary)
        m = res["metrics"]
        for name in ("retrieval mIoU", "retrieval fg/bg IoU", "linear probe mIoU"):
            e = m[name]
            lo, hi = e["delta_ci"]
            print(f"{name}: {100 * e['value']:.1f} (untrained {100 * e['floor']:.1f}; "
                  f"gain 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}])")
        print(f"report: {os.path.join(res['report_dir'], 'report.html')}")
