"""Helpers for the reliability suite (tests/reliability, see docs/reliability.md).

Faults that stop a server use PRIVATE servers (a Stack built from ``private_stack_env``), never the session
fixtures' servers, which other tests share.  Every fault test's docstring says
"Fault: ... Expected: ..." and the test asserts the expected behaviour."""

from __future__ import annotations

import datetime as dt
import io
import uuid

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoprank.stack import free_port
from shoprank.validation import ValidationOptions, samples, validate_partition

# ---- one raw partition through the real validation runner (the input suites) -----------------
DAY = "2026-11-20"
NOW = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.timezone.utc)  # the suites' "now"
OPTS = ValidationOptions(now=NOW, build_docs=False)
IDS = pd.Index(samples.catalog(300, day=DAY)["product_id"])  # the catalogue feedback and judgments refer to


def clean(dataset: str, day: str = DAY, n: int | None = None) -> pd.DataFrame:
    """A clean batch of ``dataset`` for ``day`` (``n`` rows where the contract allows)."""
    if dataset == "catalog":
        return samples.catalog(n or 300, day=day)
    if dataset == "queries":
        return samples.queries(day=day)
    if dataset == "judgments":
        return samples.judgments(IDS, n=n or 300)
    return samples.feedback(n or 2_000, day=day, ids=IDS)


def parquet(df: pd.DataFrame | pa.Table, index: bool = False) -> bytes:
    buf = io.BytesIO()
    if isinstance(df, pa.Table):
        pq.write_table(df, buf)
    else:
        df.to_parquet(buf, index=index)
    return buf.getvalue()


def put(storage, dataset: str, files: dict[str, bytes], day: str = DAY, complete: bool = True) -> dict:
    """Upload ``files`` into the raw partition, then (``complete``) its ``_SUCCESS`` marker;
    returns :func:`raw_state` of the partition."""
    prefix = f"raw/{dataset}/dt={day}/"
    for name, data in files.items():
        storage.put_bytes(prefix + name, data)
    if complete:
        storage.put_bytes(prefix + "_SUCCESS", b"")
    return raw_state(storage, prefix)


def run(storage, dataset: str, run_id: str, day: str = DAY, options: ValidationOptions = OPTS):
    ids = IDS if dataset in ("judgments", "feedback") else None
    return validate_partition(storage, dataset, day, run_id, options, catalog_ids=ids)


class ConstModel(mlflow.pyfunc.PythonModel):
    """A tiny packaged model: registry tests need a logged model, not a trained one."""

    def predict(self, context, model_input, params=None):
        return [0.0] * len(model_input)


def raw_state(storage, prefix: str) -> dict[str, tuple[bytes, str]]:
    """Every object under ``prefix`` with its bytes and ETag: 'raw stays untouched' compares two of these."""
    return {k: (storage.get_bytes(k), storage._s3.head_object(Bucket=storage.bucket, Key=k)["ETag"])
            for k in storage.list_keys(prefix)}


_LOGGED: dict[str, tuple[str, str]] = {}


def log_const_model(tracking_uri: str, experiment: str = "reliability", fresh: bool = False) -> tuple[str, str]:
    """(model_uri, run_id) of a constant pyfunc model logged once per server (``fresh``: a new one)."""
    if not fresh and tracking_uri in _LOGGED:
        return _LOGGED[tracking_uri]
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=ConstModel(), pip_requirements=["mlflow"])
    _LOGGED[tracking_uri] = info.model_uri, run.info.run_id
    return _LOGGED[tracking_uri]


def private_stack_env(tmp_path, **extra: str) -> dict[str, str]:
    """Environment of a stack of our own (own home, own free ports): faults may stop its servers."""
    import os

    home = tmp_path / "private-home"
    env = {"SHOPRANK_HOME": str(home), "SHOPRANK_ENV_FILE": str(tmp_path / "none.env"),
           "SHOPRANK_S3_PORT": str(free_port()), "SHOPRANK_MLFLOW_PORT": str(free_port()),
           "SHOPRANK_AIRFLOW_PORT": str(free_port()), "SHOPRANK_BUCKET": "shoprank-rel",
           "PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", **extra}
    return env


@pytest.fixture()
def model_settings(mlflow_server):
    """Settings of the session MLflow server with a registered-model name of this test's own."""
    return mlflow_server.replaced(registered_model=f"rel-{uuid.uuid4().hex[:8]}")
