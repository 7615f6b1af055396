"""The evaluation report: `report.json`, `report.md` and PNG plots in one output directory.

`build_report` turns scored items (and optionally latent traces) per intervention into one
JSON-friendly dict; `write_report` writes it:

* `report.json` -- the dict itself, written atomically (temp file + rename), NaN as null;
* `report.md` -- intervention | accuracy | 95% CI | Δ vs none | Δ 95% CI | n, then per-category
  accuracy and the collapse metrics per intervention;
* `accuracy_by_intervention.png` -- accuracy bars with their bootstrap CIs;
* `latent_cosine_heatmap.png` -- cosine matrix of the first mean-centred latents (sample blocks
  outlined), or a panel saying no latent traces were recorded;
* `trigger_rate.png` -- per intervention, the fraction of answers that opened a latent block and
  the accuracy of the fired / not-fired answers, with CIs (`monet_fast.eval.plots`).

Plots use matplotlib's object API with the Agg canvas (no pyplot, so no global backend switch in
the caller's process). matplotlib is an optional dependency (`pip install monet_fast[plots]`):
without it the PNGs are skipped with a warning and the JSON/markdown are still written.

Report schema (`format` = "monet_fast.eval.report/1")::

    {"format", "meta": {...}, "baseline": "none", "alpha", "n_boot", "seed",
     "interventions": {name: {"accuracy", "ci": [lo, hi], "n", "correct",
                              "delta_vs_baseline", "delta_ci": [lo, hi], "n_paired",
                              "by_category": {cat: {"n", "correct", "accuracy"}},
                              "judge": {"asked", "correct", "errors"} | null,
                              "judge_failures": int,  # items whose judge failed (scored wrong)
                              "collapse": {...collapse_metrics...} | null}},
     "judge_failures": int,  # summed over interventions
     "categories": [...], "heatmap": {"intervention", "labels": [[sample, step]], "matrix"} | null}

A judge failure on an item keeps the rule verdict (wrong: the judge is asked only about
rule-wrong items), so it stays in `n` and in the accuracy; `judge_failures` says how many.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monet_fast._io import atomic_write_bytes
from monet_fast._optional import available, missing_message
from monet_fast.eval.collapse import TraceLike, collapse_metrics, cosine_matrix
from monet_fast.eval.interventions import INTERVENTIONS
from monet_fast.eval.plots import _num, plot_accuracy, plot_heatmap, plot_trigger
from monet_fast.eval.scoring import accuracy_by_category
from monet_fast.eval.stats import bootstrap_ci, paired_bootstrap_delta
from monet_fast.tasks.scoring import ScoredItem

REPORT_FORMAT = "monet_fast.eval.report/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ACCURACY_PNG = "accuracy_by_intervention.png"
HEATMAP_PNG = "latent_cosine_heatmap.png"
TRIGGER_PNG = "trigger_rate.png"


def _get(item: ScoredItem | Mapping[str, Any], name: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


def _ordered(names: Sequence[str]) -> list[str]:
    known = [n for n in INTERVENTIONS if n in names]
    return known + sorted(n for n in names if n not in INTERVENTIONS)


def build_report(
    items: Mapping[str, Sequence[ScoredItem | Mapping[str, Any]]],
    traces: Mapping[str, Sequence[TraceLike]] | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    baseline: str = "none",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    heatmap_latents: int = 128,
    heatmap_intervention: str | None = None,
    fired: Mapping[str, Sequence[bool]] | None = None,
    embedding_norm: float | None = None,
) -> dict[str, Any]:
    """Accuracy with bootstrap CIs, paired Δ vs `baseline`, per-category accuracy and collapse
    metrics for every intervention run.

    Args:
        items: intervention name -> scored items (`ScoredItem` or dicts with sample_id, correct,
            category; judge optional).
        traces: intervention name -> latent traces of that run, one per sample (optional).
        meta: free-form run description (model, bench, latent size, limit, ...), copied as is.
        baseline: the run every Δ is measured against; Δs are None without it. Items are paired
            by sample_id; `n_paired` says how many were common.
        heatmap_intervention: whose traces the heatmap shows (default: the baseline's if
            recorded, else the first run with traces). The heatmap is of mean-centred latents.
        fired: intervention name -> per item (same order as `items`), whether the answer
            opened a latent block; adds each run's `trigger` (rate and accuracy split).
        embedding_norm: mean input-embedding row norm; adds latent/embedding norm ratios to
            the collapse metrics.
    """
    traces = traces or {}
    names = _ordered(list(items))
    base_items = items.get(baseline)
    base_by_id = (
        {str(_get(i, "sample_id")): bool(_get(i, "correct")) for i in base_items}
        if base_items is not None
        else None
    )
    runs: dict[str, Any] = {}
    categories: set[str] = set()
    for name in names:
        run_items = list(items[name])
        correct = np.array([bool(_get(i, "correct")) for i in run_items], dtype=np.float64)
        accuracy, ci = bootstrap_ci(correct, n_boot=n_boot, alpha=alpha, seed=seed)
        groups = accuracy_by_category(
            {"category": _get(i, "category"), "correct": _get(i, "correct")} for i in run_items
        )
        categories.update(groups["by_category"])
        delta = delta_ci = None
        n_paired = 0
        if base_by_id is not None:
            pairs = [
                (base_by_id[sid], bool(_get(i, "correct")))
                for i in run_items
                if (sid := str(_get(i, "sample_id"))) in base_by_id
            ]
            n_paired = len(pairs)
            if pairs:
                a, b = np.array(pairs, dtype=np.float64).T
                d, (lo, hi) = paired_bootstrap_delta(a, b, n_boot=n_boot, alpha=alpha, seed=seed)
                delta, delta_ci = d, [lo, hi]
        judged = [_get(i, "judge") for i in run_items if _get(i, "judge") is not None]
        run_traces = traces.get(name)
        runs[name] = {
            "accuracy": accuracy,
            "ci": list(ci),
            "n": len(run_items),
            "correct": int(correct.sum()),
            "delta_vs_baseline": delta,
            "delta_ci": delta_ci,
            "n_paired": n_paired,
            "by_category": groups["by_category"],
            "judge": (
                {
                    "asked": len(judged),
                    "correct": judged.count("correct"),
                    "errors": judged.count("error"),
                }
                if judged
                else None
            ),
            "judge_failures": judged.count("error"),
            "collapse": (
                collapse_metrics(run_traces, embedding_norm) if run_traces is not None else None
            ),
            "trigger": (
                trigger_stats(run_items, fired[name], n_boot=n_boot, alpha=alpha, seed=seed)
                if fired is not None and name in fired
                else None
            ),
        }

    heatmap = None
    with_traces = [n for n in names if n in traces and traces[n] is not None]
    chosen = heatmap_intervention or (baseline if baseline in with_traces else None)
    chosen = chosen or (with_traces[0] if with_traces else None)
    if chosen is not None:
        if chosen not in traces:
            raise ValueError(f"heatmap_intervention {chosen!r} has no traces; have {with_traces}")
        matrix, labels = cosine_matrix(traces[chosen], max_latents=heatmap_latents, centred=True)
        if labels:
            heatmap = {
                "intervention": chosen,
                "centred": True,
                "labels": [list(x) for x in labels],
                # 4 decimals: plenty for a picture, and keeps report.json small.
                "matrix": np.round(matrix, 4).tolist(),
            }
    return {
        "format": REPORT_FORMAT,
        "meta": dict(meta or {}),
        "baseline": baseline,
        "alpha": alpha,
        "n_boot": n_boot,
        "seed": seed,
        "interventions": runs,
        "judge_failures": sum(r["judge_failures"] for r in runs.values()),
        "categories": sorted(categories),
        "heatmap": heatmap,
        "trigger_rate": ((runs.get(baseline) or {}).get("trigger") or {}).get("rate"),
    }


def trigger_stats(
    items: Sequence[ScoredItem | Mapping[str, Any]],
    fired: Sequence[bool],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Trigger rate (fraction of items whose answer opened a latent block) with its bootstrap
    CI, and accuracy with CI on the fired and the not-fired items separately (NaN when a group
    is empty)."""
    if len(fired) != len(items):
        raise ValueError(f"fired has {len(fired)} entries for {len(items)} items")
    flags = np.array([bool(f) for f in fired], dtype=bool)
    correct = np.array([bool(_get(i, "correct")) for i in items], dtype=np.float64)
    rate, rate_ci = bootstrap_ci(flags.astype(np.float64), n_boot=n_boot, alpha=alpha, seed=seed)
    acc_f, ci_f = bootstrap_ci(correct[flags], n_boot=n_boot, alpha=alpha, seed=seed)
    acc_n, ci_n = bootstrap_ci(correct[~flags], n_boot=n_boot, alpha=alpha, seed=seed)
    return {
        "rate": rate,
        "ci": list(rate_ci),
        "n_fired": int(flags.sum()),
        "n_not_fired": int((~flags).sum()),
        "accuracy_fired": acc_f,
        "ci_fired": list(ci_f),
        "accuracy_not_fired": acc_n,
        "ci_not_fired": list(ci_n),
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """`value` with NaN/inf -> None, numpy scalars/arrays and tuples -> Python, Paths -> str
    (what strict JSON readers accept)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _pp(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}"


def _interval(ci: Sequence[float | None] | None, signed: bool = False) -> str:
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return "—"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"[{fmt.format(100 * ci[0])}, {fmt.format(100 * ci[1])}]"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The markdown summary of a `build_report` dict."""
    meta = report.get("meta", {})
    runs: Mapping[str, Any] = report["interventions"]
    baseline = report.get("baseline", "none")
    level = round(100 * (1 - report.get("alpha", 0.05)))
    title = " — ".join(str(meta[k]) for k in ("bench", "model") if meta.get(k))
    lines = [f"# Evaluation report{': ' + title if title else ''}", ""]
    if meta:
        lines += [", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    lines += [
        f"| intervention | accuracy | {level}% CI | Δ vs {baseline} (pp) | Δ {level}% CI | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {_pct(run['accuracy'])} | {_interval(run['ci'])} | "
            f"{_pp(run['delta_vs_baseline']) if name != baseline else '—'} | "
            f"{_interval(run['delta_ci'], signed=True) if name != baseline else '—'} | {run['n']} |"
        )
    lines += [
        "",
        f"Δ: accuracy minus {baseline}'s on the same items (paired bootstrap, "
        f"{report.get('n_boot')} resamples). `mask` hides latent slots from later tokens; "
        "`no-latent` closes every latent block at once.",
    ]
    judged = {n: r["judge"] for n, r in runs.items() if r.get("judge")}
    if judged:
        lines += ["", "LLM judge (asked only where the rules said wrong):", ""]
        lines += [
            f"- {n}: asked {j['asked']}, judged correct {j['correct']}, errors {j['errors']}"
            for n, j in judged.items()
        ]
        if report.get("judge_failures"):
            lines += [
                "",
                f"Judge failures: {report['judge_failures']} item(s) kept their rule verdict "
                "(wrong) and stay in the accuracy; see the log for sample ids and errors.",
            ]

    triggered = {n: r["trigger"] for n, r in runs.items() if r.get("trigger")}
    if triggered:
        lines += [
            "",
            f"## Latent mode: {meta.get('latent_mode', 'auto')}",
            "",
            f"| intervention | trigger rate | {level}% CI | accuracy fired (n) | "
            "accuracy not fired (n) |",
            "|---|---|---|---|---|",
        ]
        for name, t in triggered.items():
            lines.append(
                f"| {name} | {_pct(t['rate'])} | {_interval(t['ci'])} | "
                f"{_pct(t['accuracy_fired'])} {_interval(t['ci_fired'])} ({t['n_fired']}) | "
                f"{_pct(t['accuracy_not_fired'])} {_interval(t['ci_not_fired'])} "
                f"({t['n_not_fired']}) |"
            )
        lines += [
            "",
            "Trigger rate: fraction of answers that opened a latent block (`auto`: the model "
            "decides; `off`: never; `force`: every answer starts with one).",
        ]

    categories = report.get("categories") or []
    if categories:
        lines += ["", "## Accuracy by category", ""]
        lines += ["| category | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
        for cat in categories:
            cells = []
            for run in runs.values():
                entry = run["by_category"].get(cat)
                cells.append(f"{_pct(entry['accuracy'])} ({entry['n']})" if entry else "—")
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")

    collapsed = {n: r["collapse"] for n, r in runs.items() if r.get("collapse")}
    if collapsed:
        lines += [
            "",
            "## Latent collapse",
            "",
            "| intervention | cos within | cos across (same step) | cos across (all) | "
            "effective rank | centred: cos within | cos across (same step) | effective rank | "
            "norm mean ± std | norm / embedding norm | latents |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in collapsed.items():
            rank = f"{_num(c['effective_rank'], 2)} / {c['effective_rank_max']}"
            norm = f"{_num(c['norm_mean'], 2)} ± {_num(c['norm_std'], 2)}"
            cc = c.get("centred") or {}
            lines.append(
                f"| {name} | {_num(c['mean_cos_within'])} | {_num(c['mean_cos_across_same_step'])}"
                f" | {_num(c['mean_cos_across_all'])} | {rank} | {_num(cc.get('mean_cos_within'))}"
                f" | {_num(cc.get('mean_cos_across_same_step'))} | "
                f"{_num(cc.get('effective_rank'), 2)} | {norm} | {_num(c.get('norm_ratio'), 2)} | "
                f"{c['n_latents']} |"
            )
        first = next(iter(collapsed))
        steps = collapsed[first]["norm_per_step"]
        if steps:
            lines += ["", f"Latent L2 norm per step ({first}, mean ± std): "]
            lines[-1] += ", ".join(
                f"{s['step']}: {_num(s['mean'], 1)} ± {_num(s['std'], 1)} (n={s['n']}"
                + (f", ×{_num(s['ratio'], 2)} the embedding norm" if "ratio" in s else "")
                + ")"
                for s in steps
            )
        lines += [
            "",
            "Centred: the same statistics after subtracting the run's mean latent (the raw cosine "
            "is dominated by one direction all hidden states share). Embedding norm: mean L2 "
            "norm of the input-embedding rows.",
            "",
            "Cosines: mean over pairs of latents of one sample (within) or of different samples "
            "(across); effective rank: Roy & Vetterli 2007 over all latents, out of min(N, H).",
        ]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots into `out_dir` (created if needed).

    Returns {"json", "markdown", "accuracy_plot", "heatmap_plot", "trigger_plot"} -> paths
    written (the plots are absent when matplotlib is not installed; the trigger plot when no run
    recorded which answers opened a latent block).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(report)
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD}
    text = json.dumps(clean, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    atomic_write_bytes(paths["json"], text.encode("utf-8"))
    atomic_write_bytes(paths["markdown"], render_markdown(clean).encode("utf-8"))
    if not available("matplotlib"):  # optional: the report stays useful without plots
        warnings.warn(
            missing_message("matplotlib", "plotting") + " (no PNG plots written)", stacklevel=2
        )
        return paths
    paths["accuracy_plot"] = out / ACCURACY_PNG
    paths["heatmap_plot"] = out / HEATMAP_PNG
    atomic_write_bytes(paths["accuracy_plot"], plot_accuracy(clean))
    atomic_write_bytes(paths["heatmap_plot"], plot_heatmap(clean))
    if any(run.get("trigger") for run in clean["interventions"].values()):
        paths["trigger_plot"] = out / TRIGGER_PNG
        atomic_write_bytes(paths["trigger_plot"], plot_trigger(clean))
    return paths


__all__ = [
    "ACCURACY_PNG",
    "HEATMAP_PNG",
    "REPORT_FORMAT",
    "TRIGGER_PNG",
    "REPORT_JSON",
    "REPORT_MD",
    "build_report",
    "plot_accuracy",
    "plot_heatmap",
    "render_markdown",
    "to_jsonable",
    "trigger_stats",
    "write_report",
]
