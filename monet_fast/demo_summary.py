"""The demo's summary: `DemoReport` (written to `<out>/report.json`) and its printed tables.

Built from the eval reports the demo writes (`monet_fast.eval.report` format): accuracy of each
stage with its 95 % bootstrap CI; for the final model every latent intervention's paired Δ vs
`none` with its CI; trigger rate and accuracy split fired / not fired; latent collapse raw and
mean-centred; the latent / embedding norm ratio per latent step; and two paired model
comparisons on the same held-out items: VLPO − stage 3 and feedback_norm on − off.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monet_fast.eval.stats import paired_bootstrap_delta


@dataclass
class DemoReport:
    task: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    interventions: dict = field(default_factory=dict)
    collapse: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    comparisons: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def paired_models(report_a: dict, report_b: dict, seed: int = 0) -> dict[str, Any]:
    """Δ accuracy (b − a) of two models' `none` runs on the same items (paired by sample_id),
    with its 95 % paired-bootstrap CI."""
    a = {p["sample_id"]: bool(p["correct"]) for p in report_a["predictions"]["none"]}
    b = {p["sample_id"]: bool(p["correct"]) for p in report_b["predictions"]["none"]}
    common = [sid for sid in a if sid in b]
    if not common:
        return {"delta": None, "ci": None, "n": 0}
    xa = np.array([a[s] for s in common], dtype=np.float64)
    xb = np.array([b[s] for s in common], dtype=np.float64)
    delta, (lo, hi) = paired_bootstrap_delta(xa, xb, seed=seed)
    return {
        "accuracy_a": float(xa.mean()),
        "accuracy_b": float(xb.mean()),
        "delta": delta,
        "ci": [lo, hi],
        "n": len(common),
    }


def intervention_table(eval_report: dict) -> dict[str, dict]:
    """name -> {accuracy, ci, delta, delta_ci} (skipped interventions say why)."""
    runs = eval_report["interventions"]
    table = {
        name: {
            "accuracy": run["accuracy"],
            "ci": run.get("ci"),
            "delta": run.get("delta_vs_baseline") if name != "none" else 0.0,
            "delta_ci": run.get("delta_ci") if name != "none" else None,
        }
        for name, run in runs.items()
    }
    for name, why in eval_report.get("skipped_interventions", {}).items():
        table[name] = {
            "accuracy": None,
            "ci": None,
            "delta": None,
            "delta_ci": None,
            "skipped": why,
        }
    return table


def latent_diagnostics(eval_report: dict) -> dict[str, Any]:
    """Trigger statistics, raw and centred collapse, norm ratios of the `none` run."""
    none = eval_report["interventions"]["none"]
    c = none.get("collapse") or {}
    centred = c.get("centred") or {}
    return {
        "latent_mode": eval_report.get("meta", {}).get("latent_mode", "auto"),
        "feedback_norm": eval_report.get("meta", {}).get("feedback_norm"),
        "trigger": none.get("trigger"),
        "collapse": {
            "mean_cos_across_same_step": c.get("mean_cos_across_same_step"),
            "centred_mean_cos_across_same_step": centred.get("mean_cos_across_same_step"),
            "centred_mean_cos_within": centred.get("mean_cos_within"),
            "effective_rank": c.get("effective_rank"),
            "centred_effective_rank": centred.get("effective_rank"),
            "n_latents": c.get("n_latents"),
        },
        "embedding_norm": c.get("embedding_norm"),
        "norm_ratio_per_step": [s.get("ratio") for s in c.get("norm_per_step") or []],
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(ci: list | None, signed: bool = False) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"[{fmt.format(100 * ci[0])}, {fmt.format(100 * ci[1])}]"


def _pp(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f} pp"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _intervention_lines(table: dict[str, dict]) -> list[str]:
    lines = [
        "| intervention | accuracy | 95% CI | Δ vs none | 95% CI of Δ |",
        "|---|---|---|---|---|",
    ]
    for name, run in table.items():
        if run.get("skipped"):
            lines.append(f"| {name} | skipped: {run['skipped']} | - | - | - |")
            continue
        delta = "-" if name == "none" else _pp(run["delta"])
        lines.append(
            f"| {name} | {_pct(run['accuracy'])} | {_ci(run['ci'])} | {delta} | "
            f"{_ci(run['delta_ci'], signed=True)} |"
        )
    return lines


def format_summary(report: DemoReport) -> str:
    t = report.task
    lines = [
        "",
        f"monet_fast demo — synthetic task, {t['n_choices']} choices (chance {_pct(t['chance'])}), "
        f"{t['n_eval']} held-out samples, K={t['latent_size']}, "
        f"feedback_norm={t.get('feedback_norm', 'none')}",
        "",
        "| stage | feedback_norm | steps | final loss | held-out accuracy | 95% CI | trigger rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report.stages:
        loss = "-" if s.get("final_loss") is None else f"{s['final_loss']:.3f}"
        lines.append(
            f"| {s['name']} | {s.get('feedback_norm') or '-'} | {s['steps']} | {loss} | "
            f"{_pct(s['accuracy'])} | {_ci(s.get('ci'))} "
            f"| {_pct(s.get('trigger_rate'))} |"
        )
    lines += ["", f"Latent interventions on the final model ({t.get('final', 'vlpo')}):", ""]
    lines += _intervention_lines(report.interventions)
    for key, title in (
        ("vlpo_vs_stage3", "VLPO − stage 3"),
        ("feedback_norm", "feedback_norm match_embeddings − none (stage 3)"),
    ):
        cmp = report.comparisons.get(key)
        if cmp:
            lines.append(
                f"\n{title}: {_pct(cmp.get('accuracy_b'))} vs {_pct(cmp.get('accuracy_a'))}, "
                f"Δ {_pp(cmp['delta'])}, 95% CI {_ci(cmp['ci'], signed=True)} pp (n={cmp['n']})"
            )
    alt = report.comparisons.get("feedback_norm_interventions")
    if alt:
        lines += [
            "",
            f"Interventions on the stage-3 model with the other feedback_norm ({alt['mode']}):",
            "",
        ]
        lines += _intervention_lines(alt["table"])
    d = report.diagnostics
    trig = d.get("trigger") or {}
    c = d.get("collapse") or {}
    ratios = ", ".join(_num(r, 2) for r in d.get("norm_ratio_per_step") or [])
    lines += [
        "",
        f"trigger rate ({d.get('latent_mode', 'auto')}): {_pct(trig.get('rate'))} "
        f"{_ci(trig.get('ci'))}; accuracy fired {_pct(trig.get('accuracy_fired'))} "
        f"(n={trig.get('n_fired')}), not fired {_pct(trig.get('accuracy_not_fired'))} "
        f"(n={trig.get('n_not_fired')})",
        f"latent collapse: cosine across samples (same step) raw {_num(c.get('mean_cos_across_same_step'))}, "
        f"mean-centred {_num(c.get('centred_mean_cos_across_same_step'))}; effective rank raw "
        f"{_num(c.get('effective_rank'), 2)}, centred {_num(c.get('centred_effective_rank'), 2)} "
        f"over {c.get('n_latents')} latents",
        f"latent norm / embedding norm ({_num(d.get('embedding_norm'), 3)}) per step: {ratios or 'n/a'}",
    ]
    return "\n".join(lines)


def format_command(argv: list[str]) -> str:
    """`monet-fast ARGV` as one shell command (the prompt's newlines stay inside its quotes)."""
    return " ".join(["monet-fast", *(shlex.quote(a) for a in argv)])


__all__ = [
    "DemoReport",
    "format_command",
    "format_summary",
    "intervention_table",
    "latent_diagnostics",
    "paired_models",
    "read_report",
]
