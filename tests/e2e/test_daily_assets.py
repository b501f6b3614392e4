"""Datasets as Airflow assets, on the real stack (SHOPRANK_DAILY_TRIGGER=asset, see conftest):
`shoprank events landed --date D` starts D's daily run, the validate tasks record what they
validated as asset events, and a manual run of D (logical date) resolves the same day."""

import datetime as dt
import os
import subprocess
import time

import pytest

from shoprank.storage import Storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAILY = "shoprank_daily_update"


def _wait_for(find, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while (found := find()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f}s")
        time.sleep(2.0)
    return found


def test_landed_day_starts_its_daily_run_and_validations_are_asset_events(airflow, airflow_stack, market_day):
    from shoprank.data.contracts import CATALOG
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.stack import venv_bin

    settings = airflow_stack.settings
    storage = Storage(settings)
    day = market_day + dt.timedelta(days=5)  # clear of the other tests' days
    d = day.isoformat()
    market = generate_marketplace(n_products=300, n_queries=40, seed=7, start=market_day)  # = the market_day one
    storage.write_partition(CATALOG.conform(market.catalog_for_day(day)), "raw", "catalog", day)
    storage.put_bytes(f"raw/feedback/dt={d}/_SUCCESS", b"")  # a complete day without any event
    airflow.wait_for_dag(DAILY)
    airflow.unpause(DAILY)

    # a producer announces the day, with the CLI, against this stack
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
           **settings.as_env(secrets=False)}
    proc = subprocess.run([venv_bin("shoprank"), "events", "landed", "--date", d], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"landed for {d}" in proc.stdout and "queues a run of shoprank_daily_update" in proc.stdout

    run = _wait_for(lambda: next((r for r in airflow.runs(DAILY, run_type="asset_triggered", order_by="-id")
                                  if r.get("partition_key") == d), None), 240, f"asset-triggered run for {d}")
    run_id = run["dag_run_id"]
    assert run["logical_date"] is None  # an asset-triggered run: the day comes from its partition key
    final = airflow.wait_for_run(DAILY, run_id, timeout=600)
    states = airflow.task_states(DAILY, run_id)
    assert final["state"] == "success", states
    assert states["validate_catalog"] == "success"
    assert states["validate_feedback"] == "skipped" and states["train"] == "skipped"
    assert f"skipping {d}:" in "\n".join(airflow.task_log_lines(DAILY, run_id, "validate_feedback"))

    # the landing event created that run
    landed = next(e for e in airflow.asset_events(name_pattern="shoprank-feedback-raw") if e["partition_key"] == d)
    assert landed["extra"]["date"] == d
    assert run_id in {r["run_id"] for r in landed["created_dagruns"]}
    # what validate_catalog promoted is an asset event: the date in extra and as partition key
    (event,) = airflow.asset_events(name_pattern="shoprank-catalog-validated", source_run_id=run_id)
    assert event["source_task_id"] == "validate_catalog" and event["partition_key"] == d
    assert event["extra"]["date"] == d and event["extra"]["rows"] > 0
    assert event["extra"]["data_docs"].startswith(f"s3://{settings.bucket}/")
    assert event["uri"] == f"s3://{settings.bucket}/validated/catalog"
    # a skipped validation records nothing
    assert airflow.asset_events(name_pattern="shoprank-feedback-validated", source_run_id=run_id) == []

    # a manual run of the same day (logical date D) resolves the same day, in asset mode too
    manual = airflow.trigger(DAILY, logical_date=f"{d}T00:00:00+00:00")["dag_run_id"]
    final = airflow.wait_for_run(DAILY, manual, timeout=600)
    states = airflow.task_states(DAILY, manual)
    assert final["state"] == "success", states
    assert states["validate_feedback"] == "skipped"
    assert f"skipping {d}:" in "\n".join(airflow.task_log_lines(DAILY, manual, "validate_feedback"))
    (again,) = airflow.asset_events(name_pattern="shoprank-catalog-validated", source_run_id=manual)
    assert again["partition_key"] == d and again["extra"]["date"] == d
