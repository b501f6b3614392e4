import pandas as pd
import pytest

from shoprank.datasets import (
    LeakageError, SnapshotParams, build_splits, check_no_leakage, frequency_buckets, split_of,
)


def _catalog(n=60):
    return pd.DataFrame({
        "product_id": [f"p{i}" for i in range(n)],
        "title": [f"title {i}" for i in range(n)],
        "description": ["d"] * n,
        "category": ["Shoes > Running" if i % 2 else "Audio > Headphones" for i in range(n)],
        "brand": ["b"] * n,
    })


def _judgments(n_queries=40):
    rows = []
    for q in range(n_queries):
        for j in range(5):
            rows.append((f"query {q}", f"p{(q + j) % 60}", j % 4, "human"))
    return pd.DataFrame(rows, columns=["query", "product_id", "grade", "source"])


def test_split_by_query_never_by_row():
    splits = build_splits(_catalog(), _judgments(), None, SnapshotParams(test_fraction=0.3, val_fraction=0.2))
    seen = {}
    for name, df in splits.items():
        for q in df["query"].unique():
            assert q not in seen, f"{q} in {seen.get(q)} and {name}"
            seen[q] = name
    assert all(len(df) for df in splits.values())


def test_split_is_deterministic_and_seeded():
    assert split_of("red shoes", 1, 0.1, 0.2) == split_of("red shoes", 1, 0.1, 0.2)
    assignments = {s: [split_of(f"q{i}", s, 0.1, 0.2) for i in range(200)] for s in (1, 2)}
    assert assignments[1] != assignments[2]
    share_test = assignments[1].count("test") / 200
    assert 0.1 < share_test < 0.3


def test_every_split_gets_sampled_negatives_with_grade_zero():
    params = SnapshotParams(n_negatives=7, n_hard_negatives=0, test_fraction=0.3)
    splits = build_splits(_catalog(), _judgments(), None, params)
    judged = _judgments()
    for name in ("train", "val", "test"):
        for q, group in splits[name].groupby("query"):
            n_judged = (judged["query"] == q).sum()
            assert len(group) == n_judged + 7, name
            assert group["product_id"].is_unique
            extra = group[~group["product_id"].isin(judged.loc[judged["query"] == q, "product_id"])]
            assert (extra["grade"] == 0).all() and (extra["weight"] == 1.0).all()
    again = build_splits(_catalog(), _judgments(), None, params)["test"]
    pd.testing.assert_frame_equal(splits["test"], again)  # fixed seed


def _lexical_catalog():
    rows = [(f"s{i}", f"acme running shoes model {i}", "Shoes > Running") for i in range(30)]
    rows += [(f"c{i}", f"shoe cleaning kit for running shoes {i}", "Shoes > Care") for i in range(30)]
    rows += [(f"h{i}", f"studio headphones {i}", "Audio > Headphones") for i in range(60)]
    return pd.DataFrame(rows, columns=["product_id", "title", "category"]).assign(brand="acme", description=None)


def test_train_gets_unjudged_bm25_hard_negatives_with_lower_weight_and_val_test_do_not():
    catalog = _lexical_catalog()
    judgments = pd.DataFrame([(f"running shoes {chr(97 + q % 26)}{chr(97 + q // 26)}", f"s{(q + j) % 30}", 3 - j % 2, "human")
                              for q in range(60) for j in range(3)], columns=["query", "product_id", "grade", "source"])
    params = SnapshotParams(n_negatives=2, n_hard_negatives=4, hard_negative_pool=20, unjudged_weight=0.5)
    splits = build_splits(catalog, judgments, None, params)
    train = splits["train"]
    hard = train[train["weight"] == 0.5]
    n = train["query"].nunique()
    assert 3 * n <= len(hard) <= 4 * n  # a product drawn as a random negative too keeps weight 1
    assert (hard["grade"] == 0).all()
    # hard negatives share query words: shoes or cleaning kits for running shoes, never headphones
    assert hard["product_id"].str[0].isin(["s", "c"]).all()
    for q, group in train.groupby("query"):
        judged = set(judgments.loc[judgments["query"] == q, "product_id"])
        assert not judged & set(group.loc[group["weight"] == 0.5, "product_id"])
        assert group["product_id"].is_unique
    for name in ("val", "test"):
        assert (splits[name]["weight"] == 1.0).all()


def test_queries_are_normalised_before_the_split():
    j = pd.DataFrame([("Red  Shoes", "p1", 3, "human"), ("red shoes", "p2", 2, "human"), ("RED SHOES ", "p3", 1, "human")],
                     columns=["query", "product_id", "grade", "source"])
    splits = build_splits(_catalog(), pd.concat([j, _judgments()]), None, SnapshotParams(n_hard_negatives=0))
    where = [name for name, df in splits.items() if (df["query"] == "red shoes").any()]
    assert len(where) == 1
    rows = splits[where[0]]
    assert set(rows.loc[rows["query"] == "red shoes", "product_id"]) >= {"p1", "p2", "p3"}
    assert not any(df["query"].str.contains("[A-Z]").any() for df in splits.values())


def test_leakage_check_names_the_shared_queries():
    train = pd.DataFrame({"query": ["a", "b", "Shared One", "shared two"]})
    test = pd.DataFrame({"query": ["shared one", "c"]})
    holdout = {"Shared Two"}
    with pytest.raises(LeakageError) as err:
        check_no_leakage(train, {"val": None, "test": test, "recent_holdout": holdout})
    msg = str(err.value)
    assert "1 queries of the test split" in msg and "'shared one'" in msg
    assert "1 queries of the recent_holdout split" in msg and "'shared two'" in msg
    check_no_leakage(train, {"test": pd.DataFrame({"query": ["c"]})})  # disjoint: no error


def test_unknown_products_are_left_out():
    j = pd.concat([_judgments(), pd.DataFrame([("query 0", "ghost", 3, "human")], columns=_judgments().columns)])
    splits = build_splits(_catalog(), j, None, SnapshotParams())
    assert "ghost" not in set(pd.concat(splits.values())["product_id"])


def test_frequency_buckets_follow_traffic_share():
    q = pd.DataFrame({"query": ["a", "b", "c", "d", "e"], "frequency": [50, 20, 15, 10, 5], "category": None})
    b = frequency_buckets(q)
    assert b["a"] == "head" and b["b"] == "torso" and b["c"] == "torso" and b["e"] == "tail"


def test_bad_fractions_rejected():
    with pytest.raises(ValueError):
        SnapshotParams(val_fraction=0.6, test_fraction=0.5)
