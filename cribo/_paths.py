"""Where a command will write, checked before it starts working."""
from __future__ import annotations

import os
import tempfile

__all__ = ["check_writable_folder"]


def check_writable_folder(folder: str, option: str, target: str) -> None:
    """That files can be made in ``folder``, which may not exist yet: its nearest
    existing ancestor (itself if it exists) must be a folder in which a file can
    be made, tried with a temporary file (so it holds for root and read-only
    mounts alike).  The folders missing on the way are made later.

    Args:
        folder: where the files will go.
        option: the option that named it, for the message (``--out``).
        target: what the user gave (a file in ``folder``, or ``folder`` itself).

    Raises:
        NotADirectoryError: the nearest existing ancestor is a file.
        PermissionError: no file can be made there.
    """
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{option}: cannot write {target}: {parent} is a file, "
                                 f"not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise PermissionError(f"{option}: cannot write {target} ({e.strerror or e} in "
                              f"{parent})") from None
