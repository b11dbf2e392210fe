"""The networks and the objective of CrIBo (torch).

=================================  ============================================
module                             holds
=================================  ============================================
``cribo.nn.vit``                   :class:`VisionTransformer` with DINO's
                                   parameter names, ``vit_tiny/small/base``
``cribo.nn.head``                  :class:`CriboHead` (docs/method.md §5)
``cribo.nn.checkpoints``           :func:`read_checkpoint` (the one reader of
                                   ``.pth`` files), :func:`load_pretrained`
``cribo.nn.objective``             :class:`CriboObjective`: docs/method.md §2-§5
                                   on autograd, over the operators of
                                   :mod:`cribo.ops`
=================================  ============================================

>>> from cribo import nn
>>> vit = nn.vit_small(patch_size=16)
>>> head = nn.CriboHead(vit.embed_dim)
>>> teacher, report = nn.load_pretrained("cribo_vits16_coco.pth")

(``cribo.models`` is the same set of networks under the name the README used first.)
"""
from .checkpoints import LoadReport, load_pretrained, read_checkpoint
from .head import CriboHead, WeightNormLinear
from .objective import (CriboObjective, CriboStudent, NonFiniteError, ObjectiveOutput,
                        image_seeds, student_logits)
from .vit import DropPath, VisionTransformer, vit, vit_base, vit_small, vit_tiny

__all__ = [
    "VisionTransformer", "vit", "vit_tiny", "vit_small", "vit_base", "DropPath",
    "CriboHead", "WeightNormLinear", "LoadReport", "load_pretrained", "read_checkpoint",
    "CriboObjective", "CriboStudent", "ObjectiveOutput", "NonFiniteError", "image_seeds",
    "student_logits",
]
