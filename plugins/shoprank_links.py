"""Airflow plugin: extra links from shoprank's tasks to the MLflow UI and the Data Docs.

Airflow 3 resolves a plugin's operator extra links in the api-server, when someone opens a
task (UI or ``GET .../taskInstances/{task_id}/links``): ``get_link`` below reads the XComs of
the task's DAG run from the metadata database and :func:`shoprank.links.task_link` builds the
URL (which task shows which link: see that module).  The links attach to the operator class of
``@task`` functions and to the approval operator; on tasks they do not apply to they are
empty, and the UI shows no button for them.
"""

from __future__ import annotations

import json
import logging

from airflow.plugins_manager import AirflowPlugin
from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseOperatorLink

from shoprank import links
from shoprank.airflow_operators import RecordedApprovalOperator

log = logging.getLogger(__name__)


def read_xcom(ti_key, task_id: str, key: str = links.RETURN_VALUE):
    """The XCom ``key`` of ``task_id`` in the DAG run of ``ti_key`` (api-server side: the task
    SDK's XCom API needs a running task, so this reads the table, as Airflow's own links do)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(run_id=ti_key.run_id, key=key, dag_ids=ti_key.dag_id, task_ids=task_id,
                               map_indexes=-1).with_only_columns(XComModel.value)
        ).first()
    value = row.value if row is not None else None
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)  # plain JSON only: never instantiate classes named in XCom
        except ValueError:
            pass
    return value


class ShoprankLink(BaseOperatorLink):
    name = ""

    def get_link(self, operator, *, ti_key) -> str:
        try:
            url = links.task_link(self.name, ti_key.dag_id, ti_key.task_id,
                                  lambda task_id, key=links.RETURN_VALUE: read_xcom(ti_key, task_id, key))
        except Exception:  # a link must never break the task page
            log.exception("shoprank link %r of %s failed", self.name, ti_key)
            return ""
        return url or ""


class DataDocsLink(ShoprankLink):
    name = links.DATA_DOCS
    operators = [_PythonDecoratedOperator]


class MlflowRunLink(ShoprankLink):
    name = links.MLFLOW_RUN
    operators = [_PythonDecoratedOperator]


class ModelVersionLink(ShoprankLink):
    name = links.MODEL_VERSION
    operators = [_PythonDecoratedOperator]


class CompareWithChampionLink(ShoprankLink):
    name = links.COMPARE
    operators = [RecordedApprovalOperator]


class ShoprankLinksPlugin(AirflowPlugin):
    name = "shoprank_links"
    operator_extra_links = [DataDocsLink(), MlflowRunLink(), ModelVersionLink(), CompareWithChampionLink()]
