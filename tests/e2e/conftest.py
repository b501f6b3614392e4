"""A real Airflow deployment (api-server, scheduler, dag-processor, triggerer) plus S3 and
MLflow, started once per test session on free ports, driven only over Airflow's REST API."""

import datetime as dt
import os

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


@pytest.fixture(scope="session")
def airflow_stack(stack_settings, tmp_path_factory):
    saved = {k: os.environ.get(k) for k in E2E_ENV}
    os.environ.update(E2E_ENV)
    stack = Stack(stack_settings)
    try:
        stack.up(progress=lambda m: None)
        yield stack
    finally:
        stack.down(progress=lambda m: None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def airflow(airflow_stack):
    return client_for(airflow_stack.settings)


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
