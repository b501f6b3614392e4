"""The train DAG on a real CeleryExecutor: the `train` task runs on the `gpu` queue's worker.

Real services on free loopback ports: Debian's redis-server (broker), the rclone S3 server,
MLflow, and Airflow 3 (api-server, scheduler, dag-processor; SQLite metadata DB, Celery
results in the same DB through ``db+sqlite``) with two Celery workers, one consuming queue
``default`` and one consuming queue ``gpu``.  Each worker records its own name as the task
instances' hostname (``shoprank.training.worker.worker_hostname``), so the REST API's task
instance records say which worker ran what.  The run is left behind once `train` succeeded.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import time

import pytest

from shoprank.stack import Stack, free_port, prepared_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = "shoprank_train"
TINY_TRAIN = {"epochs": 1, "max_steps": 4, "batch_size": 8, "max_length": 32, "accelerator": "cpu",
              "devices": 1}
AIRFLOW_SERVICES = ("s3", "mlflow", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed (CI=true): run `make system-deps`")
        pytest.skip("redis-server is not installed (`make system-deps` installs Debian's redis-server)")
    import redis

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=open(workdir / "redis.log", "wb"), stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            if client.ping():
                break
        except redis.exceptions.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (workdir / "redis.log").read_text()
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def celery_stack(redis_url, tmp_path_factory):
    home = tmp_path_factory.mktemp("celery-home")
    settings = prepared_settings({
        "SHOPRANK_HOME": str(home), "SHOPRANK_S3_PORT": str(free_port()), "SHOPRANK_MLFLOW_PORT": str(free_port()),
        "SHOPRANK_AIRFLOW_PORT": str(free_port()), "SHOPRANK_BUCKET": "shoprank-celery",
        "SHOPRANK_ENV_FILE": str(home / "no.env"), "PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
    })
    extra = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
        "SHOPRANK_TRAIN_QUEUE": "gpu",  # read by dags/shoprank_train.py when the DAG is parsed
    }
    stack = Stack(settings, airflow_extra_env=extra)
    workers = [stack.celery_worker_service("default", "cpu-worker"), stack.celery_worker_service("gpu", "gpu-worker")]
    try:
        stack.up(AIRFLOW_SERVICES, progress=lambda m: None)
        for svc in workers:
            stack.start(svc)
        yield stack
    finally:
        for svc in workers:
            stack.stop(svc.name)
        stack.down(progress=lambda m: None)


def test_train_task_runs_on_the_gpu_queue_worker(celery_stack):
    from shoprank.airflow_client import client_for
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.storage import Storage

    settings = celery_stack.settings
    storage = Storage(settings)
    storage.ensure_bucket()
    day = dt.date.today() - dt.timedelta(days=3)
    generate_marketplace(n_products=200, n_queries=30, seed=11, start=day).write_to_storage(storage, day)

    airflow = client_for(settings)
    airflow.wait_for_dag(TRAIN, timeout=180)
    airflow.unpause(TRAIN)
    run_id = airflow.trigger(TRAIN, conf={**TINY_TRAIN, "data_date": day.isoformat()})["dag_run_id"]

    deadline = time.monotonic() + 420
    while True:
        tis = {ti["task_id"]: ti for ti in airflow.task_instances(TRAIN, run_id)}
        states = {t: ti["state"] for t, ti in tis.items()}
        if states.get("train") == "success":
            break
        failed = [t for t, s in states.items() if s in ("failed", "upstream_failed")]
        assert not failed, (states, {n: celery_stack.log_tail(n, 40) for n in
                                     ("airflow-worker-cpu-worker", "airflow-worker-gpu-worker")})
        assert time.monotonic() < deadline, (states, celery_stack.log_tail("airflow-worker-gpu-worker", 60))
        time.sleep(3)

    train = tis["train"]
    assert train["queue"] == "gpu"
    assert train["hostname"] == "gpu-worker", train
    for task_id in ("validate_catalog", "validate_judgments", "validate_queries", "snapshot"):
        assert tis[task_id]["state"] == "success"
        assert tis[task_id]["queue"] == "default" and tis[task_id]["hostname"] == "cpu-worker", tis[task_id]
    # the training subprocess ran under the gpu worker (its progress lines are in that task's log)
    print({t: (ti["queue"], ti["hostname"], ti.get("duration")) for t, ti in tis.items() if ti["hostname"]})
