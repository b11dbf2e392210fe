"""How many threads cribo's C kernels use.

Kernels split independent images or rows statically over POSIX threads, so a
result does not depend on the thread count; BLAS runs single-threaded inside
them, so the cores are never oversubscribed.  The default is the number of
cores this process may run on, or ``CRIBO_NUM_THREADS`` if set.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from .. import _C


def _default_threads() -> int:
    env = os.environ.get("CRIBO_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"CRIBO_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"CRIBO_NUM_THREADS must be a positive integer, got {env!r}")
        return min(n, _C.MAX_THREADS)
    try:
        return max(1, min(len(os.sched_getaffinity(0)), _C.MAX_THREADS))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, _C.MAX_THREADS))


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (1..256, ``cribo._C.MAX_THREADS``) in every cribo kernel from now on."""
    _C.set_num_threads(n=n)


def get_num_threads() -> int:
    """The number of threads cribo's kernels use."""
    return int(_C.get_num_threads())


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Context manager: run the enclosed calls with ``n`` threads."""
    old = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(old)


_C.set_num_threads(n=_default_threads())
