"""Airflow extra links (shoprank.links + plugins/shoprank_links.py): URLs from sample XComs,
and the plugin as Airflow loads it and attaches it to the train DAG's tasks."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from shoprank import links
from shoprank.config import get_settings

REPO = Path(__file__).resolve().parents[2]
BASE = "http://mlflow.example:5000"
DOCS_PAGE = ("reports/data-docs/validations/catalog_suite/manual__2026-12-01T10_00_00_00_00/"
             "20261201T100001.000000Z/catalog-batch.html")
RUN, EXP, CHAMPION_RUN = "a1b2c3", "7", "f9e8d7"


@pytest.fixture()
def settings():
    return get_settings().replaced(mlflow_tracking_uri=BASE + "/", registered_model="shoprank-ranker")


def card_with_compare(base: str = BASE) -> str:
    """An approval card as workflow.gate_version writes it (its compare link's exact format)."""
    from shoprank.promotion import approval_card

    compare = (f"{base}/#/compare-runs?runs={json.dumps([RUN, CHAMPION_RUN])}"
               f"&experiments={json.dumps([EXP])}")
    return approval_card("3", {"ndcg_at_10": "0.5"}, "2",
                         {"MLflow run": f"{base}/#/experiments/{EXP}/runs/{RUN}",
                          "Compare with champion run": compare})


def xcoms(**by_task):
    """A reader over {(task_id, key): value}; keyword ``task`` = the task's return value."""
    table = {}
    for task, value in by_task.items():
        if isinstance(value, dict) and "__key__" in value:
            value = dict(value)
            table[(task, value.pop("__key__"))] = value
        else:
            table[(task, "return_value")] = value
    return lambda task_id, key="return_value": table.get((task_id, key))


TRAIN_RUN_XCOMS = dict(
    validate_catalog={"dataset": "catalog", "date": "2026-12-01", "success": True, "data_docs": DOCS_PAGE,
                      "data_docs_index": "reports/data-docs/index.html"},
    validate_judgments={"dataset": "judgments", "date": "2026-12-01", "success": True, "data_docs": None},
    train={"mlflow_run_id": RUN, "experiment_id": EXP, "model_uri": "models:/m-1", "snapshot": "s1"},
    evaluate={"metrics": {"ndcg_at_10": 0.5}, "champion_version": "2"},
    register={"version": "3", "reused": False},
    gate={"__key__": "decision", "version": "3", "eligible": True, "card": card_with_compare()},
)


# ---- URL builders -----------------------------------------------------------------------------------

def test_url_builders():
    assert links.run_url(BASE, RUN, EXP) == f"{BASE}/#/experiments/7/runs/a1b2c3"
    assert links.run_url(BASE, RUN) == f"{BASE}/#/runs/a1b2c3"
    assert links.model_version_url(BASE, "shoprank-ranker", 3) == f"{BASE}/#/models/shoprank-ranker/versions/3"
    assert links.model_version_url(BASE, "my model/x", "4") == f"{BASE}/#/models/my%20model%2Fx/versions/4"
    url = links.compare_runs_url(BASE, [RUN, CHAMPION_RUN], [EXP])
    assert url == f"{BASE}/#/compare-runs?runs=[%22a1b2c3%22,%22f9e8d7%22]&experiments=[%227%22]"
    query = urllib.parse.parse_qs(url.split("?", 1)[1])  # what the MLflow UI parses
    assert json.loads(query["runs"][0]) == [RUN, CHAMPION_RUN] and json.loads(query["experiments"][0]) == [EXP]
    assert links.run_artifact_url(BASE, RUN, EXP, "data-docs/a b/p.html") == \
        f"{BASE}/#/experiments/7/runs/a1b2c3/artifacts/data-docs/a%20b/p.html"


def test_data_docs_artifact_path_is_where_train_copies_the_pages(tmp_path):
    """workflow.log_data_docs puts a page in the run; links.data_docs_artifact_path finds it there."""
    from shoprank.workflow import log_data_docs

    class Storage:
        def exists(self, key):
            return key == DOCS_PAGE

        def download_file(self, key, target):
            Path(target).write_text("<html>docs</html>")

    logged = []

    class Client:
        def log_artifacts(self, run_id, local_dir, artifact_path):
            logged.extend(f"{artifact_path}/{p.relative_to(local_dir).as_posix()}"
                          for p in Path(local_dir).rglob("*") if p.is_file())

    log_data_docs(Client(), RUN, Storage(), [DOCS_PAGE])
    assert logged == [links.data_docs_artifact_path(DOCS_PAGE)]
    assert links.data_docs_artifact_path(None) is None and links.data_docs_artifact_path("") is None


def test_compare_from_card():
    assert links.compare_from_card(card_with_compare()) == ([RUN, CHAMPION_RUN], [EXP])
    assert links.compare_from_card("Version 3 is already the champion; nothing to approve.") is None
    assert links.compare_from_card(None) is None
    assert links.compare_from_card("#/compare-runs?runs=[not json]&experiments=[]") is None


def test_mlflow_ui_base_prefers_a_public_url(settings):
    assert links.mlflow_ui_base(settings) == BASE  # no trailing slash
    compose = SimpleNamespace(mlflow_tracking_uri="http://mlflow:5000",
                              mlflow=SimpleNamespace(public_url="http://localhost:5000/"))
    assert links.mlflow_ui_base(compose) == "http://localhost:5000"


# ---- which task shows which link -------------------------------------------------------------------------

def test_links_of_a_train_run(settings):
    read = xcoms(**TRAIN_RUN_XCOMS)

    def link(task, name, dag="shoprank_train"):
        return links.task_link(name, dag, task, read, settings)

    page = "data-docs/" + DOCS_PAGE.removeprefix("reports/data-docs/")
    assert link("validate_catalog", links.DATA_DOCS) == f"{BASE}/#/experiments/7/runs/a1b2c3/artifacts/{page}"
    assert link("validate_judgments", links.DATA_DOCS) is None  # no page built for it
    for task in ("train", "evaluate", "register"):
        assert link(task, links.MLFLOW_RUN) == f"{BASE}/#/experiments/7/runs/a1b2c3"
        assert link(task, links.MODEL_VERSION) == f"{BASE}/#/models/shoprank-ranker/versions/3"
        assert link(task, links.DATA_DOCS) is None and link(task, links.COMPARE) is None
    assert link("approve", links.COMPARE) == links.compare_runs_url(BASE, [RUN, CHAMPION_RUN], [EXP])
    assert link("approve", links.MLFLOW_RUN) is None
    # the card was written with the tracking URI the tasks use; the link uses the UI base
    public = SimpleNamespace(mlflow_tracking_uri=BASE, registered_model="m",
                             mlflow=SimpleNamespace(public_url="http://localhost:5000"))
    assert links.task_link(links.COMPARE, "shoprank_train", "approve", read, public).startswith(
        "http://localhost:5000/#/compare-runs?runs=")
    # the same tasks in the daily DAG; nothing for other tasks or other DAGs
    assert link("train", links.MLFLOW_RUN, dag="shoprank_daily_update") == f"{BASE}/#/experiments/7/runs/a1b2c3"
    assert link("snapshot", links.MLFLOW_RUN) is None
    assert link("train", links.MLFLOW_RUN, dag="someone_elses_dag") is None
    assert links.link_names("shoprank_train", "promote") == ()
    assert links.link_names("shoprank_daily_update", "validate_feedback") == (links.DATA_DOCS,)
    # the daily train task copies only the feedback page into its run: no link to a missing page
    assert links.link_names("shoprank_daily_update", "validate_catalog") == ()


def test_links_wait_for_their_inputs(settings):
    """Before train/register/gate ran (or with odd values) a link is None, never an error."""
    early = xcoms(validate_catalog=TRAIN_RUN_XCOMS["validate_catalog"])
    for task, name in (("validate_catalog", links.DATA_DOCS), ("train", links.MLFLOW_RUN),
                       ("evaluate", links.MODEL_VERSION), ("approve", links.COMPARE)):
        assert links.task_link(name, "shoprank_train", task, early, settings) is None, (task, name)
    odd = xcoms(train="not a dict", register={"version": None}, gate={"__key__": "decision", "card": None})
    assert links.task_link(links.MLFLOW_RUN, "shoprank_train", "train", odd, settings) is None
    assert links.task_link(links.MODEL_VERSION, "shoprank_train", "train", odd, settings) is None
    assert links.task_link(links.COMPARE, "shoprank_train", "approve", odd, settings) is None
    # a first run has no champion: its card has no compare link
    first = xcoms(gate={"__key__": "decision", "card": "Version 1 ... (no champion yet)"})
    assert links.task_link(links.COMPARE, "shoprank_train", "approve", first, settings) is None


# ---- the plugin -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


@pytest.fixture(scope="module")
def plugin(airflow_home):
    """plugins/ loaded by Airflow's own plugin-directory loader (what every Airflow process runs)."""
    from airflow._shared.plugins_manager import _load_plugins_from_plugin_directory

    plugins, errors = _load_plugins_from_plugin_directory(
        plugins_folder=str(REPO / "plugins"), load_examples=False, example_plugins_module=None,
        ignore_file_syntax="glob")
    assert errors == {}
    found = [p for p in plugins if p.name == "shoprank_links"]
    assert len(found) == 1, [p.name for p in plugins]
    return found[0]


def _module(plugin):
    import sys

    return sys.modules[type(plugin.operator_extra_links[0]).__module__]


def test_plugin_registers_its_links(plugin):
    from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
    from airflow.sdk import BaseOperatorLink

    from shoprank.airflow_operators import RecordedApprovalOperator

    by_name = {link.name: link for link in plugin.operator_extra_links}
    assert set(by_name) == {links.DATA_DOCS, links.MLFLOW_RUN, links.MODEL_VERSION, links.COMPARE}
    assert all(isinstance(link, BaseOperatorLink) for link in by_name.values())
    for name in (links.DATA_DOCS, links.MLFLOW_RUN, links.MODEL_VERSION):
        assert by_name[name].operators == [_PythonDecoratedOperator]
    assert by_name[links.COMPARE].operators == [RecordedApprovalOperator]
    assert plugin.global_operator_extra_links == []  # not on every task of every DAG


def test_plugin_get_link_reads_the_runs_xcoms(plugin, monkeypatch):
    module = _module(plugin)
    values = {(task, key): value for (task, key), value in (
        (("train", "return_value"), TRAIN_RUN_XCOMS["train"]), (("register", "return_value"), {"version": "3"}))}
    monkeypatch.setattr(module, "read_xcom", lambda ti_key, task_id, key="return_value": values.get((task_id, key)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", BASE)
    key = SimpleNamespace(dag_id="shoprank_train", run_id="manual__1", task_id="evaluate", map_index=-1)
    by_name = {link.name: link for link in plugin.operator_extra_links}
    assert by_name[links.MLFLOW_RUN].get_link(None, ti_key=key) == f"{BASE}/#/experiments/7/runs/a1b2c3"
    assert by_name[links.MODEL_VERSION].get_link(None, ti_key=key).endswith("/versions/3")
    assert by_name[links.DATA_DOCS].get_link(None, ti_key=key) == ""  # not a validate task

    def broken(*args, **kwargs):
        raise RuntimeError("database is gone")

    monkeypatch.setattr(module, "read_xcom", broken)
    assert by_name[links.MLFLOW_RUN].get_link(None, ti_key=key) == ""  # never breaks the task page


def test_serialized_train_dag_gets_the_links(plugin, monkeypatch):
    """What the api-server does: deserialize the DAG with the plugins' links attached by operator class."""
    from airflow import plugins_manager
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    monkeypatch.setattr(plugins_manager, "get_operator_extra_links", lambda: list(plugin.operator_extra_links))
    monkeypatch.setattr(plugins_manager, "get_global_operator_extra_links", lambda: [])
    bag = DagBag(dag_folder=str(REPO / "dags" / "shoprank_train.py"))
    assert bag.import_errors == {}
    dag = DagSerialization.from_dict(DagSerialization.to_dict(bag.dags["shoprank_train"]))
    extra = {t.task_id: set(t.extra_links) for t in dag.tasks}
    assert extra["validate_catalog"] >= {links.DATA_DOCS}
    assert extra["train"] >= {links.MLFLOW_RUN, links.MODEL_VERSION}
    assert extra["approve"] == {links.COMPARE}
    assert extra["gate"] == set()  # a branch operator: no links
