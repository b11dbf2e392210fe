"""The NumPy API of cribo's C core, in one namespace.

Every function takes array-likes, converts them visibly (any float dtype to
C-contiguous float32, any integer dtype to int64; see ``cribo.ops._arrays``) and
calls the binding entry point of the same name and keywords (csrc/binding/_C.c), which
owns every rule about the arguments (shapes, ranges, finiteness; errors name
the function and the argument) and runs a C kernel with the GIL released.
Nothing here needs torch.

===============================  ===========================  ===================
docs/method.md                   Python module                C kernel
===============================  ===========================  ===================
§2 joint-space clustering        cribo/ops/clustering.py      csrc/cluster.c
§3 object pooling                cribo/ops/pooling.py         csrc/pool.c
§4 object queue, top-k search    cribo/ops/queue.py           csrc/queue.c
§5 losses and centres            cribo/ops/losses.py          csrc/loss.c
===============================  ===========================  ===================
"""
from __future__ import annotations

from .. import _C
from .queue import Match, ObjectQueue, topk_cosine
from .clustering import Clustering, cluster, draw_init
from .losses import CriboLosses, cribo_losses, softmax_cross_entropy, update_center
from .threads import get_num_threads, num_threads, set_num_threads
from .pooling import pool, pool_backward

#: What a broken argument rule raises (the binding writes the message of every
#: rule; ``_arrays.py`` that of an input that is no array of numbers): a
#: ValueError (shapes, ranges, finiteness) or a TypeError (dtypes, kinds).
ArgumentError = _C.ArgumentError
ArgumentTypeError = _C.ArgumentTypeError

__all__ = [
    "Clustering", "cluster", "draw_init",
    "pool", "pool_backward",
    "Match", "ObjectQueue", "topk_cosine",
    "CriboLosses", "cribo_losses", "softmax_cross_entropy", "update_center",
    "get_num_threads", "num_threads", "set_num_threads",
    "ArgumentError", "ArgumentTypeError",
]
