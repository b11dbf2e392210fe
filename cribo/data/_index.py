"""The one rule of every data set's ``__getitem__``: which image an index means."""
from __future__ import annotations

__all__ = ["image_index"]


def image_index(index: int, n: int, owner: str) -> int:
    """``index`` in ``[-n, n)`` as a position in ``[0, n)`` (negative counts from the
    end, as in a list); IndexError naming ``owner`` (the data set's class) otherwise."""
    i = int(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{owner}: index {index} out of range for {n} images")
    return i
