"""Training data plumbing: load samples per config, a deterministic global data order, collation.

Data order: epoch e visits the dataset in `epoch_order(n, seed, e)` (a seeded permutation, the
same on every rank and every run). Optimizer step s of the epoch takes the s-th global batch of
G = micro_batch_size x grad_accum x world_size samples from it, split into world_size x
grad_accum micro-batches; rank r takes micro-batches r·grad_accum ... (r+1)·grad_accum - 1.
So one process with grad_accum = 2 and two processes with grad_accum = 1 see the same samples
per optimizer step, and a resume at step s continues exactly where the interrupted run was.
An incomplete last global batch is dropped (as `drop_last`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monet_fast.data.batching import collate
from monet_fast.data.images import PIXELS_PER_TOKEN, resize_by_token_budget
from monet_fast.data.latent_batch import LatentBatch
from monet_fast.data.reader import DataError, DataWarning, read_monet_sft_with_report
from monet_fast.data.synthetic import make_samples
from monet_fast.data.types import Sample
from monet_fast.data.validation import validate
from monet_fast.model import sequence as seq
from monet_fast.stage import Stage
from monet_fast.train.config_schema import DataSection

logger = logging.getLogger(__name__)


@dataclass
class DataReport:
    """What loading the data did; written to <output>/data_report.json."""

    kind: str
    n_samples: int
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # first reasons (file, row, sample_id)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_MAX_REASONS = 20


def load_samples(d: DataSection) -> tuple[list[Sample], DataReport]:
    """Samples for a data section. Bad rows raise (`on_error: raise`) or are skipped and counted."""
    if d.kind == "synthetic":
        samples = make_samples(d.n, d.seed, start=d.start)
        report = DataReport("synthetic", len(samples))
    else:
        paths = [d.path] if isinstance(d.path, str) else list(d.path)
        samples, reasons = [], []
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"data.path {p!r} does not exist")
            # Images stay on disk (decoded per batch); `validate` checks the files exist now.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)  # counted in the report instead
                got, rep = read_monet_sft_with_report(
                    p,
                    d.root,
                    on_error=d.on_error,
                    load_images=False,
                    allow_outside_root=d.allow_outside_root,
                )
                reasons += [f"{p}: row {row}: {why}" for row, why in rep.skipped]
                n_before = len(got)
                got = validate(got, on_error=d.on_error)
            if len(got) < n_before:
                reasons.append(f"{p}: {n_before - len(got)} samples failed validation")
            samples += got
        report = DataReport("monet_sft", len(samples), len(reasons), reasons[:_MAX_REASONS])
        if reasons:
            logger.warning(
                "data: skipped %d rows/samples (on_error=skip); first: %s",
                len(reasons),
                reasons[0],
            )
    if d.limit is not None:
        samples = samples[: d.limit]
        report.n_samples = len(samples)
    if not samples:
        raise DataError("the dataset is empty (after skipping bad rows)")
    return samples, report


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of the sample keys in order: tells a resume whether it sees the same dataset."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.key.encode() + b"\0")
    return h.hexdigest()[:16]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The dataset order of one epoch: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_micro_batches(
    order: Sequence[int],
    step: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    rank: int,
) -> list[list[int]]:
    """Dataset indices of this rank's micro-batches for optimizer step `step` of an epoch."""
    g = micro_batch_size * grad_accum * world_size
    chunk = order[step * g : (step + 1) * g]
    mine = chunk[rank * grad_accum * micro_batch_size : (rank + 1) * grad_accum * micro_batch_size]
    return [
        list(mine[i * micro_batch_size : (i + 1) * micro_batch_size]) for i in range(grad_accum)
    ]


def apply_image_budget(sample: Sample, budget: Sequence[int] | None) -> Sample:
    """Resize all images of a sample together to a token budget (reference §1.4); a copy.

    The budget covers question and auxiliary images together, so stage 3's question images get
    the sizes computed with the auxiliary images counted, as in the reference.
    """
    if budget is None:
        return sample
    segs = [s for s in [*sample.question, *sample.reasoning] if s.kind in ("image", "aux_image")]
    if not segs:
        return sample
    resized, new_sizes = resize_by_token_budget(
        [s.load_image() for s in segs],
        budget[0] * PIXELS_PER_TOKEN,
        budget[1] * PIXELS_PER_TOKEN,
    )
    if new_sizes is None:
        return sample
    swap = {id(s): img for s, img in zip(segs, resized)}

    def repl(part):
        return [dataclasses.replace(s, image=swap[id(s)]) if id(s) in swap else s for s in part]

    return dataclasses.replace(
        sample, question=repl(sample.question), reasoning=repl(sample.reasoning)
    )


def ce_weight_of(batch: LatentBatch, obs_weight: float) -> float:
    """Σ CE weights of a collated batch, as `latent_forward` will count them (before running it).

    Targets: labels != -100 at positions > 0; observation targets weigh `obs_weight`.
    """
    labels = batch.labels
    target = labels != seq.IGNORE_INDEX
    target[:, 0] = False
    w = torch.where(batch.observation_mask, obs_weight, 1.0)
    return float((w * target).sum())


