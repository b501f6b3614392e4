"""`airflow dags test` of a small DAG that reads from the real S3 server through the
Airflow connection `shoprank_s3` (real Airflow, SQLite metadata DB)."""

import subprocess
import uuid
from dataclasses import replace

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
    settings = replace(airflow_db, bucket=f"inv-{uuid.uuid4().hex[:10]}")  # nothing else writes here
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
