"""Structural checks of `Sample`s (what `read_monet_sft` applies to every row, and what callers
building samples in code can apply): segment kinds per turn, observations after auxiliary
images, one non-empty answer, images present. Errors are `DataError`s naming the sample."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Literal, NoReturn

from monet_fast.data.errors import DataError, DataWarning, split_source
from monet_fast.data.types import SEGMENT_KINDS, Sample

OnError = Literal["raise", "skip"]
ON_ERROR_MODES = ("raise", "skip")
QUESTION_KINDS = ("image", "text")
REASONING_KINDS = ("text", "aux_image", "observation", "answer")
# How many skip reasons the warning quotes.
N_REASONS_SHOWN = 3


def _where(sample: Sample) -> DataError:
    """An empty DataError carrying the sample's location, for `.located()`."""
    file, row = split_source(sample.source)
    return DataError("", file=file, row=row, sample_id=sample.sample_id)


def validate_sample(
    sample: Sample, *, check_files: bool = True, allow_no_observation: bool = False
) -> None:
    """Check a sample's structure; raise `DataError` naming its source (or key) if bad.

    Checks: segment kinds allowed for their turn; an observation only after an auxiliary image;
    at least one observation (unless allowed); at most one answer segment and a non-empty
    `Sample.answer`; every image segment has pixels or (with `check_files`) an existing file.
    """
    where = _where(sample)

    def fail(reason: str) -> NoReturn:
        raise DataError(reason).located(where.file, where.row, where.sample_id)

    if not sample.question:
        fail("the question has no segments")
    for j, seg in enumerate(sample.question):
        if seg.kind not in QUESTION_KINDS:
            fail(
                f"unknown question segment type {seg.kind!r} at {j} (allowed: {list(QUESTION_KINDS)})"
            )
    seen_aux = False
    n_obs = n_answer = 0
    for j, seg in enumerate(sample.reasoning):
        if seg.kind not in REASONING_KINDS:
            known = seg.kind in SEGMENT_KINDS
            fail(
                f"{'misplaced' if known else 'unknown'} reasoning segment type {seg.kind!r} "
                f"at {j} (allowed: {list(REASONING_KINDS)})"
            )
        if seg.kind == "aux_image":
            seen_aux = True
        elif seg.kind == "observation":
            if not seen_aux:
                fail(f"observation {seg.text[:40]!r} without a preceding auxiliary image")
            n_obs += 1
        elif seg.kind == "answer":
            n_answer += 1
            if not seg.text.strip():
                fail("empty answer segment")
    if n_obs == 0 and not allow_no_observation:
        fail("no observation in the assistant turn (pass allow_no_observation=True to keep it)")
    if n_answer > 1:
        fail(f"{n_answer} answer segments, expected at most one")
    if not str(sample.answer).strip():
        fail("empty answer")
    for seg in [*sample.question, *sample.reasoning]:
        if seg.kind in ("image", "aux_image"):
            if seg.image is None and seg.path is None:
                fail(f"{seg.kind} segment has neither an image nor a path")
            if seg.image is None and check_files and not os.path.isfile(seg.path):
                fail(f"missing image file {seg.path!r}")


def validate(
    samples: Sample | Iterable[Sample],
    *,
    check_files: bool = True,
    allow_no_observation: bool = False,
    on_error: OnError = "raise",
) -> list[Sample]:
    """`validate_sample` over samples; returns the valid ones ("skip" warns with the count).

    Use after `read_monet_sft(load_images=False)` to find missing image files up front.
    """
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
    if isinstance(samples, Sample):
        samples = [samples]
    good: list[Sample] = []
    reasons: list[str] = []
    for sample in samples:
        try:
            validate_sample(
                sample, check_files=check_files, allow_no_observation=allow_no_observation
            )
        except DataError as err:
            if on_error == "raise":
                raise
            reasons.append(str(err))
            continue
        good.append(sample)
    if reasons:
        shown = "; ".join(reasons[:N_REASONS_SHOWN])
        warnings.warn(
            f"skipped {len(reasons)} invalid samples ({shown})", DataWarning, stacklevel=2
        )
    return good


__all__ = ["ON_ERROR_MODES", "QUESTION_KINDS", "REASONING_KINDS", "validate", "validate_sample"]