def align_count_of(batch: LatentBatch, stage: Stage) -> int:
    """Samples whose alignment term is non-empty (observation tokens / latent slots)."""
    if stage is Stage.STAGE2:
        return sum(1 for lay in batch.layouts if lay.observation_positions)
    if stage is Stage.STAGE3:
        return sum(1 for lay in batch.layouts if lay.slot_positions)
    return 0


@dataclass
class MicroBatch:
    """One collated micro-batch plus the numbers the loss normalisation needs up front."""

    samples: list[Sample]
    batch: LatentBatch
    teacher: list[torch.Tensor] | None
    ce_weight: float
    align_count: int
    n_tokens: int
    skipped: list[str] = field(default_factory=list)


class SFTCollator:
    """Samples -> MicroBatch for one stage (picklable, so DataLoader workers can run it).

    on_error="skip": samples that fail to collate (unreadable image, bad structure) are dropped
    from the micro-batch and listed in `MicroBatch.skipped`; "raise" re-raises with the sample's
    location. Missing teacher-cache entries always raise: they are not a data-row problem.
    """

    def __init__(
        self,
        processor: Any,
        student_stage: Stage,
        latent_size: int,
        obs_weight: float,
        *,
        image_budget: Sequence[int] | None = None,
        cache: Any = None,
        on_error: str = "raise",
        with_teacher: bool = False,
        label_observation_tags: bool = False,
    ) -> None:
        self.processor = processor
        self.label_observation_tags = label_observation_tags
        self.student_stage = Stage.expect(student_stage, "SFTCollator(student_stage)")
        self.latent_size = latent_size
        self.obs_weight = obs_weight
        self.image_budget = image_budget
        self.cache = cache
        self.on_error = on_error
        self.with_teacher = with_teacher

    def _collate(self, samples: list[Sample]) -> LatentBatch:
        return collate(
            samples,
            self.processor,
            self.student_stage,
            self.latent_size,
            label_observation_tags=self.label_observation_tags,
        )

    def __call__(self, originals: Sequence[Sample]) -> MicroBatch:
        # Cache entries are keyed and fingerprinted by the original (un-resized) sample.
        pairs = [(o, apply_image_budget(o, self.image_budget)) for o in originals]
        skipped: list[str] = []
        try:
            batch = self._collate([s for _, s in pairs])
        except (ValueError, OSError) as err:
            if self.on_error == "raise":
                bad = self._first_bad([s for _, s in pairs]) or (pairs[0][1], err)
                raise DataError(f"cannot build a training batch: {bad[1]}").located(
                    bad[0].source, None, bad[0].sample_id
                ) from err
            good = []
            for o, s in pairs:
                try:
                    self._collate([s])
                    good.append((o, s))
                except (ValueError, OSError) as e:
                    skipped.append(f"{s.source or s.key}: {e}")
            if not good:
                raise DataError(
                    f"every sample of a micro-batch failed to collate: {skipped}"
                ) from err
            pairs = good
            batch = self._collate([s for _, s in pairs])
        samples = [s for _, s in pairs]
        teacher = self.cache([o for o, _ in pairs]) if self.cache is not None else None
        return MicroBatch(
            samples=list(samples),
            batch=batch,
            teacher=teacher,
            ce_weight=ce_weight_of(batch, self.obs_weight),
            align_count=align_count_of(batch, self.student_stage) if self.with_teacher else 0,
            n_tokens=int(batch.attention_mask.sum()),
            skipped=skipped,
        )

    def _first_bad(self, samples: list[Sample]) -> tuple[Sample, Exception] | None:
        for s in samples:
            try:
                self._collate([s])
            except (ValueError, OSError) as e:
                return s, e
        return None


class _MicroBatchDataset(torch.utils.data.Dataset):
    """Item i = the collated micro-batch of dataset indices `index_lists[i]`."""

    def __init__(self, samples: Sequence[Sample], index_lists: list[list[int]], collator) -> None:
        self.samples = samples
        self.index_lists = index_lists
        self.collator = collator

    def __len__(self) -> int:
        return len(self.index_lists)

    def __getitem__(self, i: int) -> MicroBatch:
        return self.collator([self.samples[j] for j in self.index_lists[i]])


def _identity(x):
    return x


def micro_batch_loader(
    samples: Sequence[Sample], index_lists: list[list[int]], collator, num_workers: int = 0
):
    """Iterate collated micro-batches in the given order (workers keep the order)."""
    ds = _MicroBatchDataset(samples, index_lists, collator)
    if num_workers == 0:
        return (ds[i] for i in range(len(ds)))
    return iter(
        torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity
        )
    )


__all__ = [
    "DataReport",
    "MicroBatch",
    "SFTCollator",
    "align_count_of",
    "apply_image_budget",
    "ce_weight_of",
    "dataset_fingerprint",
    "epoch_order",
    "load_samples",
    "micro_batch_loader",
    "rank_micro_batches",
]
