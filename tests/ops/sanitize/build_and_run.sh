#!/usr/bin/env bash
# Builds the C kernels csrc/*.c (the Python binding lives apart, in csrc/binding/) together
# with tests/ops/sanitize/harness.c under AddressSanitizer + UndefinedBehaviorSanitizer,
# against the scipy-openblas32 wheel the package itself links, and runs the harness.
# No Python is involved at run time; Python is used only to locate the OpenBLAS wheel.
#
# Usage: tests/ops/sanitize/build_and_run.sh        (from anywhere)
# Env:   PYTHON     interpreter with scipy_openblas32 (default: .venv/bin/python, else python3)
#        CC         compiler (default gcc)
#        BUILD_DIR  output directory (default tests/ops/sanitize/build, git-ignored)
#
# Leak checking: the harness runs with ASAN_OPTIONS=detect_leaks=1.  LeakSanitizer
# needs to stop the process's threads with ptrace; where the sandbox forbids that it
# dies with "LeakSanitizer has encountered a fatal error".  Then (and only then) the
# harness is run again with detect_leaks=0 and the script says so on stderr.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
cd "$root"

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then
        PYTHON="$root/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
CC="${CC:-gcc}"
BUILD_DIR="${BUILD_DIR:-$here/build}"
mkdir -p "$BUILD_DIR"

read -r blas_inc blas_lib < <("$PYTHON" -c \
    "import scipy_openblas32 as s; print(s.get_include_dir(), s.get_lib_dir())")

sources=()
for f in csrc/*.c; do
    sources+=("$f")
done

exe="$BUILD_DIR/harness"
set -x
"$CC" -std=c11 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
    -fno-omit-frame-pointer -D_POSIX_C_SOURCE=200809L -Wall -Wextra \
    -I csrc -I "$blas_inc" \
    "${sources[@]}" tests/ops/sanitize/harness.c \
    -o "$exe" \
    -L "$blas_lib" -Wl,-rpath,"$blas_lib" -lscipy_openblas -lm -pthread
set +x

export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
common="abort_on_error=0:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"

log="$BUILD_DIR/harness.log"
set +e
ASAN_OPTIONS="detect_leaks=1:$common" "$exe" >"$log" 2>&1
status=$?
set -e
if [ "$status" -ne 0 ] && grep -q "LeakSanitizer has encountered a fatal error\|LeakSanitizer does not work under ptrace" "$log"; then
    cat "$log" >&2
    echo "build_and_run.sh: LeakSanitizer cannot run here (ptrace is restricted);" \
         "rerunning with detect_leaks=0 -- leaks are NOT checked" >&2
    set +e
    ASAN_OPTIONS="detect_leaks=0:$common" "$exe" >"$log" 2>&1
    status=$?
    set -e
fi
cat "$log"
if [ "$status" -ne 0 ]; then
    echo "build_and_run.sh: harness failed with status $status" >&2
fi
exit "$status"
