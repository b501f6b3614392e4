"""Catalogue BM25 (shoprank.lexical), the learned fusion (shoprank.fusion), the pairwise loss."""

import numpy as np
import pandas as pd
import pytest
import torch

from shoprank import fusion as fz
from shoprank.evaluation import BM25Scorer
from shoprank.lexical import Bm25Stats, CatalogueIndex
from shoprank.serving.export import ndcg_at_10
from shoprank.training.module import pairwise_loss

CATALOG = ["red running shoes for men", "blue running shoes", "red phone case", "phone charger usb-c fast",
           "shoes shoes shoes red", "leather boots brown", "wireless headphones black", "running socks"]


def test_catalogue_bm25_equals_bm25s_lucene_scores():
    index = CatalogueIndex([f"p{i}" for i in range(len(CATALOG))], CATALOG)
    for query in ("red shoes", "running running", "phone", "nothing matches", "brown leather boots"):
        expected = index.scores(query)  # bm25s, method="lucene"
        got = index.stats.score_pairs([query] * len(CATALOG), CATALOG)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert index.top_k("red shoes", 2) == ["p4", "p0"]


def test_catalogue_idf_differs_from_per_candidate_idf():
    """IDF over the catalogue: 'shoes' is common there, so a candidate set made only of shoes
    still ranks by the rarer word; the per-candidate variant sees 'shoes' everywhere."""
    stats = Bm25Stats.from_texts(CATALOG * 3 + ["lamp"] * 200)
    df = pd.DataFrame({"query": ["red shoes"] * 3, "text": ["red shoes", "blue shoes", "shoes"]})
    catalogue = BM25Scorer(stats)(df)
    assert catalogue[0] > catalogue[1] > 0 and catalogue[1] == pytest.approx(catalogue[2], rel=0.3)
    assert BM25Scorer(stats).mode == "catalogue" and BM25Scorer().mode == "per-candidate"
    again = Bm25Stats.from_json(stats.to_json())
    np.testing.assert_allclose(BM25Scorer(again)(df), catalogue)


def _val_split(n_queries=40, seed=0):
    """Queries 'colour item': the exact product (grade 3) shares both words, distractors share one."""
    rng = np.random.default_rng(seed)
    colours, items = ["red", "blue", "green", "black", "white"], ["shoes", "lamp", "sofa", "kettle", "mug"]
    rows = []
    for q in range(n_queries):
        c, it = colours[q % 5], items[(q // 5) % 5]
        query = f"{c} {it} {q}"
        rows.append((query, f"{c} {it} deluxe", 3))
        rows.append((query, f"{it} classic", 2))
        for k in range(6):
            rows.append((query, f"{c} {rng.choice(items[:0] + [x for x in items if x != it])} {k}", 0))
    return pd.DataFrame(rows, columns=["query", "text", "grade"])


def test_fusion_learns_to_lean_on_bm25_when_the_cross_encoder_is_noise():
    val = _val_split()
    stats = Bm25Stats.from_texts(val["text"].tolist() * 2)
    noise = np.random.default_rng(1).normal(size=len(val))
    fusion = fz.fit_fusion(val, noise, stats, ndcg_at_10)
    assert fusion.kind in ("fused", "bm25")
    assert fusion.val_ndcg_at_10[fusion.kind] > fusion.val_ndcg_at_10["cross_encoder"] + 0.1
    scorer = fz.FusedScorer(lambda d: np.random.default_rng(2).normal(size=len(d)), fusion, stats)
    assert ndcg_at_10(val, scorer(val)) > 0.9


def test_fusion_keeps_a_good_cross_encoder_and_refuses_to_fit_on_too_little_evidence():
    val = _val_split()
    stats = Bm25Stats.from_texts(val["text"].tolist())
    oracle = val["grade"].to_numpy(float) * 5
    assert fz.fit_fusion(val, oracle, stats, ndcg_at_10).val_ndcg_at_10["fused"] == pytest.approx(1.0)
    small = val[val["query"].isin(val["query"].unique()[:5])]
    few = fz.fit_fusion(small, np.zeros(len(small)), stats, ndcg_at_10)
    assert few.kind == "cross_encoder" and "too little evidence" in few.reason


def test_fusion_round_trips_through_the_model_dir(tmp_path):
    stats = Bm25Stats.from_texts(CATALOG)
    fusion = fz.Fusion(kind="fused", weights={"ce": 0.5, "bm25_norm": 2.0, "coverage": 1.0})
    fz.save(tmp_path, fusion, stats)
    wrapped = fz.with_fusion(lambda d: np.ones(len(d)), tmp_path)
    df = pd.DataFrame({"query": ["red shoes", "red shoes"], "text": ["red running shoes for men", "phone case"]})
    scores = wrapped(df)
    assert scores[0] > scores[1] and scores[1] == pytest.approx(0.5)
    (tmp_path / "shoprank_lexical.json").unlink()
    with pytest.raises(FileNotFoundError):
        fz.load(tmp_path)


def test_pairwise_loss_prefers_the_right_order_and_weights_pairs():
    grades = torch.tensor([3, 0, 2, 0])
    qid = torch.tensor([0, 0, 1, 1])
    good = pairwise_loss(torch.tensor([2.0, -2.0, 1.0, -1.0]), grades, qid)
    bad = pairwise_loss(torch.tensor([-2.0, 2.0, -1.0, 1.0]), grades, qid)
    assert good < bad
    # pairs across queries never count: only the second query is misordered here
    mixed = pairwise_loss(torch.tensor([5.0, -5.0, -1.0, 1.0]), grades, qid)
    only_q1 = pairwise_loss(torch.tensor([-1.0, 1.0]), torch.tensor([2, 0]), torch.tensor([0, 0]))
    assert mixed == pytest.approx(float(only_q1 * 2 / 5 + torch.nn.functional.softplus(torch.tensor(-10.0)) * 3 / 5),
                                  rel=1e-5)
    flat = pairwise_loss(torch.zeros(2, requires_grad=True), torch.tensor([1, 1]), torch.tensor([0, 0]))
    assert flat == 0
