"""Roll the `champion` alias back to an earlier model version, with an audit record.

Trigger from the Airflow UI with the form: target = a version number or an alias
(default `previous`, the champion before the last promotion). Unknown versions are refused
with the list of known ones. Same as `shoprank registry rollback`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task


@dag(
    dag_id="shoprank_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["shoprank", "registry"],
    doc_md=__doc__,
    params={
        "target": Param("previous", type="string", title="Target version",
                        description="a version number, or an alias such as 'previous'"),
        "reason": Param("rollback from Airflow", type="string", title="Reason (audit trail)"),
    },
)
def shoprank_rollback():
    @task
    def rollback() -> dict:
        from shoprank.airflow_support import task_settings, task_storage
        from shoprank.registry import Registry

        ctx = get_current_context()
        user = ctx["dag_run"].triggering_user_name if hasattr(ctx["dag_run"], "triggering_user_name") else None
        record = Registry(task_settings(), task_storage()).rollback(
            ctx["params"]["target"], actor=user or "airflow", reason=ctx["params"]["reason"],
            airflow_run=ctx["ti"].run_id)
        print(f"champion is now version {record['version']} (was {record.get('rolled_back_from')})")
        return record

    rollback()


shoprank_rollback()
