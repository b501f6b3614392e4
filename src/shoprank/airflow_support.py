"""Glue between Airflow tasks and the plain-Python product code.

DAG files stay thin: each task calls one function from here or from the product modules.
Credentials reach tasks through the Airflow connection ``shoprank_s3`` (type ``aws``:
login = access key, password = secret key, extra ``endpoint_url`` / ``region_name``), not
through code or DAG params.  Without that connection, the usual env / .env settings apply.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from shoprank.config import Settings, get_settings

log = logging.getLogger(__name__)

S3_CONN_ID = "shoprank_s3"


def task_settings(conn_id: str = S3_CONN_ID) -> Settings:
    """Settings for code running inside an Airflow task."""
    settings = get_settings()
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # connection not defined: fall back to env settings
        log.info("Airflow connection %r not available (%s); using environment settings", conn_id, exc)
        return settings
    extra = conn.extra_dejson or {}
    return replace(
        settings,
        aws_access_key_id=conn.login or settings.aws_access_key_id,
        aws_secret_access_key=conn.password or settings.aws_secret_access_key,
        s3_endpoint_url=extra.get("endpoint_url", settings.s3_endpoint_url),
        aws_region=extra.get("region_name", settings.aws_region),
    )


def task_storage(conn_id: str = S3_CONN_ID):
    from shoprank.storage import Storage

    return Storage(task_settings(conn_id))


def subprocess_env(settings: Settings) -> dict[str, str]:
    """Environment for a child process (training, torchrun) of a task: settings + creds."""
    import os

    env = dict(os.environ)
    env.update(settings.as_env())
    return env
