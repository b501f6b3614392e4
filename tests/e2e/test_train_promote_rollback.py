"""The train DAG on real Airflow services over REST: approve, reject, roll back.

Each run trains the real MiniLM cross-encoder for a few steps, logs to the real MLflow
server, stores data and artifacts in the real S3 server, and pauses at Airflow's
ApprovalOperator until this test answers it through the hitlDetails endpoint.
"""

import pytest

from shoprank.airflow_client import AirflowAPIError
from shoprank.demo import answer_approval
from shoprank.registry import Registry
from shoprank.storage import Storage

from .conftest import TINY_TRAIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = "shoprank_train"


def _train_run(airflow, approver, day, option, bystander=None):
    """Triggered by the admin; answered by alice (SHOPRANK_APPROVERS=alice in the stack's .env).
    With ``bystander``: bob (an Airflow admin, not an approver) tries first and is refused."""
    airflow.wait_for_dag(TRAIN)
    airflow.unpause(TRAIN)
    run_id = airflow.trigger(TRAIN, conf={**TINY_TRAIN, "data_date": day.isoformat()})["dag_run_id"]
    if bystander is not None:
        with pytest.raises(AirflowAPIError) as refused:
            answer_approval(bystander, TRAIN, run_id, option, "bob tries", progress=lambda m: None)
        assert refused.value.status == 403 and "not a respondent" in refused.value.body
    answer_approval(approver, TRAIN, run_id, option, f"e2e test: {option}", progress=lambda m: None)
    final = airflow.wait_for_run(TRAIN, run_id, timeout=900)
    return run_id, final, airflow.task_states(TRAIN, run_id)


def test_approve_reject_and_rollback(airflow, approver, bystander, airflow_stack, market_day):
    settings = airflow_stack.settings
    registry = Registry(settings, Storage(settings))

    run1, final, states = _train_run(airflow, approver, market_day, "Approve", bystander=bystander)
    assert final["state"] == "success", states
    assert states["promote"] == "success" and states["record_decision"] == "success"
    assert states["export"] == "success"  # ONNX export of the new champion (accepted or refused, recorded)
    v1 = registry.version_by_alias("champion").version
    assert registry.tags(v1)["export.status"] in ("exported", "partial", "refused")
    own = registry.tags(v1)
    assert own["promoted_by"] == "alice"
    assert [r["airflow_run"] for r in registry.audit_trail() if r["alias"] == "champion"] == [run1]
    assert own["gate_eligible"] == "true"
    # the version keeps a handful of tags (the model page stays readable); its metrics and
    # each gate check are on its run, where the gate and the approval card read them
    assert len(own) < 30 and "ndcg_at_10" not in own and not [k for k in own if k.startswith("gate.")], own
    tags = registry.evidence(v1)
    assert float(tags["ndcg_at_10"]) > 0 and "delta_ndcg_at_10_vs_bm25_lo" in tags
    assert tags["gate.data_validation"].startswith("pass") and tags["train.global_step"]
    # MLflow 3: the evaluation metrics are on the LoggedModel too, measured on the snapshot's test
    # split, which is an input of the run (the "Datasets" of the run page) with the training splits
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(tags["mlflow_run_id"])
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    on_model = {m.key: m for m in model.metrics or []}
    assert on_model["ndcg_at_10"].value == pytest.approx(float(tags["ndcg_at_10"]), abs=1e-6)
    assert on_model["ndcg_at_10"].dataset_name == f"{tags['data_snapshot']}/test"
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert {f"{tags['data_snapshot']}/{s}" for s in ("train", "val", "test")} <= set(inputs)
    assert inputs[f"{tags['data_snapshot']}/test"]["mlflow.data.context"] == "evaluation"

    run2, final, states = _train_run(airflow, approver, market_day, "Approve")
    assert final["state"] == "success", states
    v2 = registry.version_by_alias("champion").version
    assert v2 != v1
    assert registry.version_by_alias("previous").version == v1
    assert registry.tags(v2)["champion_compared"] == v1  # evaluated against the champion of the day

    run3, final, states = _train_run(airflow, approver, market_day, "Reject")
    assert final["state"] == "success", states
    assert states["promote"] == "skipped" and states["record_decision"] == "success"
    assert states["export"] == "skipped"  # nothing promoted, nothing exported
    v3 = registry.version_by_alias("challenger").version
    assert registry.version_by_alias("champion").version == v2  # untouched
    assert registry.tags(v3)["rejected_by"] == "alice"
    assert registry.tags(v3)["rejection_reason"] == "e2e test: Reject"

    airflow.unpause("shoprank_rollback")
    rb = airflow.trigger("shoprank_rollback", conf={"target": "previous", "reason": "e2e rollback"})
    assert airflow.wait_for_run("shoprank_rollback", rb["dag_run_id"], timeout=300)["state"] == "success"
    assert registry.version_by_alias("champion").version == v1

    bad = airflow.trigger("shoprank_rollback", conf={"target": "999"})
    assert airflow.wait_for_run("shoprank_rollback", bad["dag_run_id"], timeout=300)["state"] == "failed"
    assert registry.version_by_alias("champion").version == v1

    trail = [(r["action"], r["alias"], r["version"], r["actor"]) for r in registry.audit_trail()
             if r["alias"] == "champion" or r["action"] == "reject"]
    assert trail == [("set_alias", "champion", v1, "alice"), ("set_alias", "champion", v2, "alice"),
                     ("reject", "challenger", v3, "alice"), ("rollback", "champion", v1, "admin")]


