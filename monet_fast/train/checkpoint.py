"""Crash-safe DeepSpeed checkpoints, typed resume state, and Hugging Face export.

Layout under a run's output directory:

    checkpoints/
      step_0000004/        one DeepSpeed checkpoint (model, ZeRO optimizer shards, scheduler,
                           and our TrainingProgress as client state) + manifest.json (size and
                           sha256 of every file)
      step_0000004.r1/     the same step saved again (a resumed run re-reaching a saved step):
                           a new directory, never a replaced one
      latest               the tag of the newest committed checkpoint (one line)
    hf/                    the exported model (save_pretrained + processor + latent config)

Save protocol (`save_checkpoint`): every rank writes its shards into `.tmp-<tag>/`; the leader
of each directory fsyncs and hashes every file into `manifest.json`, fsyncs the directory and
renames it to `<tag>/` (fsyncing the parent); after all ranks have renamed, `latest` is replaced
atomically (the commit point); only then are checkpoints beyond `keep_last` removed (renamed to
`.trash-*` first, so a half-deleted one is never mistaken for a checkpoint). A crash at any point
leaves `latest` naming a complete, verified checkpoint; nothing is deleted before its successor
is durable. Leftover `.tmp-*`/`.trash-*` directories are removed by the next save.

Resume (`resolve_resume`) verifies the manifest (missing file, size, hash) of the checkpoint
`latest` names and falls back to the newest older one that verifies, with a warning naming the
problem.

Filesystems: with `shared_filesystem=True` (default) all ranks see one directory and global
rank 0 is its leader. With `shared_filesystem=False` (nodes with local disks) each node's local
rank 0 leads its own copy (DeepSpeed's `checkpoint.use_node_local_storage` makes every node
write the model states it needs next to its ZeRO shards); ranks agree on the tag to resume from
(the newest that verifies on every node).

Test hook: MONET_FAST_CKPT_PAUSE_S=<seconds> sleeps at each phase of a save (kill tests widen the
windows between phases with it; unset in normal runs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monet_fast._io import atomic_write_text, fsync_dir
from monet_fast.train import ckpt_manifest

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
EXPORT_DIR = "hf"
_TAG_RE = re.compile(r"^step_(\d+)(?:\.r(\d+))?$")
_CLIENT_KEY = "monet_fast_progress"


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


def _key(tag: str) -> tuple[int, int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)), int(m.group(2) or 0)


def list_checkpoints(root: str | os.PathLike) -> list[str]:
    """Checkpoint tags under `root` (renamed into place, so complete when written), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
    return sorted(tags, key=_key)


def _read_latest(root: Path) -> str | None:
    path = root / LATEST_FILE
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag or None


def latest_tag(root: str | os.PathLike) -> str | None:
    """The tag `latest` names, if that checkpoint exists."""
    tag = _read_latest(Path(root))
    return tag if tag is not None and (Path(root) / tag).is_dir() else None


def is_leader(rank: int, local_rank: int, shared_filesystem: bool) -> bool:
    """Whether this rank seals, renames and prunes the checkpoint directory it sees."""
    return rank == 0 if shared_filesystem else local_rank == 0


def _multi() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _barrier() -> None:
    if _multi():
        torch.distributed.barrier()


def _gather(obj: Any) -> list[Any]:
    """`obj` from every rank (one process: [obj])."""
    if not _multi():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _pause(phase: str) -> None:
    """Test hook (MONET_FAST_CKPT_PAUSE_S): widen the window after each save phase."""
    seconds = float(os.environ.get("MONET_FAST_CKPT_PAUSE_S") or 0)
    if seconds > 0:
        logger.debug("checkpoint phase %s: pausing %.3fs", phase, seconds)
        time.sleep(seconds)


