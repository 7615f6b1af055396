"""The compiled extension, its version guard and `monet-fast env`."""

import json
import subprocess
import sys

import pytest
import torch

import monet_fast
from monet_fast._ext import ExtensionMismatchError, check_build_info
from monet_fast.cli import main


def test_build_info_reports_build_facts():
    info = monet_fast._C.build_info()
    assert set(info) >= {"compiler", "torch_version", "cuda", "cuda_archs"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cuda"] == (torch.version.cuda is not None) or not info["cuda"]


def test_mismatched_torch_says_rebuild():
    with pytest.raises(ExtensionMismatchError, match="rebuild"):
        check_build_info({"torch_version": "1.0.0"}, torch_version="2.13.0+cpu")
    check_build_info({"torch_version": "2.13.0"}, torch_version="2.13.0+cpu")


def test_import_with_stale_extension_fails_with_rebuild_message(tmp_path):
    # A fake package whose _C claims another torch: importing it must say "rebuild".
    pkg = tmp_path / "monet_fast"
    pkg.mkdir()
    src = monet_fast.__file__
    (pkg / "__init__.py").write_text(open(src).read())
    (pkg / "_ext.py").write_text(open(src.replace("__init__.py", "_ext.py")).read())
    (pkg / "_C.py").write_text("def build_info():\n    return {'torch_version': '0.0.1'}\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import monet_fast"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "built against torch 0.0.1" in proc.stderr and "rebuild" in proc.stderr


def test_env_command_prints_versions(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["extension"]["torch_version"] == monet_fast._C.build_info()["torch_version"]
    for key in ("triton", "transformers", "deepspeed", "gpus"):
        assert key in info
    assert main(["env"]) == 0
    assert "transformers:" in capsys.readouterr().out


def test_bench_unknown_name_is_a_clear_error(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
