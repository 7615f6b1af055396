"""Training observability: JSONL metrics, a progress bar, optional TensorBoard / wandb.

Only rank 0 writes. `metrics.jsonl` gets one JSON object per logged optimizer step (and a few
`{"event": ...}` lines: start, resume, checkpoint, export, end). After a resume, steps past the
checkpoint that the interrupted run had already logged are logged again: `read_metrics` keeps
the last line per step.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from monet_fast.train.config_schema import LoggingSection

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        cfg: LoggingSection,
        *,
        rank: int = 0,
        total_steps: int = 0,
        initial_step: int = 0,
        run_config: dict | None = None,
    ) -> None:
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self._file = None
        self._bar = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step")
        if cfg.tensorboard:
            from monet_fast._optional import require

            require("tensorboard", "logging.tensorboard: true")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if cfg.wandb_project:
            from monet_fast._optional import require

            wandb = require("wandb", "logging.wandb_project")
            self._wandb = wandb.init(
                project=cfg.wandb_project, name=cfg.wandb_name, config=run_config, resume="allow"
            )

    def event(self, name: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._write({"event": name, "time": time.time(), **fields})

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **values})
        if self._bar is not None:
            post = {"loss": f"{values.get('loss', float('nan')):.4f}"}
            if "tokens_per_s" in values:
                post["tok/s"] = f"{values['tokens_per_s']:.0f}"
            self._bar.set_postfix(post, refresh=False)
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step
            )

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Step records of a metrics.jsonl (or its run directory), last line per step, in order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "step" in rec and "event" not in rec:
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics"]
