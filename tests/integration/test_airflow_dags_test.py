"""`airflow dags test` of a small DAG that reads from the real S3 server through the
Airflow connection `shoprank_s3` (real Airflow, SQLite metadata DB)."""

import subprocess
import uuid

import pandas as pd
import pytest

from shoprank.stack import Stack, airflow_env, venv_bin
from shoprank.storage import Storage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def airflow_db(s3_server):
    Stack(s3_server).migrate_airflow()
    return s3_server


def test_inventory_dag_reads_s3(airflow_db):
    settings = airflow_db.replaced(bucket=f"inv-{uuid.uuid4().hex[:10]}")  # nothing else writes here
    storage = Storage(settings)
    storage.ensure_bucket()
    storage.write_partition(pd.DataFrame({"product_id": ["a", "b", "c"]}), "raw", "catalog", "2026-11-03")
    env = airflow_env(settings)
    assert "AWS_SECRET_ACCESS_KEY" not in env  # credentials travel in the connection only
    proc = subprocess.run([venv_bin("airflow"), "dags", "test", "shoprank_inventory"], env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "raw/catalog: 1 partitions (2026-11-03 .. 2026-11-03), 3 rows" in out, out[-3000:]
    assert "state=success" in out or "success" in out.lower()


DAILY = "shoprank_daily_update"


@pytest.fixture()
def dags_test_airflow(mlflow_server, tmp_path):
    """Its own Airflow metadata DB + api-server (the session's e2e scheduler must not see these
    runs), on the session's S3 and MLflow servers; a fresh bucket and registered model."""
    from shoprank.stack import free_port

    home = tmp_path / "home"
    home.mkdir()
    key, secret_key = mlflow_server.require_s3_credentials()
    (home / "stack.env").write_text(f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret_key}\n")
    (home / "stack.env").chmod(0o600)
    port = free_port()
    settings = mlflow_server.replaced(home=home, airflow_port=port, airflow_url=f"http://127.0.0.1:{port}",
                       bucket=f"daily-{uuid.uuid4().hex[:8]}", registered_model=f"daily-dags-test-{uuid.uuid4().hex[:6]}")
    stack = Stack(settings)
    stack.up(("airflow-api-server",), progress=lambda _m: None)  # answers the approval over REST
    try:
        yield settings
    finally:
        stack.down(progress=lambda _m: None)


def _dags_test(env: dict, day: str, logfile, answer: str | None = None, client=None) -> str:
    """`airflow dags test shoprank_daily_update <day>`; answer its approval over REST if asked."""
    from shoprank.demo import answer_approval

    with open(logfile, "w") as log:
        proc = subprocess.Popen([venv_bin("airflow"), "dags", "test", DAILY, day], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if answer:
                run_id = _wait_for_run_id(client, day, proc)
                answer_approval(client, DAILY, run_id, answer, f"dags test: {answer}", progress=lambda _m: None)
            rc = proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = open(logfile).read()
    assert rc == 0, out[-6000:]
    return out


def _wait_for_run_id(client, day: str, proc, timeout: float = 600) -> str:
    import time

    from shoprank.airflow_client import AirflowAPIError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "airflow dags test ended before its approval was asked"
        try:
            for run in client.runs(DAILY):
                if (run.get("logical_date") or "").startswith(day):
                    return run["dag_run_id"]
        except AirflowAPIError as exc:
            if exc.status != 404:  # 404: `dags test` has not written the DAG to the metadata DB yet
                raise
        time.sleep(2)
    raise TimeoutError(f"no {DAILY} run for {day} appeared")


@pytest.mark.slow
def test_daily_update_dags_test_one_date_twice(dags_test_airflow, tmp_path):
    """`airflow dags test shoprank_daily_update <date>`: the whole daily DAG in one process,
    its Airflow HITL approval answered over the REST API of an api-server on the same
    metadata DB (a parked HITL task waits in `dags test` until answered from outside).

    There is no champion yet, so the day falls back to a full retrain (a few steps); the run
    validates the day, derives labels, trains, evaluates, registers one version, asks for the
    approval, promotes on Approve and exports.  The same date again must not add a version
    nor count the day's events twice, and must leave the champion where it is."""
    import datetime as dt

    from mlflow import MlflowClient

    from shoprank.airflow_client import client_for
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.registry import Registry
    from shoprank.simulation import save_marketplace_params, simulate_and_write
    from shoprank.workflow import make_snapshot, validate_latest

    settings = dags_test_airflow
    storage = Storage(settings)
    storage.ensure_bucket()
    day0 = dt.date(2026, 11, 2)
    day = (day0 + dt.timedelta(days=1)).isoformat()
    market = generate_marketplace(n_products=150, n_queries=30, seed=11, start=day0)
    market.write_to_storage(storage, day0)
    save_marketplace_params(storage, n_products=150, n_queries=30, seed=11, start=day0.isoformat())
    for ds in ("catalog", "judgments", "queries"):  # the train DAG's first tasks: a golden snapshot
        validate_latest(storage, ds, run_id="setup", on_or_before=day0.isoformat())
    make_snapshot(storage, on_or_before=day0.isoformat(), seed=settings.seed)
    sim = simulate_and_write(settings, day, n_sessions=60, seed=3, ranker="random")
    assert sim["by_type"]["click"] > 0

    env = airflow_env(settings, extra={
        "SHOPRANK_REGISTERED_MODEL": settings.registered_model,
        "SHOPRANK_DAILY_START_DATE": day0.isoformat(),
        "SHOPRANK_DAILY_FULL_MAX_STEPS": "3",
        # CI trains 3 steps on 30 queries: quality and evidence are measured by
        # test_default_gate.py, `make demo` and bench/, so those gate rules are relaxed here only
        "SHOPRANK_GATE_MUST_BEAT_BM25": "false",
        "SHOPRANK_GATE_MAX_REGRESSION": "1.0",
        "SHOPRANK_GATE_MIN_TEST_QUERIES": "1",
        "SHOPRANK_GATE_MAX_LATENCY_MS": "1e9",
        "SHOPRANK_GATE_MAX_LATENCY_RATIO": "1e9",
    })
    client = client_for(settings)
    out = _dags_test(env, day, tmp_path / "dags-test-1.log", answer="Approve", client=client)
    registry = Registry(settings, storage)
    versions = registry.known_versions()
    assert len(versions) == 1, versions
    tags = registry.evidence(versions[0])
    assert tags["daily.date"] == day and tags["daily.mode"] == "full"  # no champion -> full retrain
    assert registry.version_by_alias("champion").version == versions[0]  # approved over REST
    assert "recent_ndcg_at_10" in tags  # evaluated on the recent-feedback holdout as well
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(tags["mlflow_run_id"])
    assert run.data.params["daily.mode"] == "full"
    assert any(k.startswith("labels.") for k in run.data.params), sorted(run.data.params)
    for task_id in ("validate_feedback", "prepare", "train", "evaluate", "register", "gate", "approve",
                    "promote", "record_decision", "export"):
        assert f"task_id={task_id}" in out, f"{task_id} did not run:\n{out[-4000:]}"
    labels_key = f"derived/labels/dt={day}/pairs.parquet"
    labels_before = storage.read_parquet(labels_key)
    snapshot_files = {k: storage.get_bytes(f"datasets/daily-{day}/{k}") for k in ("manifest.json", "train.parquet")}

    # the same date again: the day's training and version are reused, events counted once; the
    # day's snapshot (what the version was trained on) is kept as it was, although the day's own
    # version is champion now (re-deciding would say "warm start from version 1")
    out = _dags_test(env, day, tmp_path / "dags-test-2.log")
    assert registry.known_versions() == versions
    assert registry.version_by_alias("champion").version == versions[0]
    for k, before in snapshot_files.items():
        assert storage.get_bytes(f"datasets/daily-{day}/{k}") == before, f"{k} of the day's snapshot changed"
    assert "warm start from" not in out, "the re-run downloaded the champion to warm-start a finished training"
    labels_after = storage.read_parquet(labels_key)
    assert len(labels_after) == len(labels_before)
    assert labels_after["clicks"].sum() == labels_before["clicks"].sum()
