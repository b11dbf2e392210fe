# Two commands do all the set-up on a machine with nothing but Python 3.10+ (for the
# pinned torch) and a C compiler; each installs what it needs, idempotently, into .venv:
#   make pretrain  the main job: pretrains the CPU preset on the embedded synthetic
#                  scenes, evaluates the teacher and writes runs/cribo/report/
#                  (about 6 min on 2 cores)
#   make test      the test suite (CI runs exactly this, through .ci/run)
# Optional: make demo (a tour of the C operators, a few seconds), make bench
# (benchmarks/), make test-all (including tests marked slow), make clean.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The pinned CPU build of torch is installed before cribo, so that cribo's own
# `torch` requirement is already met and nothing pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo pretrain test test-all bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=77" "numpy>=2.0" "scipy-openblas32>=0.3.27"
	$(PIP) install -q $(TORCH)
	touch $@

# The extension is rebuilt whenever a C file or the build description changes.
$(VENV)/.cribo: $(VENV)/.base setup.py pyproject.toml $(wildcard csrc/*.c csrc/*.h)
	$(PIP) install -q --no-build-isolation -e ".[torch,plot]"
	touch $@

# Re-run (a no-op when all is there) whenever this list changes.  `build` is for
# tests/test_packaging.py (python -m build).
$(VENV)/.testdeps: $(VENV)/.base Makefile
	$(PIP) install -q "pytest>=7" "hypothesis>=6" "threadpoolctl>=3" "build>=1" nbformat nbclient ipykernel
	touch $@

demo: $(VENV)/.cribo
	$(VENV)/bin/cribo demo

pretrain: $(VENV)/.cribo
	$(VENV)/bin/cribo pretrain $(ARGS)

# CI's short run: everything but the tests marked slow.
test: $(VENV)/.cribo $(VENV)/.testdeps
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.cribo $(VENV)/.testdeps
	$(PY) -m pytest -q

bench: $(VENV)/.cribo $(VENV)/.testdeps
	$(PY) benchmarks/run.py

clean:
	rm -rf build cribo/*.so tests/ops/sanitize/build $(VENV)
