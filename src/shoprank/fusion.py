"""Learned fusion of the cross-encoder with lexical evidence: never worse than BM25 where the
model knows little.

A cross-encoder fine-tuned for a few hundred steps orders a query's relevant products well
but has seen few of a catalogue's off-topic products; BM25 with catalogue statistics knows
nothing of meaning but is rarely fooled into ranking a product with none of the query's
words on top.  The final score of a shoprank model combines both, **per pair** (no list
context, so serving can score any subset of candidates in any batches):

    score(q, d) = w_ce * ce(q, d) + w_bm25 * bm25(q, d) / idf_sum(q) + w_cov * coverage(q, d)

* ``ce``: the cross-encoder's logit;
* ``bm25 / idf_sum``: Lucene BM25 with the catalogue's statistics (:mod:`shoprank.lexical`),
  divided by the sum of the query terms' IDF, its upper bound, so the feature is in [0, 1)
  and comparable across queries of different lengths;
* ``coverage``: the IDF-weighted share of the query's terms present in the product text.

**Fitting.** The weights are fitted after training on the **validation split only** (never
the test split; never the training split, whose cross-encoder scores are over-confident),
in two steps:

1. the *direction*: a pairwise logistic (RankNet) objective over every pair of a query's
   candidates with different grades, each pair weighted by its grade difference, plus a
   small L2 penalty, solved with L-BFGS (scipy); this gives the relative weight of BM25
   and coverage (the lexical part) and of the cross-encoder;
2. the *mix*: the pairwise loss counts every pair alike, NDCG@10 only the top of each list,
   so the share ``t`` of the (standardised) lexical part against the (standardised)
   cross-encoder is chosen on a grid ``t = 0, 0.1, ..., 1`` by validation NDCG@10, the
   metric the gate uses (one scalar: little room to over-fit).

Then the fused score, the cross-encoder alone and BM25 alone are compared by validation
NDCG@10 and the best is kept (``kind``; ties go to the simpler one); with fewer than
``MIN_VAL_QUERIES`` validation queries having a relevant product there is too little
evidence to fit and the cross-encoder is used alone.  The choice, the weights and the
validation figures are written next to the weights (``shoprank_fusion.json``) with the
catalogue statistics (``shoprank_lexical.json``), logged to MLflow, and applied by every
scorer built from the model directory (evaluation, the MLflow pyfunc, the ranking API and
the ONNX exports).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from shoprank.lexical import STATS_FILE, Bm25Stats, tokenize

log = logging.getLogger(__name__)

FUSION_FILE = "shoprank_fusion.json"
FEATURES = ("ce", "bm25_norm", "coverage")
KINDS = ("fused", "cross_encoder", "bm25")
PREFERENCE = ("cross_encoder", "bm25", "fused")  # on a tie, the simpler score
MIX_GRID = tuple(i / 10 for i in range(11))
MIN_VAL_QUERIES = 20
L2 = 1e-3


@dataclass
class Fusion:
    """How a model's final score is made from its features (see the module docstring)."""

    kind: str = "cross_encoder"
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "bm25_norm": 0.0, "coverage": 0.0})
    val_ndcg_at_10: dict[str, float] = field(default_factory=dict)  # kind -> validation NDCG@10
    val_queries: int = 0
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Fusion":
        d = json.loads(raw)
        if d.get("kind") not in KINDS:
            raise ValueError(f"{FUSION_FILE}: unknown kind {d.get('kind')!r} (known: {KINDS})")
        return cls(**{k: d[k] for k in ("kind", "weights", "val_ndcg_at_10", "val_queries", "reason") if k in d})

    def combine(self, ce: np.ndarray, lexical: np.ndarray | None) -> np.ndarray:
        """Final scores from the cross-encoder logits and the lexical features (n x 2)."""
        ce = np.asarray(ce, dtype=np.float64)
        if self.kind == "cross_encoder" or lexical is None:
            return ce
        if self.kind == "bm25":
            return lexical[:, 0]
        w = self.weights
        return w["ce"] * ce + w["bm25_norm"] * lexical[:, 0] + w["coverage"] * lexical[:, 1]


