"""Read, validate and write datasets in the reference's Monet-SFT-125K JSON format.

On disk (REFERENCE.md §1.2) a dataset is a JSON list (or JSON-lines file) of rows
`{"data": [system, user, assistant], "metadata": {"dataset_name", "sample_id"}}` whose messages
hold content items `{"type": "text", "text": ...}` / `{"type": "image", "image": relative path}`.
In memory every row becomes a `Sample` of typed segments, so nothing downstream parses strings.

Conversion of the assistant turn (the reference's rules of
`Monet_single_input_images_preprocess_function`, src/task.py, plus our segment split):

* `<abs_vis_token></abs_vis_token>` in a text item marks where the next (auxiliary) image goes; the
  placeholder is removed and the image becomes an "aux_image" segment at its position. Every
  assistant image must directly follow a text item holding a placeholder, and #images must equal
  #placeholders. (Stricter than the reference on one point: it also lets through an image that
  is the first item of the turn or follows another image; we reject those as malformed.)
* `<observation>` tags in text before the turn's first auxiliary image are stripped, text kept.
  Later `<observation>...</observation>` spans become "observation" segments (tags removed).
  A sample needs at least one observation unless `allow_no_observation=True`.
* The last `\\boxed{...}` outside observations becomes an "answer" segment with text
  `"\\boxed{...}"`, and `Sample.answer` is its content (stripped). Without any `\\boxed{}` the
  answer is the final segment's text: a final "text" segment is turned into the "answer" segment,
  a final observation stays an observation (its text is still `Sample.answer`).
* System text is overwritten with "You are a helpful assistant." (`overwrite_system=True`), and
  "\\nPut your final answer within \\boxed{}." is removed from user text unless the first user
  image path contains Zebra_CoT_visual_search / Zebra_CoT_count (`strip_boxed_instruction=True`).
* In the user turn, placeholders (rare) move the question images to their positions, as the
  reference's `process_multiple_question_img` does.

Errors: reading raises only `DataError` (a ValueError) for anything wrong with the data -- the
file (missing, not UTF-8, not JSON, too deeply nested), a row (structure, types, placeholder and
observation rules, unencodable unicode) or an image (path outside the dataset root, missing,
empty, truncated, corrupt, over `images.pixel_limit()`, unusable mode) -- naming the file, the
0-based row, the sample_id and, where one field is at fault, the field (`data[2].content[1].image`).
Bad arguments (`on_error`) raise `ValueError`. `on_error="skip"` drops bad rows and warns once
(`DataWarning`) with the count and the first reasons (`read_monet_sft_with_report` also returns
them). A file that is not valid JSON cannot be skipped row by row and always raises.

Image paths must stay inside the dataset root (no absolute paths, no `..` or symlink leading out;
`monet_fast.data.paths`) unless `allow_outside_root=True` (config `data.allow_outside_root`).
`write_monet_sft` checks every sample before it writes anything and writes each file atomically.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from monet_fast.data.boxed import find_last_boxed
from monet_fast.data.errors import DataError, DataWarning
from monet_fast.data.images import open_rgb
from monet_fast.data.paths import resolve_image_path
from monet_fast.data.types import DEFAULT_SYSTEM, Sample, Segment
from monet_fast.data.validation import (
    N_REASONS_SHOWN,
    ON_ERROR_MODES,
    OnError,
    validate_sample,
)
from monet_fast.model.tokens import LATENT_PLACEHOLDER, OBS_END, OBS_START

logger = logging.getLogger(__name__)


# Removed from user text by the reference, except for the two Zebra-CoT subsets that keep it.
BOXED_INSTRUCTION = "\nPut your final answer within \\boxed{}."
KEEP_BOXED_INSTRUCTION_MARKERS = ("Zebra_CoT_visual_search", "Zebra_CoT_count")

CONTENT_TYPES = ("image", "text")
# Strings with a meaning in the on-disk text; plain text segments must not contain them.
RESERVED_STRINGS = (LATENT_PLACEHOLDER, OBS_START, OBS_END)


@dataclass
class ReadReport:
    """What a read did: rows seen, samples kept, and (row, reason) of every skipped row."""

    path: str
    n_rows: int = 0
    n_read: int = 0
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_monet_sft(
    json_path: str | os.PathLike,
    dataset_root: str | os.PathLike | None = None,
    *,
    on_error: OnError = "raise",
    load_images: bool = True,
    allow_no_observation: bool = False,
    strip_boxed_instruction: bool = True,
    strip_early_observations: bool = True,
    overwrite_system: bool = True,
    allow_outside_root: bool = False,
) -> list[Sample]:
    """Read a Monet-SFT-format `.json` (list) or `.jsonl` file into `Sample`s.

    Args:
        json_path: the dataset file.
        dataset_root: directory the image paths are relative to; defaults to the file's directory.
            (The reference's Monet-SFT-125K stores paths like "Visual_CoT/images/x.jpg" relative
            to the Monet-SFT-125K folder, i.e. the PARENT of each train.json: pass that folder.)
        on_error: "raise" stops at the first bad row; "skip" drops bad rows and warns
            (`DataWarning`) with their number and the first reasons.
        load_images: decode every image as RGB now (missing/corrupt files are found here);
            False keeps only paths, loaded on access via `Segment.load_image()` (use `validate`
            to check the files). Prefer False for large datasets: decoded images are big.
        allow_no_observation: keep samples without any observation (reference flag).
        strip_boxed_instruction: drop "\\nPut your final answer within \\boxed{}." from user text
            (except the Zebra_CoT_visual_search / Zebra_CoT_count subsets), as the reference.
        strip_early_observations: strip `<observation>` tags before the first auxiliary image
            (reference); False makes such an observation an error instead.
        overwrite_system: replace the system text by "You are a helpful assistant." (reference).
        allow_outside_root: accept absolute image paths and paths leading out of `dataset_root`
            (`..`, symlinks); refused by default.

    Raises:
        DataError: a bad file, row or image (see the module docstring), located.
        ValueError: an unknown `on_error`.
    """
    samples, report = read_monet_sft_with_report(
        json_path,
        dataset_root,
        on_error=on_error,
        load_images=load_images,
        allow_no_observation=allow_no_observation,
        strip_boxed_instruction=strip_boxed_instruction,
        strip_early_observations=strip_early_observations,
        overwrite_system=overwrite_system,
        allow_outside_root=allow_outside_root,
    )
    return samples


def read_monet_sft_with_report(
    json_path: str | os.PathLike,
    dataset_root: str | os.PathLike | None = None,
    *,
    on_error: OnError = "raise",
    load_images: bool = True,
    allow_no_observation: bool = False,
    strip_boxed_instruction: bool = True,
    strip_early_observations: bool = True,
    overwrite_system: bool = True,
    allow_outside_root: bool = False,
) -> tuple[list[Sample], ReadReport]:
    """`read_monet_sft`, also returning a `ReadReport` of rows read and skipped."""
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
    path = Path(json_path)
    root = path.parent if dataset_root is None else Path(dataset_root)
    report = ReadReport(path=str(path))
    opts = _ReadOptions(
        dataset_root=root,
        load_images=load_images,
        allow_no_observation=allow_no_observation,
        strip_boxed_instruction=strip_boxed_instruction,
        strip_early_observations=strip_early_observations,
        overwrite_system=overwrite_system,
        default_dataset_name=path.parent.name or "dataset",
        allow_outside_root=allow_outside_root,
    )
    samples: list[Sample] = []
    for row_index, row in _iter_rows(path, on_error, report):
        report.n_rows += 1
        sample_id = _peek_sample_id(row)
        try:
            try:
                sample = _sample_from_row(row, opts, row_index, f"{path}:{row_index}")
            except DataError:
                raise
            except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as err:
                # Structure we did not anticipate: still a bad row (skippable), not a crash.
                raise DataError(f"malformed row ({type(err).__name__}: {err})") from err
        except DataError as err:
            located = err.located(path, row_index, sample_id)
            if on_error == "raise":
                raise located from None
            report.skipped.append((row_index, located.reason))
            continue
        samples.append(sample)
    report.n_read = len(samples)
    if report.skipped:
        shown = "; ".join(f"row {r}: {why}" for r, why in report.skipped[:N_REASONS_SHOWN])
        more = "" if report.n_skipped <= N_REASONS_SHOWN else "; ..."
        warnings.warn(
            f"{path}: skipped {report.n_skipped} of {report.n_rows} rows ({shown}{more})",
            DataWarning,
            stacklevel=3,
        )
    logger.info("%s: read %d samples, skipped %d rows", path, report.n_read, report.n_skipped)
    return samples, report


def _iter_rows(path: Path, on_error: OnError, report: ReadReport) -> Iterable[tuple[int, Any]]:
    """Yield (row index, decoded row). `.jsonl`: one row per non-blank line, bad lines skippable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("dataset file not found", file=path) from None
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err})", file=path) from None
    except OSError as err:
        raise DataError(f"cannot read the dataset file ({err})", file=path) from None

    if path.suffix == ".jsonl":
        for row_index, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                yield row_index, parse_json(line, line_offset=row_index)
            except DataError as err:
                error = err.located(path, row_index, None)
                if on_error == "raise":
                    raise error from None
                report.n_rows += 1
                report.skipped.append((row_index, error.reason))
        return

    try:
        rows = parse_json(text)
    except DataError as err:
        raise err.located(path, None, None) from None
    if not isinstance(rows, list):
        raise DataError(
            f"expected a JSON list of rows, got a JSON {type(rows).__name__}", file=path
        )
    yield from enumerate(rows)


