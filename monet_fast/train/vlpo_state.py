"""VLPO run state: the resume record with the RL counters, its checkpoint loader, the metrics
logger's progress bar and the result of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monet_fast.train import checkpoint as ckpt
from monet_fast.train.metrics import MetricsLogger


@dataclass
class RLProgress(ckpt.TrainingProgress):
    """TrainingProgress plus RL counters. global_step = RL steps; global_batch_size = prompts
    per RL step; samples_seen = prompts; tokens_seen = generated tokens (latent steps included)."""

    optimizer_steps: int = 0
    skipped_steps: int = 0


def load_rl_checkpoint(engine: Any, root: str | Path, tag: str) -> RLProgress:
    """`checkpoint.load_checkpoint` with the RL counters kept (its record type is the base)."""
    path, client = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None or client is None or ckpt._CLIENT_KEY not in client:
        raise FileNotFoundError(
            f"checkpoint {Path(root) / tag} could not be loaded or carries no monet_fast "
            "progress record"
        )
    progress = RLProgress.from_state_dict(client[ckpt._CLIENT_KEY])
    progress.restore_rng()
    return progress


class RLMetricsLogger(MetricsLogger):
    """The SFT metrics logger with the progress bar showing reward, accuracy and KL."""

    def log(self, step: int, values: dict[str, Any]) -> None:
        super().log(step, values)
        if self._bar is not None:
            keys = (("reward", "reward_mean"), ("acc", "accuracy"), ("keep", "group_keep_rate"))
            post = {k: f"{values[v]:.3f}" for k, v in keys if values.get(v) is not None}
            if values.get("kl") is not None:
                post["kl"] = f"{values['kl']:.2e}"
            if values.get("skipped"):
                post["skip"] = values.get("skip_reason", "")
            self._bar.set_postfix(post, refresh=False)


@dataclass
class RLResult:
    """What a finished (or stopped) VLPO run produced."""

    output: Path
    global_step: int
    rewards: list[float] = field(default_factory=list)  # reward_mean per RL step of this run
    checkpoint: Path | None = None
    export: Path | None = None
    seconds: float = 0.0


__all__ = ["RLMetricsLogger", "RLProgress", "RLResult", "load_rl_checkpoint"]
