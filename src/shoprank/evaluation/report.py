"""``evaluate()``: score a test split with several scorers, compare, slice, bootstrap.

Scorers named in ``baseline_names`` (``bm25``, ``champion``) are baselines; the others are
candidates (normally one: the challenger).  Every candidate is compared with every baseline
by a paired bootstrap over queries, overall and per slice.

Flat metric names (:meth:`EvaluationReport.to_dict`) are the same in every run so MLflow's
compare view lines them up::

    ndcg_at_10, mrr_at_10, recall_at_10, recall_at_20, ndcg_exp_at_10, n_queries  candidate
    bm25_ndcg_at_10, champion_mrr_at_10, ...                                      baselines
    delta_ndcg_at_10_vs_bm25, delta_ndcg_at_10_vs_bm25_lo / _hi                   paired bootstrap
    query_freq_bucket_head_ndcg_at_10, category_shoes_bm25_ndcg_at_10             slices
    delta_ndcg_at_10_vs_champion_query_freq_bucket_tail_lo / _hi                  slice deltas (primary metric)

Slices: ``query_freq_bucket`` and ``category`` are *query-level* attributes; when a column
varies within a query the query takes its most frequent value.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from shoprank.evaluation.bootstrap import CONFIDENCE, N_BOOT, SEED, BootstrapCI, paired_bootstrap_ci
from shoprank.evaluation.metrics import (
    MRR_K, NDCG_K, RECALL_KS, RELEVANT_GRADE, mean_metrics, metric_names, per_query_metrics,
)
from shoprank.evaluation.scorers import ScoreFn

log = logging.getLogger(__name__)

SLICE_COLUMNS = ("query_freq_bucket", "category")
DEFAULT_BASELINES = ("bm25", "champion")


def slug(value: Any) -> str:
    """Metric-name-safe lower-case token: 'Home > Kitchen' -> 'home_kitchen'."""
    s = re.sub(r"[^0-9a-z]+", "_", str(value).lower()).strip("_")
    return s or "none"


@dataclass(frozen=True)
class Delta:
    """Candidate minus baseline for one metric (optionally within one slice)."""

    candidate: str
    baseline: str
    metric: str
    ci: BootstrapCI
    slice_column: str | None = None
    slice_value: str | None = None


@dataclass
class EvaluationReport:
    overall: dict[str, dict[str, float]]  # scorer -> metric -> mean over queries
    per_query: dict[str, pd.DataFrame]  # scorer -> per-query metrics (+ slice columns)
    slices: pd.DataFrame  # long: scorer, slice_column, slice_value, metric, value, n_queries
    deltas: list[Delta]
    candidates: list[str]
    baselines: list[str]
    metrics: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def delta(self, metric: str, baseline: str, candidate: str | None = None,
              slice_column: str | None = None, slice_value: str | None = None) -> Delta | None:
        candidate = candidate or (self.candidates[0] if self.candidates else None)
        for d in self.deltas:
            if (d.candidate, d.baseline, d.metric, d.slice_column, d.slice_value) == (
                candidate, baseline, metric, slice_column, slice_value
            ):
                return d
        return None

    def to_dict(self, candidate: str | None = None, include_slices: bool = True) -> dict[str, float]:
        """Flat ``name -> float`` for MLflow (names stable across runs; see module docstring)."""
        if candidate is None:
            if len(self.candidates) > 1:
                raise ValueError(f"several candidates {self.candidates}: say which one")
            candidate = self.candidates[0] if self.candidates else None
        out: dict[str, float] = {}
        prefix = {name: "" if name == candidate else f"{slug(name)}_" for name in self.overall}
        for name, values in self.overall.items():
            if name != candidate and name not in self.baselines:
                continue
            for m, v in values.items():
                out[f"{prefix[name]}{m}"] = v
        for d in self.deltas:
            if d.candidate != candidate:
                continue
            if d.slice_column is not None and (not include_slices or d.metric != self.primary_metric):
                continue
            base = f"delta_{d.metric}_vs_{slug(d.baseline)}"
            if d.slice_column is not None:
                base += f"_{d.slice_column}_{slug(d.slice_value)}"
            out[base], out[base + "_lo"], out[base + "_hi"] = d.ci.mean, d.ci.lo, d.ci.hi
        if include_slices and not self.slices.empty:
            for row in self.slices.itertuples(index=False):
                if row.scorer != candidate and row.scorer not in self.baselines:
                    continue
                key = f"{row.slice_column}_{slug(row.slice_value)}_{prefix[row.scorer]}{row.metric}"
                out[key] = float(row.value)
        return out

    def summary(self) -> str:
        """Plain-text table for logs / the approval card."""
        w = max([14, *(len(m) + 2 for m in self.metrics)])  # "ndcg_exp_at_10" is 14 wide: keep a gap
        lines = ["scorer".ljust(14) + "".join(m.rjust(w) for m in self.metrics)]
        for name, values in self.overall.items():
            lines.append(name.ljust(14) + "".join(f"{values.get(m, float('nan')):{w}.4f}" for m in self.metrics))
        for d in self.deltas:
            if d.slice_column is None:
                lines.append(
                    f"{d.candidate} - {d.baseline} {d.metric}: {d.ci.mean:+.4f} "
                    f"[{d.ci.lo:+.4f}, {d.ci.hi:+.4f}] ({d.ci.n_queries} queries)"
                )
        return "\n".join(lines)


def _query_slices(df: pd.DataFrame, slice_cols: Sequence[str], queries: pd.Index) -> pd.DataFrame:
    present = [c for c in slice_cols if c in df.columns]
    if not present:
        return pd.DataFrame(index=queries)
    sub = df[["query", *present]].copy()
    sub["query"] = sub["query"].astype(str)
    out = {}
    for c in present:
        col = sub[["query", c]].dropna()
        mode = col.groupby("query")[c].agg(lambda s: s.astype(str).value_counts().index[0])
        out[c] = mode.reindex(queries)
    return pd.DataFrame(out, index=queries)


def evaluate(
    test_df: pd.DataFrame,
    scorers: Mapping[str, ScoreFn],
    baseline_names: Sequence[str] = DEFAULT_BASELINES,
    *,
    slice_cols: Sequence[str] = SLICE_COLUMNS,
    ndcg_k: int = NDCG_K,
    mrr_k: int = MRR_K,
    recall_ks: Sequence[int] = RECALL_KS,
    relevant_grade: int = RELEVANT_GRADE,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> EvaluationReport:
    """Score ``test_df`` with each scorer and build the report (see module docstring)."""
    missing = [c for c in ("query", "text", "grade") if c not in test_df.columns]
    if missing:
        raise ValueError(f"test split lacks columns {missing}")
    if not scorers:
        raise ValueError("no scorers given")
    df = test_df.reset_index(drop=True)
    names = metric_names(ndcg_k, mrr_k, recall_ks)
    baselines = [n for n in scorers if n in set(baseline_names)]
    candidates = [n for n in scorers if n not in set(baseline_names)]

    per_query: dict[str, pd.DataFrame] = {}
    overall: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    slices_of_query: pd.DataFrame | None = None
    for name, fn in scorers.items():
        t0 = time.perf_counter()
        scores = np.asarray(fn(df), dtype=np.float64).reshape(-1)
        timings[f"{name}_scoring_s"] = time.perf_counter() - t0
        pq = per_query_metrics(df, scores, ndcg_k=ndcg_k, mrr_k=mrr_k, recall_ks=recall_ks,
                               relevant_grade=relevant_grade)
        if slices_of_query is None:
            slices_of_query = _query_slices(df, slice_cols, pq.index)
        pq = pq.join(slices_of_query)
        per_query[name] = pq
        overall[name] = {**mean_metrics(pq, names), "n_queries": float(pq[names[0]].notna().sum())}
        log.info("%s: %s", name, " ".join(f"{m} {overall[name][m]:.4f}" for m in names))
    assert slices_of_query is not None

    # per-slice means
    rows = []
    for name, pq in per_query.items():
        for col in slices_of_query.columns:
            for value, group in pq.groupby(col, dropna=True):
                for m in names:
                    rows.append({
                        "scorer": name, "slice_column": col, "slice_value": str(value), "metric": m,
                        "value": float(group[m].mean(skipna=True)) if group[m].notna().any() else float("nan"),
                        "n_queries": int(group[m].notna().sum()),
                    })
    slices = pd.DataFrame(rows, columns=["scorer", "slice_column", "slice_value", "metric", "value", "n_queries"])

    # paired bootstrap deltas: every metric overall, the primary metric per slice
    deltas: list[Delta] = []
    boot = dict(n_boot=n_boot, seed=seed, confidence=confidence)
    for cand in candidates:
        for base in baselines:
            a, b = per_query[cand], per_query[base]
            for m in names:
                deltas.append(Delta(cand, base, m, paired_bootstrap_ci(a[m].to_numpy(), b[m].to_numpy(), **boot)))
            primary = names[0]
            for col in slices_of_query.columns:
                for value in sorted(slices_of_query[col].dropna().astype(str).unique()):
                    mask = (slices_of_query[col].astype(str) == value).to_numpy()
                    ci = paired_bootstrap_ci(a[primary].to_numpy()[mask], b[primary].to_numpy()[mask], **boot)
                    deltas.append(Delta(cand, base, primary, ci, col, value))

    params = {
        "ndcg_k": ndcg_k, "mrr_k": mrr_k, "recall_ks": list(recall_ks), "relevant_grade": relevant_grade,
        "n_boot": n_boot, "seed": seed, "confidence": confidence, "n_pairs": len(df),
        "n_queries": int(df["query"].nunique()), "slice_columns": list(slices_of_query.columns),
    }
    report = EvaluationReport(overall, per_query, slices, deltas, candidates, baselines, names, params, timings)
    log.info("evaluation:\n%s", report.summary())
    return report