def parse_json(text: str, line_offset: int = 0) -> Any:
    """json.loads with every failure a DataError; `line_offset` = lines before `text` in the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"malformed JSON at line {err.lineno + line_offset} column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise DataError("JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise DataError(f"unreadable JSON value ({err})") from None


def _peek_sample_id(row: Any) -> str | None:
    if isinstance(row, dict) and isinstance(row.get("metadata"), dict):
        sample_id = row["metadata"].get("sample_id")
        return None if sample_id is None else str(sample_id)
    return None


@dataclass(frozen=True)
class _ReadOptions:
    """The per-row conversion options of `read_monet_sft` (see its docstring)."""

    dataset_root: Path
    load_images: bool
    allow_no_observation: bool
    strip_boxed_instruction: bool
    strip_early_observations: bool
    overwrite_system: bool
    default_dataset_name: str
    allow_outside_root: bool = False


def _sample_from_row(row: Any, opts: _ReadOptions, row_index: int, source: str) -> Sample:
    """Convert one decoded row into a `Sample` (rules in the module docstring).

    Raises `DataError` without a location; the caller adds file, row and sample_id.
    """
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}")
    if "data" not in row:
        raise DataError(f'row has no "data" (keys: {sorted(row)})')
    messages = row["data"]
    if not isinstance(messages, list):
        raise DataError(
            f'"data" must be a list of messages, got {type(messages).__name__}', field="data"
        )
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DataError(
            f'"metadata" must be an object, got {type(metadata).__name__}', field="metadata"
        )

    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
        raise DataError(
            f"expected messages with roles [system?, user, assistant], got {roles!r:.200}",
            field="data[*].role",
        )
    by_role = {m["role"]: _content_items(m, i) for i, m in enumerate(messages)}
    msg_index = {m["role"]: i for i, m in enumerate(messages)}

    def image_maker(role: str) -> _MakeImage:
        def make(kind: Literal["image", "aux_image"], item_index: int, rel: str) -> Segment:
            field = f"data[{msg_index[role]}].content[{item_index}].image"
            try:
                return _image_segment(kind, rel, opts)
            except DataError as err:
                raise err.located(None, None, None, field) from None

        return make

    # System: the reference overwrites it unconditionally.
    system = DEFAULT_SYSTEM
    if not opts.overwrite_system and "system" in by_role:
        system = "".join(text for kind, text in by_role["system"] if kind == "text")

    question = _user_segments(
        by_role["user"],
        make_image=image_maker("user"),
        dataset_root=opts.dataset_root,
        strip_boxed_instruction=opts.strip_boxed_instruction,
    )
    reasoning = _assistant_segments(
        by_role["assistant"],
        make_image=image_maker("assistant"),
        strip_early_observations=opts.strip_early_observations,
    )
    reasoning, answer = _extract_answer(reasoning)

    known = {"dataset_name", "sample_id", "choices", "category", "meta"}
    meta = dict(metadata.get("meta") or {})
    meta.update({k: v for k, v in metadata.items() if k not in known})
    choices = metadata.get("choices")
    if choices is not None and not (
        isinstance(choices, list) and all(isinstance(c, str) for c in choices)
    ):
        raise DataError(
            f'metadata "choices" must be a list of strings, got {choices!r:.80}',
            field="metadata.choices",
        )
    sample = Sample(
        question=question,
        reasoning=reasoning,
        answer=answer,
        sample_id=str(metadata.get("sample_id", row_index)),
        dataset_name=str(metadata.get("dataset_name", opts.default_dataset_name)),
        system=system,
        choices=choices,
        category=None if metadata.get("category") is None else str(metadata["category"]),
        source=source,
        meta=meta,
    )
    validate_sample(sample, check_files=False, allow_no_observation=opts.allow_no_observation)
    return sample


def _content_items(message: dict, msg_index: int) -> list[tuple[str, str]]:
    """A message's content as (type, text-or-image-path) pairs, type-checked.

    Errors name the field (`data[i].content[j]...`); the caller adds file, row and sample_id.
    """
    role = message["role"]
    content = message.get("content")
    field = f"data[{msg_index}].content"
    if isinstance(content, str):  # plain-string content is valid chat format
        _check_utf8(content, f"{role} content", field)
        return [("text", content)]
    if not isinstance(content, list):
        raise DataError(
            f"{role} message content must be a list, got {type(content).__name__}", field=field
        )
    items: list[tuple[str, str]] = []
    for j, item in enumerate(content):
        where = f"{field}[{j}]"
        if not isinstance(item, dict):
            raise DataError(
                f"{role} item {j} must be an object, got {type(item).__name__}", field=where
            )
        kind = item.get("type")
        if kind == "text":
            value = item.get("text")
        elif kind == "image":
            # "image_file_name" is the key of the reference's older (AVT) files.
            value = item.get("image", item.get("image_file_name"))
        else:
            raise DataError(
                f"unknown content item type {kind!r:.80} in {role} item {j} "
                f"(allowed: {list(CONTENT_TYPES)})",
                field=f"{where}.type",
            )
        if not isinstance(value, str):
            raise DataError(
                f"{role} item {j} ({kind}) needs a string, got {value!r:.80}",
                field=f"{where}.{kind}",
            )
        if kind == "text":
            _check_utf8(value, f"{role} item {j} text", f"{where}.text")
        items.append((kind, value))
    return items


def _check_utf8(text: str, what: str, field: str) -> None:
    # JSON can spell lone surrogates ("\ud800"); they crash tokenizers and UTF-8 writers later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            f"{what} is not valid unicode ({err.reason} at {err.start})", field=field
        ) from None


# make_image(kind, content item index, relative path) -> image segment (field-located errors)
_MakeImage = Callable[[Literal["image", "aux_image"], int, str], Segment]


def _image_segment(
    kind: Literal["image", "aux_image"], rel_path: str, opts: _ReadOptions
) -> Segment:
    root = opts.dataset_root
    path = resolve_image_path(root, rel_path, allow_outside_root=opts.allow_outside_root)
    if not opts.load_images:
        return Segment(kind, path=str(path))
    if not os.path.exists(path):  # False (not OSError) for a name too long, a bad symlink...
        hint = _root_hint(rel_path, root)
        raise DataError(f"missing image file {str(path)!r}{hint}")
    return Segment(kind, image=open_rgb(path), path=str(path))


def _root_hint(rel_path: str, dataset_root: Path) -> str:
    # Monet-SFT-125K paths are relative to the folder above each train.json; a wrong root is the
    # commonest cause of "missing image", so say so when the parent folder has the file.
    parent = dataset_root.resolve().parent
    if os.path.isfile(parent / rel_path):
        return f" (the file exists under {str(parent)!r}: pass dataset_root={str(parent)!r})"
    return f" (dataset_root is {str(dataset_root)!r})"


def _user_segments(
    items: list[tuple[str, str]],
    *,
    make_image: _MakeImage,
    dataset_root: Path,
    strip_boxed_instruction: bool,
) -> list[Segment]:
    image_items = [(j, value) for j, (kind, value) in enumerate(items) if kind == "image"]
    keep_instruction = bool(image_items) and any(
        marker in str(dataset_root / image_items[0][1]) for marker in KEEP_BOXED_INSTRUCTION_MARKERS
    )
    images = [make_image("image", j, p) for j, p in image_items]
    texts = []
    for kind, value in items:
        if kind == "text":
            if strip_boxed_instruction and not keep_instruction:
                value = value.replace(BOXED_INSTRUCTION, "")
            texts.append(value)

    n_placeholders = sum(t.count(LATENT_PLACEHOLDER) for t in texts)
    segments: list[Segment] = []
    image_iter, text_iter = iter(images), iter(texts)
    if n_placeholders == 0:
        for kind, _ in items:
            segments.append(
                next(image_iter) if kind == "image" else Segment("text", next(text_iter))
            )
    else:
        # The reference moves question images to the placeholders of the prompt.
        if n_placeholders != len(images):
            raise DataError(
                f"user turn has {len(images)} images but {n_placeholders} "
                f"{LATENT_PLACEHOLDER!r} placeholders"
            )
        for text in texts:
            pieces = text.split(LATENT_PLACEHOLDER)
            for k, piece in enumerate(pieces):
                if k:
                    segments.append(next(image_iter))
                segments.append(Segment("text", piece))
    return [s for s in segments if s.kind != "text" or s.text]


def _assistant_segments(
    items: list[tuple[str, str]],
    *,
    make_image: _MakeImage,
    strip_early_observations: bool,
) -> list[Segment]:
    # Pairing rules first (cheap, and before any image is decoded).
    n_images = n_placeholders = 0
    for j, (kind, value) in enumerate(items):
        if kind == "text":
            n_placeholders += value.count(LATENT_PLACEHOLDER)
            continue
        n_images += 1
        previous = items[j - 1] if j > 0 else None
        if previous is None or previous[0] != "text" or LATENT_PLACEHOLDER not in previous[1]:
            raise DataError(
                f"auxiliary image {value!r} (assistant item {j}) is not immediately preceded by "
                f"a text item containing {LATENT_PLACEHOLDER!r}"
            )
    if n_images != n_placeholders:
        raise DataError(
            f"assistant turn has {n_images} auxiliary images but {n_placeholders} "
            f"{LATENT_PLACEHOLDER!r} placeholders"
        )
    # With both rules, each image's preceding text item holds exactly one placeholder and no
    # other item holds any, so "image at its placeholder" is "split that text item around it".

    pieces: list[str | Segment] = []
    after_placeholder = ""
    seen_image = False
    for j, (kind, value) in enumerate(items):
        if kind == "image":
            pieces.append(make_image("aux_image", j, value))
            pieces.append(after_placeholder)
            after_placeholder = ""
            seen_image = True
            continue
        if not seen_image and strip_early_observations:
            # Reference: an observation needs an auxiliary image before it in the turn; earlier
            # tags are dropped, their text kept.
            value = value.replace(OBS_START, "").replace(OBS_END, "")
        before, found, after = value.partition(LATENT_PLACEHOLDER)
        pieces.append(before)
        if found:
            after_placeholder = after

    segments: list[Segment] = []
    text = ""
    for piece in pieces:
        if isinstance(piece, str):
            text += piece  # content items are concatenated by the chat template
            continue
        segments.extend(_split_observations(text))
        segments.append(piece)
        text = ""
    segments.extend(_split_observations(text))
    return segments


def _split_observations(text: str) -> list[Segment]:
    """Split text at `<observation>...</observation>` spans into text/observation segments."""
    segments: list[Segment] = []
    pos = 0
    while True:
        start = text.find(OBS_START, pos)
        stray_end = text.find(OBS_END, pos)
        if start == -1:
            if stray_end != -1:
                raise DataError(f"{OBS_END!r} without a matching {OBS_START!r}")
            break
        if stray_end != -1 and stray_end < start:
            raise DataError(f"{OBS_END!r} without a matching {OBS_START!r}")
        end = text.find(OBS_END, start + len(OBS_START))
        if end == -1:
            raise DataError(f"unclosed {OBS_START!r} (observations cannot span an image)")
        inner = text[start + len(OBS_START) : end]
        if OBS_START in inner:
            raise DataError(f"nested {OBS_START!r}")
        if start > pos:
            segments.append(Segment("text", text[pos:start]))
        segments.append(Segment("observation", inner))
        pos = end + len(OBS_END)
    if pos < len(text):
        segments.append(Segment("text", text[pos:]))
    return segments


def _extract_answer(reasoning: list[Segment]) -> tuple[list[Segment], str]:
    """Split off the answer segment; returns (segments, Sample.answer)."""
    for idx in range(len(reasoning) - 1, -1, -1):
        seg = reasoning[idx]
        if seg.kind != "text":
            continue
        found = find_last_boxed(seg.text)
        if found is None:
            continue
        start, end, content = found
        if not content.strip():
            raise DataError(f"empty answer {seg.text[start:end]!r}")
        pieces = [
            Segment("text", seg.text[:start]),
            Segment("answer", seg.text[start:end]),
            Segment("text", seg.text[end:]),
        ]
        pieces = [p for p in pieces if p.kind == "answer" or p.text]
        return reasoning[:idx] + pieces + reasoning[idx + 1 :], content.strip()

    # No \boxed{}: the final segment's text is the answer (documented fallback).
    if not reasoning or reasoning[-1].kind == "aux_image":
        raise DataError("empty answer: the assistant turn has no text after its last image")
    last = reasoning[-1]
    if not last.text.strip():
        raise DataError("empty answer: the assistant turn ends with empty text")
    if last.kind == "text":
        reasoning = reasoning[:-1] + [Segment("answer", last.text)]
    return reasoning, last.text.strip()


__all__ = [
    "BOXED_INSTRUCTION",
    "DataError",
    "DataWarning",
    "ReadReport",
    "read_monet_sft",
    "read_monet_sft_with_report",
]
