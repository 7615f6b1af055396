#!/usr/bin/env bash
# `make compat-check`: run a subset of the CPU tests, and the sm_90 kernel compile check, against
# the transformers and Triton of the GPU image (ENVIRONMENT.md, "The GPU machine"), which are
# older than the ones in .venv. They are installed into throwaway directories shadowed through
# PYTHONPATH, so .venv itself is not touched. Version-specific calls live in monet_fast/_compat.py.
#
# Extra pins, and why:
#   huggingface-hub<2, httpx<1 (+ httpcore, certifi): transformers 5.17 requires hub <2.0, and
#     hub 1.x imports httpx, which .venv (hub 2.x, httpx2) does not have.
#   numpy<2.4: Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4
#     refuses ("only 0-dimensional arrays can be converted"); Triton 3.8 squeezes first. This only
#     affects TRITON_INTERPRET runs, never compiled kernels on a GPU.
set -euo pipefail

PY=${PY:-.venv/bin/python}
DIR=${COMPAT_DIR:-build/compat}
TRANSFORMERS_VERSION=${COMPAT_TRANSFORMERS:-5.17.0}
TRITON_VERSION=${COMPAT_TRITON:-3.6.0}
TESTS=${COMPAT_TESTS:-tests/test_compat.py tests/test_tiny_model.py tests/test_processor.py
tests/test_latent_forward.py tests/test_decode.py tests/test_latent_attention.py
tests/test_gaussian_logprob.py tests/test_train_sft.py}

start=$(date +%s)
rm -rf "$DIR"
mkdir -p "$DIR"
pip_target() { "$PY" -m pip install --quiet --no-deps --target "$DIR/$1" "${@:2}"; }
pip_target transformers "transformers==$TRANSFORMERS_VERSION" "huggingface-hub<2,>=1.5" \
    "httpx<1,>=0.23" "httpcore<2" certifi
pip_target triton "triton==$TRITON_VERSION" "numpy<2.4"
SHADOW="$(realpath "$DIR/transformers"):$(realpath "$DIR/triton")"
PYTHONPATH="$SHADOW" "$PY" -c "
import numpy, transformers, triton
assert transformers.__version__ == '$TRANSFORMERS_VERSION', transformers.__file__
assert triton.__version__ == '$TRITON_VERSION', triton.__file__
print('compat-check: transformers', transformers.__version__, '| triton', triton.__version__,
      '| numpy', numpy.__version__)"
echo "compat-check: shadow dirs ready in $(($(date +%s) - start)) s"

# shellcheck disable=SC2086  # TESTS is a list of paths
PYTHONPATH="$SHADOW" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TRITON_INTERPRET=1 \
    "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable $TESTS -k "not distributed"
# The H200 / H100 of the GPU image is sm_90: every kernel variant compiled by that Triton.
PYTHONPATH="$SHADOW" TRITON_CACHE_DIR="$(realpath "$DIR")/triton_cache" \
    "$PY" -m monet_fast.cli check-kernels --arch sm_90 --jobs 2
echo "compat-check: passed in $(($(date +%s) - start)) s"