def test_extra_links_lead_to_mlflow_and_the_data_docs(airflow, airflow_stack):
    """The plugin's extra links (plugins/shoprank_links.py), read over REST from the latest
    successful training run that had a champion to compare with (the last one above), each
    followed to a 200 with the pipeline's MLflow login; what they point at exists in MLflow."""
    import json
    import re
    import urllib.parse

    import requests

    from shoprank import links

    settings = airflow_stack.settings
    login = (settings.mlflow_tracking_username, settings.mlflow_tracking_password)
    api = settings.mlflow_tracking_uri.rstrip("/")

    def get(path_or_url: str, **params) -> requests.Response:
        url = path_or_url if path_or_url.startswith("http") else api + path_or_url
        return requests.get(url, params=params, auth=login, timeout=30)

    def run_exists(run_uuid: str, experiment_id: str | None = None) -> None:
        resp = get("/api/2.0/mlflow/runs/get", run_id=run_uuid)
        assert resp.status_code == 200, resp.text
        if experiment_id:
            assert resp.json()["run"]["info"]["experiment_id"] == experiment_id

    registry = Registry(settings, Storage(settings))
    versions = {v.tags.get("airflow.run_key", "").split("/", 1)[-1]: v for v in registry.client.search_model_versions(
        f"name='{registry.name}'")}  # train DAG runs: airflow.run_key = shoprank_train/<run id>
    done = sorted((r for r in airflow.runs(TRAIN) if r["state"] == "success" and r["dag_run_id"] in versions),
                  key=lambda r: r["start_date"] or "", reverse=True)
    assert done, "no successful shoprank_train run"
    compared = [r for r in done if versions[r["dag_run_id"]].tags.get("champion_compared") not in (None, "", "none")]
    run_id = (compared or done)[0]["dag_run_id"]
    expected = {"validate_catalog": {links.DATA_DOCS}, "train": {links.MLFLOW_RUN, links.MODEL_VERSION},
                "evaluate": {links.MLFLOW_RUN, links.MODEL_VERSION},
                "register": {links.MLFLOW_RUN, links.MODEL_VERSION}, "approve": {links.COMPARE}}
    for task_id, names in expected.items():
        got = airflow.extra_links(TRAIN, run_id, task_id)
        if task_id == "approve" and not compared:  # a first model: nothing to compare with, no button
            assert got == {links.COMPARE: None}, got
            continue
        for name in names:
            url = got.get(name)
            assert url and url.startswith(api + "/#/"), (task_id, name, got)
            page, _, route = url.partition("#")
            ui = get(page)  # the MLflow UI; the route after '#' is the browser's
            assert ui.status_code == 200 and "<html" in ui.text.lower(), (task_id, name, ui.status_code)
            if name == links.MLFLOW_RUN:
                exp, run = re.fullmatch(r"/experiments/([^/]+)/runs/([^/]+)", route).groups()
                run_exists(run, exp)
            elif name == links.MODEL_VERSION:
                model, version = re.fullmatch(r"/models/([^/]+)/versions/([^/]+)", route).groups()
                resp = get("/api/2.0/mlflow/model-versions/get", name=urllib.parse.unquote(model), version=version)
                assert resp.status_code == 200, resp.text
                tags = {t["key"]: t["value"] for t in resp.json()["model_version"].get("tags", [])}
                assert tags["airflow.run_key"] == f"{TRAIN}/{run_id}"  # the version this DAG run registered
            elif name == links.DATA_DOCS:
                exp, run, path = re.fullmatch(r"/experiments/([^/]+)/runs/([^/]+)/artifacts/(.+)", route).groups()
                run_exists(run, exp)
                doc = get("/get-artifact", path=urllib.parse.unquote(path), run_uuid=run)
                assert doc.status_code == 200 and "<html" in doc.text.lower(), (path, doc.status_code)
            elif name == links.COMPARE:
                query = urllib.parse.parse_qs(route.partition("?")[2])
                side_by_side = json.loads(query["runs"][0])
                assert len(side_by_side) == 2, side_by_side  # the challenger and the champion of that day
                for run in side_by_side:
                    run_exists(run)


