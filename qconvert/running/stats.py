"""Figures over many samples: the mean, and a seeded bootstrap interval around it.

verify runs every (prompt, seed) pair through the reference and the output
on the same noise, so each sample gives one paired figure.  A figure's
interval is the percentile bootstrap of the mean over those samples:
``RESAMPLES`` draws of n samples with replacement (numpy's PCG64 seeded with
``SEED``, so a report is the same bytes every run), the 2.5th and 97.5th
percentiles of the draws' means.  A paired gap between two outputs measured
on the same samples is the same interval over the per-sample differences:
that cancels what the prompts themselves contribute, so a 0.3 dB difference
can be significant when each figure alone spans 3 dB.

Percentiles are order statistics (no interpolation): a PSNR is infinite for a
sample the output reproduces exactly, and interpolating between infinities
gives NaN.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def settings() -> dict:
    """How the intervals are made, recorded beside them."""
    return {"method": "percentile bootstrap of the mean", "resamples": RESAMPLES, "seed": SEED, "level": LEVEL}


def _bootstrap_means(values: np.ndarray) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(SEED))
    picks = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
    with np.errstate(invalid="ignore"):  # inf - inf never happens: the sum of infinities of one sign is inf
        return np.sort(values[picks].mean(axis=1))


def summary(values) -> dict:
    """{"mean", "low", "high", "n"} of a figure's per-sample values (finite or infinite, never NaN)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("no samples")
    if np.isnan(v).any():
        raise ValueError("a NaN figure cannot be summarised; verify refuses non-finite outputs before this")
    with np.errstate(invalid="ignore"):  # +inf and -inf together (never from verify) would give NaN
        mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    draws = _bootstrap_means(v)
    tail = (1 - LEVEL) / 2
    low = draws[int(math.floor(tail * RESAMPLES))]
    high = draws[min(RESAMPLES - 1, int(math.ceil((1 - tail) * RESAMPLES)) - 1)]
    return {"mean": mean, "low": float(low), "high": float(high), "n": int(v.size)}


def paired_gap(a, b) -> dict:
    """The interval of mean(a - b) over samples measured on the same inputs (a[i] and b[i] are one sample)."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError("paired figures need the same samples")
    return summary(_difference(x, y) for x, y in zip(a, b))


def _difference(x: float, y: float) -> float:
    if math.isinf(x) and math.isinf(y) and (x > 0) == (y > 0):
        return 0.0  # both reproduce the sample exactly: no gap
    return x - y
