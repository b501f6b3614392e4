"""MLflow runs with authentication (MLflow's basic-auth app) on the embedded stack.

The pipeline logs in as ``shoprank-pipeline`` (MANAGE on the experiment and the registered
model, granted at ``stack up``); people get read access by default; moving or deleting an
alias of the registered model with any other account is refused with HTTP 403."""

from __future__ import annotations

import uuid

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from shoprank.mlflow_auth import PIPELINE_USER, AuthAdmin
from shoprank.stack import Stack, secret

pytestmark = pytest.mark.integration


def _admin_password(settings) -> str:
    return secret(settings, "MLFLOW_AUTH_ADMIN_PASSWORD")


def _new_version(client: MlflowClient, name: str, tmp_path) -> str:
    """A model version from a tiny run artifact (no training)."""
    exp = client.get_experiment_by_name("auth-tests")
    exp_id = exp.experiment_id if exp else client.create_experiment("auth-tests")
    run = client.create_run(exp_id)
    note = tmp_path / "model.txt"
    note.write_text("not a real model")
    client.log_artifact(run.info.run_id, str(note), "model")
    client.set_terminated(run.info.run_id)
    return client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version


def test_anonymous_requests_are_refused_and_the_ui_takes_a_login(mlflow_server):
    """Fault: a request without credentials, or with a wrong password.  Expected: 401 with a
    basic-auth challenge (the browser shows its login box); the health check stays open; the UI
    and the REST API answer the pipeline's login."""
    uri = mlflow_server.mlflow_tracking_uri
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    anonymous = requests.get(api, timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(api, auth=(PIPELINE_USER, "wrong"), timeout=10).status_code == 401
    assert requests.get(f"{uri}/", timeout=10).status_code == 401
    assert requests.get(f"{uri}/health", timeout=10).status_code == 200
    login = (mlflow_server.mlflow_tracking_username, mlflow_server.mlflow_tracking_password)
    assert login[0] == PIPELINE_USER and login[1]
    assert requests.get(api, auth=login, timeout=10).status_code == 200
    ui = requests.get(f"{uri}/", auth=login, timeout=10)
    assert ui.status_code == 200 and "<html" in ui.text.lower()
    admin = ("admin", _admin_password(mlflow_server))
    assert requests.get(f"{uri}/", auth=admin, timeout=10).status_code == 200


def _cli_add_user(settings, monkeypatch, capsys) -> tuple[str, str]:
    """`shoprank mlflow-user add NAME` against this stack; returns (name, printed password)."""
    from shoprank.cli import main

    reader = f"reader-{uuid.uuid4().hex[:6]}"
    with monkeypatch.context() as m:
        m.setenv("SHOPRANK_HOME", str(settings.home))
        m.setenv("SHOPRANK_MLFLOW_PORT", str(settings.mlflow_port))
        m.setenv("SHOPRANK_ENV_FILE", str(settings.home / "no.env"))
        assert main(["mlflow-user", "add", reader]) == 0
    out = capsys.readouterr().out
    assert f"MLflow user {reader} (read only) created; password: " in out
    return reader, out.rsplit("password: ", 1)[1].strip()


def test_only_the_pipeline_moves_aliases(mlflow_server, monkeypatch, capsys, tmp_path):
    """Fault: a person's account (created by the admin, default READ) sets and deletes the
    `champion` alias of the pipeline's registered model.  Expected: both refused (HTTP 403,
    PERMISSION_DENIED) and the alias unchanged; that account still reads the model; the
    pipeline's account registers a version and sets and deletes the alias."""
    uri = mlflow_server.mlflow_tracking_uri
    name = mlflow_server.registered_model  # created and granted at `stack up`
    client = MlflowClient(uri, registry_uri=uri)  # logs in from MLFLOW_TRACKING_* (the pipeline)
    try:  # the session's stack is shared: other suites may have registered versions already
        before = client.get_model_version_by_alias(name, "champion").version
    except MlflowException:
        before = None
    v1 = _new_version(client, name, tmp_path)
    v2 = _new_version(client, name, tmp_path)
    client.set_registered_model_alias(name, "champion", v1)
    try:
        reader, password = _cli_add_user(mlflow_server, monkeypatch, capsys)
        assert requests.get(f"{uri}/", auth=(reader, password), timeout=10).status_code == 200  # the UI
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", reader)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        as_reader = MlflowClient(uri, registry_uri=uri)
        assert as_reader.get_model_version_by_alias(name, "champion").version == v1  # reads
        assert {v.version for v in as_reader.search_model_versions(f"name='{name}'")} >= {v1, v2}
        with pytest.raises(MlflowException) as refused:
            as_reader.set_registered_model_alias(name, "champion", v2)
        assert refused.value.error_code == "PERMISSION_DENIED" and "403" in str(refused.value)
        with pytest.raises(MlflowException) as refused:
            as_reader.delete_registered_model_alias(name, "champion")
        assert refused.value.error_code == "PERMISSION_DENIED"
        with pytest.raises(MlflowException) as refused:  # nor a new alias of its own
            as_reader.set_registered_model_alias(name, "mine", v2)
        assert refused.value.error_code == "PERMISSION_DENIED"
        # the same refusal on the REST API, as the UI would get it
        raw = requests.post(f"{uri}/api/2.0/mlflow/registered-models/alias",
                            json={"name": name, "alias": "champion", "version": v2},
                            auth=(reader, password), timeout=10)
        assert raw.status_code == 403
        monkeypatch.undo()
        assert client.get_model_version_by_alias(name, "champion").version == v1  # unchanged

        # the pipeline's account moves it and deletes it
        client.set_registered_model_alias(name, "champion", v2)
        assert client.get_model_version_by_alias(name, "champion").version == v2
    finally:
        monkeypatch.undo()
        if before is None:
            client.delete_registered_model_alias(name, "champion")
        else:
            client.set_registered_model_alias(name, "champion", before)
        for version in (v1, v2):
            client.delete_model_version(name, version)
    assert not {v1, v2} & {v.version for v in client.search_model_versions(f"name='{name}'")}


def test_stack_up_restores_the_pipeline_grants(mlflow_server, monkeypatch, capsys):
    """Fault: the pipeline's grant on the registered model is revoked (an admin mistake).
    Expected: the pipeline is down to read access; the next `stack up` grants MANAGE again and
    the pipeline's password stays the one in stack.env; so does docker-compose's provisioning
    step (`python -m shoprank.mlflow_auth provision` in airflow-init)."""
    from shoprank.mlflow_auth import main as mlflow_auth_main

    uri, name = mlflow_server.mlflow_tracking_uri, mlflow_server.registered_model
    admin = AuthAdmin(uri, _admin_password(mlflow_server))
    perm = {"username": PIPELINE_USER, "resource_type": "registered_model", "resource_id": name}

    def permission() -> str:
        return admin.call("GET", "/api/3.0/mlflow/users/permissions/get", params=perm)[1]["permission"]

    assert permission() == "MANAGE"
    admin.call("POST", "/api/3.0/mlflow/users/permissions/revoke", json=perm)
    assert permission() == "READ"
    messages: list[str] = []
    Stack(mlflow_server).up(("s3", "mlflow"), progress=messages.append)
    assert permission() == "MANAGE"
    assert any("shoprank-pipeline unchanged" in m for m in messages), messages

    admin.call("POST", "/api/3.0/mlflow/users/permissions/revoke", json=perm)
    assert permission() == "READ"
    monkeypatch.setenv("SHOPRANK_HOME", str(mlflow_server.home))
    monkeypatch.setenv("SHOPRANK_MLFLOW_PORT", str(mlflow_server.mlflow_port))
    monkeypatch.setenv("SHOPRANK_ENV_FILE", str(mlflow_server.home / "no.env"))
    assert mlflow_auth_main(["provision"]) == 0
    assert "MANAGE on experiment" in capsys.readouterr().out
    assert permission() == "MANAGE"
