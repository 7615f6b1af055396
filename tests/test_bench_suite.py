"""`pytest benchmarks/ --benchmark-json out.json` works from a copy of benchmarks/ outside the
checkout (no repository pytest config, only the installed monet_fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_benchmarks_run_outside_the_checkout(tmp_path):
    suite = tmp_path / "benchmarks"
    shutil.copytree(BENCHMARKS, suite, ignore=shutil.ignore_patterns("results", "__pycache__"))
    out = tmp_path / "out.json"
    # conftest sets TRITON_INTERPRET; pytest-xdist's worker variables would make the inner
    # pytest-benchmark believe it runs under xdist and skip the timing (no JSON written).
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-rs", "-p", "no:cacheprovider",
         "--bench-quick", "-k", "test_latent_forward and stage3", f"--benchmark-json={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "--bench-quick: batch 8 is not the smallest" in run.stdout
    names = sorted(b["name"] for b in json.loads(out.read_text())["benchmarks"])
    assert names == [
        "test_latent_forward[1-stage3-batched]",
        "test_latent_forward[1-stage3-two_pass_reference]",
    ]
