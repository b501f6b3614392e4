"""Inventory: what data is in the shoprank bucket (partitions per dataset and zone).

A small read-only DAG, handy after dropping your own files into raw/ to check that
shoprank sees them.  Reads S3 through the Airflow connection `shoprank_s3`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="shoprank_inventory",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["shoprank"],
    doc_md=__doc__,
)
def shoprank_inventory():
    @task
    def list_partitions() -> dict:
        from shoprank.airflow_support import task_storage
        from shoprank.inventory import inventory

        return inventory(task_storage())

    list_partitions()


shoprank_inventory()
