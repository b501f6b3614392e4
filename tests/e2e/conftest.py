"""A real Airflow deployment (api-server, scheduler, dag-processor, triggerer) plus S3 and
MLflow, started once per test session on free ports, driven only over Airflow's REST API."""

import datetime as dt

import pytest

from shoprank.airflow_client import client_for
from shoprank.stack import Stack

# CI trains a few steps on a tiny marketplace (40 queries, 8 test queries) to prove the wiring
# in minutes: the quality, evidence and latency rules of the gate are relaxed for these runs
# only. The DEFAULT gate is exercised on a real trained model by
# tests/integration/test_default_gate.py (and by `make demo`).
E2E_ENV = {
    "SHOPRANK_GATE_MUST_BEAT_BM25": "false",
    "SHOPRANK_GATE_MAX_REGRESSION": "1.0",
    "SHOPRANK_GATE_MIN_TEST_QUERIES": "1",
    "SHOPRANK_GATE_MAX_LATENCY_MS": "1e9",
    "SHOPRANK_GATE_MAX_LATENCY_RATIO": "1e9",
    "SHOPRANK_APPROVAL_TIMEOUT_HOURS": "1",
}

TINY_TRAIN = {"epochs": 1, "max_steps": 6, "batch_size": 8, "max_length": 32, "accelerator": "cpu"}


# Put where a user puts policy: in .env. The stack hands the resolved settings to every Airflow
# process, so these reach the DAG files and tasks (the gate would refuse the tiny model without
# them). Only alice may answer approvals; bob is an Airflow admin but not an approver.
# The daily update runs in asset mode (SHOPRANK_DAILY_TRIGGER=asset): no clock runs compete with
# the tests' runs, a "day landed" asset event starts one (tests/e2e/test_daily_assets.py), and
# the manual runs with a logical date the other tests trigger work the same in both modes.
E2E_DOTENV = {**E2E_ENV, "SHOPRANK_APPROVERS": "alice",
              "SHOPRANK_AIRFLOW_USERS": "admin:admin,alice:user,bob:admin",
              "SHOPRANK_DAILY_TRIGGER": "asset"}


@pytest.fixture(scope="session")
def airflow_stack(stack_env, tmp_path_factory):
    from shoprank.stack import prepared_settings

    dotenv = tmp_path_factory.mktemp("e2e-dotenv") / ".env"
    dotenv.write_text("".join(f"{k}={v}\n" for k, v in E2E_DOTENV.items()))
    settings = prepared_settings({**stack_env, "SHOPRANK_ENV_FILE": str(dotenv)})
    assert settings.approval.names == ["alice"] and settings.source_of("SHOPRANK_APPROVERS").startswith(".env")
    stack = Stack(settings)
    try:
        stack.up(progress=lambda m: None)
        yield stack
    finally:
        stack.down(progress=lambda m: None)


@pytest.fixture(scope="session")
def airflow(airflow_stack):
    """The admin (triggers runs, reads states; not an approver)."""
    return client_for(airflow_stack.settings)


@pytest.fixture(scope="session")
def approver(airflow_stack):
    """alice, the one user in SHOPRANK_APPROVERS."""
    return client_for(airflow_stack.settings, user="alice")


@pytest.fixture(scope="session")
def bystander(airflow_stack):
    """bob: an Airflow admin who is not an approver."""
    return client_for(airflow_stack.settings, user="bob")


@pytest.fixture(scope="session")
def market_day(airflow_stack):
    """A tiny synthetic marketplace written to raw/ (and its parameters, for the simulator)."""
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.simulation import save_marketplace_params
    from shoprank.storage import Storage

    storage = Storage(airflow_stack.settings)
    storage.ensure_bucket()
    day = dt.date.today() - dt.timedelta(days=12)  # clear of the daily DAG's own run for yesterday
    market = generate_marketplace(n_products=300, n_queries=40, seed=7, start=day)
    market.write_to_storage(storage, day)
    save_marketplace_params(storage, n_products=300, n_queries=40, seed=7, start=day.isoformat())
    return day
