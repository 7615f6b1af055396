"""Shared benchmark plumbing: timing, the report record, markdown table and JSON output."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from monet_fast._io import atomic_write_text


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of `fn()` in seconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class BenchReport:
    """One benchmark run: a row per (configuration, provider) plus ratio columns.

    rows: dicts with at least "config", "provider" and "seconds"; extra metrics (GB/s,
    samples/s, speedup) as further keys. skipped: reason, when the benchmark cannot run here.
    """

    name: str
    device: str = field(default_factory=device_name)
    rows: list[dict] = field(default_factory=list)
    skipped: str | None = None
    notes: str = ""

    def add(self, **row) -> None:
        self.rows.append(row)

    def to_dict(self) -> dict:
        return asdict(self)


def matches(label: str, only: str | None) -> bool:
    """True when a case label is selected by `--only SUBSTR` (no filter selects everything)."""
    return only is None or only in label


def no_match(report: BenchReport, only: str | None, labels: list[str]) -> BenchReport:
    """Mark `report` skipped because `--only` selected none of `labels`, naming them."""
    report.skipped = f"--only {only!r} matches no case; cases here: {labels}"
    return report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_report(report: BenchReport) -> str:
    """Markdown table of the report (what `monet-fast bench` prints and results/ commits)."""
    lines = [f"### {report.name} — {report.device}", ""]
    if report.skipped:
        return "\n".join(lines + [f"skipped: {report.skipped}"])
    if report.rows:
        cols: list[str] = []
        for row in report.rows:
            cols += [c for c in row if c not in cols]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in report.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    if report.notes:
        lines += ["", report.notes]
    return "\n".join(lines)


def write_json(report: BenchReport, path: str | Path) -> None:
    """Write the report as JSON atomically."""
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2))
