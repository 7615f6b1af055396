"""How a benchmark row becomes a `Sample`: images (files, base64 columns, VLMEvalKit references),
"(A) text" option lists, gold letters, the multiple-choice question text, and the row loop that
locates every error (file, row) -- shared by the per-benchmark readers in `readers.py`."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from monet_fast.data.errors import DataError
from monet_fast.data.images import decode_rgb, open_rgb, probe_image
from monet_fast.data.paths import resolve_image_path
from monet_fast.data.types import Sample, Segment
from monet_fast.eval.row_sources import is_image_ref, resolve_image_refs, table_rows
from monet_fast.tasks.prompts import LETTERS, format_mc_question

# "(A) rubber" -- the option lines of V* text and MME-RealWorld "Answer choices".
PAREN_OPTION = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$", re.DOTALL)


@dataclass
class EncodedImageSegment(Segment):
    """An image segment holding the encoded file bytes (JPEG/PNG), decoded on access.

    Used for base64 image columns: the encoded form is ~10x smaller than the pixels, so a whole
    HR-Bench file fits in memory while only the batch being decoded is expanded. `path` names
    where the bytes came from ("file.tsv:row 3"), for messages only.
    """

    data: bytes = field(default=b"", repr=False)

    def load_image(self) -> Image.Image:
        if self.image is not None:
            return self.image
        return decode_rgb(self.data, self.path or "embedded image")


@dataclass(frozen=True)
class ReadOptions:
    limit: int | None
    load_images: bool
    system: str
    allow_outside_root: bool = False


def file_image(path: Path, load: bool) -> Segment:
    """An image segment for a file (path already root-checked); DataError if missing/unreadable."""
    if not os.path.isfile(path):  # False (not OSError) for a name too long
        raise DataError(f"image file not found: {path}")
    if not load:
        return Segment("image", path=str(path))
    return Segment("image", image=open_rgb(path), path=str(path))


def row_image_path(base: Path, value: Any, field: str, opts: ReadOptions) -> Path:
    """`base / value` for an image path read from a row, root-checked; errors name `field`."""
    try:
        return resolve_image_path(base, value, allow_outside_root=opts.allow_outside_root)
    except DataError as err:
        raise err.located(None, None, None, field) from None


def encoded_image(value: Any, where: str, load: bool) -> Segment:
    """An image segment from a base64 string (or raw bytes / {"bytes": ...} from parquet)."""
    if isinstance(value, dict) and "bytes" in value:
        value = value["bytes"]
    if isinstance(value, str):
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"image column is not valid base64 ({err})") from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise DataError(f"image column must be base64 text or bytes, got {type(value).__name__}")
    if not data:
        raise DataError("image column is empty")
    if load:
        return Segment("image", image=decode_rgb(data, where), path=where)
    probe_image(data, where)  # the header only: format, pixel limit and mode, no decoding
    return EncodedImageSegment("image", path=where, data=data)


def parse_paren_options(items: Sequence[Any], what: str) -> list[str]:
    """Option texts from ["(A) x", "(B) y", ...]; letters must run A, B, C... in order."""
    if not isinstance(items, (list, tuple)) or not items:
        raise DataError(f"{what} must be a non-empty list of '(A) ...' strings, got {items!r}")
    choices = []
    for k, item in enumerate(items):
        match = PAREN_OPTION.match(item) if isinstance(item, str) else None
        if match is None or match.group(1) != LETTERS[k]:
            raise DataError(
                f"{what}[{k}] must look like '({LETTERS[k]}) text', got {str(item)[:80]!r}"
            )
        choices.append(match.group(2))
    return choices


def gold_letter_of(answer: Any, choices: Sequence[str]) -> str:
    letter = str(answer).strip().strip("()").strip()
    allowed = LETTERS[: len(choices)]
    if len(letter) != 1 or letter not in allowed:
        raise DataError(f"answer must be one of the option letters {list(allowed)}, got {answer!r}")
    return letter


def mc_sample(
    *,
    image: Segment,
    question: str,
    choices: list[str],
    answer: str,
    sample_id: str,
    category: str | None,
    dataset_name: str,
    source: str,
    system: str,
    meta: dict,
) -> Sample:
    if not question.strip():
        raise DataError("empty question text")
    if len(choices) < 2 or any(not c.strip() for c in choices):
        raise DataError(f"need >= 2 non-empty options, got {choices!r}")
    return Sample(
        question=[image, Segment("text", format_mc_question(question, choices))],
        reasoning=[],
        answer=gold_letter_of(answer, choices),
        sample_id=sample_id,
        dataset_name=dataset_name,
        system=system,
        choices=list(choices),
        category=category,
        source=source,
        meta=meta,
    )


def rows_to_samples(
    rows: Iterator[tuple[int, Any]],
    path: Path,
    limit: int | None,
    convert: Callable[[int, Any], Sample],
) -> list[Sample]:
    """Apply `convert` to rows, adding file/row to every DataError (and to unexpected shapes)."""
    samples: list[Sample] = []
    if limit == 0:
        return samples
    for row_index, row in rows:
        try:
            try:
                samples.append(convert(row_index, row))
            except DataError:
                raise
            except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as err:
                raise DataError(f"malformed row ({type(err).__name__}: {err})") from err
        except DataError as err:
            raise err.located(path, row_index, _peek_id(row)) from None
        if limit is not None and len(samples) >= limit:
            break
    return samples


def _peek_id(row: Any) -> str | None:
    if isinstance(row, dict):
        for key in ("question_id", "index", "Question_id"):
            if row.get(key) not in (None, ""):
                return str(row[key])
    return None


def read_table_benchmark(
    path: Path,
    opts: ReadOptions,
    required: Sequence[str],
    convert: Callable[[int, dict[str, Any], Segment], Sample],
) -> list[Sample]:
    """Read a VLMEvalKit-style MCQ table (TSV/parquet) with embedded base64 images."""
    # Pass 1 collects the raw rows (no decoding), so image references can be resolved first.
    rows: list[tuple[int, dict[str, Any]]] = []
    if opts.limit != 0:
        for row_index, row in table_rows(path, required):
            rows.append((row_index, row))
            if opts.limit is not None and len(rows) >= opts.limit:
                break
    refs = resolve_image_refs(path, rows, required)

    def convert_row(row_index: int, row: dict[str, Any]) -> Sample:
        value = row.get("image")
        if is_image_ref(value):
            key = value.strip()
            if key not in refs:
                raise DataError(
                    f"image field {key!r} is neither base64 nor the index of a row with an image"
                )
            value = refs[key]
        image = encoded_image(value, f"{path}:row {row_index}", opts.load_images)
        return convert(row_index, row, image)

    return rows_to_samples(iter(rows), path, None, convert_row)
