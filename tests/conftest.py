"""Shared fixtures.  Integration fixtures start REAL servers (no mocks): an rclone S3
server over HTTP with enforced credentials, an MLflow tracking server with proxied
artifacts in that S3, each on free loopback ports under a temporary SHOPRANK_HOME."""

from __future__ import annotations

import os
import uuid

import pytest

from shoprank.config import Settings
from shoprank.stack import Stack, free_port, prepared_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory) -> dict[str, str]:
    """Environment describing a private embedded stack for this test session."""
    home = tmp_path_factory.mktemp("shoprank-home")
    env = {
        "SHOPRANK_HOME": str(home),
        "SHOPRANK_S3_PORT": str(free_port()),
        "SHOPRANK_MLFLOW_PORT": str(free_port()),
        "SHOPRANK_AIRFLOW_PORT": str(free_port()),
        "SHOPRANK_BUCKET": "shoprank-test",
        "SHOPRANK_ENV_FILE": str(home / "no.env"),
        "PATH": os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
    }
    return env


@pytest.fixture(scope="session")
def stack_settings(stack_env) -> Settings:
    return prepared_settings(stack_env)


@pytest.fixture(scope="session")
def stack(stack_settings):
    st = Stack(stack_settings)
    yield st
    st.down(progress=lambda _msg: None)


@pytest.fixture(scope="session")
def s3_server(stack) -> Settings:
    """A real `rclone serve s3` on loopback; returns settings pointing at it."""
    stack.up(("s3",), progress=lambda _msg: None)
    return stack.settings


@pytest.fixture(scope="session")
def mlflow_server(stack, s3_server) -> Settings:
    """A real MLflow tracking server with proxied artifacts in the S3 server."""
    stack.up(("s3", "mlflow"), progress=lambda _msg: None)
    return stack.settings


@pytest.fixture()
def storage(s3_server):
    """A Storage bound to a fresh bucket on the real S3 server."""
    from dataclasses import replace

    from shoprank.storage import Storage

    settings = replace(s3_server, bucket=f"t-{uuid.uuid4().hex[:12]}")
    st = Storage(settings)
    st.ensure_bucket()
    return st
