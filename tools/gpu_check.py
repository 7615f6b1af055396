#!/usr/bin/env python3
"""`make gpu-check`: the first thing a GPU machine runs — proves or disproves each GPU claim.

Steps, each timed and logged, each in its own subprocess with a time limit so that one slow or
crashing step cannot eat the others' budget (the whole check is sized for 8 minutes on one
H100/H200):

1. install what the GPU image lacks from a carried wheel folder (`make gpu-wheels` builds
   `wheelhouse/` with DeepSpeed and its pure-Python dependencies; the GPU image has no network);
2. build `monet_fast._C` against the machine's torch with its CUDA sources
   (`MONET_FAST_REQUIRE_CUDA=1`: a build without CUDA is an error, not a silent fallback),
   for the local GPU's arch only;
3. `pytest -m gpu` (compiled Triton kernels vs torch, the CUDA `_C` latent step vs torch, graph
   decoding == eager decoding, a DeepSpeed ZeRO-2 bf16 step, ...);
4. every `monet-fast bench` at the sizes listed in `BENCHES`;
5. writes `benchmarks/results/<gpu-name>.md` and `.json` (copied to `$OUT` when set, so the
   device tool brings them back) and prints the table of DESIGN.md's performance targets with
   PASS / FAIL / NOT MEASURED (`monet_fast.bench.targets`).

Exit status: 0 when the build and the GPU tests pass (missed performance targets are reported,
not failures), 1 when the build or a GPU test fails, 2 when there is no CUDA GPU (unless
`--allow-cpu`, which the CPU test suite uses to exercise the plumbing).

This file imports nothing from monet_fast until the package is built, and only the standard
library at the top, so it runs with any Python that has torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (benchmark, extra CLI args, time limit in s). Sizes: latent-attention --quick is B=1 at 2k and
# 8k (the target's 8k included); logprob --quick is the target's 16384 x 3584; latent-decode at
# its full sizes (B = 1, 8, 32, 128 new tokens); latent-forward and train-step at 7B width only
# (the target), the tiny/mid sizes are CPU-table material.
BENCHES: list[tuple[str, list[str], int]] = [
    ("latent-attention", ["--quick"], 120),
    ("logprob", ["--quick"], 90),
    ("latent-decode", [], 90),
    ("latent-forward", ["--only", "7b-width"], 90),
    ("train-step", ["--only", "7b-width-2-layers stage2 B=8"], 120),
]
TOTAL_BUDGET_S = 480


def _log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], timeout: float, env: dict | None = None, log: Path | None = None) -> dict:
    """Run `cmd`, tee its output to `log`, return rc / seconds / tail (rc 124 on time-out)."""
    t0 = time.perf_counter()
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=max(timeout, 1)
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        out += f"\n[gpu-check] timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n{out}")
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(seconds, 1), "tail": out[-3000:]}


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def slug(name: str) -> str:
    """File name for a device: 'NVIDIA H200' -> 'nvidia_h200'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def install_wheels(wheelhouse: Path, logs: Path) -> dict:
    """Install DeepSpeed from the carried wheel folder when the image lacks it."""
    try:
        import deepspeed  # noqa: F401

        return {"rc": 0, "seconds": 0.0, "tail": "deepspeed already installed"}
    except ImportError:
        pass
    if not wheelhouse.is_dir():
        return {"rc": 1, "seconds": 0.0, "tail": f"deepspeed missing and no {wheelhouse}/ (run `make gpu-wheels` here and carry it)"}  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse), "deepspeed"]  # fmt: skip
    return _run(cmd, 120, env={"DS_BUILD_OPS": "0"}, log=logs / "wheels.log")


def build(logs: Path, arch: str | None) -> dict:
    """Build _C with CUDA sources against this machine's torch, for the local arch."""
    env = {"MONET_FAST_REQUIRE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    result = _run(cmd, 300, env=env, log=logs / "build.log")
    if result["rc"] == 0:
        probe = "import json; from monet_fast import _C; print(json.dumps(_C.build_info()))"
        info = _run([sys.executable, "-c", probe], 60)
        result["build_info"] = info["tail"].strip().splitlines()[-1] if info["rc"] == 0 else None
        if info["rc"] != 0 or '"cuda": true' not in (result["build_info"] or ""):
            result["rc"] = 1
            result["tail"] += f"\n[gpu-check] _C has no CUDA kernels: {info['tail'][-500:]}"
    return result


def run_gpu_tests(logs: Path, timeout: float, env: dict) -> dict:
    junit = logs / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "--benchmark-disable", f"--junitxml={junit}", "tests"]  # fmt: skip
    result = _run(cmd, timeout, env=env, log=logs / "gpu_tests.log")
    summary = [line for line in result["tail"].splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]  # fmt: skip
    result["summary"] = summary[-1].strip("= ") if summary else "no summary (see gpu_tests.log)"
    # pytest exit 5 = nothing collected: no GPU test is a failure of this check, not a pass.
    return result


def run_bench(name: str, args: list[str], timeout: float, logs: Path, env: dict) -> dict:
    """One benchmark as a subprocess; its BenchReport dict (or a skipped report on failure)."""
    out = logs / f"bench_{slug(name)}.json"
    cmd = [sys.executable, "-m", "monet_fast.cli", "bench", name, *args, "--json", str(out)]
    result = _run(cmd, timeout, env=env, log=logs / f"bench_{slug(name)}.log")
    if result["rc"] == 0 and out.exists():
        report = json.loads(out.read_text())
    else:
        why = "timed out" if result["rc"] == 124 else f"exit {result['rc']}"
        report = {"name": name, "rows": [], "skipped": f"{why} after {result['seconds']} s: {result['tail'][-300:]}"}  # fmt: skip
    report["seconds"] = result["seconds"]
    return report


