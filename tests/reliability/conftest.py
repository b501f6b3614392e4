"""Helpers for the reliability suite (tests/reliability, see docs/reliability.md).

Faults that stop a server use PRIVATE servers (a Stack built from ``private_stack_env``), never the session
fixtures' servers, which other tests share.  Every fault test's docstring says
"Fault: ... Expected: ..." and the test asserts the expected behaviour."""

from __future__ import annotations

import uuid
import mlflow
import pytest

from shoprank.stack import free_port


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
