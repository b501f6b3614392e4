"""MLflow authentication: who may do what on the tracking server, and how each side logs in.

The tracking server runs MLflow's basic-auth app (``mlflow server --app-name basic-auth``) on the
embedded stack and in docker-compose.  Three kinds of accounts:

* ``admin`` (password ``MLFLOW_AUTH_ADMIN_PASSWORD``): created by MLflow itself on the first
  start of an empty auth database; creates the other accounts and grants permissions.  This is
  also the UI login the stack prints.
* ``shoprank-pipeline`` (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``): what every
  pipeline process logs in with (Airflow tasks, the training subprocess, the CLI, the demo).
  :func:`provision` gives it MANAGE on the experiment and on the registered model, so it logs
  runs, registers versions and moves the ``champion`` / ``challenger`` / ``previous`` aliases.
* everyone else (``shoprank mlflow-user add NAME``): the server's ``default_permission`` READ.
  They browse and compare runs and models in the UI; setting or deleting an alias of the
  registered model is refused (HTTP 403), so ``champion`` moves only through the pipeline.

Passwords are generated (``stack up`` into ``$SHOPRANK_HOME/stack.env``, ``docker/init-env.py``
into ``.env``), never written in code.  MLflow's client reads its credentials only from the
environment variables ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, so a process
that resolved them from a file exports them with :func:`export_credentials`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import requests

ADMIN_USER = "admin"
PIPELINE_USER = "shoprank-pipeline"
DEFAULT_PERMISSION = "READ"
PIPELINE_PERMISSION = "MANAGE"  # deleting an alias needs can_delete, which only MANAGE has
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
REGISTERED_MODEL_DESCRIPTION = ("shoprank cross-encoder ranker. Aliases: champion (serving), "
                                "challenger (newest candidate), previous (rollback target).")


class MlflowAuthError(RuntimeError):
    """The auth setup failed (wrong admin password, server without auth, refused call)."""


# ---- the server side ------------------------------------------------------------------------

# Seconds a worker remembers a verified (user, password): without it every request pays a
# PBKDF2 hash (~0.1-0.3 s on a busy small machine).  A password change or deletion through the
# API takes effect at once on the worker that handled it, on other workers within this time.
AUTH_CACHE_TTL_SECONDS = 60


def auth_config_text(database_uri: str, admin_username: str = ADMIN_USER,
                     default_permission: str = DEFAULT_PERMISSION,
                     cache_ttl_seconds: int = AUTH_CACHE_TTL_SECONDS) -> str:
    """The basic-auth app's ini file (MLFLOW_AUTH_CONFIG_PATH).  The admin password is not in it:
    the server reads it from MLFLOW_AUTH_ADMIN_PASSWORD when it creates the admin account."""
    escape = lambda value: value.replace("%", "%%")  # noqa: E731  (configparser interpolation)
    return ("[mlflow]\n"
            f"default_permission = {default_permission}\n"
            f"database_uri = {escape(database_uri)}\n"
            f"admin_username = {escape(admin_username)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {int(cache_ttl_seconds)}\n")


def write_auth_config(path: Path, database_uri: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(auth_config_text(database_uri))
    return path


# ---- the client side ------------------------------------------------------------------------

def export_credentials(username: str | None = None, password: str | None = None,
                       environ: Mapping[str, str] | None = None) -> bool:
    """Put the pipeline's MLflow login into ``os.environ`` (where MLflow's client reads it).

    Without arguments the values are resolved like every setting (environment, ``.env``,
    ``$SHOPRANK_HOME/stack.env``).  Returns whether credentials were exported.
    """
    if username is None or password is None:
        from shoprank.config import env_layers

        def first(name: str) -> str | None:  # an empty line (a copied .env.example) does not hide stack.env
            return next((values[name] for _source, values in env_layers(environ) if values.get(name)), None)

        username = username or first("MLFLOW_TRACKING_USERNAME")
        password = password or first("MLFLOW_TRACKING_PASSWORD")
    if not username or not password:
        return False
    os.environ["MLFLOW_TRACKING_USERNAME"] = username
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return True


@dataclass
class AuthAdmin:
    """The admin account's calls to the basic-auth app's REST API (users and grants)."""

    tracking_uri: str
    password: str
    username: str = ADMIN_USER
    timeout: float = 30.0

    def call(self, method: str, path: str, *, ok_errors: tuple[str, ...] = (), **kwargs: Any) -> tuple[int, dict]:
        """(HTTP status, JSON body).  Errors whose ``error_code`` is in ``ok_errors`` are returned."""
        url = self.tracking_uri.rstrip("/") + path
        try:
            resp = requests.request(method, url, auth=(self.username, self.password), timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise MlflowAuthError(f"MLflow at {self.tracking_uri} is not reachable: {exc}") from None
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = {"message": resp.text[:300]}
        if resp.ok or body.get("error_code") in ok_errors:
            return resp.status_code, body
        raise MlflowAuthError(f"MLflow {method} {path}: HTTP {resp.status_code} {body.get('message') or body}")

    def auth_enabled(self) -> bool:
        """True on a basic-auth server where the admin login works; False on one without auth."""
        url = self.tracking_uri.rstrip("/") + "/api/2.0/mlflow/users/current"
        try:
            status = requests.get(url, auth=(self.username, self.password), timeout=self.timeout).status_code
        except requests.RequestException as exc:
            raise MlflowAuthError(f"MLflow at {self.tracking_uri} is not reachable: {exc}") from None
        if status == 404:  # no basic-auth app: the route does not exist
            return False
        if status == 200:
            return True
        if status == 401:
            raise MlflowAuthError(
                f"MLflow refused the {self.username!r} login at {self.tracking_uri}: its auth database was "
                f"created with another MLFLOW_AUTH_ADMIN_PASSWORD (the password only applies when MLflow "
                f"creates the account on an empty auth database)")
        raise MlflowAuthError(f"MLflow GET /api/2.0/mlflow/users/current: HTTP {status}")

    def can_log_in(self, username: str, password: str) -> bool:
        url = self.tracking_uri.rstrip("/") + "/api/2.0/mlflow/users/current"
        try:
            return requests.get(url, auth=(username, password), timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def ensure_user(self, username: str, password: str) -> str:
        """Create ``username`` or reset its password; returns ``created``, ``updated`` or ``unchanged``."""
        status, _ = self.call("GET", "/api/2.0/mlflow/users/get", params={"username": username},
                              ok_errors=("RESOURCE_DOES_NOT_EXIST",))
        if status != 200:
            self.call("POST", "/api/2.0/mlflow/users/create", json={"username": username, "password": password})
            return "created"
        if self.can_log_in(username, password):
            return "unchanged"
        self.call("PATCH", "/api/2.0/mlflow/users/update-password", json={"username": username, "password": password})
        return "updated"

    def grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        """Give ``username`` exactly ``permission`` on one resource (replacing another grant)."""
        body = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        _, found = self.call("GET", "/api/3.0/mlflow/users/permissions/get", params=body)
        if found.get("permission") == permission:
            return
        status, _ = self.call("POST", "/api/3.0/mlflow/users/permissions/grant", json={**body, "permission": permission},
                              ok_errors=("RESOURCE_ALREADY_EXISTS",))
        if status != 200:  # an explicit lower grant exists: replace it
            self.call("POST", "/api/3.0/mlflow/users/permissions/revoke", json=body)
            self.call("POST", "/api/3.0/mlflow/users/permissions/grant", json={**body, "permission": permission})

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created when absent."""
        status, body = self.call("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name},
                                 ok_errors=("RESOURCE_DOES_NOT_EXIST",))
        if status == 200:
            return body["experiment"]["experiment_id"]
        _, body = self.call("POST", "/api/2.0/mlflow/experiments/create", json={"name": name})
        return body["experiment_id"]

    def ensure_registered_model(self, name: str) -> None:
        status, _ = self.call("GET", "/api/2.0/mlflow/registered-models/get", params={"name": name},
                              ok_errors=("RESOURCE_DOES_NOT_EXIST",))
        if status != 200:
            self.call("POST", "/api/2.0/mlflow/registered-models/create",
                      json={"name": name, "description": REGISTERED_MODEL_DESCRIPTION},
                      ok_errors=("RESOURCE_ALREADY_EXISTS",))


