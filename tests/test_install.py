"""Install and import hygiene: the core install (no extras) works, optional dependencies are
imported lazily and a missing one stops with one line naming the extra; constraints follow torch.

The "core install" is emulated in subprocesses of this interpreter whose path finder hides the
optional packages (as if not installed: `find_spec` gives None, imports raise
ModuleNotFoundError). `make install-check` does the real thing in a fresh venv.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from monet_fast import _optional
from monet_fast._optional import MissingDependencyError, require

ROOT = Path(__file__).resolve().parent.parent
# Hidden for the core-install checks: the extras, and psutil (core, but only the CPU memory
# probe of `bench latent-forward` may need it).
EXTRAS = ["deepspeed", "matplotlib", "psutil"]

# sitecustomize for the subprocesses: wraps the sys.path finder so the packages named in
# MONET_FAST_HIDE are not found.
HIDER = """
import os, sys
from importlib.machinery import PathFinder

HIDDEN = set(filter(None, os.environ.get("MONET_FAST_HIDE", "").split(",")))


class HidingPathFinder(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
"""


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_hidden(
    tmp_path: Path, hidden: list[str], code: str, *args: str
) -> subprocess.CompletedProcess:
    """Run `code` (or `python -m monet_fast.cli ARGS` when code is empty) with `hidden` packages
    not installed; returns the completed process (text output)."""
    (tmp_path / "sitecustomize.py").write_text(HIDER)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, MONET_FAST_HIDE=",".join(hidden))
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "monet_fast.cli", *args]
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow  # a subprocess importing torch and transformers: ~5 s of CPU
def test_readme_snippet_and_env_run_without_extras(tmp_path):
    snippet = _tool("readme_snippet").snippet("Python API", (ROOT / "README.md").read_text())
    code = snippet + textwrap.dedent(
        f"""
            import io, json, sys, contextlib
            from monet_fast.cli import main
            assert out.loss is not None and bool(out.loss.isfinite())
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main(["env", "--json"]) == 0
            print("ENV" + json.dumps(json.loads(buf.getvalue())))
            print("LOADED", [m for m in {EXTRAS!r} if m in sys.modules])
            """
    )
    proc = run_hidden(tmp_path, EXTRAS, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env_line = next(line for line in proc.stdout.splitlines() if line.startswith("ENV"))
    info = json.loads(env_line[3:])
    assert info["deepspeed"] == "not installed (pip install 'monet_fast[train]')"
    assert info["matplotlib"] == "not installed (pip install 'monet_fast[plots]')"
    assert info["triton"][0].isdigit()  # core on Linux: present
    assert {"torch_version", "cuda"} <= set(info["extension"])  # _C build facts
    assert "LOADED []" in proc.stdout


@pytest.mark.slow  # a subprocess importing torch and transformers: ~5 s of CPU
def test_model_and_cli_import_without_triton(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import torch
        from monet_fast.cli import build_parser, main

        # Every registered subcommand module imports without triton, and light: building the
        # parser (for `env`, `--help`, ...) must not import transformers either.
        build_parser()
        assert not {"triton", "transformers"} & set(sys.modules), "heavy import in the parser"
        assert main(["env"]) == 0
        from monet_fast.model import latent_forward, tiny_model
        from monet_fast.model.attention import latent_attention
        from monet_fast._optional import MissingDependencyError

        assert "triton" not in sys.modules
        q = torch.zeros(1, 1, 4, 16)
        try:
            latent_attention(q, q, q, None, 0, None, None)
        except MissingDependencyError as err:
            print("ERR", err)
        """
    )
    proc = run_hidden(tmp_path, ["triton"], code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton: not installed (pip install 'monet_fast[kernels]')" in proc.stdout
    assert "ERR triton is not installed; the 'monet_latent' attention (Triton kernels) needs " \
        "it: pip install 'monet_fast[kernels]'" in proc.stdout  # fmt: skip


@pytest.mark.slow  # a subprocess importing torch and transformers: ~5 s of CPU
def test_train_without_deepspeed_is_one_line_naming_the_extra(tmp_path):
    proc = run_hidden(
        tmp_path,
        ["deepspeed"],
        "",
        "train", "--stage", "1", "--config", str(ROOT / "configs/tiny/stage1.yaml"),
        "--output", str(tmp_path / "run"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    err_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert err_lines == [
        "monet-fast train: error: deepspeed is not installed; training needs it: "
        "pip install 'monet_fast[train]'"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# --- monet_fast._optional ----------------------------------------------------------------------


def test_require_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import raises ModuleNotFoundError
    with pytest.raises(MissingDependencyError) as info:
        require("deepspeed", "training")
    assert str(info.value) == (
        "deepspeed is not installed; training needs it: pip install 'monet_fast[train]'"
    )
    assert not _optional.available("deepspeed") and _optional.version("deepspeed") is None
    with pytest.raises(KeyError, match="not a known optional dependency"):
        require("numpy")


def test_require_keeps_a_broken_install_error(tmp_path, monkeypatch):
    # The optional package is there but one of *its* dependencies is not: not "install extra".
    (tmp_path / "fakeopt").mkdir()
    (tmp_path / "fakeopt" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_optional.OPTIONAL, "fakeopt", ("fakeopt", "train"))
    with pytest.raises(ModuleNotFoundError) as info:
        require("fakeopt")
    assert not isinstance(info.value, MissingDependencyError)
    assert info.value.name == "no_such_dependency_xyz"


def test_cli_reraises_a_missing_core_module(capsys):
    err = ModuleNotFoundError("No module named 'no_such_core_xyz'", name="no_such_core_xyz")
    with pytest.raises(ModuleNotFoundError):
        _optional.exit_missing_dependency(err, "monet-fast x")
    plain = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib.figure")
    assert _optional.exit_missing_dependency(plain, "monet-fast eval") == 2
    assert capsys.readouterr().err == (
        "monet-fast eval: error: matplotlib is not installed: pip install 'monet_fast[plots]'\n"
    )


# --- tools/constraints_for_torch.py ------------------------------------------------------------

CONSTRAINTS = "# pins\ntorch==2.13.0\ntriton==3.8.0  # CPU pairing\ntransformers==5.24.0\n"
# Excerpt of the PyPI torch==2.13.0 (CUDA 13.0 build) metadata (`pip install --dry-run --report`).
CUDA_TORCH_REQUIRES = [
    "filelock",
    'cuda-toolkit[cublas,cudart,nvrtc]==13.0.3; platform_system == "Linux"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
    'optree>=0.13.0; extra == "optree"',
]
CPU_TORCH_REQUIRES = ["filelock", "sympy>=1.13.3", "optree>=0.13.0; extra == 'optree'"]


@pytest.mark.parametrize(
    "requires, expect",
    [
        (CUDA_TORCH_REQUIRES, {"triton": "triton==3.7.1"}),
        (CPU_TORCH_REQUIRES, {}),
        (None, {}),  # no metadata requirements at all
        (["triton (==3.6.0)"], {"triton": "triton==3.6.0"}),  # old metadata form
        (["Triton==3.7.1; platform_system == 'Windows'"], {}),  # not this platform
        (["triton==3.7.1; extra == 'kernels'"], {}),
        (["triton>=3.5"], {}),  # no exact pin: keep constraints.txt's
    ],
)
def test_torch_pins(requires, expect):
    assert _tool("constraints_for_torch").torch_pins(requires) == expect


def test_effective_constraints_follow_torch():
    tool = _tool("constraints_for_torch")
    pins = {**tool.torch_pins(CUDA_TORCH_REQUIRES), "torch": "torch==2.13.0+cu130"}
    text, changes = tool.effective_constraints(CONSTRAINTS, pins)
    assert text == "# pins\ntorch==2.13.0+cu130\ntriton==3.7.1\ntransformers==5.24.0\n"
    assert changes == ["torch==2.13.0 -> torch==2.13.0+cu130", "triton==3.8.0 -> triton==3.7.1"]
    # CPU torch: triton keeps constraints.txt's pin; a pin missing there is appended.
    text, _ = tool.effective_constraints(CONSTRAINTS, {"torch": "torch==2.13.0+cpu"})
    assert "triton==3.8.0  # CPU pairing" in text.splitlines()
    text, changes = tool.effective_constraints("numpy==2\n", {"triton": "triton==3.7.1"})
    assert text == "numpy==2\ntriton==3.7.1\n" and changes == ["+ triton==3.7.1"]


def test_constraints_script_for_this_torch(tmp_path):
    out = tmp_path / "c.txt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/constraints_for_torch.py"), "-o", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.read_text().splitlines()
    assert f"torch=={torch.__version__}" in lines
    tool = _tool("constraints_for_torch")
    wanted = tool.torch_pins(importlib.metadata.requires("torch")).get("triton")
    pinned = next(line for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if line.startswith("triton=="))  # fmt: skip
    assert (wanted or pinned) in lines, proc.stderr


@pytest.mark.parametrize("package", ["monet_fast.model", "monet_fast.decode"])
def test_lazy_package_exports_resolve(package):
    # These packages import their exports on first access (so the CLI parser stays light);
    # every name in __all__ must map to a module that defines it.
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name  # noqa: B018
