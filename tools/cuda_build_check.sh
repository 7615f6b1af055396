#!/usr/bin/env bash
# `make cuda-build-check`: build monet_fast._C WITH its CUDA sources against the PyPI CUDA torch,
# on a machine without a GPU (nvcc needed), in a throwaway venv; import it, check build_info()
# (cuda, cuda_archs, the shared CUDA runtime, no nvrtc) and run the CPU tests against that build.
#
# The venv is kept in $WORK between runs (the CUDA torch is a ~3 GB download); delete $WORK to
# start from scratch. The source is a copy of the working tree (tracked and untracked files).
# Knobs: MONET_FAST_CUDA_CHECK_DIR (default /tmp/monet_fast_cuda_check),
#        MONET_FAST_CUDA_CHECK_ARCHS (default "8.0;9.0": one string, ';' inside, on purpose),
#        MONET_FAST_CUDA_CHECK_TESTS (default: the whole suite, "tests"), MAX_JOBS (default 2).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${MONET_FAST_CUDA_CHECK_DIR:-/tmp/monet_fast_cuda_check}
ARCHS=${MONET_FAST_CUDA_CHECK_ARCHS:-8.0;9.0}
TESTS=${MONET_FAST_CUDA_CHECK_TESTS:-tests}
PYTHON=${PYTHON:-python3}
VENV=$WORK/venv
SRC=$WORK/src
PY=$VENV/bin/python
PIP=$VENV/bin/pip
TORCH_PIN=$(grep -E '^torch==' "$ROOT/constraints.txt")
START=$(date +%s)
step() { echo "[cuda-build-check +$(($(date +%s) - START))s] $*"; }
die() { echo "[cuda-build-check] FAIL: $*" >&2; exit 1; }

command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ] || die "nvcc not found (PATH or CUDACXX)"
# This machine's pip config may add a local wheel directory holding the CPU torch and cap
# versions; ignore every pip config file so that the PyPI CUDA build is what gets installed.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_NO_INDEX || true

mkdir -p "$WORK"
if [ -x "$PY" ] && "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is None \
        or torch.__version__.split('+')[0] != '${TORCH_PIN#torch==}')" 2>/dev/null; then
    step "reusing $VENV ($("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
else
    step "creating $VENV and installing the PyPI CUDA build of $TORCH_PIN (~3 GB)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$PIP" install --quiet "$TORCH_PIN"
fi
"$PY" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null \
    || die "$VENV has a CPU torch; delete $WORK and rerun"

step "installing the other pinned dependencies (Triton as this torch requires)"
"$PY" "$ROOT/tools/constraints_for_torch.py" -o "$WORK/constraints.txt"
DS_BUILD_OPS=0 "$PIP" install --quiet -c "$WORK/constraints.txt" numpy pillow triton \
    transformers tokenizers safetensors pyyaml tqdm psutil matplotlib deepspeed pytest \
    pytest-benchmark pybind11 ninja cmake ruff setuptools wheel

step "copying the working tree to $SRC"
rm -rf "$SRC" && mkdir -p "$SRC"
# (a file deleted but still in git's index is skipped: --ignore-failed-read)
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | tar -C "$ROOT" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$SRC"

step "building _C with CUDA: TORCH_CUDA_ARCH_LIST='$ARCHS' MONET_FAST_REQUIRE_CUDA=1"
# VERBOSE=1: cmake --build prints the nvcc command lines, whose --generate-code flags we check.
(cd "$SRC" && PATH="$VENV/bin:$PATH" TORCH_CUDA_ARCH_LIST="$ARCHS" MONET_FAST_REQUIRE_CUDA=1 \
    VERBOSE=1 MAX_JOBS=${MAX_JOBS:-2} "$PIP" install -v --no-build-isolation --no-deps -e . \
    >"$WORK/build.log" 2>&1) || { tail -40 "$WORK/build.log"; die "build failed ($WORK/build.log)"; }
grep -E "\[monet_fast build\]|monet_fast: " "$WORK/build.log" || true
GENCODE=$(grep -oE -- "--generate-code=arch=compute_[0-9a-z]+,code=\[[^]]*\]" "$WORK/build.log" \
    | sort -u | tr '\n' ' ')
echo "nvcc: $GENCODE"
for arch in $(echo "$ARCHS" | tr ';, ' '   '); do
    sm="sm_$(echo "${arch%+PTX}" | tr -d .)"
    [[ "$GENCODE" == *"$sm"* ]] || die "nvcc did not build $sm (TORCH_CUDA_ARCH_LIST='$ARCHS')"
done

step "checking the built extension"
EXPECT_ARCHS=$(echo "$ARCHS" | tr ', ' ';;')
(cd "$WORK" && "$PY" - "$EXPECT_ARCHS" <<'EOF'
import subprocess
import sys

import monet_fast

info = monet_fast._C.build_info()
print("build_info:", info)
so = monet_fast._C.__file__
assert info["cuda"] is True, f"_C built without CUDA: {info.get('cuda_reason')}"
assert info["cuda_archs"] == sys.argv[1], (info["cuda_archs"], sys.argv[1])
dyn = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
needed = [line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
print("NEEDED:", " ".join(needed))
assert any(n.startswith("libcudart.so") for n in needed), "not linked to the shared CUDA runtime"
assert not any("nvrtc" in n for n in needed), "nvrtc linked in"
sections = subprocess.run(["readelf", "-S", so], capture_output=True, text=True).stdout
assert ".nv_fatbin" in sections, "no device code (.nv_fatbin) in _C"
print("extension OK:", so)
EOF
) || die "extension check failed"

step "default archs with TORCH_CUDA_ARCH_LIST unset (the decision only, no build)"
(cd "$SRC" && env -u TORCH_CUDA_ARCH_LIST "$PY" -c "
import importlib.util, shutil, torch
spec = importlib.util.spec_from_file_location('monet_fast_setup', 'setup.py')
setup = importlib.util.module_from_spec(spec); spec.loader.exec_module(setup)
toolkit, _ = setup.decide_cuda(torch)
assert toolkit is not None
print(setup.cuda_archs(torch, toolkit))")

step "CPU tests against this build: $TESTS"
# shellcheck disable=SC2086  # TESTS is a list of paths
(cd "$SRC" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TRITON_INTERPRET=1 \
    "$PY" -m pytest -q --benchmark-disable -p no:cacheprovider $TESTS) || die "tests failed"
step "PASS in $(($(date +%s) - START)) s"
