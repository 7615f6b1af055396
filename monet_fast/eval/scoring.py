"""Accuracy of scored items, overall and per category (what a report tabulates)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from monet_fast.tasks.scoring import ScoredItem

UNCATEGORIZED = "uncategorized"


def _field(record: ScoredItem | Mapping[str, Any], name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def accuracy_by_category(
    records: Iterable[ScoredItem | Mapping[str, Any]],
) -> dict[str, Any]:
    """Overall and per-category accuracy of records with `category` and `correct`.

    Returns {"overall": {"n", "correct", "accuracy"}, "by_category": {category: {...}}}, with
    categories sorted and a missing category counted as "uncategorized". Accuracy of an empty
    group is NaN.
    """
    totals: dict[str, list[int]] = {}
    n = correct = 0
    for record in records:
        ok = bool(_field(record, "correct"))
        category = _field(record, "category")
        key = UNCATEGORIZED if category is None else str(category)
        bucket = totals.setdefault(key, [0, 0])
        bucket[0] += 1
        bucket[1] += ok
        n += 1
        correct += ok

    def entry(total: int, good: int) -> dict[str, Any]:
        return {"n": total, "correct": good, "accuracy": good / total if total else math.nan}

    return {
        "overall": entry(n, correct),
        "by_category": {k: entry(*totals[k]) for k in sorted(totals)},
    }


__all__ = ["UNCATEGORIZED", "accuracy_by_category"]
