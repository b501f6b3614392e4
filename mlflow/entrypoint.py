#!/usr/bin/env python3
"""Entrypoint of the MLflow image: write the basic-auth app's config, then run the command.

`mlflow server --app-name basic-auth` reads its users database from an ini file
(MLFLOW_AUTH_CONFIG_PATH).  That URL holds the database password, so the file is not baked into
the image: it is written at start from SHOPRANK_MLFLOW_AUTH_DATABASE_URI (mode 0600), with the
same content shoprank.mlflow_auth.auth_config_text gives the embedded stack (a unit test keeps
the two equal).  The admin's first password comes from MLFLOW_AUTH_ADMIN_PASSWORD and the UI's
CSRF key from MLFLOW_FLASK_SERVER_SECRET_KEY, both read by MLflow itself.  Without
SHOPRANK_MLFLOW_AUTH_DATABASE_URI the command runs unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_CONFIG_PATH = "/tmp/mlflow-auth/basic_auth.ini"


def config_text(database_uri: str, admin_username: str = "admin", default_permission: str = "READ",
                cache_ttl_seconds: int = 60) -> str:
    escape = lambda value: value.replace("%", "%%")  # noqa: E731  (configparser interpolation)
    return ("[mlflow]\n"
            f"default_permission = {default_permission}\n"
            f"database_uri = {escape(database_uri)}\n"
            f"admin_username = {escape(admin_username)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {int(cache_ttl_seconds)}\n")


def write_config(environ: dict[str, str]) -> Path | None:
    uri = environ.get("SHOPRANK_MLFLOW_AUTH_DATABASE_URI")
    if not uri:
        return None
    path = Path(environ.get("MLFLOW_AUTH_CONFIG_PATH") or DEFAULT_CONFIG_PATH)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(config_text(uri, environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"))
    return path


def main(argv: list[str]) -> None:
    path = write_config(dict(os.environ))
    if path is not None:
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(path)
    os.environ.pop("SHOPRANK_MLFLOW_AUTH_DATABASE_URI", None)  # the server needs only the file
    if not argv:
        sys.exit("usage: entrypoint.py COMMAND [ARGS...]")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
