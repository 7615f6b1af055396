"""Build of monet_fast: Python packages plus the monet_fast._C extension, compiled by CMake.

Build knobs (environment variables, read once and logged):
  MONET_FAST_REQUIRE_CUDA=1     fail the build unless the CUDA sources are built (GPU machines)
  MONET_FAST_SKIP_CUDA_BUILD=1  never build CUDA sources, even with a CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST          CUDA archs, e.g. "8.0;9.0+PTX" (default: DEFAULT_CUDA_ARCHS that
                                this nvcc supports, plus the archs of the GPUs in this machine)
  CUDACXX / CUDA_HOME           which nvcc to use (default: nvcc on PATH)
  MAX_JOBS                      parallel compile jobs (default: CPU count)
  CMAKE_BUILD_TYPE              Release (default) or Debug / RelWithDebInfo

The CUDA sources are built when torch is a CUDA build and an nvcc of the same CUDA major version
is found. Otherwise `_C` is C++ only, CUDA tensors take the torch fallback of each op, and the
build log says so in a banner (pip shows it with -v); MONET_FAST_REQUIRE_CUDA=1 makes that an
error instead.

torch is deliberately NOT in pyproject's build requirements: an isolated build would resolve the
newest torch from the index (a CUDA build of several GB on a CPU machine) and compile the
extension against a different torch than the one it runs with. We build against the torch
installed in the target environment: use `pip install -e . --no-build-isolation`, or plain
`pip install .`, in which case setup.py looks torch up in the target interpreter's site-packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Built when TORCH_CUDA_ARCH_LIST is unset: A100, A10/RTX 30xx, L4/L40/RTX 40xx, H100/H200; the
# highest also as PTX so that newer GPUs (Blackwell) JIT-compile it. torch's own fallback list
# starts at archs that nvcc 13 no longer supports.
DEFAULT_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0")
_ARCH_RE = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def _log(msg: str) -> None:
    print(f"[monet_fast build] {msg}", flush=True)


def _banner(msg: str) -> None:
    # pip hides a successful build's output unless run with -v; stderr plus a banner is the most
    # we can do to make it visible there, MONET_FAST_REQUIRE_CUDA=1 is the way to make it fatal.
    bar = "!" * 100
    print(f"\n{bar}\n[monet_fast build] WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().upper() in ("1", "TRUE", "ON", "YES")


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


def _find_tool(name: str) -> str | None:
    """`name` on PATH, else from its pip package (cmake / ninja wheels ship the binary)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
    except ImportError:
        return None
    bin_dir = getattr(module, f"{name.upper()}_BIN_DIR", None)
    path = Path(bin_dir) / name if bin_dir else None
    return str(path) if path and path.exists() else None


