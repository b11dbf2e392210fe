"""Builds cribo._C from csrc/ against the NumPy C API and a CBLAS.

The CBLAS is the scipy-openblas32 wheel from PyPI (library and headers, symbols
prefixed ``scipy_``), so ``pip install .`` needs nothing from the system but a C
compiler.  Set CRIBO_SYSTEM_CBLAS=1 to link a system ``-lcblas``/``-lopenblas``
instead.  Extra compiler flags (e.g. sanitizers) come from CRIBO_CFLAGS.
"""
import os
import sys

import numpy
from setuptools import Extension, setup

# csrc/*.c: the pure C kernels; csrc/binding/: the only code that knows Python/NumPy.
sources = [os.path.join("csrc", f) for f in
           ("binding/_C.c", "binding/args.c", "parallel.c", "cluster.c", "pool.c",
            "queue.c", "loss.c")]
include_dirs = [numpy.get_include(), "csrc"]
library_dirs = []
libraries = []
# The NumPy C-API the extension may use: that of NumPy 1.25, the runtime floor in
# pyproject.toml.  Built against NumPy 2.x headers, it then imports under any NumPy
# from 1.25 on, whatever NumPy the build environment picked.
define_macros = [("NDEBUG", None), ("NPY_TARGET_VERSION", "NPY_1_25_API_VERSION")]
runtime_library_dirs = []
extra_link_args = []

if os.environ.get("CRIBO_SYSTEM_CBLAS"):
    define_macros.append(("CRIBO_SYSTEM_CBLAS", None))
    libraries += [os.environ.get("CRIBO_BLAS_LIB", "openblas")]
else:
    import scipy_openblas32

    include_dirs.append(scipy_openblas32.get_include_dir())
    library_dirs.append(scipy_openblas32.get_lib_dir())
    libraries.append(scipy_openblas32.get_library())
    if sys.platform.startswith("linux"):
        # Installed side by side in site-packages; cribo/_blas.py also preloads it.
        extra_link_args.append("-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib")

# Never -ffast-math/-Ofast: the kernels rely on IEEE infinities and NaN checks.
# -fno-trapping-math and -fno-math-errno only declare that nobody reads the FP
# exception flags or errno, which lets GCC if-convert the branch-free selects in
# vmath.h and use vector sqrt; they change no result.  -std=c11 (not gnu11) keeps -ffp-contract=off: no FMA
# contraction, so every target clone rounds identically.
extra_compile_args = ["-O3", "-std=c11", "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-psabi",
                      "-fno-math-errno",
                      "-D_POSIX_C_SOURCE=200809L"]
if os.environ.get("CRIBO_WERROR"):
    extra_compile_args.append("-Werror")
extra_compile_args += os.environ.get("CRIBO_CFLAGS", "").split()
extra_link_args += ["-pthread"] + os.environ.get("CRIBO_LDFLAGS", "").split()

setup(
    ext_modules=[
        Extension(
            "cribo._C",
            sources=sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            depends=[os.path.join("csrc", f) for f in
                     ("binding/args.h", "cribo.h", "blas.h", "vmath.h", "workspace.h")],
        )
    ]
)
