"""Atomic DeepSpeed checkpoints, typed resume state, and Hugging Face export.

Layout under a run's output directory:

    checkpoints/
      step_0000004/        one DeepSpeed checkpoint (model, ZeRO optimizer shards, scheduler,
                           and our TrainingProgress as client state)
      latest               the tag of the newest complete checkpoint (one line)
    hf/                    the exported model (save_pretrained + processor + latent config)

Atomicity: DeepSpeed writes into `checkpoints/.tmp-step_N/`; after every rank is done, rank 0
renames it to `step_N/` and then replaces `latest` (temp file + os.replace). A crash at any
point leaves `latest` naming a complete checkpoint; leftover `.tmp-*` directories are removed
by the next save. (Assumes the output directory is on a filesystem all ranks share, as
DeepSpeed's default checkpointing does.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monet_fast._io import atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
EXPORT_DIR = "hf"
_TAG_RE = re.compile(r"^step_(\d+)$")
_CLIENT_KEY = "monet_fast_progress"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


@dataclass
class TrainingProgress:
    """Where a run is: everything besides model/optimizer/scheduler that a resume needs.

    The data position is (epoch, step_in_epoch): the order of an epoch is a pure function of
    (seed, epoch), so no sampler state is stored. rng holds the python / numpy / torch CPU
    generator states of rank 0 (training itself draws no random numbers; kept for hooks).
    """

    seed: int
    global_batch_size: int
    dataset_fingerprint: str
    n_samples: int
    world_size: int = 1
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    rng: dict = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        # Plain Python values only, so the client state loads with torch.load(weights_only=True).
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainingProgress:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})

    def capture_rng(self) -> None:
        np_state = np.random.get_state()
        self.rng = {
            "python": _to_lists(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist(),
        }

    def restore_rng(self) -> None:
        if not self.rng:
            return
        random.setstate(_to_tuples(self.rng["python"]))
        n = self.rng["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
        torch.set_rng_state(torch.tensor(self.rng["torch"], dtype=torch.uint8))


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def compare_progress(saved: TrainingProgress, now: TrainingProgress) -> list[str]:
    """Human-readable differences between a checkpoint's run and the configured run.

    Values from the checkpoint win for the position (epoch, step, seen counters); the config wins
    for everything else; the differences listed here change what a resume reproduces.
    """
    notes = []
    if saved.seed != now.seed:
        notes.append(f"seed: checkpoint {saved.seed}, config {now.seed} (data order changes)")
    if saved.global_batch_size != now.global_batch_size:
        notes.append(
            f"global batch: checkpoint {saved.global_batch_size}, config {now.global_batch_size} "
            "(the epoch continues at the same step index, so samples shift)"
        )
    if saved.dataset_fingerprint != now.dataset_fingerprint:
        notes.append(
            f"dataset: checkpoint saw {saved.n_samples} samples (fingerprint "
            f"{saved.dataset_fingerprint}), now {now.n_samples} ({now.dataset_fingerprint})"
        )
    if saved.world_size != now.world_size:
        notes.append(
            f"world size: checkpoint {saved.world_size}, now {now.world_size} (same data order "
            "if the global batch is unchanged)"
        )
    return notes


def list_checkpoints(root: str | os.PathLike) -> list[str]:
    """Complete checkpoint tags under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


def latest_tag(root: str | os.PathLike) -> str | None:
    """The tag `latest` names, if that checkpoint exists."""
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag if (Path(root) / tag).is_dir() else None


def resolve_resume(root: str | os.PathLike, resume: str) -> tuple[Path, str]:
    """(checkpoint root, tag) for `--resume` ("latest", a tag, or a path to a tag directory)."""
    root = Path(root)
    if resume == "latest":
        tag = latest_tag(root)
        if tag is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint to resume under {str(root)!r} (no valid "
                f"'{LATEST_FILE}' file); start without --resume"
            )
        return root, tag
    if (root / resume).is_dir():
        return root, resume
    p = Path(resume)
    if p.is_dir():
        return p.parent, p.name
    raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint (looked in {str(root)!r})")


def save_checkpoint(
    engine: Any,
    root: str | os.PathLike,
    progress: TrainingProgress,
    *,
    keep_last: int = 2,
    rank: int = 0,
    barrier=None,
) -> Path:
    """Save a DeepSpeed checkpoint for `progress.global_step` atomically; prune old ones.

    All ranks must call it (ZeRO shards are per rank). `barrier` synchronises ranks (a no-op in
    one process).
    """
    root = Path(root)
    tag = tag_for(progress.global_step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if barrier is not None:
        barrier()
    progress.capture_rng()
    engine.save_checkpoint(
        str(root), tag=tmp_tag, client_state={_CLIENT_KEY: progress.state_dict()}, save_latest=False
    )
    if barrier is not None:
        barrier()
    final = root / tag
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        atomic_write_text(root / LATEST_FILE, tag + "\n")
        for old in list_checkpoints(root)[:-keep_last]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
    if barrier is not None:
        barrier()
    return final


def load_checkpoint(engine: Any, root: str | os.PathLike, tag: str) -> TrainingProgress:
    """Load model, optimizer and scheduler state into `engine`; return the saved progress."""
    path, client = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None or client is None or _CLIENT_KEY not in client:
        raise FileNotFoundError(
            f"checkpoint {Path(root) / tag} could not be loaded or carries no monet_fast "
            "progress record"
        )
    progress = TrainingProgress.from_state_dict(client[_CLIENT_KEY])
    progress.restore_rng()
    return progress


def export_hf(
    model: Any, processor: Any, path: str | os.PathLike, *, zero_stage: int = 0, rank: int = 0
) -> Path:
    """Write a Hugging Face directory (weights, processor, latent config incl. K) atomically.

    Under ZeRO-3 the parameters are gathered first (every rank must call this); rank 0 writes.
    The result loads with `Qwen2_5_VLForConditionalGeneration.from_pretrained` and
    `monet_fast.model.load_pretrained`.
    """
    from monet_fast.model.loading import save_pretrained

    if zero_stage == 3:
        from monet_fast._optional import require

        deepspeed = require("deepspeed", "saving a ZeRO-3 model")

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                save_pretrained(model, processor, path)
    elif rank == 0:
        save_pretrained(model, processor, path)
    return Path(path)


__all__ = [
    "CHECKPOINT_DIR",
    "EXPORT_DIR",
    "LATEST_FILE",
    "TrainingProgress",
    "compare_progress",
    "export_hf",
    "latest_tag",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume",
    "save_checkpoint",
    "tag_for",
]
