"""Offline evaluation: metrics (torchmetrics.retrieval), BM25 baseline, cross-encoder scorer,
paired bootstrap CIs, per-slice results and plots.

Public API::

    evaluate(test_df, scorers, baseline_names=("bm25", "champion"), ...) -> EvaluationReport
    EvaluationReport.to_dict() -> flat {metric_name: float}
    ScoreFn = Callable[[pd.DataFrame], np.ndarray]
    BM25Scorer(), CrossEncoderScorer.from_dir(model_dir)
    per_query_metrics(df, scores, ...), paired_bootstrap_ci(a, b, ...)
    plot_validation_curve(history, path), plot_slice_metrics(report, path, ...)
"""

from shoprank.evaluation.bootstrap import BootstrapCI, paired_bootstrap_ci
from shoprank.evaluation.metrics import (
    MRR_K, NDCG_K, RECALL_KS, RELEVANT_GRADE, mean_metrics, metric_names, per_query_metrics,
)
from shoprank.evaluation.plots import plot_slice_metrics, plot_validation_curve
from shoprank.evaluation.report import Delta, EvaluationReport, evaluate, slug
from shoprank.evaluation.scorers import BM25Scorer, CrossEncoderScorer, ScoreFn, bm25_tokenize

__all__ = [
    "BM25Scorer", "BootstrapCI", "CrossEncoderScorer", "Delta", "EvaluationReport", "MRR_K", "NDCG_K",
    "RECALL_KS", "RELEVANT_GRADE", "ScoreFn", "bm25_tokenize", "evaluate", "mean_metrics", "metric_names",
    "paired_bootstrap_ci", "per_query_metrics", "plot_slice_metrics", "plot_validation_curve", "slug",
]