def resume_candidates(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(tags to try, newest first; notes) for resuming "latest" from `root`.

    The tag `latest` names comes first, then every older checkpoint. Checkpoints newer than
    `latest` were never committed (a crash between their rename and the `latest` update) and
    are not candidates. No `latest` file: no candidates (nothing was ever committed).
    """
    root = Path(root)
    named = _read_latest(root)
    if named is None or not _TAG_RE.match(named):
        note = [f"{root / LATEST_FILE}: names {named!r}, not a checkpoint tag"] if named else []
        return [], note
    notes = []
    if not (root / named).is_dir():
        notes.append(f"{root / LATEST_FILE} names {named}, which is missing")
    older = [t for t in list_checkpoints(root) if _key(t) < _key(named)]
    tags = ([named] if not notes else []) + older[::-1]
    return tags, notes


def agree_on_tag(lists: list[list[str]]) -> str | None:
    """The newest tag present in every list (each list one directory's candidates)."""
    if not lists:
        return None
    common = set(lists[0]).intersection(*map(set, lists[1:]))
    return max(common, key=_key) if common else None


def resolve_resume(
    root: str | os.PathLike, resume: str, *, leader: bool = True
) -> tuple[Path, str]:
    """(checkpoint root, tag) for `--resume` ("latest", a tag, or a path to a tag directory).

    Every rank must call it. The chosen checkpoint is verified against its manifest by each
    directory's leader; for "latest", a damaged or missing one is skipped with a warning naming
    what is wrong and the previous one is tried; an explicit tag must verify.
    """
    root = Path(root)
    if resume != "latest":
        if (root / resume).is_dir() or not Path(resume).is_dir():
            where, tag = root, resume
        else:
            where, tag = Path(resume).parent, Path(resume).name
        problem = ckpt_manifest.verify(where / tag) if leader else None
        bad = [p for p in _gather(problem) if p]
        if bad:
            raise FileNotFoundError(f"--resume {resume!r}: checkpoint unusable: {'; '.join(bad)}")
        return where, tag

    mine = resume_candidates(root) if leader else None
    gathered = [c for c in _gather(mine) if c is not None]
    for notes in (n for _, n in gathered):
        for note in notes:
            logger.warning("resume: %s; falling back to an older checkpoint", note)
    lists = [tags for tags, _ in gathered]
    while True:
        tag = agree_on_tag(lists)
        if tag is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint to resume under {str(root)!r} (no valid "
                f"'{LATEST_FILE}' file, or no checkpoint that verifies on every node); start "
                "without --resume"
            )
        if any(tags[0] != tag for tags in lists):
            logger.warning("resume: using %s, older than the newest committed checkpoint", tag)
        problem = ckpt_manifest.verify(root / tag) if leader else None
        bad = [p for p in _gather(problem) if p]
        if not bad:
            return root, tag
        logger.warning(
            "resume: checkpoint %s is damaged (%s); falling back to the previous one",
            tag,
            "; ".join(bad),
        )
        lists = [[t for t in tags if t != tag] for tags in lists]


def _next_revision(root: Path, step: int) -> int:
    revs = [_key(t)[1] for t in list_checkpoints(root) if _key(t)[0] == step]
    return max(revs) + 1 if revs else 0


def tag_for(step: int, revision: int = 0) -> str:
    return f"step_{step:07d}" + (f".r{revision}" if revision else "")


def _prune(root: Path, keep_last: int, new: str) -> None:
    """Remove checkpoints up to `new` beyond the last `keep_last` (older revisions of a step
    first); never `new` (the one `latest` now names). Newer tags (an abandoned future after a
    resume from an older tag) are left alone."""
    tags = [t for t in list_checkpoints(root) if _key(t) <= _key(new)]
    newest_rev = {}
    for t in tags:
        newest_rev[_key(t)[0]] = t  # sorted: the last revision of each step wins
    live = [t for t in tags if newest_rev[_key(t)[0]] == t]
    keep = set(live[-keep_last:]) | {new}
    for old in tags:
        if old not in keep:
            trash = root / f".trash-{old}"
            os.replace(root / old, trash)  # atomic: a half-deleted directory is never a tag
            shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    engine: Any,
    root: str | os.PathLike,
    progress: TrainingProgress,
    *,
    keep_last: int = 2,
    rank: int = 0,
    local_rank: int = 0,
    shared_filesystem: bool = True,
) -> Path:
    """Save a DeepSpeed checkpoint for `progress.global_step` crash-safely; prune old ones.

    All ranks must call it (ZeRO shards are per rank). See the module docstring for the order
    of writes; `shared_filesystem=False` makes each node's local rank 0 seal and rename its own
    copy (the DeepSpeed config must then set `checkpoint.use_node_local_storage`).
    """
    root = Path(root)
    leader = is_leader(rank, local_rank, shared_filesystem)
    step = progress.global_step
    if leader:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".trash-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    # Same tag on every rank: a directory that already has this step (a resumed run re-reaching
    # it) gets the next revision, never a replacement.
    revision = max(r for r in _gather(_next_revision(root, step) if leader else 0))
    tag = tag_for(step, revision)
    tmp_tag = f".tmp-{tag}"
    progress.capture_rng()
    engine.save_checkpoint(
        str(root), tag=tmp_tag, client_state={_CLIENT_KEY: progress.state_dict()}, save_latest=False
    )
    _barrier()  # every rank's shards are written
    _pause("written")
    final = root / tag
    if leader:
        ckpt_manifest.seal(root / tmp_tag, tag=tag, step=step, world_size=progress.world_size)
        _pause("sealed")
        os.replace(root / tmp_tag, final)
        fsync_dir(root)
    _barrier()  # every directory holds the complete checkpoint
    _pause("renamed")
    if leader:
        atomic_write_text(root / LATEST_FILE, tag + "\n")  # the commit point
    _barrier()
    _pause("committed")
    if leader:
        _prune(root, keep_last, tag)
    _barrier()
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
    "agree_on_tag",
    "compare_progress",
    "export_hf",
    "is_leader",
    "latest_tag",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume",
    "resume_candidates",
    "save_checkpoint",
    "tag_for",
]
