"""Synthetic marketplace: determinism, contracts, judgments, hidden relevance, cold start."""

from __future__ import annotations

import datetime as dt
import json
import re

import numpy as np
import pandas as pd
import pytest

from shoprank.data.contracts import CATALOG, GRADE_MAX, GRADE_MIN, JUDGMENTS, QUERIES, product_text
from shoprank.data.synthetic import (
    BRANDS,
    GRADE_THRESHOLDS,
    LEAVES,
    generate_marketplace,
    relevance_to_grade,
)

START = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def mp():
    return generate_marketplace()  # default size: 2000 products, 300 queries


def _dtypes(df: pd.DataFrame) -> dict[str, str]:
    return {c: str(t) for c, t in df.dtypes.items()}


def test_same_seed_same_frames_and_different_seed_differs():
    a = generate_marketplace(n_products=400, n_queries=40, seed=5, n_users=50)
    b = generate_marketplace(n_products=400, n_queries=40, seed=5, n_users=50)
    c = generate_marketplace(n_products=400, n_queries=40, seed=6, n_users=50)
    for name in ("catalog", "queries", "judgments", "users"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    q = a.queries["query"].iat[0]
    np.testing.assert_array_equal(a.true_relevance(q, a.catalog), b.true_relevance(q, b.catalog))
    assert not a.catalog["title"].equals(c.catalog["title"])
    assert not a.queries["query"].equals(c.queries["query"])
    assert not a.judgments.equals(c.judgments)


def test_frames_conform_to_contracts(mp):
    for df, contract in ((mp.catalog, CATALOG), (mp.judgments, JUDGMENTS), (mp.queries, QUERIES)):
        assert list(df.columns) == contract.names
        assert _dtypes(df) == contract.dtypes
        for col in contract.columns:
            if not col.nullable:
                assert df[col.name].notna().all(), col.name
        assert not df.duplicated(list(contract.key)).any(), contract.dataset


def test_catalog_content(mp):
    cat = mp.catalog
    assert (cat["price"] > 0).all()
    paths = cat["category"].unique()
    assert len(paths) >= 30
    assert all(len(p.split(" > ")) == 3 for p in paths)
    # attributes are JSON objects with the same keys within a leaf
    # (a list comprehension: on pandas 3, Series.map(json.loads) infers an Arrow struct of all keys)
    attrs = [json.loads(s) for s in cat["attributes"]]
    keys = pd.Series([",".join(a) for a in attrs])
    assert keys.groupby(cat["category"]).nunique().eq(1).all()
    # prices follow the category: laptops cost more than phone cases
    med = cat.groupby("category")["price"].median()
    assert med["Electronics > Computers > Laptops"] > 10 * med["Electronics > Phones > Phone Cases"]
    # titles vary: not one template
    assert cat["title"].nunique() > 0.95 * len(cat)
    assert cat["title"].str.contains(" by ").mean() > 0.1
    # attribute values are mentioned in the product's text most of the time
    text = product_text(cat).str.lower()
    hits = [all(v.lower() in t for v in a.values()) for a, t in zip(attrs, text)]
    assert 0.4 < np.mean(hits) < 1.0


def test_judgments_grades_and_pool(mp):
    j = mp.judgments
    assert j["grade"].between(GRADE_MIN, GRADE_MAX).all()
    assert set(j["grade"].unique()) == {0, 1, 2, 3}
    assert (j["source"] == "human").all()
    assert set(j["query"]) == set(mp.queries["query"])
    on_start = set(mp.catalog_for_day(START)["product_id"])
    assert set(j["product_id"]) <= on_start  # every judged product exists in the catalogue
    per_query = j.groupby("query").size()
    assert per_query.between(15, 40).all() and 25 <= per_query.mean() <= 35
    assert (j.groupby("query")["grade"].max() >= 2).all()  # every query has positives
    assert (j.groupby("query")["grade"].min() <= 1).all()  # and negatives


def test_grades_come_from_hidden_relevance(mp):
    for q, g in list(mp.judgments.groupby("query"))[:50]:
        rel = mp.true_relevance(q, g)
        assert ((rel >= 0) & (rel <= 1)).all()
        np.testing.assert_array_equal(relevance_to_grade(rel), g["grade"].to_numpy())
    assert list(relevance_to_grade(np.array([0.0, GRADE_THRESHOLDS[0], GRADE_THRESHOLDS[1], 1.0]))) == [0, 1, 2, 3]


def test_true_relevance_is_fixed_and_order_independent(mp):
    q = mp.queries.iloc[3]
    prods = mp.catalog.iloc[:200]
    r1 = mp.true_relevance(q, prods)
    perm = np.random.default_rng(0).permutation(200)
    r2 = mp.true_relevance(q["query"], prods["product_id"].to_numpy()[perm])
    np.testing.assert_allclose(r1[perm], r2)
    with pytest.raises(KeyError):
        mp.true_relevance("no such query", prods)
    with pytest.raises(KeyError):
        mp.true_relevance(q, ["P-missing"])


def test_relevance_is_learnable_from_text(mp):
    """Exact matches share more query words with their text than irrelevant products do."""
    text = dict(zip(mp.catalog["product_id"], product_text(mp.catalog).str.lower()))
    traits = mp.truth.query_traits(mp.queries).set_index("query")
    clean = traits.index[~traits["has_typo"] & ~traits["has_synonym"]]
    j = mp.judgments[mp.judgments["query"].isin(clean)].copy()
    j["overlap"] = [np.mean([w in text[p] for w in q.split()]) for q, p in zip(j["query"], j["product_id"])]
    by_grade = j.groupby("grade")["overlap"].mean()
    assert by_grade[3] > by_grade[2] > by_grade[0]
    assert by_grade[3] - by_grade[0] > 0.3


def test_query_synonyms_are_a_lexical_gap(mp):
    """Leaf synonyms (couch, sneakers) never appear in product text: BM25 cannot match them."""
    words = re.findall(r"[\w'-]+", " ".join(product_text(mp.catalog).str.lower()))
    vocab = set(words)
    phrases = vocab | {" ".join(words[i : i + n]) for n in (2, 3) for i in range(len(words) - n + 1)}
    synonyms = [syn for leaf in LEAVES for syn in leaf.synonyms]
    assert not [syn for syn in synonyms if syn in phrases]
    # most have a word no product uses; a few ("desk chair") overlap other leaves on purpose
    assert np.mean([any(w not in vocab for w in syn.split()) for syn in synonyms]) > 0.9
    traits = mp.truth.query_traits(mp.queries)
    assert 0.1 < traits["has_synonym"].mean() < 0.6
    assert 0.03 < traits["has_typo"].mean() < 0.25


def test_queries_have_zipf_frequencies_and_target_categories(mp):
    qs = mp.queries
    leaf_paths = {leaf.path for leaf in LEAVES}
    assert set(qs["category"]) <= leaf_paths
    f = qs["frequency"].sort_values(ascending=False).to_numpy()
    assert (f >= 1).all()
    assert f[0] >= 10 * np.median(f)  # a head ...
    assert f[: len(f) // 10].sum() > 0.3 * f.sum()  # ... that carries a large share of searches
    # exact and substitute judgments sit in the query's target category
    j = mp.judgments.merge(mp.catalog[["product_id", "category"]], on="product_id")
    j = j.merge(qs[["query", "category"]], on="query", suffixes=("", "_target"))
    on_target = j["category"] == j["category_target"]
    assert on_target[j["grade"] == 3].all()
    assert on_target[j["grade"] == 2].mean() > 0.95  # a sibling-leaf product may get lucky noise


def test_users(mp):
    u = mp.users
    assert u["user_id"].is_unique and len(u) == 1000
    assert u["price_sensitivity"].between(0, 1).all()
    prefs = pd.Series([json.loads(s) for s in u["preferred_brands"]])
    assert prefs.map(len).between(1, 3).all()
    assert set().union(*prefs.map(set)) <= set(BRANDS)


def test_cold_start_catalog_grows(mp):
    sizes = [len(mp.catalog_for_day(START + dt.timedelta(days=d))) for d in (-1, 0, 1, 5, 14)]
    assert sizes[0] == sizes[1]  # nothing new is listed on or just before the start day
    assert sizes[1] < sizes[2] < sizes[3] < sizes[4] == len(mp.catalog)
    day = START + dt.timedelta(days=5)
    cat = mp.catalog_for_day(day)
    assert (cat["created_at"] < pd.Timestamp(day + dt.timedelta(days=1), tz="UTC")).all()
    assert 0.1 < 1 - sizes[1] / len(mp.catalog) < 0.3  # ~20% of products are new


def test_write_to_storage(mp, recording_storage):
    st = recording_storage
    day = START + dt.timedelta(days=3)
    written = mp.write_to_storage(st, day)
    assert set(written) == {"catalog", "judgments", "queries"}
    d = day.isoformat()
    cat = st.partitions[("raw", "catalog", d)]
    jud = st.partitions[("raw", "judgments", d)]
    qs = st.partitions[("raw", "queries", d)]
    assert _dtypes(cat) == CATALOG.dtypes and _dtypes(jud) == JUDGMENTS.dtypes and _dtypes(qs) == QUERIES.dtypes
    assert len(cat) == len(mp.catalog_for_day(day))
    assert set(jud["product_id"]) <= set(cat["product_id"])
    assert len(qs) == len(mp.queries)


def test_scales_and_stays_consistent():
    big = generate_marketplace(n_products=20_000, n_queries=50, seed=3, n_users=20)
    assert len(big.catalog) == 20_000 and big.catalog["product_id"].is_unique
    assert set(big.judgments["product_id"]) <= set(big.catalog["product_id"])
    assert len(generate_marketplace(n_products=1, n_queries=1, n_users=1, new_product_fraction=0).catalog) == 1
