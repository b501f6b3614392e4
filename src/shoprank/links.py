"""Where a task's "extra links" in the Airflow UI point: MLflow pages and the Data Docs.

Plain Python, no Airflow: ``plugins/shoprank_links.py`` registers the links with Airflow and
hands :func:`task_link` a reader of the XComs of the task's DAG run; everything here builds
URLs from what the tasks returned.

Which task shows which link, and what it is built from:

* ``validate_*`` -> ``Data Docs``: the batch's GX page (the task's ``data_docs`` key) as the
  ``train`` task copied it into its MLflow run (``workflow.log_data_docs``); in the daily DAG
  only ``validate_feedback``'s page is copied (:data:`DOCS_IN_RUN`).
* ``train``, ``evaluate``, ``register`` -> ``MLflow run`` (``train``'s ``mlflow_run_id`` and
  ``experiment_id``) and ``MLflow model version`` (``register``'s ``version``).
* ``approve`` -> ``MLflow compare with champion``: the compare view of the approval card
  (``gate``'s XCom ``decision``), challenger and champion runs side by side.

A link whose inputs do not exist yet (the task has not run, no champion to compare with, no
Data Docs built) is ``None``: Airflow shows no button for it.  Links are built when someone
opens the task, so they always use the current settings.

The MLflow UI routes are its hash routes (``<base>/#/experiments/<id>/runs/<run>``), as the
MLflow 3 UI builds them itself.  The base is the MLflow UI a *browser* reaches:
``mlflow_tracking_uri``, or a public URL setting when the deployment has one (see
:func:`mlflow_ui_base`).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any, Callable

DATA_DOCS = "Data Docs"
MLFLOW_RUN = "MLflow run"
MODEL_VERSION = "MLflow model version"
COMPARE = "MLflow compare with champion"

#: DAGs whose tasks get links (other DAGs on the same Airflow may have a ``train`` task too)
DAGS = frozenset({"shoprank_train", "shoprank_daily_update"})
#: validate tasks whose Data Docs page the DAG's ``train`` task copies into its MLflow run (None:
#: every ``validate_*``); the daily DAG hands ``train`` the feedback page only
DOCS_IN_RUN: dict[str, frozenset[str] | None] = {"shoprank_train": None,
                                                 "shoprank_daily_update": frozenset({"validate_feedback"})}
RUN_TASKS = frozenset({"train", "evaluate", "register"})
APPROVE_TASK = "approve"
TRAIN_TASK, REGISTER_TASK, GATE_TASK = "train", "register", "gate"

#: where the train task copies the Data Docs pages in its run (``workflow.log_data_docs``)
DATA_DOCS_ARTIFACT_DIR = "data-docs"
DATA_DOCS_PREFIX = "reports/data-docs/"

#: (task_id, key) -> the XCom value of that task in the same DAG run, or None
XComReader = Callable[[str, str], Any]

RETURN_VALUE = "return_value"
_FRAGMENT_SAFE = "/:@-._~!$&'()*+,;="  # RFC 3986 pchar, kept readable in the fragment


def mlflow_ui_base(settings) -> str:
    """The MLflow UI as a browser reaches it: ``SHOPRANK_MLFLOW_PUBLIC_URL`` (docker compose, where
    tasks reach MLflow at ``http://mlflow:5000`` but a browser at ``http://localhost:5000``), else
    ``MLFLOW_TRACKING_URI``."""
    return str(settings.mlflow.public_url or settings.mlflow_tracking_uri).rstrip("/")


# ---- URL builders -------------------------------------------------------------------------------

def run_url(base: str, run_id: str, experiment_id: str | None = None) -> str:
    """The run page (``#/runs/<run>`` redirects to its experiment when the id is unknown)."""
    if experiment_id:
        return f"{base}/#/experiments/{_seg(experiment_id)}/runs/{_seg(run_id)}"
    return f"{base}/#/runs/{_seg(run_id)}"


def run_artifact_url(base: str, run_id: str, experiment_id: str, path: str) -> str:
    """The run page's Artifacts tab with ``path`` selected (HTML artifacts are rendered there)."""
    return f"{run_url(base, run_id, experiment_id)}/artifacts/{urllib.parse.quote(path, safe=_FRAGMENT_SAFE)}"


def model_version_url(base: str, model_name: str, version: str | int) -> str:
    return f"{base}/#/models/{_seg(model_name)}/versions/{_seg(str(version))}"


def compare_runs_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """MLflow's compare view (``#/compare-runs?runs=[...]&experiments=[...]``, JSON lists)."""
    def as_json(values: list[str]) -> str:
        return urllib.parse.quote(json.dumps([str(v) for v in values], separators=(",", ":")), safe="[],")

    return f"{base}/#/compare-runs?runs={as_json(run_ids)}&experiments={as_json(experiment_ids)}"


def data_docs_artifact_path(page_key: str | None) -> str | None:
    """The artifact path of a Data Docs page (an S3 key under ``reports/data-docs/``) in the
    MLflow run it was copied into: ``data-docs/<path below reports/data-docs/>``."""
    if not page_key:
        return None
    rel = page_key.split(DATA_DOCS_PREFIX, 1)[-1].lstrip("/")
    return f"{DATA_DOCS_ARTIFACT_DIR}/{rel}" if rel else None


_COMPARE_IN_CARD = re.compile(r"#/compare-runs\?runs=(\[[^\]]*\])&experiments=(\[[^\]]*\])")


def compare_from_card(card: str | None) -> tuple[list[str], list[str]] | None:
    """(run ids, experiment ids) of the compare link in an approval card, or None."""
    match = _COMPARE_IN_CARD.search(card or "")
    if not match:
        return None
    try:
        runs, experiments = (json.loads(urllib.parse.unquote(g)) for g in match.groups())
    except ValueError:
        return None
    runs = [str(r) for r in runs if r]
    if not runs:
        return None
    return runs, [str(e) for e in experiments if e]


# ---- which task gets which link -------------------------------------------------------------------

def link_names(dag_id: str, task_id: str) -> tuple[str, ...]:
    """The links a task of a shoprank DAG offers (empty for every other task)."""
    if dag_id not in DAGS:
        return ()
    if task_id.startswith("validate_"):
        logged = DOCS_IN_RUN.get(dag_id)
        return (DATA_DOCS,) if logged is None or task_id in logged else ()
    if task_id in RUN_TASKS:
        return (MLFLOW_RUN, MODEL_VERSION)
    if task_id == APPROVE_TASK:
        return (COMPARE,)
    return ()


def task_link(name: str, dag_id: str, task_id: str, xcom: XComReader, settings=None) -> str | None:
    """The URL of link ``name`` on task ``task_id`` of a run of ``dag_id``, or None when it does
    not apply to the task or its inputs are not there (yet)."""
    if name not in link_names(dag_id, task_id):
        return None
    if settings is None:
        from shoprank.config import get_settings

        settings = get_settings()
    base = mlflow_ui_base(settings)
    if name == DATA_DOCS:
        path = data_docs_artifact_path(_as_dict(xcom(task_id, RETURN_VALUE)).get("data_docs"))
        trained = _as_dict(xcom(TRAIN_TASK, RETURN_VALUE))
        if not path or not trained.get("mlflow_run_id") or not trained.get("experiment_id"):
            return None  # no page, or not in an MLflow run yet (train copies it there)
        return run_artifact_url(base, trained["mlflow_run_id"], trained["experiment_id"], path)
    if name == MLFLOW_RUN:
        trained = _as_dict(xcom(TRAIN_TASK, RETURN_VALUE))
        if not trained.get("mlflow_run_id"):
            return None
        return run_url(base, trained["mlflow_run_id"], trained.get("experiment_id"))
    if name == MODEL_VERSION:
        version = _as_dict(xcom(REGISTER_TASK, RETURN_VALUE)).get("version")
        return model_version_url(base, settings.registered_model, version) if version not in (None, "") else None
    if name == COMPARE:
        decision = _as_dict(xcom(GATE_TASK, "decision"))
        found = compare_from_card(decision.get("card"))
        return compare_runs_url(base, *found) if found else None
    return None


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _seg(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")
