"""Scores of a packaged model on an evaluation split, kept in S3 and reused.

Every daily update scores the same golden test split with the champion; the champion of
today was usually scored yesterday as the challenger. A model's scores on the same rows do
not change, so :func:`cached_scorer` keeps them under
``reports/scores/<model key>/<rows digest>.npy`` and reads them back instead of scoring
again (on a busy 2-core worker that is minutes per run).

* ``model key``: the MLflow LoggedModel id of the packaged model (``m-...``; one per logged
  model, so a retried training that logs a new model never reads the old one's scores);
* ``rows digest``: SHA-256 of the ``query`` and ``text`` columns, in order; any change of the
  rows (another snapshot, another candidate set, another text template) is another entry.

Only evaluation reads the cache. Latency is always timed on the model itself.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from typing import Callable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ScoreFn = Callable[[pd.DataFrame], np.ndarray]
PREFIX = "reports/scores/"


def rows_digest(df: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(df[["query", "text"]].astype(str), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:32]


def cache_key(model_key: str, df: pd.DataFrame) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_key)
    return f"{PREFIX}{safe}/{rows_digest(df)}.npy"


def cached_scorer(score: ScoreFn, storage, model_key: str | None) -> ScoreFn:
    """``score`` with its results kept in S3 under ``model_key`` (no key: ``score`` itself)."""
    if not model_key:
        return score

    def scored(df: pd.DataFrame) -> np.ndarray:
        key = cache_key(model_key, df)
        if storage.exists(key):
            values = np.load(io.BytesIO(storage.get_bytes(key)), allow_pickle=False)
            if values.shape == (len(df),):
                log.info("scores of %s on %d rows read from %s", model_key, len(df), storage.uri(key))
                return values
            log.warning("ignored %s: %s scores for %d rows", storage.uri(key), values.shape, len(df))
        values = np.asarray(score(df), dtype=np.float64).reshape(-1)
        buf = io.BytesIO()
        np.save(buf, values, allow_pickle=False)
        storage.put_bytes(key, buf.getvalue(), "application/octet-stream")
        return values

    return scored
