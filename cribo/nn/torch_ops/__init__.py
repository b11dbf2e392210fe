"""The CrIBo operators in torch, on the tensors' device (docs/method.md §2-§5).

The same operations as :mod:`cribo.ops` (the C core, on NumPy arrays), written
with torch so that they run where the tensors live -- a GPU in practice --
without copying tokens or logits to the host.  They are tested equal to the C
core on CPU tensors (tests/nn/torch_ops/).  ``CriboObjective`` does not use them
yet: choosing the engine by device (``backend="auto" | "c" | "torch"``) is the
next step.

>>> from cribo.nn import torch_ops
>>> c = torch_ops.cluster(tokens, positions, 64)            # tokens (B,2,N,d) on a GPU
>>> objects = torch_ops.pool(tokens, c.labels, 64)          # (B,2,K,d), autograd native
>>> queue = torch_ops.ObjectQueue(25_000, 384, device="cuda")

=================================  ============================================
module                             holds
=================================  ============================================
``cribo.nn.torch_ops.clustering``  :func:`cluster` (§2), batched over images
``cribo.nn.torch_ops.pooling``     :func:`pool` (§3), autograd native
``cribo.nn.torch_ops.queue``       :class:`ObjectQueue`, :func:`topk_cosine` (§4)
``cribo.nn.torch_ops.losses``      :func:`softmax_cross_entropy`,
                                   :func:`cribo_losses`, :func:`update_center`
                                   (§5), chunked over rows
=================================  ============================================
"""
from .clustering import Clustering, cluster
from .losses import TorchCriboLosses, cribo_losses, softmax_cross_entropy, update_center
from .pooling import pool
from .queue import Match, ObjectQueue, topk_cosine

__all__ = [
    "Clustering", "cluster", "pool", "Match", "ObjectQueue", "topk_cosine",
    "TorchCriboLosses", "cribo_losses", "softmax_cross_entropy", "update_center",
]