class CudaToolkit:
    """The nvcc to build with, resolved to the toolkit it belongs to.

    The `nvcc` on PATH may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc that
    execs /usr/local/cuda-13.0/bin/nvcc); CMake would then look for headers and libraries next
    to the wrapper. nvcc's dry run prints the directory of the real compiler (`_HERE_`).
    """

    def __init__(self, nvcc: str) -> None:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
        )
        here = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
        real = Path(here.group(1).strip()) / "nvcc" if here else Path(nvcc).resolve()
        if not real.exists():
            real = Path(nvcc).resolve()
        self.nvcc = str(real)
        self.root = str(real.parent.parent)
        out = subprocess.run([self.nvcc, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release (\d+)\.(\d+)", out)
        self.version = f"{match.group(1)}.{match.group(2)}" if match else "unknown"
        codes = subprocess.run([self.nvcc, "--list-gpu-code"], capture_output=True, text=True)
        # sm_XY -> "X.Y" (the last digit is the minor version: sm_100 -> 10.0). Empty when this
        # nvcc cannot list them (old CUDA): then nothing is filtered and nvcc has the last word.
        codes = codes.stdout.split() if codes.returncode == 0 else []
        self.archs = {f"{c[3:-1]}.{c[-1]}" for c in codes if re.fullmatch(r"sm_\d+", c)}


def _find_nvcc() -> str | None:
    if os.environ.get("CUDACXX"):
        cudacxx = shutil.which(os.environ["CUDACXX"])
        if cudacxx is None:
            raise RuntimeError(f"CUDACXX={os.environ['CUDACXX']!r} is not an executable nvcc")
        return cudacxx
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def parse_arch_list(text: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;8.6 9.0+PTX", separators ; , or space) -> ["8.0", ...]."""
    archs = [a for a in re.split(r"[;,\s]+", text.strip()) if a]
    bad = [a for a in archs if not _ARCH_RE.match(a)]
    if bad or not archs:
        raise RuntimeError(
            f"TORCH_CUDA_ARCH_LIST={text!r}: invalid entries {bad}; expected compute "
            "capabilities like '8.0;8.6;9.0+PTX' (separated by ';', ',' or spaces)"
        )
    return archs


def cmake_cuda_architectures(archs: list[str]) -> list[str]:
    """["8.0", "9.0+PTX"] -> CMake CUDA_ARCHITECTURES ["80-real", "90"] (PTX = also virtual)."""
    out = []
    for arch in archs:
        major, minor, suffix, ptx = _ARCH_RE.match(arch).groups()
        out.append(f"{major}{minor}{suffix}" + ("" if ptx else "-real"))
    return out


def cuda_archs(torch, toolkit: CudaToolkit) -> list[str]:
    """The archs to build: TORCH_CUDA_ARCH_LIST, else the default list (see DEFAULT_CUDA_ARCHS)."""

    def base(arch: str) -> str:
        major, minor, _, _ = _ARCH_RE.match(arch).groups()
        return f"{major}.{minor}"

    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if requested:
        archs = parse_arch_list(requested)
        unsupported = [a for a in archs if toolkit.archs and base(a) not in toolkit.archs]
        if unsupported:
            raise RuntimeError(
                f"TORCH_CUDA_ARCH_LIST={requested!r}: nvcc {toolkit.version} ({toolkit.nvcc}) "
                f"cannot build {unsupported}; it supports {sorted(toolkit.archs, key=float)}"
            )
        _log(f"CUDA archs from TORCH_CUDA_ARCH_LIST: {';'.join(archs)}")
        return archs
    wanted = list(DEFAULT_CUDA_ARCHS)
    local = []
    if torch.cuda.is_available():
        local = [
            f"{a}.{b}"
            for a, b in map(torch.cuda.get_device_capability, range(torch.cuda.device_count()))
        ]
    wanted += [a for a in local if a not in wanted]
    archs = [a for a in wanted if not toolkit.archs or a in toolkit.archs]
    dropped = [a for a in wanted if a not in archs]
    if not archs:
        raise RuntimeError(
            f"nvcc {toolkit.version} supports none of the default CUDA archs {wanted}; set "
            f"TORCH_CUDA_ARCH_LIST to some of {sorted(toolkit.archs, key=float)}"
        )
    archs = sorted(archs, key=float)
    archs[-1] += "+PTX"
    _log(
        f"CUDA archs (TORCH_CUDA_ARCH_LIST unset): {';'.join(archs)} = default "
        f"{';'.join(DEFAULT_CUDA_ARCHS)} + local GPUs {local or 'none'}, intersected with what "
        f"nvcc {toolkit.version} supports" + (f" (dropped {dropped})" if dropped else "")
    )
    return archs


def decide_cuda(torch) -> tuple[CudaToolkit | None, str]:
    """(toolkit to build the CUDA sources with, or None for C++ only; why), logged.

    A CUDA torch built without its CUDA kernels gets a warning banner, or an error under
    MONET_FAST_REQUIRE_CUDA=1 (whatever the reason, a CPU torch included).
    """
    toolkit, why = _find_cuda(torch)
    if toolkit is None:
        if _flag("MONET_FAST_REQUIRE_CUDA"):
            raise RuntimeError(
                f"MONET_FAST_REQUIRE_CUDA=1 but the CUDA sources cannot be built: {why}. "
                "Install a CUDA torch and the matching CUDA toolkit (nvcc), or unset "
                "MONET_FAST_REQUIRE_CUDA to build C++ only"
            )
        if torch.version.cuda is not None:
            _banner(
                f"building monet_fast._C WITHOUT its CUDA kernels: {why}. On a GPU, ops take "
                "their (slower) torch fallback. Set MONET_FAST_REQUIRE_CUDA=1 to make this an "
                "error."
            )
    _log(f"{'building' if toolkit else 'NOT building'} CUDA sources: {why}")
    return toolkit, why


def _find_cuda(torch) -> tuple[CudaToolkit | None, str]:
    if _flag("MONET_FAST_SKIP_CUDA_BUILD"):
        return None, "MONET_FAST_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    nvcc = _find_nvcc()
    if nvcc is None:
        return None, (
            f"torch {torch.__version__} has CUDA {torch.version.cuda} but no nvcc was found "
            "(looked at CUDACXX, CUDA_HOME/bin, PATH)"
        )
    toolkit = CudaToolkit(nvcc)
    if toolkit.version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, (
            f"nvcc {toolkit.version} ({toolkit.nvcc}) does not match torch's CUDA "
            f"{torch.version.cuda} (major versions differ)"
        )
    via = f", via {nvcc}" if nvcc != toolkit.nvcc else ""
    return toolkit, (
        f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc {toolkit.version} at "
        f"{toolkit.nvcc} (toolkit {toolkit.root}{via})"
    )


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _import_torch()
        import pybind11

        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError(
                "cmake not found on PATH; install it (apt install cmake or pip install cmake)"
            )
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)

        toolkit, why = decide_cuda(torch)

        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        _log(f"CMAKE_BUILD_TYPE={build_type} MAX_JOBS={jobs} torch={torch.__version__}")
        args = [
            cmake,
            str(ROOT),
            "-DCMAKE_PREFIX_PATH=" + pybind11.get_cmake_dir(),
            "-DPython3_EXECUTABLE=" + sys.executable,
            "-DCMAKE_BUILD_TYPE=" + build_type,
            "-DMONET_FAST_OUTPUT_DIR=" + str(out_dir),
            "-DMONET_FAST_TORCH_DIR=" + str(Path(torch.__file__).resolve().parent),
            "-DMONET_FAST_TORCH_VERSION=" + torch.__version__,
            "-DMONET_FAST_CXX11_ABI=" + str(int(torch.compiled_with_cxx11_abi())),
            "-DMONET_FAST_ENABLE_CUDA=" + ("ON" if toolkit else "OFF"),
            "-DMONET_FAST_CUDA_REASON=" + why,
        ]
        ninja = _find_tool("ninja")
        if ninja:
            args += ["-G", "Ninja", "-DCMAKE_MAKE_PROGRAM=" + ninja]
        if toolkit:
            archs = cuda_archs(torch, toolkit)
            args += [
                "-DCMAKE_CUDA_COMPILER=" + toolkit.nvcc,
                "-DCUDAToolkit_ROOT=" + toolkit.root,
                # One string, ';'-separated: CMake reads it as a list (not a compile definition).
                "-DMONET_FAST_CUDA_ARCHS=" + ";".join(archs),
                "-DCMAKE_CUDA_ARCHITECTURES=" + ";".join(cmake_cuda_architectures(archs)),
            ]
        subprocess.run(args, cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


# pip's build backend runs this file as __main__; tests import it to check the CUDA decisions.
if __name__ == "__main__":
    setup(
        ext_modules=[CMakeExtension("monet_fast._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
