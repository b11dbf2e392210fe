"""Loads the OpenBLAS that cribo._C was linked against before cribo._C itself.

The extension records the scipy-openblas32 library by name; on Linux an rpath
finds it beside cribo in site-packages, and this preload covers editable
installs and other layouts.  A build against a system CBLAS needs neither.
"""
from __future__ import annotations

import ctypes
import os


def preload() -> None:
    try:
        import scipy_openblas32
    except ImportError:  # built with CRIBO_SYSTEM_CBLAS
        return
    lib_dir = scipy_openblas32.get_lib_dir()
    name = scipy_openblas32.get_library()
    for candidate in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        path = os.path.join(lib_dir, candidate)
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
