"""``cribo.evaluate``: dense evaluation of a backbone (docs/method.md §7), and ``cribo evaluate``.

The implementation lives in :mod:`cribo.evaluation` (metrics, features, dense,
cli); this module is its public face::

    from cribo.evaluate import evaluate_retrieval, linear_probe, paired_bootstrap
    result = evaluate_retrieval(backbone, train_set, val_set, k=30, temperature=0.02)
    result.miou, result.fg_iou, result.per_class_iou, result.confusion

Command line: ``cribo evaluate --checkpoint runs/cribo/teacher_backbone.pth``
(``--help`` lists every option); on a VOC-style folder of your own classes,
``cribo evaluate --checkpoint ... --data FOLDER --class-names classes.txt``.
"""
from .evaluation import *  # noqa: F401,F403
from .evaluation import __all__ as _all
from .evaluation.cli import build_parser, main

__all__ = list(_all) + ["build_parser", "main"]