def provision(tracking_uri: str, admin_password: str, pipeline_user: str, pipeline_password: str,
              experiment: str, registered_model: str, progress: Callable[[str], None] = lambda _m: None) -> bool:
    """Make the pipeline account able to run the pipeline; idempotent (every ``stack up``).

    Creates the account (or resets its password to the configured one), the experiment and the
    registered model when absent, and grants the account MANAGE on both.  Creating them here,
    before anyone else can, matters: whoever creates a resource gets MANAGE on it.  Returns
    False, doing nothing, when the server runs without authentication.
    """
    admin = AuthAdmin(tracking_uri, admin_password)
    if not admin.auth_enabled():
        return False
    if pipeline_user == ADMIN_USER:
        raise MlflowAuthError("MLFLOW_TRACKING_USERNAME must not be the admin account: the pipeline has its own")
    state = admin.ensure_user(pipeline_user, pipeline_password)
    experiment_id = admin.experiment_id(experiment)
    admin.ensure_registered_model(registered_model)
    admin.grant(pipeline_user, "experiment", experiment_id, PIPELINE_PERMISSION)
    admin.grant(pipeline_user, "registered_model", registered_model, PIPELINE_PERMISSION)
    progress(f"mlflow: account {pipeline_user} {state}, {PIPELINE_PERMISSION} on experiment {experiment!r} "
             f"and model {registered_model!r}; others read only")
    return True


