"""Build of monet_fast: Python packages plus the monet_fast._C extension, compiled by CMake.

Build knobs (environment variables, read once and logged):
  MONET_FAST_SKIP_CUDA_BUILD=1  never build CUDA sources, even with a CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST          CUDA archs to build (default: torch's own list / the local GPU)
  MAX_JOBS                      parallel compile jobs (default: CPU count)
  CMAKE_BUILD_TYPE              Release (default) or Debug / RelWithDebInfo

torch is deliberately NOT in pyproject's build requirements: an isolated build would resolve the
newest torch from the index (a CUDA build of several GB on a CPU machine) and compile the
extension against a different torch than the one it runs with. We build against the torch
installed in the target environment: use `pip install -e . --no-build-isolation`, or plain
`pip install .`, in which case setup.py looks torch up in the target interpreter's site-packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"[monet_fast build] {msg}", flush=True)


def _import_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        # Isolated build env: fall back to the target environment's torch (see module docstring).
        for key in ("purelib", "platlib"):
            site = sysconfig.get_paths()[key]
            if (Path(site) / "torch").is_dir() and site not in sys.path:
                sys.path.append(site)
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "monet_fast needs torch installed before it is built; install the CPU build with "
                "`pip install torch==2.13.0+cpu` (or your CUDA build), then "
                "`pip install -e . --no-build-isolation`"
            ) from err
    import torch

    return torch


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _import_torch()
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "cmake not found on PATH; install it (apt install cmake or pip install cmake)"
            )
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)

        skip_cuda = os.environ.get("MONET_FAST_SKIP_CUDA_BUILD", "0").upper() in ("1", "TRUE", "ON")
        nvcc = shutil.which("nvcc")
        if skip_cuda:
            use_cuda, why = False, "MONET_FAST_SKIP_CUDA_BUILD is set"
        elif torch.version.cuda is None:
            use_cuda, why = False, f"torch {torch.__version__} is a CPU build"
        elif nvcc is None:
            use_cuda, why = False, "nvcc not found on PATH"
        else:
            use_cuda, why = (
                True,
                f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc at {nvcc}",
            )
        _log(f"{'building' if use_cuda else 'NOT building'} CUDA sources: {why}")

        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        _log(f"CMAKE_BUILD_TYPE={build_type} MAX_JOBS={jobs} torch={torch.__version__}")
        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        args = [
            cmake,
            str(ROOT),
            "-DCMAKE_PREFIX_PATH=" + prefix,
            "-DPython3_EXECUTABLE=" + sys.executable,
            "-DCMAKE_BUILD_TYPE=" + build_type,
            "-DMONET_FAST_OUTPUT_DIR=" + str(out_dir),
            "-DMONET_FAST_TORCH_VERSION=" + torch.__version__,
            "-DMONET_FAST_ENABLE_CUDA=" + ("ON" if use_cuda else "OFF"),
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if use_cuda:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
            if arch_list:
                _log(f"TORCH_CUDA_ARCH_LIST={arch_list}")
            args += ["-DCMAKE_CUDA_COMPILER=" + nvcc]
        subprocess.run(args, cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


setup(
    ext_modules=[CMakeExtension("monet_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
