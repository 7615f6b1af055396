"""Bootstrap confidence intervals for accuracy and for paired accuracy differences.

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the n items with replacement
`n_boot` times, take the statistic of each resample, report the alpha/2 and 1-alpha/2 quantiles.
`paired_bootstrap_delta` resamples ITEMS, keeping both runs' verdicts on an item together, so the
interval reflects the per-item correlation between an intervention and the baseline (the
interventions rerun the same questions); an unpaired bootstrap would be far too wide.

Vectorised with numpy: one [chunk, n] index draw per chunk, chunked to bound memory at
`_MAX_DRAW` indices. Results depend only on (values, n_boot, alpha, seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Indices drawn per chunk (8 bytes each): 2**24 -> 128 MiB at most.
_MAX_DRAW = 1 << 24


def _check(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _as_vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def bootstrap_means(x: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of the 1-D array `x`."""
    n = x.size
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _MAX_DRAW // max(n, 1))
    for start in range(0, n_boot, rows):
        m = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))  # [m, n]
        out[start : start + m] = x[idx].mean(axis=1)
    return out


def _interval(means: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """(mean, (lo, hi)): the mean of `values` (e.g. 0/1 correctness -> accuracy) and its
    percentile-bootstrap (1 - alpha) interval. Empty input gives NaNs."""
    _check(n_boot, alpha)
    x = _as_vector(values, "values")
    if x.size == 0:
        return math.nan, (math.nan, math.nan)
    return float(x.mean()), _interval(bootstrap_means(x, n_boot, seed), alpha)


def paired_bootstrap_delta(
    correct_a: Sequence[float] | np.ndarray,
    correct_b: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """(delta, (lo, hi)) with delta = mean(b) - mean(a) over the same items, in order.

    Pass the baseline as `a` and the intervention as `b` (Δaccuracy = intervention - none).
    Items are resampled jointly: resampling the per-item difference b_i - a_i is the same as
    resampling pairs and differencing the two means.
    """
    _check(n_boot, alpha)
    a = _as_vector(correct_a, "correct_a")
    b = _as_vector(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(
            f"paired runs need the same items: {a.size} vs {b.size} values (align by sample_id)"
        )
    if a.size == 0:
        return math.nan, (math.nan, math.nan)
    diff = b - a
    return float(diff.mean()), _interval(bootstrap_means(diff, n_boot, seed), alpha)


__all__ = ["bootstrap_ci", "bootstrap_means", "paired_bootstrap_delta"]