def versions() -> dict:
    facts = {"python": sys.version.split()[0]}
    for mod in ("torch", "triton", "transformers", "deepspeed"):
        try:
            facts[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - report what is missing, go on
            facts[mod] = f"missing ({type(err).__name__})"
    try:
        import torch

        facts["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            facts["capability"] = f"{major}.{minor}"
    except ImportError:
        pass
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        facts["commit"] = "unknown"
    return facts


def render_markdown(device: str, facts: dict, steps: dict, reports: dict, targets_md: str) -> str:
    from monet_fast.bench.common import format_report

    date = _dt.date.today().isoformat()
    lines = [
        f"# GPU results — {device}",
        "",
        f"Measured {date} by `make gpu-check` at commit {facts.get('commit')}: "
        + ", ".join(f"{k} {v}" for k, v in facts.items() if k != "commit"),
        "",
        "## Steps",
        "",
        "| step | exit | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, step in steps.items():
        note = step.get("summary") or step.get("build_info") or ""
        lines.append(f"| {name} | {step.get('rc')} | {step.get('seconds')} | {note} |")
    lines += ["", "## Performance targets (DESIGN.md)", "", targets_md, ""]
    for report in reports.values():
        rep = _report_obj(report)
        lines += [format_report(rep), f"\n(benchmark wall time {report.get('seconds')} s)", ""]
    return "\n".join(lines)


def _report_obj(d: dict):
    from monet_fast.bench.common import BenchReport

    return BenchReport(
        name=d.get("name", "?"),
        device=d.get("device", "?"),
        rows=d.get("rows", []),
        skipped=d.get("skipped"),
        notes=d.get("notes", ""),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--logs", default=None, help="log folder (default: $OUT/gpu-check or /tmp)")
    parser.add_argument("--wheelhouse", default=str(ROOT / "wheelhouse"))
    parser.add_argument("--skip-build", action="store_true", help="use the _C already built")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--bench", action="append", help="only these benchmarks (repeatable)")
    parser.add_argument("--allow-cpu", action="store_true", help="run the plumbing without a GPU")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S)
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    device = gpu_name()
    if device is None and not args.allow_cpu:
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check", file=sys.stderr)  # fmt: skip
        return 2
    device = device or "CPU (plumbing check, no GPU)"
    out_env = os.environ.get("OUT")
    logs = Path(args.logs or (Path(out_env) / "gpu-check" if out_env else Path("/tmp/gpu-check")))
    logs.mkdir(parents=True, exist_ok=True)
    run_env = {"DS_ACCELERATOR": "cuda" if gpu_name() else "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    if not gpu_name():
        run_env["TRITON_INTERPRET"] = "1"

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    steps: dict[str, dict] = {}
    failed = False
    if gpu_name():
        steps["wheels"] = install_wheels(Path(args.wheelhouse), logs)
        _log(f"wheels: {steps['wheels']['tail'][-200:]}")
    if not args.skip_build:
        import torch

        arch = None
        if torch.cuda.is_available():
            arch = "{}.{}".format(*torch.cuda.get_device_capability(0))
        _log(f"building _C (MONET_FAST_REQUIRE_CUDA=1, arch {arch}) ...")
        steps["build"] = build(logs, arch)
        _log(f"build: exit {steps['build']['rc']} in {steps['build']['seconds']} s")
        if steps["build"]["rc"] != 0:
            failed = True
            print(steps["build"]["tail"][-2000:], file=sys.stderr)
    if not args.skip_tests and not failed:
        _log("pytest -m gpu ...")
        steps["gpu tests"] = run_gpu_tests(logs, min(180, max(left() - 200, 60)), run_env)
        _log(f"gpu tests: {steps['gpu tests']['summary']}")
        failed = failed or steps["gpu tests"]["rc"] != 0
    reports: dict[str, dict] = {}
    if not failed or steps.get("build", {}).get("rc", 0) == 0:
        for name, bench_args, limit in BENCHES:
            if args.bench and name not in args.bench:
                continue
            if left() < 15:
                reports[name] = {"name": name, "rows": [], "skipped": "gpu-check time budget spent"}
                continue
            _log(f"bench {name} {' '.join(bench_args)} (limit {min(limit, left()):.0f} s) ...")
            reports[name] = run_bench(name, bench_args, min(limit, left()), logs, run_env)
            _log(f"bench {name}: {reports[name].get('skipped') or 'ok'} in {reports[name]['seconds']} s")  # fmt: skip

    from monet_fast.bench.targets import evaluate_targets, format_targets

    targets = evaluate_targets(reports)
    targets_md = format_targets(targets)
    facts = versions()
    markdown = render_markdown(device, facts, steps, reports, targets_md)
    payload = {
        "device": device,
        "facts": facts,
        "steps": steps,
        "reports": reports,
        "targets": [t.__dict__ for t in targets],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = slug(device) if gpu_name() else "cpu_plumbing_check"
    (results / f"{stem}.md").write_text(markdown + "\n")
    (results / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    if out_env:
        for suffix in (".md", ".json"):
            shutil.copy(results / f"{stem}{suffix}", Path(out_env) / f"{stem}{suffix}")
    print("\n" + targets_md)
    _log(f"wrote {results / stem}.md/.json in {payload['seconds']} s; exit {1 if failed else 0}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
