"""A PRIVATE real Airflow deployment (api-server, scheduler, dag-processor, triggerer, LocalExecutor,
SQLite) plus its own S3 server, on free ports, driven over REST: the REST API refuses
unauthenticated calls; a run survives a scheduler restart in the middle of a task; task
logs hold no secret.  The DAGs folder is a temporary one with a slow task (so the restart
really happens mid-task) next to the product's shoprank_inventory DAG."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shoprank.airflow_client import client_for
from shoprank.config import REPO_ROOT
from shoprank.stack import Stack, prepared_settings
from shoprank.storage import Storage

from .conftest import private_stack_env
from .test_reliability_security import leaked, secret_values

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

SERVICES = ("s3", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
SLOW_SECONDS = 30

SLOW_DAG = textwrap.dedent(f'''
    """Reliability test DAG: one slow, idempotent task that records each attempt in S3."""
    import time

    import pendulum
    from airflow.sdk import dag, get_current_context, task


    @dag(dag_id="rel_slow", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
    def rel_slow():
        @task(retries=3, retry_delay=pendulum.duration(seconds=3))
        def slow() -> dict:
            from shoprank.airflow_support import task_settings, task_storage

            ti = get_current_context()["ti"]
            storage = task_storage()
            storage.put_bytes(f"rel/{{ti.run_id}}/attempt-{{ti.try_number}}", b"started")
            print("settings:", task_settings().public_dict())  # what a task may print (no secrets)
            for i in range({SLOW_SECONDS}):
                print(f"working {{i + 1}}/{SLOW_SECONDS}", flush=True)
                time.sleep(1)
            storage.put_bytes(f"rel/{{ti.run_id}}/done-{{ti.try_number}}", b"done")
            return {{"try": ti.try_number}}

        slow()


    rel_slow()
''')


class RelStack(Stack):
    """The embedded stack with a DAGs folder of our own and fast orphan / heartbeat detection."""

    def __init__(self, settings, dags: Path):
        super().__init__(settings)
        self.dags = dags

    def airflow_services(self):
        services = super().airflow_services()
        for svc in services:
            svc.env = {**svc.env, "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
                       # faster than the defaults (300 s) so CI does not wait minutes; not so
                       # short that a busy 2-core machine's late heartbeat looks like a death
                       "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
                       "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "20",
                       "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5"}
        return services


@pytest.fixture(scope="module")
def rel_airflow(tmp_path_factory):
    base = tmp_path_factory.mktemp("rel-airflow")
    dags = base / "dags"
    dags.mkdir()
    (dags / "rel_slow.py").write_text(SLOW_DAG)
    (dags / "shoprank_inventory.py").symlink_to(REPO_ROOT / "dags" / "shoprank_inventory.py")
    stack = RelStack(prepared_settings(private_stack_env(base)), dags)
    t0 = time.monotonic()
    try:
        stack.up(SERVICES, progress=lambda m: print(f"[rel-airflow] {m}", flush=True))
        print(f"[rel-airflow] up in {time.monotonic() - t0:.0f}s", flush=True)
        Storage(stack.settings).ensure_bucket()
        yield stack
    finally:
        stack.down(progress=lambda _m: None)


def _http(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers, method=method),
                                    timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_rest_api_refuses_unauthenticated_calls(rel_airflow):
    """Fault: REST calls with no token, a forged token, and a wrong password.
    Expected: 401/403 for each; the admin's password from stack.env gets a token that works."""
    base = rel_airflow.settings.airflow_url
    assert _http(f"{base}/api/v2/dags") in (401, 403)
    assert _http(f"{base}/api/v2/dags/rel_slow/dagRuns", "POST", {"logical_date": None}) in (401, 403)
    forged = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl"
    assert _http(f"{base}/api/v2/dags", token=forged) in (401, 403)
    assert _http(f"{base}/auth/token", "POST", {"username": "admin", "password": "admin"}) in (400, 401, 403)
    client = client_for(rel_airflow.settings)
    assert _http(f"{base}/api/v2/dags", token=client.token()) == 200


def test_run_completes_across_a_scheduler_restart_mid_task(rel_airflow):
    """Fault: the scheduler (and with it the LocalExecutor's running task) is stopped while
    a task runs, then started again.  Expected: the run still ends in success over REST; the
    interrupted attempt is retried and the task's work completes exactly once (one done marker)."""
    client = client_for(rel_airflow.settings)
    storage = Storage(rel_airflow.settings)
    client.wait_for_dag("rel_slow", timeout=180)
    client.unpause("rel_slow")
    run_id = client.trigger("rel_slow")["dag_run_id"]
    deadline = time.monotonic() + 180
    while client.task_states("rel_slow", run_id).get("slow") != "running":
        assert time.monotonic() < deadline, client.task_states("rel_slow", run_id)
        time.sleep(2)
    while not storage.list_keys(f"rel/{run_id}/attempt-"):
        assert time.monotonic() < deadline
        time.sleep(1)
    time.sleep(5)  # well inside the task's work
    assert rel_airflow.stop("airflow-scheduler")
    stopped = time.monotonic()
    time.sleep(3)
    assert not storage.list_keys(f"rel/{run_id}/done"), "the task must have been interrupted"
    scheduler = next(s for s in rel_airflow.airflow_services() if s.name == "airflow-scheduler")
    rel_airflow.start(scheduler)
    final = client.wait_for_run("rel_slow", run_id, timeout=420)
    took = time.monotonic() - stopped
    attempts = storage.list_keys(f"rel/{run_id}/attempt-")
    done = storage.list_keys(f"rel/{run_id}/done")
    print(f"\nRELIABILITY FIGURES scheduler restart: run {final['state']} {took:.0f}s after the stop; "
          f"attempts started {[a.rsplit('/', 1)[1] for a in attempts]}, completed {[d.rsplit('/', 1)[1] for d in done]}")
    assert final["state"] == "success", client.task_states("rel_slow", run_id)
    assert len(done) == 1, f"the work must complete exactly once, got {done}"
    assert len(attempts) >= 2, "the interrupted attempt and the one that completed"


def test_product_dag_runs_and_task_logs_hold_no_secret(rel_airflow):
    """Fault: a secret printed into a task log (connection password, env, settings repr).
    Expected: shoprank_inventory succeeds through the connection, and no task log or service
    log of this deployment contains the S3 secret key, admin password, JWT secret, fernet key
    or user-hash key."""
    client = client_for(rel_airflow.settings)
    client.wait_for_dag("shoprank_inventory", timeout=180)
    client.unpause("shoprank_inventory")
    run_id = client.trigger("shoprank_inventory")["dag_run_id"]
    assert client.wait_for_run("shoprank_inventory", run_id, timeout=300)["state"] == "success"
    secrets = secret_values(rel_airflow.settings)
    home = rel_airflow.settings.home
    files = [p for p in (home / "airflow" / "logs").rglob("*") if p.is_file()] + list((home / "logs").glob("*.log"))
    task_logs = [p for p in files if "dag_id=" in str(p)]
    assert len(task_logs) >= 2, files  # rel_slow attempt(s) and shoprank_inventory
    for path in files:
        assert leaked(path.read_text(errors="replace"), secrets) == [], path
    print(f"\nRELIABILITY FIGURES airflow logs: scanned {len(files)} files ({len(task_logs)} task logs), no secret")
