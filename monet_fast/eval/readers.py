"""Benchmark readers: local copies of V* Bench, HR-Bench 4K/8K, MME-RealWorld-Lite, our synthetic task.

Nothing is downloaded. Point `data_dir` at a folder holding the benchmark exactly as its authors
publish it (or at the question file itself); every reader returns `Sample`s with
`question = [image, text]`, the text being the question followed by one `"A. option"` line per
choice (`format_mc_question`), `choices` (option texts), `answer` (gold letter), `category`,
`sample_id` (unique within the benchmark, so runs can be paired item by item), `dataset_name`,
`source = "file:row"` (0-based data row) and the benchmark-specific extras in `meta`. Images are
not decoded unless `load_images=True`: a path (or the encoded bytes of a base64 column) is kept
and decoded by `Segment.load_image()`, because HR-Bench 8K alone is several GB of pixels.

Supported layouts (first match wins):

* **vstar** -- V* Bench, HF dataset `craigwu/vstar_bench` (191 questions)::

      test_questions.jsonl      one JSON object per line: {"image": "direct_attributes/sa_4690.jpg",
                                "text": "What is the material of the glove?\\n(A) rubber\\n(B) cotton
                                \\n(C) leather\\n(D) wool\\nAnswer with the option's letter from the
                                given choices directly.", "category": "direct_attributes",
                                "question_id": 0, "label": "A"}
      direct_attributes/*.jpg   images, paths relative to the .jsonl
      relative_position/*.jpg

  Options are the "(X) text" lines of `text`; lines before them are the question, lines after
  (the answer-format instruction) go to `meta["instruction"]`. Without `test_questions.jsonl`,
  the per-category folders alone are read: `<category>/<name>.json` with `{"question", "options",
  "target_object", "bbox"}` next to `<name>.jpg|.jpeg|.png`, where `options[0]` is the correct one
  (the original V* evaluation's convention). Those files carry no letters, so the options are put
  in a deterministic order derived from the file's relative path (sha256-seeded shuffle), which
  spreads the gold letter over A-D; the letters then differ from test_questions.jsonl's.

* **hrbench4k / hrbench8k** -- HR-Bench, HF dataset `DreamMr/HR-Bench` (800 questions each)::

      hr_bench_4k.tsv  (or hr_bench_8k.tsv; VLMEvalKit's names HRBench4K.tsv / HRBench8K.tsv too)
      hr_bench_4k.parquet   same columns; needs pyarrow, used only when no .tsv is present

  Tab-separated with a header row, VLMEvalKit's MCQ format: `index, question, A, B, C, D, answer,
  category, cycle_category, image` where `image` is the base64-encoded JPEG/PNG (pandas quoting,
  so fields may hold quoted tabs/newlines). VLMEvalKit's de-duplication convention is honoured: an
  `image` value of at most 64 characters is the `index` of the row holding the actual image.

* **mme-realworld-lite** -- MME-RealWorld-Lite, HF dataset `yifanzhang114/MME-RealWorld-Lite`
  (data.zip, 1,919 questions; the question format is the full MME-RealWorld's)::

      MME-RealWorld-Lite.json   (also found under data/) a JSON list of {"Question_id":
                                "perception/ocr_cc/book_map_poster/0913", "Image": "x.png",
                                "Text": question, "Answer choices": ["(A) ...", ..., "(E) The image
                                does not feature the content."], "Ground truth": "B", "Category",
                                "Subtask", "Task"}
      imgs/<Image>              the images (or <Image> next to the JSON)

  `category` is "Task/Subtask" (the groups the MME-RealWorld evaluation reports), the fine
  "Category" is in `meta`. Alternatively the VLMEvalKit copy `mme_realworld_lite.tsv`
  (HF `yifanzhang114/MME-RealWorld-Base64`, also named MME-RealWorld-Lite.tsv): columns `index,
  question, multi-choice options` (a Python list literal of "(A) ..." strings)`, answer, category,
  l2-category, image` (base64).

* **synthetic** -- a directory written by `monet_fast.data.write_synthetic_dataset` (its
  `train.json`, or the only .json/.jsonl file there), read with `read_monet_sft`; the gold
  reasoning stays in `Sample.reasoning` for reference.

Real-benchmark samples get `MONET_EVAL_SYSTEM`, the system prompt the Monet authors evaluated
with (it asks for the answer in \\boxed{}); pass `system=` to override. Every malformed file or
row raises `DataError` naming the file and row; a missing file names the file the layout expects.
Image files named by a question file must lie inside that file's folder (no absolute paths, no
`..` or symlink leading out; `monet_fast.data.paths`) unless `allow_outside_root=True`; images
are checked like training images (`monet_fast.data.images`: empty, corrupt, pixel limit, mode).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import os
import random
import re
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from monet_fast.data.errors import DataError
from monet_fast.data.images import decode_rgb, open_rgb, probe_image
from monet_fast.data.paths import check_inside_root, resolve_image_path
from monet_fast.data.reader import parse_json, read_monet_sft
from monet_fast.data.types import Sample, Segment

BENCHMARKS: tuple[str, ...] = ("vstar", "hrbench4k", "hrbench8k", "mme-realworld-lite", "synthetic")

# The system prompt of the Monet authors' VLMEvalKit runs (README of NOVAglow646/Monet).
MONET_EVAL_SYSTEM = (
    "You are a helpful multimodal assistant. You are required to answer the question based on "
    "the image provided. Put your final answer in \\boxed{}."
)

LETTERS = string.ascii_uppercase
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# "(A) rubber" -- the option lines of V* text and MME-RealWorld "Answer choices".
_PAREN_OPTION = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$", re.DOTALL)
# VLMEvalKit: an image field this short is the index of another row that holds the image.
_IMAGE_REF_MAX_CHARS = 64

_VSTAR_FILE = "test_questions.jsonl"
_VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
_HRBENCH_FILES = {
    "hrbench4k": ("hr_bench_4k.tsv", "HRBench4K.tsv", "hr_bench_4k.parquet"),
    "hrbench8k": ("hr_bench_8k.tsv", "HRBench8K.tsv", "hr_bench_8k.parquet"),
}
_HRBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "category", "image")
_MME_JSON = ("MME-RealWorld-Lite.json", "data/MME-RealWorld-Lite.json")
_MME_TSV = ("mme_realworld_lite.tsv", "MME-RealWorld-Lite.tsv")
_MME_JSON_KEYS = ("Question_id", "Image", "Text", "Answer choices", "Ground truth")
_MME_TSV_COLUMNS = ("index", "question", "multi-choice options", "answer", "category", "image")

_LAYOUT_HINTS = {
    "vstar": (
        f"V* Bench (HF craigwu/vstar_bench): {_VSTAR_FILE} with images under "
        "direct_attributes/ and relative_position/, or those folders with <name>.json + image"
    ),
    "hrbench4k": "HR-Bench (HF DreamMr/HR-Bench): hr_bench_4k.tsv (base64 images) or .parquet",
    "hrbench8k": "HR-Bench (HF DreamMr/HR-Bench): hr_bench_8k.tsv (base64 images) or .parquet",
    "mme-realworld-lite": (
        "MME-RealWorld-Lite (HF yifanzhang114/MME-RealWorld-Lite, data.zip): "
        "MME-RealWorld-Lite.json + imgs/, or VLMEvalKit's mme_realworld_lite.tsv"
    ),
    "synthetic": "a directory written by monet_fast.data.write_synthetic_dataset (train.json)",
}


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


def format_mc_question(question: str, choices: Sequence[str]) -> str:
    """The question followed by one "A. option" line per choice (our synthetic task's format)."""
    lines = [question.strip()]
    lines += [f"{LETTERS[k]}. {choice}" for k, choice in enumerate(choices)]
    return "\n".join(lines)


def read_benchmark(
    name: str,
    data_dir: str | os.PathLike,
    limit: int | None = None,
    *,
    load_images: bool = False,
    system: str | None = None,
    allow_outside_root: bool = False,
) -> list[Sample]:
    """Read the first `limit` (all if None) questions of benchmark `name` from a local copy.

    Args:
        name: one of `BENCHMARKS`.
        data_dir: the folder holding the published files (layouts in the module docstring), or
            the question file itself.
        limit: read only the first `limit` questions, in file order.
        load_images: decode every image now (finds corrupt files up front; costs memory).
            By default only existence (files) or base64 validity and the image header (embedded
            images) are checked, and pixels are decoded by `Segment.load_image()`.
        system: system prompt of the samples; None gives `MONET_EVAL_SYSTEM` for the real
            benchmarks and keeps the synthetic data's own.
        allow_outside_root: accept image paths that are absolute or lead out of the question
            file's folder (`..`, symlinks); refused by default.

    Raises:
        DataError: a missing layout, malformed file or row, bad image or image path (located).
        ValueError: an unknown `name` or a negative `limit`.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {name!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"data path does not exist; expected {_LAYOUT_HINTS[name]}", file=root)
    opts = _Options(
        limit=limit,
        load_images=load_images,
        system=system or MONET_EVAL_SYSTEM,
        allow_outside_root=allow_outside_root,
    )
    if name == "vstar":
        samples = _read_vstar(root, opts)
    elif name in _HRBENCH_FILES:
        samples = _read_hrbench(name, root, opts)
    elif name == "mme-realworld-lite":
        samples = _read_mme_realworld_lite(root, opts)
    else:
        samples = _read_synthetic(root, opts, system)
    _check_unique_ids(samples)
    return samples


@dataclass(frozen=True)
class _Options:
    limit: int | None
    load_images: bool
    system: str
    allow_outside_root: bool = False


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _locate(root: Path, candidates: Sequence[str]) -> Path | None:
    """`root` itself if it is a file, else the first candidate that exists under it."""
    if root.is_file():
        return root
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    return None


def _missing(name: str, root: Path, candidates: Sequence[str]) -> DataError:
    expected = " or ".join(str(root / c) for c in candidates)
    return DataError(f"no {name} data here: expected {expected} ({_LAYOUT_HINTS[name]})", file=root)


def _check_unique_ids(samples: list[Sample]) -> None:
    # Interventions are paired item by item on sample_id; a duplicate would silently mis-pair.
    seen: dict[str, str | None] = {}
    for sample in samples:
        if sample.sample_id in seen:
            raise DataError(
                f"duplicate sample_id {sample.sample_id!r} (also at {seen[sample.sample_id]})",
                file=sample.source,
            )
        seen[sample.sample_id] = sample.source


# --------------------------------------------------------------------------------------------
# Shared row helpers
# --------------------------------------------------------------------------------------------


def _file_image(path: Path, load: bool) -> Segment:
    """An image segment for a file (path already root-checked); DataError if missing/unreadable."""
    if not os.path.isfile(path):  # False (not OSError) for a name too long
        raise DataError(f"image file not found: {path}")
    if not load:
        return Segment("image", path=str(path))
    return Segment("image", image=open_rgb(path), path=str(path))


def _row_image_path(base: Path, value: Any, field: str, opts: _Options) -> Path:
    """`base / value` for an image path read from a row, root-checked; errors name `field`."""
    try:
        return resolve_image_path(base, value, allow_outside_root=opts.allow_outside_root)
    except DataError as err:
        raise err.located(None, None, None, field) from None


def _encoded_image(value: Any, where: str, load: bool) -> Segment:
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


def _parse_paren_options(items: Sequence[Any], what: str) -> list[str]:
    """Option texts from ["(A) x", "(B) y", ...]; letters must run A, B, C... in order."""
    if not isinstance(items, (list, tuple)) or not items:
        raise DataError(f"{what} must be a non-empty list of '(A) ...' strings, got {items!r}")
    choices = []
    for k, item in enumerate(items):
        match = _PAREN_OPTION.match(item) if isinstance(item, str) else None
        if match is None or match.group(1) != LETTERS[k]:
            raise DataError(
                f"{what}[{k}] must look like '({LETTERS[k]}) text', got {str(item)[:80]!r}"
            )
        choices.append(match.group(2))
    return choices


def _gold_letter(answer: Any, choices: Sequence[str]) -> str:
    letter = str(answer).strip().strip("()").strip()
    allowed = LETTERS[: len(choices)]
    if len(letter) != 1 or letter not in allowed:
        raise DataError(f"answer must be one of the option letters {list(allowed)}, got {answer!r}")
    return letter


def _mc_sample(
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
        answer=_gold_letter(answer, choices),
        sample_id=sample_id,
        dataset_name=dataset_name,
        system=system,
        choices=list(choices),
        category=category,
        source=source,
        meta=meta,
    )


def _rows_to_samples(
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


# --------------------------------------------------------------------------------------------
# JSON / JSONL / TSV / parquet row sources
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err})", file=path) from None
    except OSError as err:
        raise DataError(f"cannot read the file ({err})", file=path) from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for row_index, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            yield row_index, parse_json(line, line_offset=row_index)
        except DataError as err:
            raise err.located(path, row_index, None) from None


def _load_json_list(path: Path) -> list:
    try:
        rows = parse_json(_read_text(path))
    except DataError as err:
        raise err.located(path, None, None) from None
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON list of questions, got {type(rows).__name__}", file=path)
    return rows


@contextmanager
def _large_csv_fields() -> Iterator[None]:
    # Base64 images are megabytes per field; csv's default limit is 128 KiB. The limit is
    # process-global, so it is restored afterwards. 2**31-1 fits a C long everywhere.
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _iter_tsv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(data row index, {column: value}) of a pandas-written TSV, streamed row by row."""
    with _large_csv_fields(), open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            header = next(reader, None)
            if header is None:
                raise DataError("empty file; expected a header row", file=path)
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(
                    f"missing column(s) {missing}; header has {header[:12]}", file=path, row=None
                )
            for row_index, values in enumerate(reader):
                if not values:
                    continue
                if len(values) != len(header):
                    raise DataError(
                        f"{len(values)} fields but the header has {len(header)} "
                        f"(line {reader.line_num})",
                        file=path,
                        row=row_index,
                    )
                yield row_index, dict(zip(header, values))
        except csv.Error as err:
            raise DataError(f"malformed TSV at line {reader.line_num}: {err}", file=path) from None
        except UnicodeDecodeError as err:
            raise DataError(f"not UTF-8 text ({err})", file=path) from None


def _iter_parquet(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq  # optional: only the parquet copies need it
    except ImportError:
        raise DataError(
            "reading .parquet needs pyarrow (pip install pyarrow); or put the .tsv file of "
            "the same benchmark next to it",
            file=path,
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid/OSError family
        raise DataError(f"cannot open parquet ({type(err).__name__}: {err})", file=path) from None
    names = parquet.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"missing column(s) {missing}; columns are {names[:12]}", file=path)
    row_index = 0
    # Small batches: each row carries a multi-MB image.
    for batch in parquet.iter_batches(batch_size=8):
        for record in batch.to_pylist():
            yield row_index, record
            row_index += 1


def _cell(row: dict[str, Any], column: str) -> str:
    """A cell as stripped text; missing, None and NaN (pandas' empty cell) give ""."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _table_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix == ".parquet":
        return _iter_parquet(path, required)
    return _iter_tsv(path, required)


def _resolve_image_refs(
    path: Path, samples_rows: list[tuple[int, dict[str, Any]]], required: Sequence[str]
) -> dict[str, Any]:
    """index -> image value for every VLMEvalKit image reference among the selected rows."""
    wanted = {
        _cell(row, "image")
        for _, row in samples_rows
        if isinstance(row.get("image"), str) and len(row["image"].strip()) <= _IMAGE_REF_MAX_CHARS
    }
    if not wanted:
        return {}
    found: dict[str, Any] = {}
    for _, row in samples_rows:
        if _cell(row, "index") in wanted and not _is_ref(row.get("image")):
            found[_cell(row, "index")] = row["image"]
    if wanted - found.keys():
        # A reference to a row past `limit`: scan the rest of the file for just those images.
        for _, row in _table_rows(path, required):
            key = _cell(row, "index")
            if key in wanted and key not in found and not _is_ref(row.get("image")):
                found[key] = row["image"]
                if not wanted - found.keys():
                    break
    return found


def _is_ref(value: Any) -> bool:
    return isinstance(value, str) and len(value.strip()) <= _IMAGE_REF_MAX_CHARS


def _read_table_benchmark(
    path: Path,
    opts: _Options,
    required: Sequence[str],
    convert: Callable[[int, dict[str, Any], Segment], Sample],
) -> list[Sample]:
    """Read a VLMEvalKit-style MCQ table (TSV/parquet) with embedded base64 images."""
    # Pass 1 collects the raw rows (no decoding), so image references can be resolved first.
    rows: list[tuple[int, dict[str, Any]]] = []
    if opts.limit != 0:
        for row_index, row in _table_rows(path, required):
            rows.append((row_index, row))
            if opts.limit is not None and len(rows) >= opts.limit:
                break
    refs = _resolve_image_refs(path, rows, required)

    def convert_row(row_index: int, row: dict[str, Any]) -> Sample:
        value = row.get("image")
        if _is_ref(value):
            key = value.strip()
            if key not in refs:
                raise DataError(
                    f"image field {key!r} is neither base64 nor the index of a row with an image"
                )
            value = refs[key]
        image = _encoded_image(value, f"{path}:row {row_index}", opts.load_images)
        return convert(row_index, row, image)

    return _rows_to_samples(iter(rows), path, None, convert_row)


# --------------------------------------------------------------------------------------------
# V* Bench
# --------------------------------------------------------------------------------------------


def _split_vstar_text(text: str) -> tuple[str, list[str], str]:
    """(question, option texts, trailing instruction) of a test_questions.jsonl "text"."""
    lines = text.split("\n")
    first = next((i for i, line in enumerate(lines) if _PAREN_OPTION.match(line)), None)
    if first is None:
        raise DataError(f"no '(A) ...' option lines in text {text[:80]!r}")
    end = first
    while end < len(lines) and _PAREN_OPTION.match(lines[end]):
        end += 1
    choices = _parse_paren_options(lines[first:end], "option lines")
    return "\n".join(lines[:first]).strip(), choices, "\n".join(lines[end:]).strip()


def _read_vstar(root: Path, opts: _Options) -> list[Sample]:
    path = _locate(root, (_VSTAR_FILE,))
    if path is not None:
        return _read_vstar_jsonl(path, opts)
    if any((root / c).is_dir() for c in _VSTAR_CATEGORIES):
        return _read_vstar_folders(root, opts)
    raise DataError(
        f"no vstar data here: expected {root / _VSTAR_FILE} or the per-category folders "
        f"{', '.join(str(root / c) for c in _VSTAR_CATEGORIES)} ({_LAYOUT_HINTS['vstar']})",
        file=root,
    )


def _read_vstar_jsonl(path: Path, opts: _Options) -> list[Sample]:
    base = path.parent

    def convert(row_index: int, row: Any) -> Sample:
        if not isinstance(row, dict):
            raise DataError(f"row must be a JSON object, got {type(row).__name__}")
        missing = [k for k in ("image", "text", "label", "question_id") if k not in row]
        if missing:
            raise DataError(f"missing key(s) {missing} (keys: {sorted(row)})")
        if not isinstance(row["text"], str) or not isinstance(row["image"], str):
            raise DataError('"text" and "image" must be strings')
        question, choices, instruction = _split_vstar_text(row["text"])
        category = row.get("category")
        return _mc_sample(
            image=_file_image(_row_image_path(base, row["image"], "image", opts), opts.load_images),
            question=question,
            choices=choices,
            answer=row["label"],
            sample_id=str(row["question_id"]),
            category=None if category is None else str(category),
            dataset_name="vstar",
            source=f"{path}:{row_index}",
            system=opts.system,
            meta={"image": row["image"], "instruction": instruction},
        )

    return _rows_to_samples(_iter_jsonl(path), path, opts.limit, convert)


def _read_vstar_folders(root: Path, opts: _Options) -> list[Sample]:
    files = [
        (category, json_path)
        for category in _VSTAR_CATEGORIES
        if (root / category).is_dir()
        for json_path in sorted((root / category).glob("*.json"))
    ]
    if not files:
        raise DataError(
            f"the V* category folders hold no <name>.json annotation files ({_LAYOUT_HINTS['vstar']})",
            file=root,
        )

    def convert(row_index: int, item: tuple[str, Path]) -> Sample:
        category, json_path = item
        ann = parse_json(_read_text(json_path))
        if not isinstance(ann, dict) or "question" not in ann or "options" not in ann:
            raise DataError('expected an object with "question" and "options"', file=json_path)
        options = ann["options"]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise DataError(f'"options" must be a list of strings, got {options!r}', file=json_path)
        image_path = next(
            (
                json_path.with_suffix(s)
                for s in IMAGE_SUFFIXES
                if json_path.with_suffix(s).is_file()
            ),
            None,
        )
        if image_path is None:
            raise DataError(
                f"no image next to the annotation (tried {json_path.stem}{'|'.join(IMAGE_SUFFIXES)})",
                file=json_path,
            )
        # A symlinked image may point anywhere: the same root rule as a path in a row.
        check_inside_root(root, image_path, allow_outside_root=opts.allow_outside_root)
        rel = json_path.relative_to(root).as_posix()
        # options[0] is the correct one; a path-seeded shuffle gives stable, spread-out letters.
        order = list(range(len(options)))
        random.Random(hashlib.sha256(rel.encode()).hexdigest()).shuffle(order)
        choices = [options[i] for i in order]
        meta = {k: ann[k] for k in ("target_object", "bbox") if k in ann}
        meta["annotation"] = rel
        return _mc_sample(
            image=_file_image(image_path, opts.load_images),
            question=str(ann["question"]),
            choices=choices,
            answer=LETTERS[order.index(0)] if options else "",
            sample_id=f"{category}/{json_path.stem}",
            category=category,
            dataset_name="vstar",
            source=f"{json_path}:0",
            system=opts.system,
            meta=meta,
        )

    samples: list[Sample] = []
    for row_index, item in enumerate(files):
        try:
            samples.append(convert(row_index, item))
        except DataError as err:
            raise err.located(item[1], 0, f"{item[0]}/{item[1].stem}") from None
        if opts.limit is not None and len(samples) >= opts.limit:
            break
    return samples[: opts.limit] if opts.limit is not None else samples


# --------------------------------------------------------------------------------------------
# HR-Bench
# --------------------------------------------------------------------------------------------


def _letter_columns(row: dict[str, Any]) -> list[str]:
    """Option texts from columns A, B, C, ... filled without gaps (empty cells end the list)."""
    choices = []
    for letter in LETTERS:
        if letter not in row:
            break
        text = _cell(row, letter)
        if not text:
            break
        choices.append(text)
    later = [c for c in LETTERS[len(choices) + 1 :] if _cell(row, c)]
    if later:
        raise DataError(
            f"option column {LETTERS[len(choices)]} is empty but {later[0]} is filled "
            "(options must be filled from A without gaps)"
        )
    return choices


def _read_hrbench(name: str, root: Path, opts: _Options) -> list[Sample]:
    candidates = _HRBENCH_FILES[name]
    path = _locate(root, candidates)
    if path is None:
        raise _missing(name, root, candidates)

    def convert(row_index: int, row: dict[str, Any], image: Segment) -> Sample:
        index = _cell(row, "index")
        if not index:
            raise DataError('empty "index"')
        meta = {"index": index}
        if _cell(row, "cycle_category"):
            meta["cycle_category"] = _cell(row, "cycle_category")
        return _mc_sample(
            image=image,
            question=_cell(row, "question"),
            choices=_letter_columns(row),
            answer=_cell(row, "answer"),
            sample_id=index,
            category=_cell(row, "category") or None,
            dataset_name=name,
            source=f"{path}:{row_index}",
            system=opts.system,
            meta=meta,
        )

    return _read_table_benchmark(path, opts, _HRBENCH_COLUMNS, convert)


# --------------------------------------------------------------------------------------------
# MME-RealWorld-Lite
# --------------------------------------------------------------------------------------------


def _read_mme_realworld_lite(root: Path, opts: _Options) -> list[Sample]:
    path = _locate(root, _MME_JSON + _MME_TSV)
    if path is None:
        raise _missing("mme-realworld-lite", root, _MME_JSON + _MME_TSV)
    if path.suffix in (".tsv", ".parquet"):
        return _read_mme_table(path, opts)
    rows = _load_json_list(path)
    base = path.parent

    def convert(row_index: int, row: Any) -> Sample:
        if not isinstance(row, dict):
            raise DataError(f"question must be a JSON object, got {type(row).__name__}")
        missing = [k for k in _MME_JSON_KEYS if k not in row]
        if missing:
            raise DataError(f"missing key(s) {missing} (keys: {sorted(row)})")
        image_name = row["Image"]
        direct = _row_image_path(base, image_name, "Image", opts)  # type-checks the name first
        tried = [_row_image_path(base, f"imgs/{image_name}", "Image", opts), direct]
        image_path = next((p for p in tried if os.path.isfile(p)), None)
        if image_path is None:
            raise DataError(f"image file not found: tried {' and '.join(map(str, tried))}")
        task, subtask = str(row.get("Task", "")), str(row.get("Subtask", ""))
        category = "/".join(x for x in (task, subtask) if x) or None
        return _mc_sample(
            image=_file_image(image_path, opts.load_images),
            question=str(row["Text"]),
            choices=_parse_paren_options(row["Answer choices"], '"Answer choices"'),
            answer=row["Ground truth"],
            sample_id=str(row["Question_id"]),
            category=category,
            dataset_name="mme-realworld-lite",
            source=f"{path}:{row_index}",
            system=opts.system,
            meta={k: row[k] for k in ("Category", "Subtask", "Task", "Image") if k in row},
        )

    return _rows_to_samples(iter(enumerate(rows)), path, opts.limit, convert)


def _read_mme_table(path: Path, opts: _Options) -> list[Sample]:
    def convert(row_index: int, row: dict[str, Any], image: Segment) -> Sample:
        raw = row.get("multi-choice options")
        if isinstance(raw, str):
            try:
                # A Python list literal (VLMEvalKit writes str(list)); literal_eval runs no code.
                raw = ast.literal_eval(raw)
            except (ValueError, SyntaxError) as err:
                raise DataError(f'"multi-choice options" is not a list literal ({err})') from None
        index = _cell(row, "index")
        meta = {"index": index}
        if _cell(row, "l2-category"):
            meta["l2_category"] = _cell(row, "l2-category")
        return _mc_sample(
            image=image,
            question=_cell(row, "question"),
            choices=_parse_paren_options(raw, '"multi-choice options"'),
            answer=_cell(row, "answer"),
            sample_id=index,
            category=_cell(row, "category") or None,
            dataset_name="mme-realworld-lite",
            source=f"{path}:{row_index}",
            system=opts.system,
            meta=meta,
        )

    return _read_table_benchmark(path, opts, _MME_TSV_COLUMNS, convert)


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


def _read_synthetic(root: Path, opts: _Options, system: str | None) -> list[Sample]:
    path = _locate(root, ("train.json",))
    if path is None:
        found = sorted(p for p in root.iterdir() if p.suffix in (".json", ".jsonl"))
        if len(found) != 1:
            raise DataError(
                f"no synthetic data here: expected {root / 'train.json'} or a single .json/.jsonl "
                f"file, found {[p.name for p in found]} ({_LAYOUT_HINTS['synthetic']})",
                file=root,
            )
        path = found[0]
    samples = read_monet_sft(
        path, load_images=opts.load_images, allow_outside_root=opts.allow_outside_root
    )
    if opts.limit is not None:
        samples = samples[: opts.limit]
    for sample in samples:
        if (
            sample.choices is not None
            and sample.answer.strip() not in LETTERS[: len(sample.choices)]
        ):
            raise DataError(
                f"answer {sample.answer!r} is not an option letter of {sample.choices}",
                file=path,
                sample_id=sample.sample_id,
            )
        if system is not None:
            sample.system = system
    return samples


__all__ = [
    "BENCHMARKS",
    "MONET_EVAL_SYSTEM",
    "EncodedImageSegment",
    "format_mc_question",
    "read_benchmark",
]
