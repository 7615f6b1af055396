"""Row sources of the benchmark readers: UTF-8 text, JSON lists, JSONL, pandas-written TSV and
parquet tables (streamed), and VLMEvalKit's image references between table rows.

Every malformed file or row raises `DataError` naming the file and the 0-based data row.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monet_fast.data.errors import DataError
from monet_fast.data.reader import parse_json

# VLMEvalKit: an image field this short is the index of another row that holds the image.
IMAGE_REF_MAX_CHARS = 64


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err})", file=path) from None
    except OSError as err:
        raise DataError(f"cannot read the file ({err})", file=path) from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for row_index, line in enumerate(read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            yield row_index, parse_json(line, line_offset=row_index)
        except DataError as err:
            raise err.located(path, row_index, None) from None


def load_json_list(path: Path) -> list:
    try:
        rows = parse_json(read_text(path))
    except DataError as err:
        raise err.located(path, None, None) from None
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON list of questions, got {type(rows).__name__}", file=path)
    return rows


@contextmanager
def large_csv_fields() -> Iterator[None]:
    # Base64 images are megabytes per field; csv's default limit is 128 KiB. The limit is
    # process-global, so it is restored afterwards. 2**31-1 fits a C long everywhere.
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def iter_tsv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(data row index, {column: value}) of a pandas-written TSV, streamed row by row."""
    with large_csv_fields(), open(path, newline="", encoding="utf-8") as handle:
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


def iter_parquet(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
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


def cell(row: dict[str, Any], column: str) -> str:
    """A cell as stripped text; missing, None and NaN (pandas' empty cell) give ""."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def table_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix == ".parquet":
        return iter_parquet(path, required)
    return iter_tsv(path, required)


def resolve_image_refs(
    path: Path, samples_rows: list[tuple[int, dict[str, Any]]], required: Sequence[str]
) -> dict[str, Any]:
    """index -> image value for every VLMEvalKit image reference among the selected rows."""
    wanted = {
        cell(row, "image")
        for _, row in samples_rows
        if isinstance(row.get("image"), str) and len(row["image"].strip()) <= IMAGE_REF_MAX_CHARS
    }
    if not wanted:
        return {}
    found: dict[str, Any] = {}
    for _, row in samples_rows:
        if cell(row, "index") in wanted and not is_image_ref(row.get("image")):
            found[cell(row, "index")] = row["image"]
    if wanted - found.keys():
        # A reference to a row past `limit`: scan the rest of the file for just those images.
        for _, row in table_rows(path, required):
            key = cell(row, "index")
            if key in wanted and key not in found and not is_image_ref(row.get("image")):
                found[key] = row["image"]
                if not wanted - found.keys():
                    break
    return found


def is_image_ref(value: Any) -> bool:
    return isinstance(value, str) and len(value.strip()) <= IMAGE_REF_MAX_CHARS


__all__ = [
    "IMAGE_REF_MAX_CHARS",
    "cell",
    "is_image_ref",
    "iter_jsonl",
    "iter_parquet",
    "iter_tsv",
    "load_json_list",
    "read_text",
    "resolve_image_refs",
    "table_rows",
]
