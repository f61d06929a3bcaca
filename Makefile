# Set-up and everyday commands. `make test` and `make demo` do the whole set-up on a
# fresh machine: a virtual environment in .venv, the pinned dependencies, and the
# extension built against the torch in that environment.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := setuptools==84.2.1 wheel==0.48.0 build==1.6.1 torch==2.14.1 torchvision==0.29.1 triton==3.8.0 ninja==1.13.2 pytest==9.2.0 \
	pytest-benchmark==5.3.1 tqdm==4.70.1 matplotlib==3.11.2 scikit-learn==1.9.1 scipy==1.17.1
# The CUDA toolkit, when there is one: the CUDA kernels are compiled even without a GPU.
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export MAX_JOBS ?= 2

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: test test-packaging demo compare bench build dist clean

test: $(BUILD_STAMP)
	$(VPY) -m pytest tests -q
	@# The Triton kernels once more through Triton's interpreter, on CPU tensors (on a GPU
	@# machine the run above already ran them on the GPU).
	TRITON_INTERPRET=1 $(VPY) -m pytest tests/ops/triton/test_triton_backend.py tests/ops/triton/test_launch_state.py -q
	$(VPY) -m pytest bench -q --benchmark-disable  # each benchmark case once, checked

# The slow packaging tests (tests/test_packaging.py), deselected from `make test`.
test-packaging: $(BUILD_STAMP)
	$(VPY) -m pytest tests/test_packaging.py -q -o addopts=""

demo: $(BUILD_STAMP)
	$(VPY) -m afa_ext.train.demo

compare: $(BUILD_STAMP)
	$(VPY) bench/compare_backends.py

bench: $(BUILD_STAMP)
	$(VPY) bench/report.py

build: $(BUILD_STAMP)

# dist/afa_ext-VERSION.tar.gz, then the wheel built from that sdist (so the sdist is known
# to build), against the torch in .venv (--no-isolation; `pip install .` or `python -m
# build` elsewhere fetch torch into an isolated build environment instead).
dist: $(DEPS_STAMP)
	rm -rf dist
	$(VPY) -m build --no-isolation --outdir dist .
	@ls -l dist

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(VPY) Makefile
	$(VPY) -m pip install $(DEPS)
	touch $@

# --no-build-isolation: build against the torch installed above instead of letting pip
# fetch a second torch into a build sandbox. Editable, so the tests import the built tree.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(VPY) -m pip install --no-build-isolation --no-deps -e .
	$(VPY) -c "import afa_ext; print('afa_ext backends:', afa_ext.available_backends(), afa_ext.build_info())"
	touch $@

clean:
	rm -rf build dist *.egg-info afa_ext/_C*.so afa_ext/_build_config.py
	rm -f $(BUILD_STAMP)
