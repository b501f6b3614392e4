"""Paired bootstrap confidence intervals for per-query metric differences.

Both systems are scored on the same queries; the unit of resampling is the query.  For
``n_boot`` resamples (with replacement, ``numpy.random.default_rng(seed)``) the mean of the
per-query difference ``a - b`` is recomputed; the interval is the percentile interval at the
requested confidence (default 95%: the 2.5th and 97.5th percentiles).  Queries where either
value is NaN (metric undefined) are dropped first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 1000
SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class BootstrapCI:
    """Mean per-query difference with its bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n_queries: int
    prob_not_positive: float  # share of resampled means <= 0 (one-sided evidence against a gain)
    n_boot: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_bootstrap_ci(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
    chunk: int = 100,
) -> BootstrapCI:
    """Bootstrap CI of ``mean(a - b)`` over queries (a, b aligned per query)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-d and aligned, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = a[keep] - b[keep]
    n = len(diff)
    if n == 0:
        nan = float("nan")
        return BootstrapCI(nan, nan, nan, 0, nan, n_boot, confidence)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):  # bounded memory: chunk x n indices at a time
        size = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(size, n))
        means[start : start + size] = diff[idx].mean(axis=1)
    alpha = 1 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(
        mean=float(diff.mean()), lo=float(lo), hi=float(hi), n_queries=n,
        prob_not_positive=float((means <= 0).mean()), n_boot=n_boot, confidence=confidence,
    )
