import pandas as pd
import pytest

from shoprank.datasets import SnapshotParams, build_splits, frequency_buckets, split_of


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


def test_test_split_gets_sampled_negatives_with_grade_zero():
    params = SnapshotParams(n_negatives=7, test_fraction=0.3)
    splits = build_splits(_catalog(), _judgments(), None, params)
    test = splits["test"]
    judged = _judgments()
    for q, group in test.groupby("query"):
        n_judged = (judged["query"] == q).sum()
        assert len(group) == n_judged + 7
        assert group["product_id"].is_unique
    again = build_splits(_catalog(), _judgments(), None, params)["test"]
    pd.testing.assert_frame_equal(test, again)  # fixed seed
    assert len(splits["train"]) == (judged["query"].isin(splits["train"]["query"])).sum()  # no negatives in train


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
