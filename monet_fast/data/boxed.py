"""`\\boxed{...}` spans in text, braces balanced (the answer marker of Monet-SFT data and of
model responses)."""

from __future__ import annotations

from monet_fast.data.errors import DataError

BOXED_OPEN = "\\boxed{"


def matching_brace(text: str, open_index: int) -> int:
    """Index of the `}` that closes the `{` at `open_index` (nesting counted), or -1."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def find_last_boxed(text: str) -> tuple[int, int, str] | None:
    """(start, end, content) of the last top-level `\\boxed{...}` in `text`, braces balanced.

    `text[start:end]` is the whole span; None if there is none. Raises DataError if unclosed.
    """
    last = None
    pos = 0
    while (start := text.find(BOXED_OPEN, pos)) != -1:
        close = matching_brace(text, start + len(BOXED_OPEN) - 1)
        if close == -1:
            raise DataError(f"unclosed {BOXED_OPEN}...}} in {text[start : start + 60]!r}")
        last = (start, close + 1, text[start + len(BOXED_OPEN) : close])
        pos = close + 1
    return last


__all__ = ["BOXED_OPEN", "find_last_boxed", "matching_brace"]
