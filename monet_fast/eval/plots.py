"""PNG plots of an evaluation report (a `build_report` dict), read at a glance.

* `plot_accuracy` -- accuracy per intervention with its bootstrap CI, Δ vs the baseline above
  each bar;
* `plot_heatmap` -- cosine matrix of the first mean-centred latents (sample blocks outlined);
* `plot_trigger` -- per intervention, the fraction of answers that opened a latent block, and
  the accuracy of fired / not-fired answers, all with CIs.

matplotlib's object API with the Agg canvas (no pyplot: no global backend switch in the
caller's process); matplotlib is optional (`pip install monet_fast[plots]`), imported lazily.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from monet_fast._optional import require


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _figure_png(fig: Any) -> bytes:
    require("matplotlib.backends.backend_agg", "plotting").FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def plot_accuracy(report: Mapping[str, Any]) -> bytes:
    """PNG bytes: accuracy per intervention (%) with CI error bars, baseline as a dashed line."""
    Figure = require("matplotlib.figure", "plotting").Figure

    runs = report["interventions"]
    names = list(runs)
    acc = np.array([_nan(runs[n]["accuracy"]) for n in names]) * 100
    lo = np.array([_nan((runs[n]["ci"] or [None])[0]) for n in names]) * 100
    hi = np.array([_nan((runs[n]["ci"] or [None, None])[1]) for n in names]) * 100
    err = np.nan_to_num(np.stack([acc - lo, hi - acc]), nan=0.0).clip(min=0)
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6))
    ax = fig.add_subplot()
    baseline = report.get("baseline", "none")
    colors = ["#4c72b0" if n == baseline else "#dd8452" for n in names]
    ax.bar(names, np.nan_to_num(acc), yerr=err, capsize=4, color=colors)
    if baseline in runs and math.isfinite(_nan(runs[baseline]["accuracy"])):
        ax.axhline(100 * runs[baseline]["accuracy"], color="#4c72b0", ls="--", lw=1)
    for x, name in enumerate(names):
        delta = runs[name].get("delta_vs_baseline")
        if name != baseline and delta is not None and math.isfinite(delta):
            ax.annotate(f"{100 * delta:+.1f}", (x, 1), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    level = round(100 * (1 - report.get("alpha", 0.05)))
    meta = report.get("meta", {})
    ax.set_title(f"{meta.get('bench', '')} accuracy by latent intervention ({level}% CI)".strip())
    ax.tick_params(axis="x", labelrotation=20)
    return _figure_png(fig)


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def plot_heatmap(report: Mapping[str, Any]) -> bytes:
    """PNG bytes: the heatmap's cosine matrix with sample boundaries, or a 'no traces' panel."""
    Figure = require("matplotlib.figure", "plotting").Figure

    heatmap = report.get("heatmap")
    fig = Figure(figsize=(5.6, 4.8))
    ax = fig.add_subplot()
    if not heatmap or not heatmap.get("matrix"):
        ax.axis("off")
        ax.text(0.5, 0.5, "no latent traces recorded", ha="center", va="center")
        return _figure_png(fig)
    matrix = np.array(
        [[math.nan if v is None else v for v in row] for row in heatmap["matrix"]], dtype=float
    )
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine")
    samples = [label[0] for label in heatmap["labels"]]
    for i in range(1, len(samples)):
        if samples[i] != samples[i - 1]:  # outline sample blocks: within vs across at a glance
            ax.axhline(i - 0.5, color="k", lw=0.4)
            ax.axvline(i - 0.5, color="k", lw=0.4)
    name = heatmap.get("intervention", "")
    collapse = (report["interventions"].get(name) or {}).get("collapse") or {}
    centred = collapse.get("centred") or {}
    what = "mean-centred " if heatmap.get("centred") else ""
    ax.set_title(
        f"{what}latent cosine ({name}): within {_num(centred.get('mean_cos_within'), 2)}, "
        f"across {_num(centred.get('mean_cos_across_same_step'), 2)} "
        f"(raw: {_num(collapse.get('mean_cos_across_same_step'), 2)})",
        fontsize=9,
    )
    ax.set_xlabel(f"latent (sample-major, {len(set(samples))} samples)")
    ax.set_ylabel("latent")
    return _figure_png(fig)


def _bars(ax, x, values, cis, width, label, color) -> None:
    vals = np.array([_nan(v) for v in values]) * 100
    lo = np.array([_nan((c or [None])[0]) for c in cis]) * 100
    hi = np.array([_nan((c or [None, None])[1]) for c in cis]) * 100
    err = np.nan_to_num(np.stack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
    ax.bar(x, np.nan_to_num(vals), width, yerr=err, capsize=3, label=label, color=color)


def plot_trigger(report: Mapping[str, Any]) -> bytes:
    """PNG bytes: trigger rate and accuracy of fired / not-fired answers per intervention (%)."""
    Figure = require("matplotlib.figure", "plotting").Figure

    runs = {n: r for n, r in report["interventions"].items() if r.get("trigger")}
    names = list(runs)
    trig = [runs[n]["trigger"] for n in names]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(4.5, 1.3 * len(names) + 1.5), 3.6))
    ax = fig.add_subplot()
    w = 0.27
    _bars(
        ax, x - w, [t["rate"] for t in trig], [t["ci"] for t in trig], w, "trigger rate", "#4c72b0"
    )
    _bars(
        ax,
        x,
        [t["accuracy_fired"] for t in trig],
        [t["ci_fired"] for t in trig],
        w,
        "accuracy, fired",
        "#55a868",
    )
    _bars(
        ax,
        x + w,
        [t["accuracy_not_fired"] for t in trig],
        [t["ci_not_fired"] for t in trig],
        w,
        "accuracy, not fired",
        "#c44e52",
    )
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    level = round(100 * (1 - report.get("alpha", 0.05)))
    mode = report.get("meta", {}).get("latent_mode", "auto")
    ax.set_title(f"latent blocks opened (mode {mode}) and accuracy split ({level}% CI)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    return _figure_png(fig)


__all__ = ["plot_accuracy", "plot_heatmap", "plot_trigger"]
