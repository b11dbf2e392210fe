"""``cribo.models``: the networks under their first published name.

The ViT, the CrIBo head and :func:`load_pretrained` live in :mod:`cribo.nn`;
this module keeps ``from cribo import models; models.vit_small()`` working.
"""
from .nn.checkpoints import LoadReport, load_pretrained
from .nn.head import CriboHead, WeightNormLinear
from .nn.backbone import DropPath, VisionTransformer, vit, vit_base, vit_small, vit_tiny

__all__ = [
    "VisionTransformer", "vit", "vit_tiny", "vit_small", "vit_base",
    "CriboHead", "WeightNormLinear", "DropPath",
    "LoadReport", "load_pretrained",
]
