"""The GPU performance targets of DESIGN.md, read off benchmark reports as PASS / FAIL.

Each target names the benchmark report it reads, the rows it looks at and the threshold. A
target whose rows are missing (benchmark skipped, failed, timed out, or the row's provider
crashed) is `NOT MEASURED`, never PASS: `make gpu-check` must not turn an absent number into a
claim. The thresholds are the ones DESIGN.md states; they are compared with ratios measured in
the same run, never with absolute times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "NOT MEASURED"


@dataclass(frozen=True)
class TargetResult:
    """One line of the target table."""

    target: str
    benchmark: str
    measured: str  # the value(s) compared, formatted; "" when not measured
    threshold: str
    status: str  # PASS | FAIL | NOT MEASURED
    detail: str = ""


def _rows(reports: dict[str, dict], name: str) -> list[dict]:
    report = reports.get(name) or {}
    return list(report.get("rows") or [])


def _why_missing(reports: dict[str, dict], name: str) -> str:
    report = reports.get(name)
    if report is None:
        return f"benchmark {name!r} did not run"
    if report.get("skipped"):
        return f"skipped: {report['skipped']}"
    return f"no matching row in {name!r}"


def _check(
    target: str,
    benchmark: str,
    reports: dict[str, dict],
    select: Callable[[dict], bool],
    metrics: list[tuple[str, float, str]],
) -> TargetResult:
    """PASS when every (key, minimum, label) metric of the worst selected row is >= minimum."""
    rows = [r for r in _rows(reports, benchmark) if select(r)]
    threshold = ", ".join(f"{label} >= {minimum:g}" for _, minimum, label in metrics)
    if not rows:
        return TargetResult(target, benchmark, "", threshold, NOT_MEASURED, _why_missing(reports, benchmark))  # fmt: skip
    measured, ok, missing = [], True, []
    for key, minimum, label in metrics:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if not values:
            missing.append(key)
            continue
        worst = min(values)  # the target holds for every selected row, or it does not
        measured.append(f"{label} {worst:.3g}")
        ok = ok and worst >= minimum
    if missing:
        return TargetResult(target, benchmark, ", ".join(measured), threshold, NOT_MEASURED, f"columns missing: {missing}")  # fmt: skip
    configs = sorted({str(r.get("config", "")) for r in rows})
    return TargetResult(target, benchmark, ", ".join(measured), threshold, PASS if ok else FAIL, "; ".join(configs))  # fmt: skip


def _decode_vs_eager(reports: dict[str, dict]) -> TargetResult:
    """Latent decoding with CUDA graphs vs the same engine eager: tokens/s ratio per batch."""
    target, name, threshold = "latent decoding: graphs vs eager", "latent-decode", "ratio >= 3"
    by_config: dict[str, dict[str, float]] = {}
    for row in _rows(reports, name):
        if row.get("provider") in ("engine", "engine-eager") and "tokens_per_s" in row:
            by_config.setdefault(row["config"], {})[row["provider"]] = row["tokens_per_s"]
    ratios = {c: v["engine"] / v["engine-eager"] for c, v in by_config.items() if len(v) == 2}
    if not ratios:
        return TargetResult(target, name, "", threshold, NOT_MEASURED, _why_missing(reports, name))
    worst = min(ratios.values())
    detail = "; ".join(f"{c}: {r:.2f}x" for c, r in sorted(ratios.items()))
    return TargetResult(target, name, f"ratio {worst:.3g}", threshold, PASS if worst >= 3 else FAIL, detail)  # fmt: skip


def evaluate_targets(reports: dict[str, dict]) -> list[TargetResult]:
    """The target table from benchmark reports keyed by benchmark name (`BenchReport.to_dict()`)."""

    def at(config_part: str, provider: str, mode: str | None = None) -> Callable[[dict], bool]:
        def select(row: dict) -> bool:
            return (
                config_part in str(row.get("config", ""))
                and row.get("provider") == provider
                and (mode is None or row.get("mode") == mode)
            )

        return select

    return [
        _check(
            "latent attention fwd+bwd at 8k",
            "latent-attention",
            reports,
            at("L8192", "monet_fast", "fwd_bwd"),
            [("speedup_vs_flex", 1.0, "vs flex"), ("speedup_vs_sdpa_dense", 2.0, "vs dense SDPA")],
        ),
        _check(
            "fused Gaussian log-prob fwd+bwd (16384x3584)",
            "logprob",
            reports,
            at("logprob 16384x3584", "monet_fast", "fwd_bwd"),
            [("pct_hbm", 80.0, "% HBM"), ("speedup_vs_eager", 3.0, "vs eager")],
        ),
        _check(
            "latent decoding vs plain decoding (graphs)",
            "latent-decode",
            reports,
            at("B=", "engine / engine-plain"),
            [("ratio_vs_plain", 0.95, "ratio")],
        ),
        _decode_vs_eager(reports),
        _check(
            "stage-2 train step at 7B width (B=8)",
            "train-step",
            reports,
            at("7b-width-2-layers stage2 B=8", "monet_fast"),
            [("speedup", 5.0, "vs per-sample loop")],
        ),
    ]


def format_targets(results: list[TargetResult]) -> str:
    """Markdown table of the targets (printed by `make gpu-check` and committed with results)."""
    lines = [
        "| target | benchmark | measured | threshold | status | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.target} | {r.benchmark} | {r.measured or '-'} | {r.threshold} | "
            f"**{r.status}** | {r.detail} |"
        )
    return "\n".join(lines)


__all__ = ["FAIL", "NOT_MEASURED", "PASS", "TargetResult", "evaluate_targets", "format_targets"]
