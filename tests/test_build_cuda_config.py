"""setup.py's CUDA decisions: when the CUDA sources are built, for which archs, with which nvcc.

setup.py is imported as a module (its setup() call runs only as __main__); torch is faked where
the decision depends on a CUDA torch this CPU machine does not have.
"""

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("monet_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (
        "TORCH_CUDA_ARCH_LIST",
        "MONET_FAST_REQUIRE_CUDA",
        "MONET_FAST_SKIP_CUDA_BUILD",
        "CUDACXX",
        "CUDA_HOME",
        "CUDA_PATH",
    ):
        monkeypatch.delenv(name, raising=False)


def _torch(cuda: str | None, gpus: tuple = ()):
    return SimpleNamespace(
        __version__="2.13.0+cu130" if cuda else "2.13.0+cpu",
        version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(
            is_available=lambda: bool(gpus),
            device_count=lambda: len(gpus),
            get_device_capability=lambda i: gpus[i],
        ),
    )


def _toolkit(build, archs):
    tk = build.CudaToolkit.__new__(build.CudaToolkit)
    tk.nvcc, tk.root, tk.version, tk.archs = "/cuda/bin/nvcc", "/cuda", "13.0", set(archs)
    return tk


NVCC13_ARCHS = {"7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "12.0"}


def test_arch_list_keeps_semicolons_and_maps_to_cmake(build):
    assert build.parse_arch_list("8.0;9.0") == ["8.0", "9.0"]
    assert build.parse_arch_list(" 8.0, 8.6 9.0a+PTX ") == ["8.0", "8.6", "9.0a+PTX"]
    assert build.cmake_cuda_architectures(["8.0", "9.0+PTX", "9.0a"]) == [
        "80-real",
        "90",
        "90a-real",
    ]
    with pytest.raises(RuntimeError, match=r"invalid entries \['sm_80'\]"):
        build.parse_arch_list("8.0;sm_80")


def test_default_archs_are_intersected_with_nvcc(build, capsys):
    # torch's fallback list would start at compute_50, which nvcc 13 rejects.
    assert build.cuda_archs(_torch("13.0"), _toolkit(build, NVCC13_ARCHS)) == [
        "8.0",
        "8.6",
        "8.9",
        "9.0+PTX",
    ]
    assert "TORCH_CUDA_ARCH_LIST unset" in capsys.readouterr().out
    no_89 = _toolkit(build, NVCC13_ARCHS - {"8.9"})
    assert build.cuda_archs(_torch("13.0"), no_89) == ["8.0", "8.6", "9.0+PTX"]
    assert "dropped ['8.9']" in capsys.readouterr().out
    # A local Blackwell GPU joins the list (and carries the PTX).
    local = build.cuda_archs(_torch("13.0", gpus=((10, 0),)), _toolkit(build, NVCC13_ARCHS))
    assert local == ["8.0", "8.6", "8.9", "9.0", "10.0+PTX"]


def test_requested_archs_are_checked_against_nvcc(build, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert build.cuda_archs(_torch("13.0"), _toolkit(build, NVCC13_ARCHS)) == ["8.0", "9.0"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "5.0;8.0")
    with pytest.raises(RuntimeError, match=r"cannot build \['5.0'\]"):
        build.cuda_archs(_torch("13.0"), _toolkit(build, NVCC13_ARCHS))


def test_cuda_torch_without_nvcc_is_loud_or_an_error(build, monkeypatch, capsys):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    toolkit, why = build.decide_cuda(_torch("13.0"))
    assert toolkit is None and "no nvcc" in why
    assert "WITHOUT its CUDA kernels" in capsys.readouterr().err
    monkeypatch.setenv("MONET_FAST_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="MONET_FAST_REQUIRE_CUDA=1 .*no nvcc"):
        build.decide_cuda(_torch("13.0"))
    with pytest.raises(RuntimeError, match="CPU build"):
        build.decide_cuda(_torch(None))
    monkeypatch.delenv("MONET_FAST_REQUIRE_CUDA")
    assert build.decide_cuda(_torch(None)) == (None, "torch 2.13.0+cpu is a CPU build")
    assert "WITHOUT" not in capsys.readouterr().err  # a CPU torch is not a problem


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_nvcc_wrapper_resolves_to_its_toolkit(build):
    tk = build.CudaToolkit(shutil.which("nvcc"))
    # The toolkit root holds the headers, whatever directory the nvcc on PATH lives in.
    assert (Path(tk.root) / "include" / "cuda_runtime.h").exists()
    assert Path(tk.nvcc) == Path(tk.root) / "bin" / "nvcc"
    assert tk.version[0].isdigit() and {"8.0", "9.0"} <= tk.archs
