"""Write `Sample`s in the reference's Monet-SFT on-disk format (the inverse of `reader.py`).

All or nothing: every sample is checked (structure, image files, reserved strings, unicode)
before the first byte is written; then every image is encoded into a temp file next to its
target (`monet_fast._io.temp_sibling`, fsynced), and only when all of them exist are they renamed
into place, the JSON last (`atomic_write_text`). An image that fails to load removes the temp
files and leaves the directory as it was; a reader never sees a partial file or a JSON naming an
image that is not there.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monet_fast._io import atomic_write_text, temp_sibling
from monet_fast.data.errors import DataError
from monet_fast.data.reader import RESERVED_STRINGS
from monet_fast.data.types import Sample, Segment
from monet_fast.data.validation import validate_sample
from monet_fast.model.tokens import LATENT_PLACEHOLDER, OBS_END, OBS_START

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class _PlannedImage:
    index: int  # sample index, for messages
    segment: Segment
    rel: str  # path relative to out_dir


def write_monet_sft(
    samples: Sequence[Sample],
    out_dir: str | os.PathLike,
    name: str = "train.json",
    *,
    image_dir: str = "images",
) -> Path:
    """Write samples in the Monet-SFT on-disk format; returns the JSON path.

    Images are saved as RGB PNG under `out_dir/image_dir/` and referenced by paths relative to
    `out_dir`, so `read_monet_sft(path)` (default root = the file's directory) reads them back.
    `choices`, `category` and `meta` go into "metadata" next to dataset_name/sample_id (the
    reference ignores extra keys). Round trip: reading gives the same segments and answers when
    the answer segment is a `\\boxed{}` span and no two text segments are adjacent (they merge).

    Raises `DataError` ("cannot write sample i: ...") before writing anything for a sample that
    is invalid, and after undoing its own image files for an image that cannot be read.
    """
    out = Path(out_dir)
    rows: list[dict] = []
    planned: list[_PlannedImage] = []
    for index, sample in enumerate(samples):
        try:
            validate_sample(sample, check_files=True, allow_no_observation=True)
            rows.append(_sample_to_row(sample, index, image_dir, planned))
            # Serialise now: a value json cannot write (NaN is fine, a set is not) fails here.
            json.dumps(rows[-1], ensure_ascii=False).encode("utf-8")
        except DataError as err:
            raise DataError(f"cannot write sample {index}: {err}") from None
        except (TypeError, ValueError) as err:
            raise DataError(f"cannot write sample {index}: {type(err).__name__}: {err}") from None
    text = json.dumps(rows, ensure_ascii=False, indent=1)

    staged: list[tuple[str, Path]] = []
    try:
        for item in planned:
            try:
                data = _png_bytes(item.segment)
            except DataError as err:
                raise DataError(f"cannot write sample {item.index}: {err}") from None
            target = out / item.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(target)
            staged.append((tmp, target))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # durable before the JSON that names it
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, target in staged:
        os.replace(tmp, target)
    final = out / name
    atomic_write_text(final, text)
    return final


def _png_bytes(seg: Segment) -> bytes:
    image = seg.load_image()
    if image.mode != "RGB":
        image = image.convert("RGB")  # the format is RGB; the reader converts anyway
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _check_plain(text: str, what: str) -> str:
    for reserved in RESERVED_STRINGS:
        if reserved in text:
            raise DataError(f"{what} text contains the reserved string {reserved!r}")
    return text


def _sample_to_row(
    sample: Sample, index: int, image_dir: str, planned: list[_PlannedImage]
) -> dict:
    """The on-disk row of `sample`; its images are appended to `planned`, not yet written."""
    stem = f"{index:06d}_{_UNSAFE.sub('_', sample.key)[:80]}"

    def image(seg: Segment, tag: str) -> dict:
        rel = f"{image_dir}/{stem}_{tag}.png"
        planned.append(_PlannedImage(index, seg, rel))
        return {"type": "image", "image": rel}

    user = []
    for j, seg in enumerate(sample.question):
        if seg.kind == "image":
            user.append(image(seg, f"q{j}"))
        else:
            user.append({"type": "text", "text": _check_plain(seg.text, "question")})

    assistant: list[dict] = []
    text = ""
    n_aux = 0
    for seg in sample.reasoning:
        if seg.kind == "aux_image":
            # The placeholder ends the preceding text item, right before the image (§1.2).
            assistant.append({"type": "text", "text": text + LATENT_PLACEHOLDER})
            assistant.append(image(seg, f"aux{n_aux}"))
            n_aux += 1
            text = ""
        elif seg.kind == "observation":
            text += OBS_START + _check_plain(seg.text, "observation") + OBS_END
        else:
            text += _check_plain(seg.text, seg.kind)
    if text:
        assistant.append({"type": "text", "text": text})

    metadata: dict[str, Any] = {"dataset_name": sample.dataset_name, "sample_id": sample.sample_id}
    if sample.choices is not None:
        metadata["choices"] = list(sample.choices)
    if sample.category is not None:
        metadata["category"] = sample.category
    if sample.meta:
        metadata["meta"] = sample.meta
    return {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": sample.system}]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
        "metadata": metadata,
    }


__all__ = ["write_monet_sft"]
