# Two entry points for a fresh machine: `make demo` (end-to-end demo on the tiny offline model)
# and `make test` (the test suite). Both create .venv, install pinned deps and build monet_fast._C.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of the torch pinned in constraints.txt (the one place versions are pinned).
TORCH_CPU := torch==$(shell sed -n 's/^torch==\([^ ]*\).*/\1/p' constraints.txt)+cpu
RUN_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
STAMP := $(VENV)/.monet_fast_installed
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt constraints.txt $(wildcard csrc/*)

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS) tools/constraints_for_torch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Keep a torch that is already there (e.g. a CUDA build); otherwise the pinned CPU build,
	# because a plain `pip install torch` pulls several GB of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_CPU)"
	# Pins that follow that torch: its CUDA build requires another triton than its CPU build.
	$(PY) tools/constraints_for_torch.py -o $(VENV)/constraints.txt
	DS_BUILD_OPS=0 $(PIP) install --quiet -c $(VENV)/constraints.txt numpy pillow triton \
		transformers tokenizers safetensors pyyaml tqdm psutil matplotlib deepspeed peft pytest pytest-xdist \
		fastapi uvicorn openai httpx pytest-benchmark pybind11 ninja cmake ruff setuptools wheel
	# .venv/bin first on PATH: the build runs the cmake and ninja installed there.
	PATH="$(abspath $(VENV))/bin:$$PATH" MAX_JOBS=$${MAX_JOBS:-2} \
		$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: install
	$(RUN_ENV) $(VENV)/bin/monet-fast demo

# Tests run in TEST_WORKERS pytest-xdist processes with one torch thread each: on 2 cores that
# halves the wall time (two workers with torch's default threads oversubscribe and gain nothing).
TEST_WORKERS ?= 2
TEST_ENV := $(RUN_ENV) TRITON_INTERPRET=1 OMP_NUM_THREADS=1

test: install
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --benchmark-disable tests

# The inner loop: everything but the tests marked slow (end-to-end CLI runs, subprocess installs,
# multi-process DeepSpeed, GPU-target compiles).
test-fast: install
	$(TEST_ENV) $(PY) -m pytest -q -x -n $(TEST_WORKERS) --benchmark-disable -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(RUN_ENV) $(PY) -m pytest -q benchmarks

clean:
	rm -rf build *.egg-info monet_fast/_C*.so $(VENV)

# --- GPU machine -------------------------------------------------------------------------------
# `make gpu-check` is what a GPU machine runs first (about 8 minutes on one H100/H200): it builds
# _C with CUDA (MONET_FAST_REQUIRE_CUDA=1) against that machine's own torch, runs `pytest -m gpu`
# and the benchmarks, writes benchmarks/results/<gpu-name>.md/.json (also to $$OUT) and prints
# the performance targets with PASS/FAIL. It uses the machine's python (GPU_PY), not .venv: GPU
# images come with torch and have no network. DeepSpeed travels as wheels: `make gpu-wheels`
# here, then carry wheelhouse/ with the working tree.
GPU_PY ?= python3
GPU_WHEEL_PY ?= 3.12

.PHONY: gpu-check gpu-wheels

gpu-check:
	$(GPU_PY) tools/gpu_check.py

gpu-wheels: install
	rm -rf wheelhouse
	DS_BUILD_OPS=0 $(PIP) wheel --quiet --no-deps -w wheelhouse \
		"$$(grep -E '^deepspeed==' constraints.txt)"
	$(PIP) download --quiet --only-binary=:all: --python-version $(GPU_WHEEL_PY) \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		--platform manylinux2014_x86_64 -d wheelhouse \
		einops hjson msgpack ninja psutil py-cpuinfo pydantic
	du -sh wheelhouse

# --- install check -----------------------------------------------------------------------------
# `make install-check`: what a new user gets from `pip install .` with no extras. A fresh venv
# under /tmp, the pinned CPU torch, then the package with an isolated build (build tools from
# PyPI) and constraints that follow that torch; then, outside the source tree, the README's
# Python API snippet and `monet-fast env` (which must report the extras as not installed).
# Not part of `make test`: it downloads and builds (measured: see README "Installing").
CHECK_DIR ?= /tmp/monet_fast_install_check

.PHONY: install-check

install-check:
	rm -rf $(CHECK_DIR) && mkdir -p $(CHECK_DIR)/src
	tar --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.egg-info' \
		--exclude='*.so' --exclude=./runs --exclude=./wheelhouse -cf - . | tar -xf - -C $(CHECK_DIR)/src
	$(PYTHON) -m venv $(CHECK_DIR)/venv
	$(CHECK_DIR)/venv/bin/pip install --quiet "$(TORCH_CPU)"
	$(CHECK_DIR)/venv/bin/python tools/constraints_for_torch.py -o $(CHECK_DIR)/constraints.txt
	# PIP_CONSTRAINT (unlike -c) also reaches the isolated build environment's installs.
	cd $(CHECK_DIR)/src && PIP_CONSTRAINT=$(CHECK_DIR)/constraints.txt MAX_JOBS=$${MAX_JOBS:-2} \
		$(CHECK_DIR)/venv/bin/pip install --quiet .
	$(PYTHON) tools/readme_snippet.py "Python API" > $(CHECK_DIR)/snippet.py
	cd $(CHECK_DIR) && $(RUN_ENV) venv/bin/python snippet.py
	cd $(CHECK_DIR) && $(RUN_ENV) venv/bin/monet-fast env > env.txt && cat env.txt
	grep -q "^deepspeed: not installed (pip install 'monet_fast\[train\]')" $(CHECK_DIR)/env.txt
	@echo "install-check: core install OK (README snippet and monet-fast env)"

# --- CUDA build check (no GPU needed) ----------------------------------------------------------
# `make cuda-build-check`: builds _C with its CUDA sources (sm_80 and sm_90, nvcc required)
# against the PyPI CUDA torch in a throwaway venv under /tmp, checks build_info() and the linked
# CUDA runtime, and runs the CPU tests against that build (MONET_FAST_CUDA_CHECK_TESTS to pick).
# Not part of `make test`: the CUDA torch is a ~3 GB download (measured: see README).
.PHONY: cuda-build-check

cuda-build-check:
	PYTHON=$(PYTHON) bash tools/cuda_build_check.sh

# --- Older supported versions --------------------------------------------------------------------
# `make compat-check` runs a subset of the CPU tests and `check-kernels --arch sm_90` against the
# GPU image's transformers 5.17 / Triton 3.6, installed into build/compat and shadowed through
# PYTHONPATH (.venv untouched; ~850 MB on disk). Not part of `make test`: it takes minutes.
.PHONY: compat-check

compat-check: install
	PY=$(PY) bash tools/compat_check.sh