def add_user(tracking_uri: str, admin_password: str, username: str, password: str | None = None) -> str:
    """Create a person's account with the default (read) permission; returns its password."""
    password = password or secrets.token_urlsafe(12)
    admin = AuthAdmin(tracking_uri, admin_password)
    if not admin.auth_enabled():
        raise MlflowAuthError(f"MLflow at {tracking_uri} runs without authentication")
    status, _ = admin.call("POST", "/api/2.0/mlflow/users/create", json={"username": username, "password": password},
                           ok_errors=("RESOURCE_ALREADY_EXISTS",))
    if status != 200:
        raise MlflowAuthError(f"MLflow user {username!r} exists already")
    return password


# ---- command line (docker-compose's airflow-init job, and `shoprank mlflow-user`) ---------------

def _admin_password() -> str:
    from shoprank.config import env_layers

    value = next((v["MLFLOW_AUTH_ADMIN_PASSWORD"] for _s, v in env_layers() if v.get("MLFLOW_AUTH_ADMIN_PASSWORD")),
                 None)
    if not value:
        raise MlflowAuthError("MLFLOW_AUTH_ADMIN_PASSWORD is not set (stack.env of the embedded stack, "
                              ".env of docker-compose)")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m shoprank.mlflow_auth provision|add-user NAME``: settings as everywhere else."""
    from shoprank.config import Settings

    parser = argparse.ArgumentParser(prog="python -m shoprank.mlflow_auth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("provision", help="create the pipeline account, the experiment and the model; grant MANAGE")
    p = sub.add_parser("add-user", help="create a read-only MLflow account and print its password")
    p.add_argument("username")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    try:
        if args.action == "provision":
            if not settings.mlflow_tracking_username or not settings.mlflow_tracking_password:
                raise MlflowAuthError("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            done = provision(settings.mlflow_tracking_uri, _admin_password(), settings.mlflow_tracking_username,
                             settings.mlflow_tracking_password, settings.mlflow_experiment,
                             settings.registered_model, progress=print)
            if not done:
                print(f"MLflow at {settings.mlflow_tracking_uri} runs without authentication: nothing to do")
        else:
            password = add_user(settings.mlflow_tracking_uri, _admin_password(), args.username)
            print(f"MLflow user {args.username} (read only) created; password: {password}")
    except MlflowAuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
