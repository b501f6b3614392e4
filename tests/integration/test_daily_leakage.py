"""The daily update never trains on an evaluation query: real S3 + MLflow servers, simulated
traffic that covers the golden val/test queries, the snapshot as ``prepare_update`` writes it."""

import datetime as dt
import uuid
import pytest

from shoprank.daily import UpdatePolicy, prepare_update
from shoprank.data.synthetic import generate_marketplace
from shoprank.datasets import SnapshotParams, build_snapshot, load_split
from shoprank.simulation import save_marketplace_params, simulate_and_write
from shoprank.storage import dataset_prefix
from shoprank.validation import validate_partition

pytestmark = pytest.mark.integration

DAY0 = dt.date(2026, 10, 1)


@pytest.mark.parametrize("engine", ["pandas", pytest.param("spark", marks=pytest.mark.slow)])
def test_daily_snapshot_shares_no_query_with_golden_val_test_or_holdout(mlflow_server, storage, engine, monkeypatch):
    """On both feedback engines (SHOPRANK_FEEDBACK_ENGINE): Spark validates and derives the labels
    of the day, with the day staged from the real S3 server."""
    if engine == "spark":
        pytest.importorskip("pyspark", reason="the Spark engine needs pyspark (requirements.txt)")
        monkeypatch.setenv("SHOPRANK_SPARK_MASTER", "local[2]")
    monkeypatch.setenv("SHOPRANK_FEEDBACK_ENGINE", engine)
    settings = mlflow_server.replaced(bucket=storage.bucket, registered_model=f"leak-{uuid.uuid4().hex[:6]}")
    market = generate_marketplace(n_products=300, n_queries=60, seed=5, start=DAY0)
    market.write_to_storage(storage, DAY0)
    save_marketplace_params(storage, n_products=300, n_queries=60, seed=5, start=DAY0.isoformat())
    for dataset in ("catalog", "judgments", "queries"):
        assert validate_partition(storage, dataset, DAY0, run_id="golden").success
    golden = build_snapshot(storage, SnapshotParams(n_hard_negatives=3), day=DAY0).snapshot
    val, test = load_split(storage, golden, "val"), load_split(storage, golden, "test")
    evaluation_queries = set(val["query"]) | set(test["query"])

    day1 = DAY0 + dt.timedelta(days=1)
    simulate_and_write(settings, day1, n_sessions=400, seed=1, ranker="bm25")
    assert validate_partition(storage, "catalog", day1, run_id="day1").success
    outcome = validate_partition(storage, "feedback", day1, run_id="day1")
    assert outcome.success and outcome.engine == engine
    served = set(storage.read_partition("validated", "feedback", day1)["query"].str.lower())
    assert served & evaluation_queries, "the simulated day must cover golden val/test queries for this test to bite"

    manifest = prepare_update(settings.replaced(engine__feedback_engine=engine), storage, day1.isoformat(),
                              policy=UpdatePolicy(min_pairs=1))
    assert manifest["label_engine"] == engine
    prefix = dataset_prefix(manifest["snapshot"])
    train = storage.read_parquet(prefix + "train.parquet")
    holdout = storage.read_parquet(prefix + "recent_holdout.parquet")
    train_queries = set(train["query"])
    assert manifest["golden_snapshot"] == golden
    assert manifest["rows"]["dropped_eval_queries"] > 0
    assert not train_queries & evaluation_queries
    assert len(holdout) and not train_queries & set(holdout["query"])
    assert not set(holdout["query"]) & evaluation_queries
    assert storage.exists(prefix + "lexical.json")  # the golden catalogue statistics travel with it
