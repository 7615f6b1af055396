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
import hashlib
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monet_fast.data.errors import DataError
from monet_fast.data.paths import check_inside_root
from monet_fast.data.reader import parse_json, read_monet_sft
from monet_fast.data.types import Sample, Segment
from monet_fast.eval.row_sources import (
    cell,
    iter_jsonl,
    load_json_list,
    read_text,
)
from monet_fast.eval.sample_rows import (
    PAREN_OPTION,
    EncodedImageSegment,
    ReadOptions,
    file_image,
    mc_sample,
    parse_paren_options,
    read_table_benchmark,
    row_image_path,
    rows_to_samples,
)
from monet_fast.tasks.prompts import LETTERS, MONET_EVAL_SYSTEM, format_mc_question

BENCHMARKS: tuple[str, ...] = ("vstar", "hrbench4k", "hrbench8k", "mme-realworld-lite", "synthetic")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
    opts = ReadOptions(
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
# V* Bench
# --------------------------------------------------------------------------------------------


def _split_vstar_text(text: str) -> tuple[str, list[str], str]:
    """(question, option texts, trailing instruction) of a test_questions.jsonl "text"."""
    lines = text.split("\n")
    first = next((i for i, line in enumerate(lines) if PAREN_OPTION.match(line)), None)
    if first is None:
        raise DataError(f"no '(A) ...' option lines in text {text[:80]!r}")
    end = first
    while end < len(lines) and PAREN_OPTION.match(lines[end]):
        end += 1
    choices = parse_paren_options(lines[first:end], "option lines")
    return "\n".join(lines[:first]).strip(), choices, "\n".join(lines[end:]).strip()


def _read_vstar(root: Path, opts: ReadOptions) -> list[Sample]:
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


def _read_vstar_jsonl(path: Path, opts: ReadOptions) -> list[Sample]:
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
        return mc_sample(
            image=file_image(row_image_path(base, row["image"], "image", opts), opts.load_images),
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

    return rows_to_samples(iter_jsonl(path), path, opts.limit, convert)


def _read_vstar_folders(root: Path, opts: ReadOptions) -> list[Sample]:
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
        ann = parse_json(read_text(json_path))
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
        return mc_sample(
            image=file_image(image_path, opts.load_images),
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
        text = cell(row, letter)
        if not text:
            break
        choices.append(text)
    later = [c for c in LETTERS[len(choices) + 1 :] if cell(row, c)]
    if later:
        raise DataError(
            f"option column {LETTERS[len(choices)]} is empty but {later[0]} is filled "
            "(options must be filled from A without gaps)"
        )
    return choices


def _read_hrbench(name: str, root: Path, opts: ReadOptions) -> list[Sample]:
    candidates = _HRBENCH_FILES[name]
    path = _locate(root, candidates)
    if path is None:
        raise _missing(name, root, candidates)

    def convert(row_index: int, row: dict[str, Any], image: Segment) -> Sample:
        index = cell(row, "index")
        if not index:
            raise DataError('empty "index"')
        meta = {"index": index}
        if cell(row, "cycle_category"):
            meta["cycle_category"] = cell(row, "cycle_category")
        return mc_sample(
            image=image,
            question=cell(row, "question"),
            choices=_letter_columns(row),
            answer=cell(row, "answer"),
            sample_id=index,
            category=cell(row, "category") or None,
            dataset_name=name,
            source=f"{path}:{row_index}",
            system=opts.system,
            meta=meta,
        )

    return read_table_benchmark(path, opts, _HRBENCH_COLUMNS, convert)


# --------------------------------------------------------------------------------------------
# MME-RealWorld-Lite
# --------------------------------------------------------------------------------------------


def _read_mme_realworld_lite(root: Path, opts: ReadOptions) -> list[Sample]:
    path = _locate(root, _MME_JSON + _MME_TSV)
    if path is None:
        raise _missing("mme-realworld-lite", root, _MME_JSON + _MME_TSV)
    if path.suffix in (".tsv", ".parquet"):
        return _read_mme_table(path, opts)
    rows = load_json_list(path)
    base = path.parent

    def convert(row_index: int, row: Any) -> Sample:
        if not isinstance(row, dict):
            raise DataError(f"question must be a JSON object, got {type(row).__name__}")
        missing = [k for k in _MME_JSON_KEYS if k not in row]
        if missing:
            raise DataError(f"missing key(s) {missing} (keys: {sorted(row)})")
        image_name = row["Image"]
        direct = row_image_path(base, image_name, "Image", opts)  # type-checks the name first
        tried = [row_image_path(base, f"imgs/{image_name}", "Image", opts), direct]
        image_path = next((p for p in tried if os.path.isfile(p)), None)
        if image_path is None:
            raise DataError(f"image file not found: tried {' and '.join(map(str, tried))}")
        task, subtask = str(row.get("Task", "")), str(row.get("Subtask", ""))
        category = "/".join(x for x in (task, subtask) if x) or None
        return mc_sample(
            image=file_image(image_path, opts.load_images),
            question=str(row["Text"]),
            choices=parse_paren_options(row["Answer choices"], '"Answer choices"'),
            answer=row["Ground truth"],
            sample_id=str(row["Question_id"]),
            category=category,
            dataset_name="mme-realworld-lite",
            source=f"{path}:{row_index}",
            system=opts.system,
            meta={k: row[k] for k in ("Category", "Subtask", "Task", "Image") if k in row},
        )

    return rows_to_samples(iter(enumerate(rows)), path, opts.limit, convert)


def _read_mme_table(path: Path, opts: ReadOptions) -> list[Sample]:
    def convert(row_index: int, row: dict[str, Any], image: Segment) -> Sample:
        raw = row.get("multi-choice options")
        if isinstance(raw, str):
            try:
                # A Python list literal (VLMEvalKit writes str(list)); literal_eval runs no code.
                raw = ast.literal_eval(raw)
            except (ValueError, SyntaxError) as err:
                raise DataError(f'"multi-choice options" is not a list literal ({err})') from None
        index = cell(row, "index")
        meta = {"index": index}
        if cell(row, "l2-category"):
            meta["l2_category"] = cell(row, "l2-category")
        return mc_sample(
            image=image,
            question=cell(row, "question"),
            choices=parse_paren_options(raw, '"multi-choice options"'),
            answer=cell(row, "answer"),
            sample_id=index,
            category=cell(row, "category") or None,
            dataset_name="mme-realworld-lite",
            source=f"{path}:{row_index}",
            system=opts.system,
            meta=meta,
        )

    return read_table_benchmark(path, opts, _MME_TSV_COLUMNS, convert)


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


def _read_synthetic(root: Path, opts: ReadOptions, system: str | None) -> list[Sample]:
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
