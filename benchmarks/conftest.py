"""Set-up for the pytest-benchmark suites, so that `pytest benchmarks/ --benchmark-json out.json`
works from a copy of this folder against an installed monet_fast (no checkout config needed).

* Collects bench_*.py even without the repository's pyproject.toml (which lists the pattern).
* On a machine without CUDA, turns on the Triton interpreter (it must be set before any kernel
  module is imported, i.e. here) and keeps runs offline; GPU-only suites skip with a reason.
* `--bench-quick` (or MONET_BENCH_QUICK=1) runs only the smallest batch of each suite: a quick
  CPU check that everything runs (about 2 min on 2 cores instead of about 8).
"""

from __future__ import annotations

import fnmatch
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_addoption(parser):
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=os.environ.get("MONET_BENCH_QUICK", "") not in ("", "0"),
        help="run only the smallest batch size of each benchmark (also MONET_BENCH_QUICK=1)",
    )


def pytest_configure(config):
    # Outside the checkout the repository's filterwarnings does not apply; DeepSpeed's use of
    # torch.jit would print a deprecation warning per train-step case.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")


def _batch(item) -> int | None:
    """The batch size a parametrized benchmark runs (a `batch_size` parameter or a case's)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "batch_size" in params:
        return int(params["batch_size"])
    case = params.get("case")
    for name in ("batch_size", "batch"):
        if isinstance(getattr(case, name, None), int):
            return getattr(case, name)
    return None


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--bench-quick"):
        return
    smallest: dict[str, int] = {}
    for item in items:
        b = _batch(item)
        if b is not None:
            key = item.module.__name__ + "." + item.originalname
            smallest[key] = min(b, smallest.get(key, b))
    for item in items:
        b = _batch(item)
        if b is not None and b > smallest[item.module.__name__ + "." + item.originalname]:
            item.add_marker(
                pytest.mark.skip(reason=f"--bench-quick: batch {b} is not the smallest")
            )


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py where the ini (e.g. none, outside the checkout) does not list them."""
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    if any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
        return None  # the default collector takes it
    return pytest.Module.from_parent(parent, path=file_path)
