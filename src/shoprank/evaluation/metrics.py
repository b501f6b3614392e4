"""Per-query ranking metrics via ``torchmetrics.retrieval``.

Definitions (the same for every scorer, so numbers compare across runs):

* **Ranked list.**  Each query's candidates are sorted by score, descending.  Ties are broken
  by a stable hash of ``product_id`` (independent of row order, identical across scorers and
  runs), so a scorer that gives many candidates the same score (BM25 gives 0 to every
  candidate without a query term) is not flattered by the order in which rows were written.
* **NDCG@10** (``ndcg_at_10``, the primary metric): ``RetrievalNormalizedDCG(top_k=10)``,
  gain = grade (0..3, linear gains), discount ``1 / log2(rank + 1)``, normalised by the ideal
  ordering of the same candidates::

      DCG@k = sum_{r=1..k} g_r / log2(r + 1),   NDCG@k = DCG@k / IDCG@k

  where ``g_r`` is the grade at rank ``r`` and ``IDCG@k`` the DCG@k of the grades sorted
  descending.
* **NDCG@10, exponential gains** (``ndcg_exp_at_10``): the same with gain ``2**grade - 1``
  (0, 1, 3, 7 for grades 0..3), the form used in most published learning-to-rank results
  (Burges et al. 2005; LETOR, MSLR-WEB, Yahoo! LTR)::

      DCG_exp@k = sum_{r=1..k} (2**g_r - 1) / log2(r + 1),   NDCG_exp@k = DCG_exp@k / IDCG_exp@k

  computed as ``RetrievalNormalizedDCG`` on the transformed targets ``2**grade - 1`` (its gain
  is the target itself).  It weighs exact matches (grade 3) much more than partial ones, so
  it is reported next to, not instead of, ``ndcg_at_10``; names in :func:`metric_names`
  keep ``ndcg_at_10`` first.
* **MRR@10**: ``RetrievalMRR(top_k=10)`` with relevant = ``grade >= relevant_grade`` (default
  2: substitute or exact).
* **Recall@k**: ``RetrievalRecall(top_k=k)``, same relevance threshold, over the query's judged
  candidates (not the whole catalogue).
* Queries where a metric is undefined (no grade > 0 for either NDCG; no relevant candidate for MRR /
  recall) get NaN for that metric and are left out of its mean.

torchmetrics' MRR and recall treat candidates with a score <= 0 as never retrieved; scores are
therefore converted to positive rank-based values (same order) before they are passed in.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

NDCG_K = 10
MRR_K = 10
RECALL_KS: tuple[int, ...] = (10, 20)
RELEVANT_GRADE = 2


def metric_names(ndcg_k: int = NDCG_K, mrr_k: int = MRR_K, recall_ks: Sequence[int] = RECALL_KS) -> list[str]:
    """Metric names in report order; the first (``ndcg_at_<k>``) is the primary metric."""
    return [f"ndcg_at_{ndcg_k}", f"mrr_at_{mrr_k}", *[f"recall_at_{k}" for k in recall_ks], f"ndcg_exp_at_{ndcg_k}"]


def _per_query(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """torchmetrics ``aggregation`` that keeps one value per query (in query-index order)."""
    return values


def tiebreak_key(df: pd.DataFrame) -> np.ndarray:
    """Stable pseudo-random key per row from ``product_id`` (or ``text``), for breaking score ties."""
    col = "product_id" if "product_id" in df.columns else "text"
    return pd.util.hash_pandas_object(df[col].astype(str), index=False).to_numpy()


def ranked_preds(query_codes: np.ndarray, scores: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Positive, strictly ordered stand-ins for ``scores``: higher = earlier in the query's list."""
    order = np.lexsort((tiebreak, -scores, query_codes))  # by query, score desc, then tiebreak
    preds = np.empty(len(scores), dtype=np.float64)
    preds[order] = np.arange(len(scores), 0, -1, dtype=np.float64)  # n .. 1, all > 0
    return preds


def per_query_metrics(
    df: pd.DataFrame,
    scores: np.ndarray,
    *,
    ndcg_k: int = NDCG_K,
    mrr_k: int = MRR_K,
    recall_ks: Sequence[int] = RECALL_KS,
    relevant_grade: int = RELEVANT_GRADE,
) -> pd.DataFrame:
    """One row per query (index = query, in first-appearance order) with each metric."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(df),):
        raise ValueError(f"expected {len(df)} scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    codes, queries = pd.factorize(df["query"].astype(str), sort=False)
    grades = np.array(df["grade"].to_numpy(dtype=np.int64), copy=True)
    preds = torch.from_numpy(ranked_preds(codes, scores, tiebreak_key(df)))
    indexes = torch.from_numpy(codes.astype(np.int64))
    graded = torch.from_numpy(grades)
    relevant = graded >= relevant_grade

    def run(metric, target: torch.Tensor) -> np.ndarray:
        metric.update(preds, target, indexes=indexes)
        return metric.compute().double().numpy()

    n_q = len(queries)
    out = {
        f"ndcg_at_{ndcg_k}": run(RetrievalNormalizedDCG(top_k=ndcg_k, aggregation=_per_query), graded),
        f"mrr_at_{mrr_k}": run(RetrievalMRR(top_k=mrr_k, aggregation=_per_query), relevant),
    }
    for k in recall_ks:
        out[f"recall_at_{k}"] = run(RetrievalRecall(top_k=k, aggregation=_per_query), relevant)
    exp_gain = torch.pow(2.0, graded.double()) - 1.0  # 2**grade - 1: 0, 1, 3, 7
    out[f"ndcg_exp_at_{ndcg_k}"] = run(RetrievalNormalizedDCG(top_k=ndcg_k, aggregation=_per_query), exp_gain)
    frame = pd.DataFrame(out, index=pd.Index(queries, name="query"))
    if len(frame) != n_q:  # pragma: no cover - torchmetrics contract
        raise RuntimeError("torchmetrics returned a different number of queries")
    n_relevant = np.bincount(codes, weights=relevant.numpy().astype(float), minlength=n_q)
    any_gain = np.bincount(codes, weights=grades.astype(float), minlength=n_q) > 0
    frame.loc[~any_gain, [f"ndcg_at_{ndcg_k}", f"ndcg_exp_at_{ndcg_k}"]] = np.nan
    binary_cols = [c for c in frame.columns if not c.startswith("ndcg")]
    frame.loc[n_relevant == 0, binary_cols] = np.nan
    frame["n_candidates"] = np.bincount(codes, minlength=n_q)
    frame["n_relevant"] = n_relevant.astype(int)
    return frame


def mean_metrics(per_query: pd.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """Mean of each metric over the queries where it is defined."""
    return {n: float(per_query[n].mean(skipna=True)) if per_query[n].notna().any() else float("nan") for n in names}
