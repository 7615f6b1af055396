"""VLPO prompts: the `prompts` data kind (question + image(s) + answer, JSONL or a JSON list),
the SFT data kinds read as prompts, and a prompt prepared for rollout (reasoning dropped, images
resized to the budget, the format suffix appended)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any


def load_prompts(d: Any) -> tuple[list, Any]:
    """Prompts for an RL data section (`vlpo.RLDataSection`): synthetic (with task options),
    monet_sft (the SFT loader; reasoning ignored) or a `prompts` file."""
    from monet_fast.data.synthetic import make_samples
    from monet_fast.train.data import DataReport, load_samples

    if d.kind == "synthetic" and d.synthetic:
        samples = make_samples(d.n, d.seed, start=d.start, **d.synthetic)
        if d.limit is not None:
            samples = samples[: d.limit]
        return samples, DataReport("synthetic", len(samples))
    if d.kind != "prompts":
        return load_samples(d)
    return read_prompt_file(
        d.path,
        d.root,
        on_error=d.on_error,
        limit=d.limit,
        allow_outside_root=d.allow_outside_root,
    )


def read_prompt_file(
    path: str | list[str],
    root: str | None = None,
    *,
    on_error: str = "raise",
    limit=None,
    allow_outside_root: bool = False,
) -> tuple[list, Any]:
    """Read RL prompts (see `RLDataSection`) into `Sample`s without reasoning.

    Bad files and rows raise `DataError` naming file and row (image paths: also the field; they
    must stay inside `root` unless `allow_outside_root`); FileNotFoundError for a missing file.
    """
    from monet_fast.data.errors import DataError
    from monet_fast.data.paths import resolve_image_path
    from monet_fast.data.reader import parse_json
    from monet_fast.data.types import DEFAULT_SYSTEM, Sample, Segment
    from monet_fast.tasks.prompts import format_mc_question
    from monet_fast.train.data import DataReport

    samples, skipped = [], []
    files = [path] if isinstance(path, str) else list(path)
    for file in files:
        p = Path(file)
        if not p.is_file():
            raise FileNotFoundError(f"data.path {file!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
            if p.suffix == ".jsonl":
                lines = enumerate(text.splitlines())
                rows = [parse_json(x, line_offset=k) for k, x in lines if x.strip()]
            else:
                rows = parse_json(text)
        except UnicodeDecodeError as err:
            raise DataError(f"not UTF-8 text ({err})", file=file) from None
        except DataError as err:
            raise err.located(file, None, None) from None
        if not isinstance(rows, list):
            raise DataError(
                f"expected a JSON list of prompts, got {type(rows).__name__}", file=file
            )
        base = Path(root) if root else p.parent
        for i, row in enumerate(rows):
            try:
                if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                    raise DataError("a prompt needs 'question' and 'answer'")
                images = row.get("image") or row.get("images") or []
                images = [images] if isinstance(images, str) else list(images)
                segs = []
                for k, img in enumerate(images):
                    where = f"image[{k}]" if len(images) > 1 else "image"
                    try:
                        ip = resolve_image_path(base, img, allow_outside_root=allow_outside_root)
                    except DataError as err:
                        raise err.located(None, None, None, where) from None
                    if not os.path.isfile(ip):
                        raise DataError(f"image {str(ip)!r} does not exist", field=where)
                    segs.append(Segment("image", path=str(ip)))
                question, choices = str(row["question"]), row.get("choices")
                if choices is not None and not (
                    isinstance(choices, list)
                    and 0 < len(choices) <= 26
                    and all(isinstance(c, str) for c in choices)
                ):
                    raise DataError(
                        f"must be a list of 1 to 26 option strings, got {choices!r:.80}",
                        field="choices",
                    )
                if choices and not all(f"{chr(65 + k)}. " in question for k in range(len(choices))):
                    question = format_mc_question(question, choices)
                segs.append(Segment("text", question))
                samples.append(
                    Sample(
                        question=segs,
                        reasoning=[],
                        answer=str(row["answer"]),
                        sample_id=str(row.get("id", i)),
                        dataset_name=p.stem,
                        system=row.get("system", DEFAULT_SYSTEM),
                        choices=list(choices) if choices else None,
                        source=f"{file}:{i}",
                    )
                )
            except (DataError, TypeError, ValueError, AttributeError) as err:
                if not isinstance(err, DataError):
                    err = DataError(f"malformed prompt ({type(err).__name__}: {err})")
                err = err.located(file, i, None)
                if on_error == "raise":
                    raise err from None
                skipped.append(str(err))
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise DataError("no prompts (after skipping bad rows)", file=", ".join(map(str, files)))
    return samples, DataReport("prompts", len(samples), len(skipped), skipped[:20])


def prepare_prompt(sample, image_budget, suffix: str | None):
    """A rollout prompt: reasoning dropped, images resized to the budget, suffix appended."""
    from monet_fast.data.types import Segment
    from monet_fast.train.data import apply_image_budget

    question = list(sample.question)
    if suffix:
        last = (
            max(i for i, seg in enumerate(question) if seg.kind == "text")
            if any(seg.kind == "text" for seg in question)
            else None
        )
        if last is None:
            question.append(Segment("text", suffix))
        else:
            question[last] = Segment("text", question[last].text + suffix)
    out = dataclasses.replace(sample, question=question, reasoning=[])
    return apply_image_budget(out, image_budget) if image_budget else out


__all__ = ["load_prompts", "prepare_prompt", "read_prompt_file"]
