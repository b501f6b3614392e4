"""Serving latency of rankers, measured side by side in one process and one run.

A timing that decides something (the promotion gate) must not be one noisy measurement
against an absolute number: on a busy 2-core machine the same model measured 53 ms per pair
one minute and 40 the next.  So:

* the unit is one **ranking request**: one query with ``n_candidates`` products (the
  ranking API's ``/rank`` call; default 50), built from the test split
  (:func:`ranking_request`);
* each ranker is warmed up (``warmup`` calls), then timed for ``rounds`` rounds; in every
  round each ranker scores the same request once, in alternating order, so background load
  hits them alike (:func:`timed_rounds`); the figure is the **median** over rounds (:func:`median_ms`);
* the gate compares the challenger with the champion timed in the same run as a **ratio**,
  the median over rounds of the two calls of each round (:func:`paired_ratio`;
  ``SHOPRANK_GATE_MAX_LATENCY_RATIO``, default 1.25), plus a generous absolute per-request
  budget (``SHOPRANK_GATE_MAX_LATENCY_MS``) that catches a model far too slow for any SLO.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import numpy as np
import pandas as pd

ScoreFn = Callable[[pd.DataFrame], np.ndarray]


def ranking_request(test: pd.DataFrame, n_candidates: int = 50) -> pd.DataFrame:
    """One request of ``n_candidates`` (query, text) rows: the test query with the most
    candidates, its texts repeated in order when it has fewer."""
    if n_candidates < 1:
        raise ValueError("n_candidates must be >= 1")
    if test.empty:
        raise ValueError("no test rows to build a ranking request from")
    sizes = test.groupby(test["query"].astype(str), sort=True).size()
    query = sizes.idxmax()
    texts = test.loc[test["query"].astype(str) == query, "text"].fillna("").astype(str).tolist()
    texts = [texts[i % len(texts)] for i in range(n_candidates)]
    return pd.DataFrame({"query": [query] * n_candidates, "text": texts})


def median_ms(rounds: Mapping[str, list[float]]) -> dict[str, float]:
    """Median milliseconds per request of each scorer over its timed rounds."""
    return {name: float(statistics.median(ts)) for name, ts in rounds.items()}


def paired_ratio(rounds: Mapping[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator / denominator`` timed in the same round: a load burst
    that slows one round slows both calls of that round, so it cancels in the ratio (the ratio
    of the two medians can pair a quiet call with a busy one)."""
    ratios = [a / max(b, 1e-9) for a, b in zip(rounds[numerator], rounds[denominator])]
    if not ratios:
        raise ValueError("no timed rounds")
    return float(statistics.median(ratios))


def timed_rounds(scorers: Mapping[str, ScoreFn], request: pd.DataFrame, rounds: int = 7,
                 warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds of each scorer in each round (see the module docstring)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(scorers)
    for _ in range(warmup):
        for name in names:
            scorers[name](request)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            scorers[name](request)
            times[name].append((time.perf_counter() - t0) * 1000.0)
    return times
