"""cribo: CrIBo (Cross-Image Object-Level Bootstrapping, ICLR 2024) with a C core.

The operators of the method on NumPy arrays (``cribo.ops``, re-exported here):

>>> import cribo
>>> c = cribo.cluster(tokens, positions, n_clusters=8)    # (B,2,N,d), (B,2,N,2)
>>> objects = cribo.pool(tokens, c.labels, 8)             # (B,2,K,d)
>>> queue = cribo.ObjectQueue(capacity=1000, dim=tokens.shape[-1])
>>> idx, sim = cribo.topk_cosine(queries, bank, k=5)
>>> losses, grad = cribo.softmax_cross_entropy(student, teacher)

``import cribo`` needs only NumPy (and the OpenBLAS wheel it was built with).
"""
from ._blas import preload as _preload_blas

_preload_blas()

from .ops import *  # noqa: E402,F401,F403
from .ops import __all__ as _ops_all  # noqa: E402

__version__ = "0.1.0"
__all__ = list(_ops_all)