def _browser():
    """Headless Chromium through selenium, or a skip saying how to get them (README, "Tests")."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (README, Tests)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("no Chromium: apt-get install chromium chromium-driver (README, Tests)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1200"):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver_bin), options=opts)


def _wait_for_text(driver, texts, timeout=90):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(1)
    raise AssertionError(f"{texts} not on {driver.current_url} after {timeout}s; the page shows:\n{body[:3000]}")


def test_ui_pages_show_the_links_and_the_model_metrics(airflow, airflow_stack):
    """Screenshot-level check in a real headless browser: the Airflow task page of the last
    training run shows the plugin's link buttons, and MLflow's model page shows the evaluation
    metrics logged on the LoggedModel. Screenshots go to $SHOPRANK_HOME/ui-check/."""
    import base64
    import urllib.parse

    from shoprank import links

    settings = airflow_stack.settings
    registry = Registry(settings, Storage(settings))
    champion = registry.version_by_alias("champion")
    tags = registry.tags(champion.version)
    run_id = tags["airflow.run_key"].split("/", 1)[1]  # shoprank_train/<run id>
    shots = settings.home / "ui-check"
    shots.mkdir(exist_ok=True)
    driver = _browser()
    try:
        # Airflow: the UI reads its JWT from the `_token` cookie (what its login page sets)
        base = settings.airflow_url.rstrip("/")
        driver.get(base + "/api/v2/version")
        driver.add_cookie({"name": "_token", "value": airflow.token(), "path": "/"})
        driver.get(f"{base}/dags/{TRAIN}/runs/{urllib.parse.quote(run_id, safe='')}/tasks/train/details")
        _wait_for_text(driver, [links.MLFLOW_RUN, links.MODEL_VERSION])
        anchors = {a.text: a.get_attribute("href") for a in driver.find_elements("tag name", "a")}
        assert anchors[links.MLFLOW_RUN].startswith(settings.mlflow_tracking_uri.rstrip("/") + "/#/experiments/")
        driver.save_screenshot(str(shots / "airflow-train-task.png"))

        # MLflow: basic auth on every request of the page, then the LoggedModel view
        basic = base64.b64encode(f"{settings.mlflow_tracking_username}:{settings.mlflow_tracking_password}"
                                 .encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {basic}"}})
        from mlflow import MlflowClient

        client = MlflowClient(settings.mlflow_tracking_uri)
        run = client.get_run(tags["mlflow_run_id"])
        (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                               filter_string=f"source_run_id = '{run.info.run_id}'")
        ui = settings.mlflow_tracking_uri.rstrip("/")
        driver.get(f"{ui}/#/experiments/{run.info.experiment_id}/models/{model.model_id}")
        # the evaluation metrics, measured on the snapshot's test split ("Datasets used")
        _wait_for_text(driver, ["ndcg_at_10", f"{tags['data_snapshot']}/test", "shoprank-ranker"])
        driver.save_screenshot(str(shots / "mlflow-logged-model.png"))
        driver.get(f"{ui}/#/models/{registry.name}")
        # the model page reads in words: who holds which role and the latest moves (the
        # description), one short row per version instead of a screen of metric tags
        body = _wait_for_text(driver, ["champion", f"champion: version {champion.version}", "Latest moves",
                                       f"-> champion by alice"])
        assert "ndcg_at_10" not in body and '"actor"' not in body
        driver.save_screenshot(str(shots / "mlflow-registered-model.png"))
    finally:
        driver.quit()


def test_answering_twice_is_refused(airflow, market_day):
    """A second answer to the same approval gets HTTP 409 and changes nothing."""
    run_id = None
    for run in airflow._request("GET", f"/api/v2/dags/{TRAIN}/dagRuns?limit=1&order_by=-start_date")["dag_runs"]:
        run_id = run["dag_run_id"]
    assert run_id is not None
    with pytest.raises(AirflowAPIError) as err:
        airflow.answer(TRAIN, run_id, "approve", "Approve")
    assert err.value.status == 409


DAILY = "shoprank_daily_update"


def _daily_run(airflow, day, answer="Approve", approver=None):
    airflow.wait_for_dag(DAILY)
    airflow.unpause(DAILY)
    run_id = airflow.trigger(DAILY, logical_date=f"{day.isoformat()}T00:00:00+00:00")["dag_run_id"]
    if answer:
        answer_approval(approver, DAILY, run_id, answer, f"e2e daily: {answer}", progress=lambda m: None)
    final = airflow.wait_for_run(DAILY, run_id, timeout=900)
    return run_id, final, airflow.task_states(DAILY, run_id)


def test_daily_update_warm_starts_from_champion_and_is_idempotent(airflow, approver, airflow_stack, market_day):
    """Runs after the train test (same module): a champion exists."""
    import datetime as dt

    from mlflow import MlflowClient

    from shoprank.simulation import simulate_and_write

    settings = airflow_stack.settings
    storage = Storage(settings)
    registry = Registry(settings, storage)
    champion = registry.version_by_alias("champion").version
    day = market_day + dt.timedelta(days=1)
    out = simulate_and_write(settings, day, n_sessions=40, seed=1, ranker="champion")
    assert out["model_version"] == champion and out["by_type"]["click"] > 0

    run_id, final, states = _daily_run(airflow, day, approver=approver)
    assert final["state"] == "success", states
    assert states["validate_catalog"] == "success"  # the day's catalogue (new products) came first
    new = registry.version_by_alias("champion").version
    assert new != champion
    tags = registry.evidence(new)
    assert tags["daily.date"] == day.isoformat() and tags["daily.mode"] == "warm"
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(tags["mlflow_run_id"])
    assert run.data.params["daily.warm_start_from_version"] == champion
    assert run.data.params["init_from"]  # weights came from the champion, not the base model
    assert "labels.w_click" in run.data.params or any(k.startswith("labels.") for k in run.data.params)
    assert "recent_ndcg_at_10" in tags  # evaluated on the holdout of recent feedback too
    # the champion's scores on the golden test split were kept (score cache) for the next days
    assert storage.list_keys("reports/scores/")
    # online metrics of the day's traffic, per serving arm (all champion here)
    assert run.data.metrics["online_champion_requests"] > 0 and "online_champion_ctr" in run.data.metrics
    versions_before = registry.known_versions()
    labels_before = storage.read_parquet(f"derived/labels/dt={day.isoformat()}/pairs.parquet")

    # the same date again (Clear in the UI): no new version, no double-counted events
    airflow.clear_run(DAILY, run_id)
    final = airflow.wait_for_run(DAILY, run_id, timeout=900)
    states = airflow.task_states(DAILY, run_id)
    assert final["state"] == "success", states
    assert registry.known_versions() == versions_before
    assert registry.version_by_alias("champion").version == new
    labels_after = storage.read_parquet(f"derived/labels/dt={day.isoformat()}/pairs.parquet")
    assert labels_after["clicks"].sum() == labels_before["clicks"].sum()
    assert len(labels_after) == len(labels_before)


def test_empty_feedback_day_is_skipped_not_failed(airflow, airflow_stack, market_day):
    import datetime as dt

    day = market_day + dt.timedelta(days=2)  # nothing was written for this date
    run_id, final, states = _daily_run(airflow, day, answer=None)
    assert final["state"] == "success", states
    assert states["validate_feedback"] == "skipped"
    assert states["train"] == "skipped"
