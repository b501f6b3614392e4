"""Security defaults of the embedded stack, checked against the real servers: MLflow
refuses foreign Host headers, S3 refuses missing/wrong credentials, Airflow runs with auth
(no all-admins mode), secrets stay out of MLflow params/tags and logs, user ids are
pseudonymised with a keyed hash and never reach training rows."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
import pytest

from shoprank.config import ConfigError
from shoprank.stack import STACK_SECRETS, airflow_env, ensure_stack_env
from shoprank.storage import Storage, StorageError

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _status(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> int:
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=b"x" if method == "PUT" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def secret_values(settings) -> dict[str, str]:
    """Every generated secret of the stack (S3 keys, admin password, JWT secret, fernet key, hash key)."""
    values = ensure_stack_env(settings)
    found = {k: values[k] for k in STACK_SECRETS if values.get(k)}
    assert {"AWS_SECRET_ACCESS_KEY", "SHOPRANK_AIRFLOW_ADMIN_PASSWORD", "SHOPRANK_AIRFLOW_JWT_SECRET",
            "SHOPRANK_AIRFLOW_FERNET_KEY", "SHOPRANK_USER_HASH_KEY"} <= set(found)
    return found


def leaked(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if name != "AWS_ACCESS_KEY_ID" and value in text]


def test_mlflow_rejects_a_foreign_host_header(mlflow_server):
    """Fault: a request reaches MLflow with a Host header it does not serve (DNS rebinding),
    even with a valid login.  Expected: 403; the same request with the loopback Host header is
    answered (200).  (Without a login MLflow answers 401: integration/test_mlflow_auth.py.)"""
    import base64

    url = f"{mlflow_server.mlflow_tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    login = f"{mlflow_server.mlflow_tracking_username}:{mlflow_server.mlflow_tracking_password}"
    auth = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}
    assert _status(url, auth) == 200
    assert _status(url) == 401
    assert _status(url, {**auth, "Host": "evil.example.com"}) == 403
    assert _status(url, {**auth, "Host": f"attacker.test:{mlflow_server.mlflow_port}"}) == 403


def test_s3_requires_valid_credentials(s3_server):
    """Fault: S3 requests without a signature, with a wrong secret, with an unknown key, and
    settings with no credentials at all.  Expected: refused (400/403) / StorageError naming the credential
    variables / ConfigError before any request; the right keys work."""
    bucket = s3_server.bucket
    good = Storage(s3_server)
    good.ensure_bucket()
    # rclone answers unsigned requests with 400 UnsupportedAlgorithm (AWS: 403): refused either way
    assert _status(f"{s3_server.s3_endpoint_url}/{bucket}/") in (400, 403)  # anonymous listing
    assert _status(f"{s3_server.s3_endpoint_url}/{bucket}/anon.txt", method="PUT") in (400, 403)
    assert not good.exists("anon.txt"), "an anonymous write must not land"
    for bad in (s3_server.replaced(aws_secret_access_key="wrong-secret"),
                s3_server.replaced(aws_access_key_id="unknown-key")):
        with pytest.raises(StorageError, match="refused the credentials.*AWS_ACCESS_KEY_ID"):
            Storage(bad).list_keys("raw/")
    with pytest.raises(ConfigError, match="S3 credentials are not set"):
        Storage(s3_server.replaced(aws_access_key_id=None, aws_secret_access_key=None))
    assert isinstance(Storage(s3_server).list_keys("raw/"), list)


def test_airflow_config_has_auth_on_and_no_credentials_in_plain_env(stack_settings):
    """Fault: none (configuration audit).  Expected: the embedded Airflow uses the simple auth
    manager with one admin user, all-admins mode OFF, a generated JWT secret and fernet key;
    Airflow processes get S3 credentials only through the connection, not AWS_* variables."""
    env = airflow_env(stack_settings)
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"].lower() == "false"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
    secrets = secret_values(stack_settings)
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == secrets["SHOPRANK_AIRFLOW_JWT_SECRET"]
    assert env["AIRFLOW__CORE__FERNET_KEY"] == secrets["SHOPRANK_AIRFLOW_FERNET_KEY"]
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    # tasks log in to MLflow as the pipeline's own account, never as its admin
    assert env["MLFLOW_TRACKING_USERNAME"] == "shoprank-pipeline"
    assert env["MLFLOW_TRACKING_PASSWORD"] == secrets["MLFLOW_TRACKING_PASSWORD"]
    assert secrets["MLFLOW_AUTH_ADMIN_PASSWORD"] not in env.values()
    path = stack_settings.home / "stack.env"
    assert path.stat().st_mode & 0o077 == 0, "stack.env must be readable by its owner only"
    passwords = stack_settings.home / "airflow" / "passwords.json"
    assert passwords.stat().st_mode & 0o077 == 0


def test_user_ids_are_pseudonymised_and_never_reach_training_rows():
    """Fault: raw user ids could leak into feedback or into the training data derived from it.
    Expected: the simulator writes HMAC-SHA256 pseudonyms (keyed: another key gives other ids;
    no raw id appears); the training rows derived by shoprank.labels carry no user or
    session column and no pseudonym anywhere in their cells."""
    from shoprank.data.simulator import pseudonymise, random_rank_fn, simulate_day
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.labels import derive_labels, to_training_rows

    mp = generate_marketplace(n_products=120, n_queries=20, seed=3, start="2026-11-01")
    day = "2026-11-05"
    a = simulate_day(mp, day, random_rank_fn, n_sessions=60, seed=1, hmac_key="key-A")
    b = simulate_day(mp, day, random_rank_fn, n_sessions=60, seed=1, hmac_key="key-B")
    raw_ids = set(mp.users["user_id"].astype(str))
    users = set(a["user_id"].astype(str))
    assert users and not users & raw_ids
    assert all(re.fullmatch(r"[0-9a-f]{64}", u) for u in users)
    assert users <= {pseudonymise(r, "key-A") for r in raw_ids}  # keyed hash of a real id
    assert not users & set(b["user_id"].astype(str)), "another key must give other pseudonyms"

    result = derive_labels(a)
    rows = to_training_rows(result.pairs, mp.catalog, mp.queries)
    assert len(rows) > 0
    assert not [c for c in rows.columns if "user" in c.lower() or "session" in c.lower()], list(rows.columns)
    assert not [c for c in result.pairs.columns if "user" in c.lower()], list(result.pairs.columns)
    cells = set(rows.astype(str).to_numpy().ravel())
    assert not cells & users


def test_scanned_logs_and_mlflow_records_hold_no_secret(stack_settings, mlflow_server, request):
    """Fault: a secret printed or logged somewhere (service logs of this session's servers,
    MLflow params/tags/descriptions of every run and model version created so far).
    Expected: none of the S3 secret key, admin password, JWT secret, fernet key or user-hash key
    appears.  (The training-run and Airflow task-log scans live in test_reliability_airflow.py.)"""
    from mlflow import MlflowClient

    secrets = secret_values(stack_settings)
    logs = list((stack_settings.home / "logs").glob("*.log"))
    assert logs
    for path in logs:
        assert leaked(path.read_text(errors="replace"), secrets) == [], path
    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    scanned = 0
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=500):
            blob = repr(run.data.params) + repr(run.data.tags)
            assert leaked(blob, secrets) == [], run.info.run_id
            scanned += 1
    for mv in client.search_model_versions(max_results=1000):
        assert leaked(repr(mv.tags) + (mv.description or ""), secrets) == []
    print(f"\nRELIABILITY FIGURES secrets: scanned {len(logs)} service logs and {scanned} MLflow runs")


@pytest.mark.slow
def test_a_real_training_run_logs_no_secret_to_mlflow(mlflow_server, storage, tmp_path, capfd, monkeypatch):
    """Fault: a secret leaks into what a training run records (params from the config,
    tags, the run note, the subprocess output shown in the task log, the version tags).
    Expected: workflow.train_model + register_model of a real (2-step) MiniLM run record
    none of the stack's secrets; the S3 secret is not even in the config file on disk."""
    import pandas as pd
    from mlflow import MlflowClient

    from shoprank.storage import dataset_prefix
    from shoprank.workflow import Lineage, register_model, train_model

    monkeypatch.setenv("SHOPRANK_GIT_SHA", "reliability-test")
    import uuid

    settings = mlflow_server.replaced(bucket=storage.bucket, registered_model=f"rel-sec-{uuid.uuid4().hex[:6]}")
    secrets = secret_values(settings)
    rows = [{"query": f"{c} shoes", "product_id": f"p{i}-{c}", "text": f"{c} shoes | brand{i}",
             "grade": 3 if i == 0 else 0, "weight": 1.0, "query_freq_bucket": "head", "category": "Fashion"}
            for c in ("red", "blue", "green", "black") for i in range(4)]
    snap = "rel-secrets"
    for split in ("train", "val", "test"):
        storage.write_parquet(pd.DataFrame(rows), f"{dataset_prefix(snap)}{split}.parquet")
    lineage = Lineage(dag_id="shoprank_train", run_id="manual__secrets", key="shoprank_train/rel-secrets")
    trained = train_model(settings, {"snapshot": snap, "rows": len(rows)},
                          {"epochs": 1, "max_steps": 2, "batch_size": 8, "max_length": 16, "accelerator": "cpu"},
                          lineage, workdir=str(tmp_path / "work"))
    out = capfd.readouterr()
    version = register_model(settings, storage, trained, {"metrics": {"ndcg_at_10": 0.5}}, lineage)["version"]
    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(trained["mlflow_run_id"])
    assert run.data.params, "the run logged its parameters"
    blob = repr(run.data.params) + repr(run.data.tags) + out.out + out.err
    assert leaked(blob, secrets) == []
    assert leaked((tmp_path / "work" / "train_config.json").read_text(), secrets) == []
    mv = client.get_model_version(settings.registered_model, version)
    assert leaked(repr(mv.tags) + (mv.description or ""), secrets) == []
    print(f"\nRELIABILITY FIGURES training scan: {len(run.data.params)} params, {len(run.data.tags)} tags, "
          f"{len(out.out.splitlines())} output lines, no secret")
