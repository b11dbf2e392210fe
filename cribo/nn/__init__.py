"""The networks and the objective of CrIBo (torch).

=================================  ============================================
module                             holds
=================================  ============================================
``cribo.nn.architectures``         the one table of named ViTs
                                   (``ARCHITECTURES``, ``HEAD_DIM``)
``cribo.nn.backbone``              :class:`VisionTransformer` with DINO's
                                   parameter names, ``vit_tiny/small/base``
``cribo.nn.head``                  :class:`CriboHead` (docs/method.md §5)
``cribo.nn.checkpoints``           :func:`read_checkpoint` (the one reader of
                                   ``.pth`` files), :func:`load_pretrained`
``cribo.nn.autograd``              the C pooling and fused losses of
                                   :mod:`cribo.ops` as autograd nodes,
                                   :func:`student_logits`
``cribo.nn.objective``             :class:`CriboObjective`: docs/method.md §2-§5
                                   on autograd
=================================  ============================================

>>> from cribo import nn
>>> vit = nn.vit_small(patch_size=16)
>>> head = nn.CriboHead(vit.embed_dim)
>>> teacher, report = nn.load_pretrained("cribo_vits16_coco.pth")

(``cribo.models`` is the same set of networks under the name the README used first.)
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module of cribo.nn that defines it (loaded on first use, so
#: that the torch-free ``cribo.nn.architectures`` imports without torch).
_HOME = {
    "VisionTransformer": "backbone", "vit": "backbone", "vit_tiny": "backbone",
    "vit_small": "backbone",
    "vit_base": "backbone", "DropPath": "backbone", "CriboHead": "head", "WeightNormLinear": "head",
    "LoadReport": "checkpoints", "load_pretrained": "checkpoints",
    "read_checkpoint": "checkpoints", "CriboObjective": "objective",
    "CriboStudent": "objective", "ObjectiveOutput": "objective", "image_seeds": "objective",
    "NonFiniteError": "autograd", "student_logits": "autograd",
    "ARCHITECTURES": "architectures", "HEAD_DIM": "architectures",
}

__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'cribo.nn' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
