#!/usr/bin/env python3
"""Write .env for docker-compose with every required secret generated.

    python3 docker/init-env.py            # creates .env from .env.example (mode 0600)
    python3 docker/init-env.py --env-file path/to/.env

If the file exists, only the required secrets that are empty (or still `change-me`) are
filled; every other line is kept as it is.  Values are hex (the Fernet key base64url), so
they are safe in the connection URLs, the `shoprank_s3` JSON and command lines that
docker-compose.yml builds from them.
Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every `${VAR:?...}` of docker-compose.yml (tests/unit/test_compose.py keeps the two in step).
GENERATORS: dict[str, Callable[[], str]] = {
    "AWS_ACCESS_KEY_ID": lambda: "shoprank" + secrets.token_hex(6),
    "AWS_SECRET_ACCESS_KEY": lambda: secrets.token_hex(20),
    "SHOPRANK_POSTGRES_PASSWORD": lambda: secrets.token_hex(24),
    "SHOPRANK_AIRFLOW_DB_PASSWORD": lambda: secrets.token_hex(24),
    "SHOPRANK_MLFLOW_DB_PASSWORD": lambda: secrets.token_hex(24),
    "SHOPRANK_REDIS_PASSWORD": lambda: secrets.token_hex(24),
    "SHOPRANK_AIRFLOW_ADMIN_PASSWORD": lambda: secrets.token_hex(12),
    "SHOPRANK_AIRFLOW_JWT_SECRET": lambda: secrets.token_hex(32),
    # a Fernet key is the base64url encoding of 32 random bytes
    "SHOPRANK_AIRFLOW_FERNET_KEY": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
    "SHOPRANK_USER_HASH_KEY": lambda: secrets.token_hex(32),
    # MLflow basic auth: the pipeline's account, the `admin` login, the UI's CSRF key
    "MLFLOW_TRACKING_PASSWORD": lambda: secrets.token_hex(24),
    "MLFLOW_AUTH_ADMIN_PASSWORD": lambda: secrets.token_hex(12),
    "MLFLOW_FLASK_SERVER_SECRET_KEY": lambda: secrets.token_hex(32),
}
PLACEHOLDERS = {"", "change-me"}


def fill(lines: list[str]) -> tuple[list[str], list[str]]:
    """Return the lines with missing secrets generated, and the names that were filled."""
    out, filled, seen = [], [], set()
    for line in lines:
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and not line.lstrip().startswith("#") and key in GENERATORS:
            seen.add(key)
            if value.strip().strip("'\"") in PLACEHOLDERS:
                line = f"{key}={GENERATORS[key]()}"
                filled.append(key)
        out.append(line)
    for key in GENERATORS:
        if key not in seen:
            out.append(f"{key}={GENERATORS[key]()}")
            filled.append(key)
    return out, filled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", type=Path, default=REPO_ROOT / ".env")
    parser.add_argument("--example", type=Path, default=REPO_ROOT / ".env.example")
    args = parser.parse_args(argv)
    source = args.env_file if args.env_file.exists() else args.example
    lines, filled = fill(source.read_text(encoding="utf-8").splitlines())
    fd = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chmod(args.env_file, 0o600)
    print(f"{args.env_file}: generated {', '.join(filled) if filled else 'nothing (all set)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
