"""The data error types: `DataError` (a bad row, sample, image or path) and `DataWarning`.

Kept apart from the readers so that images, paths, sample types and every reader raise the same
error without importing each other. A message reads "file, row N, sample_id='x', field F: reason".
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """A malformed dataset file, row, sample, image or image path.

    The message names whichever of file, 0-based row, sample_id and field (e.g.
    `data[1].content[0].image`) are known; each is also an attribute.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | os.PathLike | None = None,
        row: int | None = None,
        sample_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        self.row = row
        self.sample_id = sample_id
        self.field = field
        where = []
        if self.file is not None:
            where.append(self.file)
        if row is not None:
            where.append(f"row {row}")
        if sample_id is not None:
            where.append(f"sample_id={sample_id!r}")
        if field is not None:
            where.append(f"field {field}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def located(
        self,
        file: str | os.PathLike | None,
        row: int | None,
        sample_id: str | None,
        field: str | None = None,
    ) -> DataError:
        """The same reason, with the location filled in where it was missing."""
        return DataError(
            self.reason,
            file=self.file if self.file is not None else file,
            row=self.row if self.row is not None else row,
            sample_id=self.sample_id if self.sample_id is not None else sample_id,
            field=self.field if self.field is not None else field,
        )

    def at_source(self, source: str | None, sample_id: str | None = None) -> DataError:
        """Located by a `Sample.source` string ("file:row", or any other text taken as file)."""
        file, row = split_source(source)
        return self.located(file, row, sample_id)

    def __reduce__(self):
        # Keyword-only fields survive pickling (DataLoader workers re-raise in the main process).
        return _rebuild_data_error, (self.reason, self.file, self.row, self.sample_id, self.field)


def _rebuild_data_error(
    reason: str,
    file: str | None,
    row: int | None,
    sample_id: str | None,
    field: str | None = None,
) -> DataError:
    return DataError(reason, file=file, row=row, sample_id=sample_id, field=field)


def split_source(source: str | None) -> tuple[str | None, int | None]:
    """(file, row) of a `Sample.source` "file:row"; a source without a row is all file."""
    if source is None:
        return None, None
    file, _, row_text = source.rpartition(":")
    if file and row_text.isdigit():
        return file, int(row_text)
    return source, None


class DataWarning(UserWarning):
    """Rows were skipped while reading a dataset (`on_error="skip"`)."""


__all__ = ["DataError", "DataWarning", "split_source"]
