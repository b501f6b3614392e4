"""The train DAG on real Airflow services over REST: approve, reject, roll back.

Each run trains the real MiniLM cross-encoder for a few steps, logs to the real MLflow
server, stores data and artifacts in the real S3 server, and pauses at Airflow's
ApprovalOperator until this test answers it through the hitlDetails endpoint.
"""

import pytest

from shoprank.airflow_client import AirflowAPIError
from shoprank.demo import answer_approval
from shoprank.registry import Registry
from shoprank.storage import Storage

from .conftest import TINY_TRAIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = "shoprank_train"


def _train_run(airflow, day, option):
    airflow.wait_for_dag(TRAIN)
    airflow.unpause(TRAIN)
    run_id = airflow.trigger(TRAIN, conf={**TINY_TRAIN, "data_date": day.isoformat()})["dag_run_id"]
    answer_approval(airflow, TRAIN, run_id, option, f"e2e test: {option}", progress=lambda m: None)
    final = airflow.wait_for_run(TRAIN, run_id, timeout=900)
    return run_id, final, airflow.task_states(TRAIN, run_id)


def test_approve_reject_and_rollback(airflow, airflow_stack, market_day):
    settings = airflow_stack.settings
    registry = Registry(settings, Storage(settings))

    run1, final, states = _train_run(airflow, market_day, "Approve")
    assert final["state"] == "success", states
    assert states["promote"] == "success" and states["record_decision"] == "success"
    assert states["export"] == "success"  # ONNX export of the new champion (accepted or refused, recorded)
    v1 = registry.version_by_alias("champion").version
    assert registry.tags(v1)["export.status"] in ("exported", "partial", "refused")
    tags = registry.tags(v1)
    assert tags["promoted_by"] == "admin"
    assert tags["promoted_from_airflow_run"] == run1
    assert float(tags["ndcg_at_10"]) > 0 and "delta_ndcg_at_10_vs_bm25_lo" in tags
    assert tags["gate_eligible"] == "true"

    run2, final, states = _train_run(airflow, market_day, "Approve")
    assert final["state"] == "success", states
    v2 = registry.version_by_alias("champion").version
    assert v2 != v1
    assert registry.version_by_alias("previous").version == v1
    assert registry.tags(v2)["champion_compared"] == v1  # evaluated against the champion of the day

    run3, final, states = _train_run(airflow, market_day, "Reject")
    assert final["state"] == "success", states
    assert states["promote"] == "skipped" and states["record_decision"] == "success"
    assert states["export"] == "skipped"  # nothing promoted, nothing exported
    v3 = registry.version_by_alias("challenger").version
    assert registry.version_by_alias("champion").version == v2  # untouched
    assert registry.tags(v3)["rejected_by"] == "admin"
    assert registry.tags(v3)["rejection_reason"] == "e2e test: Reject"

    airflow.unpause("shoprank_rollback")
    rb = airflow.trigger("shoprank_rollback", conf={"target": "previous", "reason": "e2e rollback"})
    assert airflow.wait_for_run("shoprank_rollback", rb["dag_run_id"], timeout=300)["state"] == "success"
    assert registry.version_by_alias("champion").version == v1

    bad = airflow.trigger("shoprank_rollback", conf={"target": "999"})
    assert airflow.wait_for_run("shoprank_rollback", bad["dag_run_id"], timeout=300)["state"] == "failed"
    assert registry.version_by_alias("champion").version == v1

    trail = [(r["action"], r["alias"], r["version"], r["actor"]) for r in registry.audit_trail()
             if r["alias"] == "champion" or r["action"] == "reject"]
    assert trail == [("set_alias", "champion", v1, "admin"), ("set_alias", "champion", v2, "admin"),
                     ("reject", "challenger", v3, "admin"), ("rollback", "champion", v1, "admin")]


def test_answering_twice_is_refused(airflow, market_day):
    """A second answer to the same approval gets HTTP 409 and changes nothing."""
    run_id = None
    for run in airflow._request("GET", f"/api/v2/dags/{TRAIN}/dagRuns?limit=1&order_by=-start_date")["dag_runs"]:
        run_id = run["dag_run_id"]
    assert run_id is not None
    with pytest.raises(AirflowAPIError) as err:
        airflow.answer(TRAIN, run_id, "approve", "Approve")
    assert err.value.status == 409


DAILY = "shoprank_daily_update"


def _daily_run(airflow, day, answer="Approve"):
    airflow.wait_for_dag(DAILY)
    airflow.unpause(DAILY)
    run_id = airflow.trigger(DAILY, logical_date=f"{day.isoformat()}T00:00:00+00:00")["dag_run_id"]
    if answer:
        answer_approval(airflow, DAILY, run_id, answer, f"e2e daily: {answer}", progress=lambda m: None)
    final = airflow.wait_for_run(DAILY, run_id, timeout=900)
    return run_id, final, airflow.task_states(DAILY, run_id)


def test_daily_update_warm_starts_from_champion_and_is_idempotent(airflow, airflow_stack, market_day):
    """Runs after the train test (same module): a champion exists."""
    import datetime as dt

    from mlflow import MlflowClient

    from shoprank.simulation import simulate_and_write

    settings = airflow_stack.settings
    storage = Storage(settings)
    registry = Registry(settings, storage)
    champion = registry.version_by_alias("champion").version
    day = market_day + dt.timedelta(days=1)
    out = simulate_and_write(settings, day, n_sessions=40, seed=1, ranker="champion")
    assert out["model_version"] == champion and out["by_type"]["click"] > 0

    run_id, final, states = _daily_run(airflow, day)
    assert final["state"] == "success", states
    assert states["validate_catalog"] == "success"  # the day's catalogue (new products) came first
    new = registry.version_by_alias("champion").version
    assert new != champion
    tags = registry.tags(new)
    assert tags["daily.date"] == day.isoformat() and tags["daily.mode"] == "warm"
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(tags["mlflow_run_id"])
    assert run.data.params["daily.warm_start_from_version"] == champion
    assert run.data.params["init_from"]  # weights came from the champion, not the base model
    assert "labels.w_click" in run.data.params or any(k.startswith("labels.") for k in run.data.params)
    assert "recent_ndcg_at_10" in tags  # evaluated on the holdout of recent feedback too
    # online metrics of the day's traffic, per serving arm (all champion here)
    assert run.data.metrics["online_champion_requests"] > 0 and "online_champion_ctr" in run.data.metrics
    versions_before = registry.known_versions()
    labels_before = storage.read_parquet(f"derived/labels/dt={day.isoformat()}/pairs.parquet")

    # the same date again (Clear in the UI): no new version, no double-counted events
    airflow.clear_run(DAILY, run_id)
    final = airflow.wait_for_run(DAILY, run_id, timeout=900)
    states = airflow.task_states(DAILY, run_id)
    assert final["state"] == "success", states
    assert registry.known_versions() == versions_before
    assert registry.version_by_alias("champion").version == new
    labels_after = storage.read_parquet(f"derived/labels/dt={day.isoformat()}/pairs.parquet")
    assert labels_after["clicks"].sum() == labels_before["clicks"].sum()
    assert len(labels_after) == len(labels_before)


def test_empty_feedback_day_is_skipped_not_failed(airflow, airflow_stack, market_day):
    import datetime as dt

    day = market_day + dt.timedelta(days=2)  # nothing was written for this date
    run_id, final, states = _daily_run(airflow, day, answer=None)
    assert final["state"] == "success", states
    assert states["validate_feedback"] == "skipped"
    assert states["train"] == "skipped"
