"""Dense evaluation of frozen patch features (docs/method.md §7; issue 4).

=================================  ============================================
module                             holds
=================================  ============================================
``cribo.evaluation.metrics``       confusion matrices, mIoU / per-class /
                                   foreground IoU, :func:`paired_bootstrap`
``cribo.evaluation.features``      checkpoints, :func:`random_init_like`, views,
                                   patch labels, :func:`encode`
``cribo.evaluation.bank``          bank sampling, :class:`Bank`, :func:`build_bank`
``cribo.evaluation.dense``         :func:`evaluate_retrieval` (dense NN
                                   retrieval), :func:`linear_probe`
``cribo.evaluation.job``           the main job's evaluation and report
``cribo.evaluation.ablate``        :func:`run_ablation` (``cribo ablate``)
=================================  ============================================

>>> from cribo.evaluation import (evaluate_retrieval, linear_probe, load_backbone,
...                               paired_bootstrap, random_init_like)
>>> from cribo.data import SyntheticScenes
>>> vit = load_backbone("runs/cribo/teacher_backbone.pth")
>>> train, val = SyntheticScenes("train", 400), SyntheticScenes("val", 200)
>>> trained = evaluate_retrieval(vit, train, val)
>>> floor = evaluate_retrieval(random_init_like(vit, seed=0), train, val)
>>> print(trained.miou, trained.fg_iou, paired_bootstrap(trained, floor).fg_iou)

The feature extraction needs torch; the metrics need only NumPy.
"""
from .dense import (LinearProbe, ProbeResult, RetrievalResult, dense_evaluation,
                    evaluate_retrieval, knn_vote, linear_probe, train_linear_probe,
                    upsample_scores)
from .bank import Bank, build_bank, sample_patches
from .features import (encode, eval_size, load_backbone, patch_histograms, random_init_like,
                       train_view)
from .metrics import (IGNORE_INDEX, Interval, PairedBootstrap, SegmentationScores,
                      confusion_matrix, iou_per_class, paired_bootstrap, scores_from_confusion)

__all__ = [
    "evaluate_retrieval", "linear_probe", "dense_evaluation", "paired_bootstrap",
    "random_init_like", "load_backbone", "RetrievalResult", "ProbeResult",
    "SegmentationScores", "PairedBootstrap", "Interval",
    "knn_vote", "upsample_scores", "LinearProbe", "train_linear_probe",
    "Bank", "build_bank", "encode", "eval_size", "patch_histograms", "sample_patches",
    "train_view", "IGNORE_INDEX", "confusion_matrix", "iou_per_class", "scores_from_confusion",
]