def lexical_features(stats: Bm25Stats, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """(n, 2): BM25 / sum of the query terms' IDF, and IDF-weighted query-term coverage."""
    bm25 = stats.score_pairs(queries, texts)
    idf_sum = np.array([sum(stats.idf(t) for t in tokenize(q)) for q in queries], dtype=np.float64)
    norm = np.divide(bm25, idf_sum, out=np.zeros_like(bm25), where=idf_sum > 0)
    return np.column_stack([norm, stats.coverage(queries, texts)])


def _pairs(grades: np.ndarray, qid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (i, j) of every within-query pair with grade_i > grade_j, and the grade gap."""
    left, right = [], []
    order = np.argsort(qid, kind="stable")
    bounds = np.flatnonzero(np.diff(qid[order])) + 1
    for rows in np.split(order, bounds):
        g = grades[rows]
        i, j = np.nonzero(g[:, None] > g[None, :])
        left.append(rows[i])
        right.append(rows[j])
    li = np.concatenate(left) if left else np.zeros(0, dtype=int)
    rj = np.concatenate(right) if right else np.zeros(0, dtype=int)
    return li, rj, (grades[li] - grades[rj]).astype(np.float64)


def fit_weights(features: np.ndarray, grades: np.ndarray, qid: np.ndarray, l2: float = L2) -> np.ndarray:
    """Linear RankNet: weights minimising the grade-gap-weighted pairwise logistic loss."""
    from scipy.optimize import minimize

    li, rj, gap = _pairs(grades, qid)
    if not len(li):
        raise ValueError("no pair of candidates with different grades to fit on")
    scale = features.std(axis=0)
    scale[scale == 0] = 1.0
    diff = (features[li] - features[rj]) / scale
    wsum = gap.sum()

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        m = diff @ w
        lo = np.logaddexp(0.0, -m)
        sig = 0.5 * (1.0 - np.tanh(m / 2.0))  # sigmoid(-m), overflow-free
        value = float((gap * lo).sum() / wsum + l2 * (w @ w))
        grad = -(diff * (gap * sig)[:, None]).sum(axis=0) / wsum + 2 * l2 * w
        return value, grad

    w0 = np.zeros(features.shape[1])
    w0[0] = 1.0
    res = minimize(loss, w0, jac=True, method="L-BFGS-B")
    return res.x / scale


def fit_fusion(val: pd.DataFrame, ce_scores: np.ndarray, stats: Bm25Stats | None,
               ndcg: Callable[[pd.DataFrame, np.ndarray], float]) -> Fusion:
    """Fit the fusion on the validation split (``val`` with query, text, grade; ``ce_scores``
    the cross-encoder's logits on it); ``ndcg(frame, scores)`` is the validation metric."""
    if stats is None:
        return Fusion(reason="no catalogue statistics: cross-encoder alone")
    grades = val["grade"].to_numpy(dtype=np.int64)
    qid, _ = pd.factorize(val["query"].astype(str))
    gain = pd.Series(grades > 0).groupby(qid).any()
    n_queries = int(gain.sum())
    if n_queries < MIN_VAL_QUERIES:
        return Fusion(val_queries=n_queries, reason=f"{n_queries} validation queries with a relevant product "
                      f"(< {MIN_VAL_QUERIES}): too little evidence to fit a fusion; cross-encoder alone")
    queries, texts = val["query"].astype(str).tolist(), val["text"].fillna("").astype(str).tolist()
    lexical = lexical_features(stats, queries, texts)
    ce = np.asarray(ce_scores, dtype=np.float64)
    w = fit_weights(np.column_stack([ce, lexical]), grades, qid)
    ce_part, lex_part = w[0] * ce, lexical @ w[1:]
    sd_ce, sd_lex = float(ce_part.std()) or 1.0, float(lex_part.std()) or 1.0
    mixes = {t: float(ndcg(val, (1 - t) * ce_part / sd_ce + t * lex_part / sd_lex)) for t in MIX_GRID}
    t = max(MIX_GRID, key=lambda m: (mixes[m], -abs(m - 0.5)))
    weights = [(1 - t) * w[0] / sd_ce, t * w[1] / sd_lex, t * w[2] / sd_lex]
    fused = Fusion(kind="fused", weights=dict(zip(FEATURES, map(float, weights))), val_queries=n_queries)
    candidates = {"fused": fused.combine(ce, lexical), "cross_encoder": ce, "bm25": lexical[:, 0]}
    figures = {k: float(ndcg(val, s)) for k, s in candidates.items()}
    best = max(KINDS, key=lambda k: (round(figures[k], 6), PREFERENCE.index(k) * -1))
    fused.kind = best
    fused.val_ndcg_at_10 = figures
    fused.reason = (f"validation NDCG@10 on {n_queries} queries: " +
                    ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) + f" (lexical share {t:.1f}); kept {best}")
    log.info("fusion: %s; weights %s", fused.reason, {k: round(v, 4) for k, v in fused.weights.items()})
    return fused


def save(model_dir: str | Path, fusion: Fusion, stats: Bm25Stats | None) -> None:
    model_dir = Path(model_dir)
    (model_dir / FUSION_FILE).write_text(fusion.to_json(), encoding="utf-8")
    if stats is not None:
        stats.save(model_dir / STATS_FILE)


def load(model_dir: str | Path) -> tuple[Fusion | None, Bm25Stats | None]:
    """The fusion and statistics saved with a model (None, None for a plain cross-encoder)."""
    model_dir = Path(model_dir)
    path = model_dir / FUSION_FILE
    if not path.is_file():
        return None, None
    fusion = Fusion.from_json(path.read_text(encoding="utf-8"))
    stats_path = model_dir / STATS_FILE
    stats = Bm25Stats.load(stats_path) if stats_path.is_file() else None
    if fusion.kind != "cross_encoder" and stats is None:
        raise FileNotFoundError(f"{path} needs {stats_path} (catalogue statistics), which is missing")
    return fusion, stats


class FusedScorer:
    """``ScoreFn`` (DataFrame with query, text -> scores) applying a model's fusion to its
    cross-encoder ``inner`` (any callable with that signature)."""

    def __init__(self, inner: Callable[[pd.DataFrame], np.ndarray], fusion: Fusion, stats: Bm25Stats | None):
        self.inner, self.fusion, self.stats = inner, fusion, stats
        self.max_length = getattr(inner, "max_length", None)

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        lexical = None
        if self.fusion.kind != "cross_encoder":
            lexical = lexical_features(self.stats, df["query"].astype(str).tolist(),
                                       df["text"].fillna("").astype(str).tolist())
        if self.fusion.kind == "bm25":
            return self.fusion.combine(np.zeros(len(df)), lexical)
        return self.fusion.combine(self.inner(df), lexical)

    def __getattr__(self, name: str):  # last_pairs_per_s, tokenizer, ... of the cross-encoder
        return getattr(self.inner, name)


def with_fusion(inner: Callable[[pd.DataFrame], np.ndarray], model_dir: str | Path):
    """``inner`` wrapped by the fusion saved in ``model_dir``, or ``inner`` itself if there is none."""
    fusion, stats = load(model_dir)
    if fusion is None or fusion.kind == "cross_encoder":
        return inner
    return FusedScorer(inner, fusion, stats)
