"""`make gpu-check` on a CPU: the target table's logic and the driver's plumbing.

The GPU run itself needs a GPU; what can go wrong before it — a target read off the wrong row,
a missing number counted as PASS, a driver that crashes after the benchmarks and loses them —
is tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from monet_fast.bench.targets import FAIL, NOT_MEASURED, PASS, evaluate_targets, format_targets

ROOT = Path(__file__).resolve().parent.parent


def _reports(attn_flex=1.2, attn_sdpa=2.5, hbm=85.0, eager=4.0, plain=0.97, graphs=4.0, step=6.0):
    """Synthetic BenchReport dicts shaped as the benchmarks write them (one row per provider)."""
    return {
        "latent-attention": {
            "rows": [
                # a 2k row that misses the targets must not count: the target is at 8k
                {"config": "B1 L2048 H28/4 D128", "mode": "fwd_bwd", "provider": "monet_fast",
                 "speedup_vs_flex": 0.5, "speedup_vs_sdpa_dense": 1.0},
                {"config": "B1 L8192 H28/4 D128", "mode": "fwd", "provider": "monet_fast",
                 "speedup_vs_flex": 0.1, "speedup_vs_sdpa_dense": 0.1},
                {"config": "B1 L8192 H28/4 D128", "mode": "fwd_bwd", "provider": "monet_fast",
                 "speedup_vs_flex": attn_flex, "speedup_vs_sdpa_dense": attn_sdpa},
                {"config": "B1 L8192 H28/4 D128", "mode": "fwd_bwd", "provider": "flex",
                 "speedup_vs_flex": 1.0, "speedup_vs_sdpa_dense": 9.0},
            ]
        },
        "logprob": {
            "rows": [
                {"config": "logprob 16384x3584 bfloat16", "mode": "fwd_bwd",
                 "provider": "monet_fast", "pct_hbm": hbm, "speedup_vs_eager": eager},
                {"config": "logprob 16384x3584 bfloat16", "mode": "fwd_bwd",
                 "provider": "eager", "pct_hbm": 20.0, "speedup_vs_eager": 1.0},
            ]
        },
        "latent-decode": {
            "rows": [
                {"config": "B=1 new=128", "provider": "engine", "tokens_per_s": 100.0 * graphs},
                {"config": "B=1 new=128", "provider": "engine-eager", "tokens_per_s": 100.0},
                {"config": "B=1 new=128", "provider": "engine / engine-plain",
                 "ratio_vs_plain": plain},
                {"config": "B=8 new=128", "provider": "engine", "tokens_per_s": 800.0 * 5},
                {"config": "B=8 new=128", "provider": "engine-eager", "tokens_per_s": 800.0},
                {"config": "B=8 new=128", "provider": "engine / engine-plain",
                 "ratio_vs_plain": 0.99},
            ]
        },
        "train-step": {
            "rows": [
                {"config": "7b-width-2-layers stage2 B=8 ZeRO-2", "provider": "monet_fast",
                 "speedup": step},
                {"config": "7b-width-2-layers stage2 B=4 ZeRO-2", "provider": "monet_fast",
                 "speedup": 1.0},
            ]
        },
    }  # fmt: skip


def _status(results) -> dict[str, str]:
    return {r.target: r.status for r in results}


def test_all_targets_pass_on_good_numbers():
    results = evaluate_targets(_reports())
    assert len(results) == 5
    assert set(_status(results).values()) == {PASS}, format_targets(results)


def test_each_target_fails_on_its_own_number():
    cases = {
        "attn_flex": (0.9, "latent attention fwd+bwd at 8k"),
        "attn_sdpa": (1.9, "latent attention fwd+bwd at 8k"),
        "hbm": (79.0, "fused Gaussian log-prob fwd+bwd (16384x3584)"),
        "eager": (2.9, "fused Gaussian log-prob fwd+bwd (16384x3584)"),
        "plain": (0.94, "latent decoding vs plain decoding (graphs)"),
        "graphs": (2.5, "latent decoding: graphs vs eager"),
        "step": (4.9, "stage-2 train step at 7B width (B=8)"),
    }
    for key, (value, target) in cases.items():
        status = _status(evaluate_targets(_reports(**{key: value})))
        assert status[target] == FAIL, (key, status)
        assert sum(s == FAIL for s in status.values()) == 1, (key, status)


def test_missing_numbers_are_not_measured_never_pass():
    reports = _reports()
    reports["logprob"] = {"rows": [], "skipped": "needs a CUDA GPU"}
    del reports["train-step"]
    results = {r.target: r for r in evaluate_targets(reports)}
    lp = results["fused Gaussian log-prob fwd+bwd (16384x3584)"]
    assert lp.status == NOT_MEASURED and "needs a CUDA GPU" in lp.detail
    ts = results["stage-2 train step at 7B width (B=8)"]
    assert ts.status == NOT_MEASURED and "did not run" in ts.detail
    # a row without the compared column is not measured either
    reports = _reports()
    del reports["latent-attention"]["rows"][2]["speedup_vs_flex"]
    status = _status(evaluate_targets(reports))
    assert status["latent attention fwd+bwd at 8k"] == NOT_MEASURED


def _driver(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **__import__("os").environ,
            "OUT": str(tmp_path / "out"),
            "CUDA_VISIBLE_DEVICES": "",
        },
    )


def test_driver_refuses_without_gpu(tmp_path):
    (tmp_path / "out").mkdir()
    proc = _driver(tmp_path, "--results-dir", str(tmp_path / "results"))
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr


@pytest.mark.slow
def test_driver_plumbing_on_cpu(tmp_path):
    """The whole pipeline minus build and GPU tests: one benchmark, results and target table."""
    (tmp_path / "out").mkdir()
    results = tmp_path / "results"
    proc = _driver(
        tmp_path, "--allow-cpu", "--skip-build", "--skip-tests", "--bench", "logprob",
        "--results-dir", str(results),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (results / "cpu_plumbing_check.md").read_text()
    payload = json.loads((results / "cpu_plumbing_check.json").read_text())
    assert "| fused Gaussian log-prob fwd+bwd (16384x3584) | logprob | - |" in md
    assert payload["reports"]["logprob"]["skipped"].startswith("needs a CUDA GPU")
    assert {t["status"] for t in payload["targets"]} == {NOT_MEASURED}
    assert payload["facts"]["torch"]
    # copied to $OUT, where the device tool picks results up
    assert (tmp_path / "out" / "cpu_plumbing_check.md").read_text() == md
    assert "NOT MEASURED" in proc.stdout
