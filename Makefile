# Two entry points for a fresh machine: `make demo` (end-to-end demo on the tiny offline model)
# and `make test` (the test suite). Both create .venv, install pinned deps and build monet_fast._C.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_CPU := torch==2.13.0+cpu
RUN_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
STAMP := $(VENV)/.monet_fast_installed
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt constraints.txt $(wildcard csrc/*)

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Keep a torch that is already there (e.g. a CUDA build); otherwise the pinned CPU build,
	# because a plain `pip install torch` pulls several GB of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_CPU)"
	DS_BUILD_OPS=0 $(PIP) install --quiet -c constraints.txt numpy pillow triton transformers \
		tokenizers safetensors pyyaml tqdm matplotlib deepspeed pytest pytest-benchmark \
		pybind11 ninja ruff setuptools wheel
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: install
	$(RUN_ENV) $(VENV)/bin/monet-fast demo

test: install
	$(RUN_ENV) TRITON_INTERPRET=1 $(PY) -m pytest -q --benchmark-disable tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(RUN_ENV) $(PY) -m pytest -q benchmarks

clean:
	rm -rf build *.egg-info monet_fast/_C*.so $(VENV)
