"""Inventory: what data is in the shoprank bucket (partitions per dataset and zone).

A small read-only DAG, handy after dropping your own files into raw/ to check that
shoprank sees them.  Reads S3 through the Airflow connection `shoprank_s3`.

It never fails on what was dropped: folders that are not `dt=YYYY-MM-DD` partitions
(`dt=2026-02-30`, `date=2026-11-20`), partitions still missing their `_SUCCESS` marker and
files that cannot be counted are listed under "problems" with their S3 key.
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

        result = inventory(task_storage())
        for p in result["problems"]:
            print(f"problem: {p['key']}: {p['problem']}")
        return result

    list_partitions()


shoprank_inventory()
