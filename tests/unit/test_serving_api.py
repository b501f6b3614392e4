"""Ranking API with a small deterministic fake scorer and an in-memory storage (no servers)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from shoprank.config import ConfigError, Settings
from shoprank.data.contracts import FEEDBACK
from shoprank.data.simulator import pseudonymise
from shoprank.serving.ab import bucket, choose_arm
from shoprank.serving.app import ServeConfig, create_app
from shoprank.serving.auth import ServeAuth
from shoprank.serving.events import EventsRejected, validate_events
from shoprank.serving.online import online_metrics_by_arm

KEY = "unit-test-hash-key"
TOKEN = "unit-test-events-token"
AUTH = ServeAuth(events_token=TOKEN)
HEADERS = {"Authorization": f"Bearer {TOKEN}"}  # every client below sends the events token


class FakeScorer:
    """Score = shared words of query and text + version bonus, so versions rank differently."""

    def __init__(self, version: str, backend: str = "fake"):
        self.version, self.backend, self.max_length = version, backend, 64
        self.calls: list[int] = []

    def score(self, queries, texts):
        self.calls.append(len(texts))
        out = []
        for q, t in zip(queries, texts):
            shared = len(set(q.lower().split()) & set(t.lower().split()))
            # version 2 prefers short texts: lets tests see which model answered
            out.append(shared + (1.0 / len(t) if self.version == "2" else len(t) / 1000))
        return np.asarray(out, dtype=np.float32)


class FakeRegistry:
    def __init__(self, **aliases):
        self.aliases = dict(aliases)
        self.loaded: list[str] = []
        self.scorers: dict[str, FakeScorer] = {}
        self.broken: set[str] = set()

    def resolve(self, alias):
        return self.aliases.get(alias)

    def load(self, settings, version, backend="onnx-int8", workdir=None):
        assert workdir and Path(workdir).is_dir()
        if version in self.broken:
            raise RuntimeError(f"version {version} is broken")
        self.loaded.append(version)
        self.scorers[version] = FakeScorer(version)
        return self.scorers[version]


class MemoryStorage:
    """The few Storage methods the API uses, in memory; ``fail`` simulates S3 being down."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.fail = False
        self.lock = threading.Lock()

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        if self.fail:
            raise OSError("S3 is down")
        with self.lock:
            self.objects[key] = bytes(data)
        return f"s3://mem/{key}"

    def write_parquet(self, df, key):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return self.put_bytes(key, buf.getvalue())

    def latest_partition(self, zone, dataset, on_or_before=None):
        days = sorted({k.split("dt=")[1][:10] for k in self.objects
                       if k.startswith(f"{zone}/{dataset}/dt=") and k.endswith("_SUCCESS")})
        return days[-1] if days else None

    def read_partition(self, zone, dataset, day):
        prefix = f"{zone}/{dataset}/dt={day}/"
        frames = [pd.read_parquet(io.BytesIO(v)) for k, v in sorted(self.objects.items())
                  if k.startswith(prefix) and k.endswith(".parquet")]
        return pd.concat(frames, ignore_index=True)

    def keys(self, prefix=""):
        return sorted(k for k in self.objects if k.startswith(prefix))

    def list_keys(self, prefix):
        if self.fail:
            raise OSError("S3 is down")
        return self.keys(prefix)

    def exists(self, key):
        if self.fail:
            raise OSError("S3 is down")
        return key in self.objects

    def copy(self, src, dst):
        self.put_bytes(dst, self.objects[src])

    def delete_prefix(self, prefix):
        with self.lock:
            gone = [k for k in self.objects if k.startswith(prefix)]
            for k in gone:
                del self.objects[k]
        return len(gone)

    def feedback(self):
        frames = [pd.read_parquet(io.BytesIO(self.objects[k])) for k in self.keys("raw/feedback/")
                  if k.endswith(".parquet")]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


CATALOG = pd.DataFrame({
    "product_id": ["p1", "p2", "p3", "p4"],
    "title": ["red running shoes", "blue denim jacket", "trail running shoes red", "coffee mug"],
    "description": ["light", "warm", "grippy", "ceramic"],
    "category": ["Shoes > Running", "Clothing > Jackets", "Shoes > Trail", "Kitchen > Mugs"],
    "brand": ["Acme", "Blue", "Acme", "Mugs"],
})


@pytest.fixture()
def settings(tmp_path) -> Settings:
    return Settings.from_env({"SHOPRANK_HOME": str(tmp_path / "home"), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
                              "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})


@pytest.fixture()
def storage() -> MemoryStorage:
    st = MemoryStorage()
    st.write_parquet(CATALOG, "validated/catalog/dt=2026-11-20/part-00000.parquet")
    st.put_bytes("validated/catalog/dt=2026-11-20/_SUCCESS", b"")
    return st


UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 24, 6, tzinfo=UTC)  # the server clock of these tests: after 11-22 and 11-23 ended


def make(settings, storage, reg=None, now=NOW, **cfg):
    reg = reg or FakeRegistry(champion="1")
    config = ServeConfig(**{"poll_seconds": 3600, "events_flush_seconds": 3600, **cfg})
    app = create_app(settings, loader=reg.load, resolve_alias=reg.resolve, storage=storage, config=config,
                     hash_key=KEY, auth=AUTH)
    if now is not None:
        app.state.service.sink.clock = (lambda: now) if isinstance(now, dt.datetime) else now
    return app, reg


CANDS = [{"product_id": "a", "text": "red running shoes acme"}, {"product_id": "b", "text": "coffee mug"},
         {"product_id": "c", "text": "red shoes"}]


def metric(client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.split(" ")[0] == line_start:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rank_orders_by_score_and_carries_ids(settings, storage):
    app, reg = make(settings, storage)
    with TestClient(app, headers=HEADERS) as client:
        r = client.post("/rank", json={"query": "red running shoes", "candidates": CANDS, "session_id": "s1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["product_id"] for x in body["results"]] == ["a", "c", "b"]
        assert [x["rank"] for x in body["results"]] == [1, 2, 3]
        scores = [x["score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert body["model_version"] == "1" and body["arm"] == "champion" and body["backend"] == "fake"
        assert len(body["request_id"]) == 32 and body["cached"] is False
        r2 = client.post("/rank", json={"query": "red running shoes", "candidates": CANDS, "top_k": 1})
        assert [x["product_id"] for x in r2.json()["results"]] == ["a"]
        assert r2.json()["request_id"] != body["request_id"]
        assert client.get("/readyz").json() == {"ready": True, "champion": "1"}


def test_ids_are_resolved_from_the_latest_validated_catalogue(settings, storage):
    app, _ = make(settings, storage)
    with TestClient(app, headers=HEADERS) as client:
        r = client.post("/rank", json={"query": "red running shoes", "product_ids": ["p4", "p2", "p1", "p3"]})
        assert r.status_code == 200, r.text
        order = [x["product_id"] for x in r.json()["results"]]
        assert order[:2] == ["p3", "p1"] and set(order[2:]) == {"p2", "p4"}  # 3 shared words; longer text first
        mixed = client.post("/rank", json={"query": "mug", "candidates": [{"product_id": "p4"},
                                                                         {"product_id": "x", "text": "mug"}]})
        assert mixed.status_code == 200
        unknown = client.post("/rank", json={"query": "mug", "product_ids": ["p4", "nope-1", "nope-2"]})
        assert unknown.status_code == 422
        detail = unknown.json()["detail"]
        assert detail["unknown_ids"] == ["nope-1", "nope-2"] and "dt=2026-11-20" in detail["error"]


@pytest.mark.parametrize("body,status,needle", [
    ({"query": "   ", "candidates": CANDS}, 422, "query"),
    ({"query": "x" * 300, "candidates": CANDS}, 422, "limit is 256"),
    ({"query": "shoes", "candidates": []}, 422, "empty"),
    ({"query": "shoes", "candidates": [{"product_id": f"p{i}", "text": "t"} for i in range(201)]}, 413, "limit is 200"),
    ({"query": "shoes", "candidates": CANDS + [CANDS[0]]}, 422, "duplicate product ids: ['a']"),
    ({"query": "shoes", "candidates": CANDS, "product_ids": ["p1"]}, 422, "exactly one"),
    ({"query": "shoes"}, 422, "exactly one"),
    ({"query": "shoes", "candidates": [{"product_id": "a", "text": "t" * 5000}]}, 422, "longer than 4000"),
    ({"query": "shoes", "candidates": CANDS, "colour": "red"}, 422, "colour"),
    ({"candidates": CANDS}, 422, "query"),
    ({"query": "shoes", "candidates": [{"product_id": "", "text": "t"}]}, 422, "product_id"),
    ({"query": "shoes", "product_ids": ["p1", ""]}, 422, "product_ids"),
    ({"query": "shoes", "product_ids": "p1"}, 422, "product_ids"),
])
def test_bad_rank_requests_get_4xx_and_change_nothing(settings, storage, body, status, needle):
    app, reg = make(settings, storage)
    with TestClient(app, headers=HEADERS) as client:
        r = client.post("/rank", json=body)
        assert r.status_code == status, r.text
        assert needle in r.text
        svc = app.state.service
        assert len(svc.cache) == 0 and len(svc.served) == 0
        assert reg.scorers["1"].calls == []
        assert 'shoprank_serve_pairs_scored_total{arm="champion"}' not in client.get("/metrics").text
        assert metric(client, f'shoprank_serve_errors_total{{route="/rank",status="{status}"}}') == 1.0


def test_no_champion_answers_503_until_one_appears(settings, storage):
    reg = FakeRegistry()
    app, _ = make(settings, storage, reg)
    with TestClient(app, headers=HEADERS) as client:
        r = client.post("/rank", json={"query": "shoes", "candidates": CANDS})
        assert r.status_code == 503 and "no @champion" in r.json()["detail"]["error"]
        assert client.get("/readyz").status_code == 503
        reg.aliases["champion"] = "1"
        app.state.service.models.refresh()
        assert client.post("/rank", json={"query": "shoes", "candidates": CANDS}).status_code == 200


def test_cache_hits_misses_and_bound(settings, storage):
    app, reg = make(settings, storage, cache_size=2)
    with TestClient(app, headers=HEADERS) as client:
        q = {"query": "red shoes", "candidates": CANDS}
        first = client.post("/rank", json=q).json()
        second = client.post("/rank", json=q).json()
        assert second["cached"] is True and second["results"] == first["results"]
        assert reg.scorers["1"].calls == [3]  # scored once
        changed = [dict(CANDS[0], text="blue jacket"), *CANDS[1:]]
        assert client.post("/rank", json={"query": "red shoes", "candidates": changed}).json()["cached"] is False
        client.post("/rank", json={"query": "mug", "candidates": CANDS})
        assert len(app.state.service.cache) == 2  # bounded: the oldest entry was evicted
        assert client.post("/rank", json=q).json()["cached"] is False
        assert metric(client, "shoprank_serve_cache_hits_total") == 1.0
        assert metric(client, "shoprank_serve_cache_misses_total") == 4.0


def test_pairs_are_scored_in_batches(settings, storage):
    app, reg = make(settings, storage, batch_size=3, cache_size=0)
    cands = [{"product_id": f"p{i}", "text": f"item {i} shoes"} for i in range(7)]
    with TestClient(app, headers=HEADERS) as client:
        assert client.post("/rank", json={"query": "shoes", "candidates": cands}).status_code == 200
    assert reg.scorers["1"].calls == [3, 3, 1]


def test_hot_reload_swaps_after_load_and_keeps_old_on_failure(settings, storage):
    reg = FakeRegistry(champion="1")
    app, _ = make(settings, storage, reg, poll_seconds=0.05)
    with TestClient(app, headers=HEADERS) as client:
        q = {"query": "red shoes", "candidates": CANDS}
        assert client.post("/rank", json=q).json()["model_version"] == "1"
        reg.broken.add("3")
        reg.aliases["champion"] = "3"
        time.sleep(0.3)
        assert client.post("/rank", json=q).json()["model_version"] == "1"  # failed load: old one serves
        assert metric(client, 'shoprank_serve_model_reloads_total{alias="champion",outcome="error"}') >= 1
        reg.aliases["champion"] = "2"
        deadline = time.monotonic() + 5
        while client.post("/rank", json=q).json()["model_version"] != "2":
            assert time.monotonic() < deadline, "no reload within 5 s at a 0.05 s poll interval"
            time.sleep(0.05)
        body = client.post("/rank", json=q).json()
        assert [x["product_id"] for x in body["results"]] == ["c", "a", "b"]  # v2's preference, not a stale cache
        text = client.get("/metrics").text
        assert 'shoprank_serve_model_version{alias="champion"} 2.0' in text
        assert 'shoprank_serve_model_info{alias="champion",backend="fake",version="2"} 1.0' in text
        assert 'version="1"' not in text.split("shoprank_serve_model_info")[-1].split("\n#")[0]
    assert reg.loaded == ["1", "2"]


def test_ab_split_is_stable_per_session_and_near_the_share():
    arms = [choose_arm("ab", f"session-{i}", 0.2) for i in range(4000)]
    share = arms.count("challenger") / len(arms)
    assert 0.17 < share < 0.23
    assert all(choose_arm("ab", f"session-{i}", 0.2) == arms[i] for i in range(200))
    assert choose_arm("ab", None, 0.5) == "champion" and choose_arm("champion", "s", 1.0) == "champion"
    assert bucket("s1") == bucket("s1") != bucket("s1", salt="other")


def test_ab_mode_routes_sessions_and_events_record_the_arm(settings, storage):
    reg = FakeRegistry(champion="1", challenger="2")
    app, _ = make(settings, storage, reg, mode="ab", challenger_share=0.5)
    sessions = {f"s{i}": choose_arm("ab", f"s{i}", 0.5) for i in range(20)}
    ch = next(s for s, a in sessions.items() if a == "challenger")
    cp = next(s for s, a in sessions.items() if a == "champion")
    with TestClient(app, headers=HEADERS) as client:
        r1 = client.post("/rank", json={"query": "red shoes", "candidates": CANDS, "session_id": ch}).json()
        r2 = client.post("/rank", json={"query": "red shoes", "candidates": CANDS, "session_id": cp}).json()
        assert (r1["arm"], r1["model_version"]) == ("challenger", "2")
        assert (r2["arm"], r2["model_version"]) == ("champion", "1")
        events = [{"event_id": f"e{i}", "ts": "2026-11-22T10:00:00Z", "request_id": r["request_id"],
                   "session_id": s, "user_id": "u1", "query": "red shoes", "product_id": "a", "position": 1,
                   "event_type": "impression"} for i, (r, s) in enumerate(((r1, ch), (r2, cp)))]
        assert client.post("/events", json={"events": events}).status_code == 202
    stored = storage.feedback().set_index("event_id")
    assert stored.loc["e0", "arm"] == "challenger" and stored.loc["e0", "model_version"] == "2"
    assert stored.loc["e1", "arm"] == "champion" and stored.loc["e1", "model_version"] == "1"
    del reg.aliases["challenger"]
    app.state.service.models.refresh()
    assert app.state.service.models.get("challenger") is None


def test_shadow_mode_returns_champion_and_records_agreement(settings, storage):
    reg = FakeRegistry(champion="1", challenger="2")
    app, _ = make(settings, storage, reg, mode="shadow")
    with TestClient(app, headers=HEADERS) as client:
        for s in ("a", "b", "c"):
            body = client.post("/rank", json={"query": "red shoes", "candidates": CANDS, "session_id": s}).json()
            assert body["arm"] == "champion" and body["model_version"] == "1"
        deadline = time.monotonic() + 5
        while metric(client, "shoprank_serve_shadow_rank_correlation_count") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = client.get("/metrics").text
    assert reg.scorers["2"].calls  # the challenger scored in the background
    assert 'shoprank_serve_shadow_top1_total{agree=' in text


def test_metrics_exposition(settings, storage):
    app, _ = make(settings, storage)
    with TestClient(app, headers=HEADERS) as client:
        client.post("/rank", json={"query": "red shoes", "candidates": CANDS})
        client.post("/rank", json={"query": "", "candidates": CANDS})
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    for needle in ('shoprank_serve_request_seconds_bucket{le="0.005",route="/rank"}',
                   'shoprank_serve_requests_total{route="/rank",status="200"} 1.0',
                   'shoprank_serve_requests_total{route="/rank",status="422"} 1.0',
                   'shoprank_serve_errors_total{route="/rank",status="422"} 1.0',
                   'shoprank_serve_model_version{alias="champion"} 1.0',
                   'shoprank_serve_rank_requests_total{arm="champion"} 1.0',
                   'shoprank_serve_pairs_scored_total{arm="champion"} 3.0',
                   "shoprank_serve_events_buffered 0.0"):
        assert needle in text, needle


def _event(i=0, **over):
    ev = {"event_id": f"e{i}", "ts": "2026-11-22T10:00:00Z", "request_id": "r1", "session_id": "s1",
          "user_id": "raw-user-7", "query": "red shoes", "product_id": "p1", "position": 1,
          "event_type": "impression", "model_version": "1"}
    ev.update(over)
    return ev


def test_events_are_pseudonymised_buffered_and_flushed_on_shutdown(settings, storage):
    app, _ = make(settings, storage)
    hashed = pseudonymise("someone", KEY)
    with TestClient(app, headers=HEADERS) as client:
        events = [_event(0), _event(1, event_type="click", user_id=hashed),
                  _event(2, ts="2026-11-23T00:00:01+00:00", event_type="purchase", position=2)]
        r = client.post("/events", json={"events": events})
        assert r.status_code == 202 and r.json() == {"accepted": 3, "buffered": 3}
        assert storage.keys("raw/feedback/") == []  # buffered, not yet written
        assert metric(client, 'shoprank_serve_events_received_total{event_type="click"}') == 1.0
    keys = storage.keys("raw/feedback/")
    assert [k.rsplit("/", 1)[0] for k in keys if k.endswith(".parquet")] == \
        ["raw/feedback/dt=2026-11-22", "raw/feedback/dt=2026-11-23"]
    assert "raw/feedback/dt=2026-11-22/_SUCCESS" in keys and "raw/feedback/dt=2026-11-23/_SUCCESS" in keys
    assert all(k.split("/")[-1].startswith(("part-", "_SUCCESS")) for k in keys)
    df = storage.feedback().sort_values("event_id").reset_index(drop=True)
    assert list(df.columns) == FEEDBACK.all_names
    assert df["user_id"].tolist() == [pseudonymise("raw-user-7", KEY), hashed, pseudonymise("raw-user-7", KEY)]
    assert "raw-user-7" not in df.to_string()
    assert str(df["ts"].dtype) == "datetime64[us, UTC]" and df["position"].tolist() == [1, 1, 2]
    FEEDBACK.conform(df)  # contract-typed


@pytest.mark.parametrize("events,index,field", [
    ([_event(0), _event(1, event_type="view")], 1, "event_type"),
    ([_event(0, position=0)], 0, "position"),
    ([_event(0, position="3")], 0, "position"),
    ([_event(0), _event(1, ts="2026-11-22 10:00:00")], 1, "ts"),
    ([_event(0, ts="yesterday")], 0, "ts"),
    ([_event(0, ts="2999-01-01T00:00:00Z")], 0, "ts"),
    ([{k: v for k, v in _event(0).items() if k != "session_id"}], 0, "session_id"),
    ([_event(0, query="  ")], 0, "query"),
    ([_event(0, arm="blue")], 0, "arm"),
    ([_event(0, colour="red")], 0, "colour"),
    (["not an object"], 0, None),
])
def test_bad_events_get_422_with_index_and_field_and_nothing_is_written(settings, storage, events, index, field):
    app, _ = make(settings, storage)
    with TestClient(app, headers=HEADERS) as client:
        r = client.post("/events", json={"events": events})
        assert r.status_code == 422, r.text
        errors = r.json()["detail"]["errors"]
        assert {"index": index, "field": field} == {k: errors[0][k] for k in ("index", "field")}
        assert app.state.service.sink.buffered == 0
    assert storage.keys("raw/feedback/") == []


def test_malformed_event_bodies(settings, storage):
    app, _ = make(settings, storage, max_events=5)
    with TestClient(app, headers=HEADERS) as client:
        assert client.post("/events", content=b"{not json", headers={"content-type": "application/json"}
                           ).status_code == 400
        assert "limit is 5" in client.post("/events", json=[_event(i) for i in range(6)]).text
        assert client.post("/events", json={"events": []}).status_code == 422
        assert client.post("/events", json={"events": [_event(0)], "x": 1}).status_code == 422
        assert client.post("/events", json=[_event(0)]).status_code == 202  # a bare list is accepted too
    assert len(storage.feedback()) == 1


def test_flush_by_size_and_failed_flush_keeps_the_wal_then_recovers(settings, storage):
    in_day = dt.datetime(2026, 11, 22, 12, tzinfo=UTC)  # 11-22 still open: no marker, no late routing
    app, _ = make(settings, storage, now=in_day, events_flush_size=2, events_flush_seconds=0.05)
    wal = settings.home / "serving" / "wal"
    with TestClient(app, headers=HEADERS) as client:
        client.post("/events", json=[_event(0), _event(1)])
        deadline = time.monotonic() + 5
        while not storage.keys("raw/feedback/"):
            assert time.monotonic() < deadline, "size-triggered flush did not happen"
            time.sleep(0.02)
        storage.fail = True
        client.post("/events", json=[_event(2)])
        while metric(client, "shoprank_serve_event_flush_errors_total") < 1:
            assert time.monotonic() < deadline + 5, "the failing flush never ran"
            time.sleep(0.02)
        assert app.state.service.sink.buffered == 1  # kept after the failed flush
    segments = list(wal.glob("*.wal"))
    assert len(segments) == 1 and '"e2"' in segments[0].read_text()  # left on disk at shutdown, not lost
    assert sorted(storage.feedback()["event_id"]) == ["e0", "e1"]
    assert "raw/feedback/dt=2026-11-22/_SUCCESS" not in storage.objects  # the day has not ended
    storage.fail = False
    app2, _ = make(settings, storage, now=in_day)
    with TestClient(app2):
        pass
    assert sorted(storage.feedback()["event_id"]) == ["e0", "e1", "e2"]
    assert list(wal.glob("*.wal")) == []
    parts = [k for k in storage.keys("raw/feedback/") if k.endswith(".parquet")]
    assert len(parts) == 2 and all(k.split("/")[-1].startswith("part-ev-") for k in parts)


def test_legacy_spool_files_are_still_uploaded(settings, storage):
    from shoprank.serving.events import to_frame

    spool = settings.home / "serving" / "spool"
    spool.mkdir(parents=True)
    rows = validate_events([_event(7)], hash_key=KEY, now=NOW)
    to_frame(rows).to_parquet(spool / "spool-20261122T100000-abcd1234.parquet", index=False)
    app, _ = make(settings, storage)
    with TestClient(app):
        pass
    assert storage.feedback()["event_id"].tolist() == ["e7"] and list(spool.iterdir()) == []


def test_validate_events_fills_version_and_arm_from_the_ranking():
    rows = validate_events([_event(0, model_version=None)], hash_key=KEY,
                           now=dt.datetime(2026, 11, 22, 12, tzinfo=dt.timezone.utc),
                           lookup={"r1": ("7", "challenger")}.get)
    assert rows[0]["model_version"] == "7" and rows[0]["arm"] == "challenger"
    rows = validate_events([{k: v for k, v in _event(0).items() if k != "event_id"}], hash_key=KEY, now=NOW)
    assert len(rows[0]["event_id"]) == 32
    with pytest.raises(EventsRejected) as exc:
        validate_events([_event(0), _event(1, position=-1), _event(2, event_type="x")], hash_key=KEY, now=NOW)
    assert [(e["index"], e["field"]) for e in exc.value.errors] == [(1, "position"), (2, "event_type")]


def test_serve_config_from_env(tmp_path):
    env = {"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none")}
    cfg = ServeConfig.from_env({**env, "SHOPRANK_SERVE_MODE": "ab", "SHOPRANK_SERVE_CHALLENGER_SHARE": "0.25",
                                "SHOPRANK_SERVE_POLL_SECONDS": "5"})
    assert (cfg.mode, cfg.challenger_share, cfg.poll_seconds) == ("ab", 0.25, 5.0)
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_MODE"):
        ServeConfig.from_env({**env, "SHOPRANK_SERVE_MODE": "canary"})
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_BATCH_SIZE"):
        ServeConfig.from_env({**env, "SHOPRANK_SERVE_BATCH_SIZE": "big"})
    with pytest.raises(ConfigError, match="CHALLENGER_SHARE"):
        ServeConfig.from_env({**env, "SHOPRANK_SERVE_CHALLENGER_SHARE": "1.5"})


def test_online_metrics_by_arm():
    rows = []

    def ev(req, arm, etype, pid, pos, eid=None):
        rows.append({"event_id": eid or f"{req}-{etype}-{pid}-{len(rows)}", "request_id": req, "product_id": pid,
                     "event_type": etype, "position": pos, "arm": arm})

    for pid, pos in (("a", 1), ("b", 2), ("c", 3)):  # champion r1: click at 2, purchase
        ev("r1", "champion", "impression", pid, pos)
    ev("r1", "champion", "click", "b", 2, eid="dup")
    ev("r1", "champion", "click", "b", 2, eid="dup")  # retried event: deduped by event_id
    ev("r1", "champion", "purchase", "b", 2)
    for pid, pos in (("a", 1), ("b", 2)):  # champion r2: no click
        ev("r2", "champion", "impression", pid, pos)
    for pid, pos in (("a", 1), ("b", 2)):  # challenger r3: clicks at 1 and 2, cart
        ev("r3", "challenger", "impression", pid, pos)
    ev("r3", "challenger", "click", "a", 1)
    ev("r3", "challenger", "click", "b", 2)
    ev("r3", "challenger", "add_to_cart", "a", 1)
    m = online_metrics_by_arm(pd.DataFrame(rows))
    assert m["online_champion_requests"] == 2 and m["online_challenger_requests"] == 1
    assert m["online_champion_ctr"] == pytest.approx(1 / 5)
    assert m["online_champion_click_rate"] == pytest.approx(0.5)
    assert m["online_champion_purchase_rate"] == pytest.approx(0.5)
    assert m["online_champion_add_to_cart_rate"] == 0
    assert m["online_champion_mrr"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["online_challenger_ctr"] == pytest.approx(1.0) and m["online_challenger_mrr"] == 1.0
    assert m["online_challenger_add_to_cart_rate"] == 1.0
    no_arm = online_metrics_by_arm(pd.DataFrame(rows).drop(columns="arm"))
    assert set(k.split("_")[1] for k in no_arm) == {"champion"} and no_arm["online_champion_requests"] == 3
    assert online_metrics_by_arm(pd.DataFrame()) == {}


def test_feedback_contract_optional_arm_column():
    base = pd.DataFrame([{**_event(0), "ts": pd.Timestamp("2026-11-22T10:00:00Z")}]).drop(columns=["model_version"])
    base["model_version"] = None
    without = FEEDBACK.conform(base)
    assert "arm" not in without.columns and list(without.columns) == FEEDBACK.names
    with_arm = FEEDBACK.conform(base.assign(arm="challenger"))
    assert list(with_arm.columns) == FEEDBACK.all_names and str(with_arm["arm"].dtype) == "string"


def test_validation_and_labels_accept_feedback_with_and_without_arm():
    """The optional ``arm`` column passes the feedback suite and does not change derived labels."""
    from shoprank.labels import LabelParams, derive_labels
    from shoprank.validation import ValidationOptions, samples, validate_frame

    day = "2026-11-20"
    ids = pd.Index(samples.catalog(300, day=day)["product_id"])
    plain = samples.feedback(2_000, day=day, ids=ids)
    arms = np.where(plain["session_id"].map(lambda s: choose_arm("ab", s, 0.3)) == "challenger", "challenger",
                    "champion")
    with_arm = FEEDBACK.conform(plain.assign(arm=arms))
    opts = ValidationOptions(now=dt.datetime(2026, 11, 23, 6, tzinfo=dt.timezone.utc))
    for df in (plain, with_arm):
        outcome = validate_frame(df, "feedback", day, opts, catalog_product_ids=ids, previous_row_count=None)
        assert outcome.success, outcome.message()
    a = derive_labels(plain, LabelParams()).pairs
    b = derive_labels(with_arm, LabelParams()).pairs
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert set(online_metrics_by_arm(with_arm)) >= {"online_champion_ctr", "online_challenger_ctr"}


def test_grafana_dashboard_only_uses_metrics_the_app_exports(settings, storage):
    import json
    import re

    dash = json.loads((Path(__file__).resolve().parents[2] / "grafana" / "shoprank-serving.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|total)$", "", m) for e in exprs for m in re.findall(r"shoprank_serve_\w+", e)}
    app, _ = make(settings, storage)
    with TestClient(app, headers=HEADERS) as client:
        exposed = set(re.findall(r"^# HELP (shoprank_serve_\w+)", client.get("/metrics").text, re.M))
    exposed = {re.sub(r"_total$", "", m) for m in exposed}
    assert used and used <= exposed, sorted(used - exposed)


def test_daily_update_online_metrics_never_fail_the_day():
    from shoprank.daily import _online_metrics

    events = pd.DataFrame([{"event_id": "e1", "request_id": "r1", "product_id": "p1", "event_type": "impression",
                            "position": 1, "arm": "challenger"},
                           {"event_id": "e2", "request_id": "r1", "product_id": "p1", "event_type": "click",
                            "position": 1, "arm": "challenger"}])
    assert _online_metrics(events)["online_challenger_ctr"] == 1.0
    assert _online_metrics(events.drop(columns="position")) == {}  # logged as a warning, day goes on


def test_fixed_scorer_app_needs_no_registry_or_storage(settings):
    scorer = FakeScorer("5")
    app = create_app(settings, scorer=scorer, config=ServeConfig(cache_size=0), auth=AUTH)
    with TestClient(app, headers=HEADERS) as client:
        body = client.post("/rank", json={"query": "red shoes", "candidates": CANDS}).json()
        assert (body["model_version"], body["backend"]) == ("5", "fake")
        assert client.post("/events", json=[_event(0)]).status_code == 503  # no S3: refused, not dropped
    assert scorer.calls == [3]


def test_scorer_failure_is_a_counted_500_and_nothing_is_cached(settings, storage):
    class Broken(FakeScorer):
        def score(self, queries, texts):
            raise RuntimeError("onnxruntime exploded")

    app = create_app(settings, scorer=Broken("1"), storage=storage, hash_key=KEY,
                     config=ServeConfig(poll_seconds=3600), auth=AUTH)
    with TestClient(app, raise_server_exceptions=False, headers=HEADERS) as client:
        assert client.post("/rank", json={"query": "red shoes", "candidates": CANDS}).status_code == 500
        assert metric(client, 'shoprank_serve_errors_total{route="/rank",status="500"}') == 1.0
        assert len(app.state.service.cache) == 0


# ---- durability, completeness markers, late events, body limit (issue 17) -----------------------
def _sink(storage, tmp_path, now, **kw):
    from shoprank.serving.events import EventSink

    return EventSink(storage, wal_dir=tmp_path / "wal", clock=lambda: now[0], **kw)


def _rows(ids, ts="2026-11-22T10:00:00Z", now=NOW):
    return validate_events([_event(0, event_id=i, ts=ts) for i in ids], hash_key=KEY, now=now)


def _stored_ids(storage, root="raw/feedback/"):
    ids = []
    for k in storage.keys(root):
        if k.endswith(".parquet"):
            ids += pd.read_parquet(io.BytesIO(storage.objects[k]))["event_id"].tolist()
    return ids


def _die(sink):
    """What SIGKILL does to a sink: its file descriptors (and flocks) go, nothing is flushed."""
    for seg in [*sink._sealed, *([sink._active] if sink._active else [])]:
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None


def test_an_accepted_event_is_in_the_fsynced_wal_before_the_202(settings, storage, monkeypatch):
    import shoprank.serving.events as events_mod

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(events_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    app, _ = make(settings, storage)
    wal = settings.home / "serving" / "wal"
    with TestClient(app, headers=HEADERS) as client:
        r = client.post("/events", json=[_event(0), _event(1)])
        assert r.status_code == 202 and synced  # fsync'd before the answer
        (segment,) = wal.glob("*.wal")
        assert [row["event_id"] for row in json.loads(segment.read_text())["rows"]] == ["e0", "e1"]
        assert storage.keys("raw/feedback/") == []  # not uploaded yet: durable on local disk only
        monkeypatch.setattr(events_mod.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left")))
        full = client.post("/events", json=[_event(2)])
        assert full.status_code == 503 and "write-ahead log" in full.json()["detail"]["error"]
        assert app.state.service.sink.buffered == 2  # the refused batch was not taken
        assert '"e2"' not in segment.read_text()  # and left no torn line behind
    assert sorted(storage.feedback()["event_id"]) == ["e0", "e1"]


def test_a_crashed_sinks_wal_is_replayed_once_and_a_live_one_is_left_alone(storage, tmp_path):
    now = [NOW]
    first = _sink(storage, tmp_path, now)
    first.add(_rows(["a1", "a2"]))
    first.add(_rows(["b1"], ts="2026-11-23T08:00:00Z"))
    second = _sink(storage, tmp_path, now)
    assert second.recover() == 0 and second.buffered == 0  # `first` is alive: its segment is locked
    _die(first)
    third = _sink(storage, tmp_path, now)
    assert third.recover() == 3 and third.buffered == 0
    assert sorted(_stored_ids(storage)) == ["a1", "a2", "b1"]
    assert list((tmp_path / "wal").glob("*.wal")) == []
    assert "raw/feedback/dt=2026-11-22/_SUCCESS" in storage.objects  # both days ended + grace
    assert "raw/feedback/dt=2026-11-23/_SUCCESS" in storage.objects


def test_replay_after_a_crash_mid_upload_overwrites_instead_of_duplicating(storage, tmp_path):
    now = [NOW]
    sink = _sink(storage, tmp_path, now)
    sink.add(_rows(["a1", "a2"]))  # dt=2026-11-22
    sink.add(_rows(["b1"], ts="2026-11-23T08:00:00Z"))  # dt=2026-11-23
    real_write = storage.write_parquet
    calls = []

    def dies_on_second_part(df, key):
        calls.append(key)
        if len(calls) == 2:
            raise OSError("process killed here")
        return real_write(df, key)

    storage.write_parquet = dies_on_second_part
    assert sink.flush() == 0
    _die(sink)  # crashed after dt=2026-11-22's part was written, before the segment was deleted
    storage.write_parquet = real_write
    storage.put_bytes("raw/feedback/dt=2026-11-22/_SUCCESS", b"")  # meanwhile another writer completed the day
    again = _sink(storage, tmp_path, now)
    assert again.recover() == 3
    ids = _stored_ids(storage) + _stored_ids(storage, "raw/feedback_late/")
    assert sorted(ids) == ["a1", "a2", "b1"]  # each once: the same key was rewritten, not a late copy
    assert storage.keys("raw/feedback_late/") == []


def test_torn_last_wal_line_is_skipped(storage, tmp_path):
    now = [NOW]
    sink = _sink(storage, tmp_path, now)
    sink.add(_rows(["a1"]))
    (segment,) = (tmp_path / "wal").glob("*.wal")
    with open(segment, "ab") as fh:
        fh.write(b'{"rows":[{"event_id":"half')  # a write cut off by the crash: never acknowledged
    _die(sink)
    assert _sink(storage, tmp_path, now).recover() == 1
    assert _stored_ids(storage) == ["a1"]


def test_the_day_is_marked_complete_only_after_it_ended_plus_the_grace(settings, storage):
    from shoprank.serving.events import merge_late_events

    clock = [dt.datetime(2026, 11, 22, 23, 50, tzinfo=UTC)]
    app, _ = make(settings, storage, now=lambda: clock[0], events_grace_minutes=30)
    marker = "raw/feedback/dt=2026-11-22/_SUCCESS"
    sink = app.state.service.sink
    with TestClient(app, headers=HEADERS) as client:
        assert client.post("/events", json=[_event(0, ts="2026-11-22T23:49:00Z")]).status_code == 202
        sink.flush()
        assert _stored_ids(storage) == ["e0"] and marker not in storage.objects  # first flush: no marker
        clock[0] = dt.datetime(2026, 11, 23, 0, 10, tzinfo=UTC)  # the day ended, still in the grace
        assert client.post("/events", json=[_event(1, ts="2026-11-22T23:59:59Z")]).status_code == 202
        sink.flush()
        assert sorted(_stored_ids(storage)) == ["e0", "e1"] and marker not in storage.objects
        clock[0] = dt.datetime(2026, 11, 23, 0, 31, tzinfo=UTC)  # ended + 30 minutes: complete
        sink.flush()
        assert marker in storage.objects
        assert client.post("/events", json=[_event(2, ts="2026-11-22T23:59:59Z")]).status_code == 202
    # after the marker: not added to the complete day, not lost either
    assert sorted(_stored_ids(storage)) == ["e0", "e1"]
    (late,) = storage.keys("raw/feedback_late/")
    assert late.startswith("raw/feedback_late/dt=2026-11-22/part-ev-") and _stored_ids(
        storage, "raw/feedback_late/") == ["e2"]
    assert merge_late_events(storage, "2026-11-22") == ["raw/feedback/dt=2026-11-22/" + late.rsplit("/", 1)[1]]
    assert sorted(_stored_ids(storage)) == ["e0", "e1", "e2"] and storage.keys("raw/feedback_late/") == []


def test_a_restart_marks_the_days_a_crash_left_unmarked_but_not_foreign_uploads(storage, tmp_path):
    df = pd.DataFrame({"x": [1]})
    storage.write_parquet(df, "raw/feedback/dt=2026-11-22/part-ev-20261122T100000-aaaa.parquet")  # ours
    storage.write_parquet(df, "raw/feedback/dt=2026-11-23/part-00000.parquet")  # an upload in progress
    _sink(storage, tmp_path, [NOW]).recover()
    assert "raw/feedback/dt=2026-11-22/_SUCCESS" in storage.objects
    assert "raw/feedback/dt=2026-11-23/_SUCCESS" not in storage.objects


@pytest.mark.parametrize("ts,needle", [
    ("0001-01-01T00:00:00Z", "days late are refused"),
    ("0001-01-01T00:00:00+01:00", "out of range"),
    ("9999-12-31T23:59:59-01:00", "out of range"),
    ("2026-11-16T05:59:59Z", "8 days old"),
])
def test_events_too_far_in_the_past_are_refused_naming_ts(settings, storage, ts, needle):
    app, _ = make(settings, storage)
    with TestClient(app, headers=HEADERS) as client:
        r = client.post("/events", json=[_event(0), _event(1, ts=ts)])
        assert r.status_code == 422, r.text
        (err,) = r.json()["detail"]["errors"]
        assert (err["index"], err["field"]) == (1, "ts") and needle in err["error"]
        assert "SHOPRANK_SERVE_EVENTS_MAX_LATE_DAYS" in err["error"] or "range" in needle
        assert client.post("/events", json=[_event(2, ts="2026-11-17T06:00:01Z")]).status_code == 202  # 6.99 days
    assert storage.feedback()["event_id"].tolist() == ["e2"]


def test_request_bodies_over_the_limit_get_413_unread(settings, storage):
    app, _ = make(settings, storage, max_body_bytes=2000)
    with TestClient(app, headers=HEADERS) as client:
        big = client.post("/events", content=b"x" * 5000, headers={"content-type": "application/json"})
        assert big.status_code == 413, big.text  # not 400: the body was never parsed
        assert big.json()["detail"]["field"] == "body" and "SHOPRANK_SERVE_MAX_BODY_BYTES" in big.text

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"events": ['
            yield b" " * 3000
            yield b"]}"

        chunked = client.post("/events", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413, chunked.text
        rank = client.post("/rank", json={"query": "shoes", "candidates": [{"product_id": "a", "text": "t" * 3000}]})
        assert rank.status_code == 413
        assert client.post("/events", json=[_event(0)]).status_code == 202  # small bodies still pass
        assert metric(client, 'shoprank_serve_errors_total{route="unmatched",status="413"}') == 2.0  # by header
        assert metric(client, 'shoprank_serve_errors_total{route="/events",status="413"}') == 1.0  # counted
    assert storage.feedback()["event_id"].tolist() == ["e0"]


def test_serve_config_reads_the_event_and_body_settings(tmp_path):
    env = {"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none")}
    cfg = ServeConfig.from_env(env)
    assert (cfg.events_grace_minutes, cfg.events_max_late_days, cfg.max_body_bytes) == (30.0, 7, 1_048_576)
    cfg = ServeConfig.from_env({**env, "SHOPRANK_SERVE_EVENTS_GRACE_MINUTES": "90",
                                "SHOPRANK_SERVE_EVENTS_MAX_LATE_DAYS": "2", "SHOPRANK_SERVE_MAX_BODY_BYTES": "4096"})
    assert (cfg.events_grace_minutes, cfg.events_max_late_days, cfg.max_body_bytes) == (90.0, 2, 4096)
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_EVENTS_GRACE_MINUTES"):
        ServeConfig.from_env({**env, "SHOPRANK_SERVE_EVENTS_GRACE_MINUTES": "-1"})
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_MAX_BODY_BYTES"):
        ServeConfig.from_env({**env, "SHOPRANK_SERVE_MAX_BODY_BYTES": "0"})


# ---- scorer fallback: int8 refused -> fp32 ONNX -> torch (issue 17, item 6) ---------------------
@pytest.fixture()
def fake_exports(monkeypatch, tmp_path):
    """A registry version with fake ``export.*`` tags, export dirs on "MLflow" and fake scorers."""
    import mlflow.artifacts

    import shoprank.mlflow_model
    import shoprank.registry
    import shoprank.serving.scorers as scorers

    state = {"tags": {}, "logged": {}}

    class Registry:
        name = "fake-model"

        def __init__(self, *_a, **_k):
            pass

        def resolve(self, ref):
            return "3"

        def version(self, number):
            return type("MV", (), {"version": number, "run_id": "run-3", "tags": state["tags"]})()

        def tags(self, number):
            return dict(state["tags"])

    def download_artifacts(run_id, artifact_path, dst_path, tracking_uri=None):
        backend = artifact_path.split("/")[-1]
        out = Path(dst_path) / backend
        out.mkdir(parents=True, exist_ok=True)
        if state["logged"].get(backend):
            (out / scorers.ONNX_FILE).write_bytes(b"onnx")
            (out / scorers.META_FILE).write_text(json.dumps({"backend": backend}))
        return str(out)

    class FakeOnnx:
        def __init__(self, path, backend, version=None, **_k):
            if state["logged"].get(backend) == "corrupt":
                raise RuntimeError("ONNXRuntimeError: protobuf parsing failed")
            self.backend, self.version, self.source = backend, version, str(path)

    class FakeTorch:
        def __init__(self, weights, version=None, **_k):
            self.backend, self.version, self.source = "torch", version, str(weights)

    monkeypatch.setattr(shoprank.registry, "Registry", Registry)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_artifacts)
    monkeypatch.setattr(scorers, "OnnxScorer", FakeOnnx)
    monkeypatch.setattr(scorers, "TorchScorer", FakeTorch)
    monkeypatch.setattr(shoprank.mlflow_model, "download_weights", lambda _s, _uri, dst: dst)
    return state


@pytest.mark.parametrize("tags,logged,backend,expected,needle", [
    ({"export.status": "partial", "export.backends": "onnx",
      "export.refused": "onnx-int8: NDCG@10 0.61 vs torch 0.70 exceeds the tolerance 0.005"},
     {"onnx": True}, "onnx-int8", "onnx", "falling back to its onnx export"),
    ({"export.status": "refused", "export.backends": "",
      "export.refused": "onnx-int8: exceeds the tolerance; onnx: exceeds the tolerance"},
     {}, "onnx-int8", "torch", "falling back to torch"),
    ({}, {}, "onnx-int8", "torch", "never exported"),
    ({"export.status": "exported", "export.backends": "onnx-int8,onnx", "export.refused": ""},
     {"onnx-int8": True, "onnx": True}, "onnx-int8", "onnx-int8", ""),
    ({"export.status": "exported", "export.backends": "onnx-int8,onnx", "export.refused": ""},
     {"onnx-int8": "corrupt", "onnx": True}, "onnx-int8", "onnx", "protobuf parsing failed"),
    ({"export.status": "exported", "export.backends": "onnx-int8", "export.refused": ""},
     {"onnx-int8": True}, "onnx", "torch", "falling back to torch"),
    ({"export.status": "exported", "export.backends": "onnx-int8,onnx", "export.refused": ""},
     {"onnx-int8": True, "onnx": True}, "torch", "torch", ""),
])
def test_load_version_scorer_falls_back_int8_then_fp32_onnx_then_torch(settings, fake_exports, tmp_path, caplog,
                                                                       tags, logged, backend, expected, needle):
    import logging

    from shoprank.serving.scorers import load_version_scorer

    fake_exports["tags"], fake_exports["logged"] = tags, logged
    with caplog.at_level(logging.INFO, logger="shoprank.serving.scorers"):
        scorer = load_version_scorer(settings, "champion", backend, workdir=str(tmp_path / "w"))
    assert scorer.backend == expected and scorer.version == "3"
    assert needle in caplog.text
    if expected != backend:
        assert any(r.levelname == "WARNING" and expected in r.getMessage() for r in caplog.records)


def test_s3_down_at_start_delays_recovery_but_loses_nothing(storage, tmp_path):
    now = [NOW]
    first = _sink(storage, tmp_path, now)
    first.add(_rows(["a1"]))
    _die(first)
    storage.fail = True
    second = _sink(storage, tmp_path, now)
    assert second.recover() == 1 and second.buffered == 1  # no exception: the start goes on
    storage.fail = False
    assert second.flush() == 1  # what the background flusher does next
    assert _stored_ids(storage) == ["a1"] and "raw/feedback/dt=2026-11-22/_SUCCESS" in storage.objects
    assert list((tmp_path / "wal").glob("*.wal")) == []


# ---- authentication (issue 18 item 4) ------------------------------------------------------------
def _no_secrets_in_env(monkeypatch, tmp_path):
    """The process environment without any serving secret, and no .env file."""
    for name in ("SHOPRANK_SERVE_EVENTS_TOKEN", "SHOPRANK_SERVE_RANK_TOKEN", "SHOPRANK_SERVE_ADMIN_TOKEN",
                 "SHOPRANK_USER_HASH_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHOPRANK_ENV_FILE", str(tmp_path / "no.env"))


def test_events_and_metrics_need_the_token_rank_is_open_without_a_rank_token(settings, storage):
    app, _ = make(settings, storage)
    body = {"events": [_event(0)]}
    with TestClient(app) as anonymous:  # no Authorization header
        missing = anonymous.post("/events", json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "SHOPRANK_SERVE_EVENTS_TOKEN" in missing.json()["detail"]["error"]
        wrong = anonymous.post("/events", json=body, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401 and "wrong bearer token" in wrong.text
        assert anonymous.post("/events", json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert anonymous.post("/events", json=body, headers={"Authorization": TOKEN}).status_code == 401
        assert app.state.service.sink.buffered == 0  # refused before the body was read: nothing kept
        assert anonymous.get("/metrics").status_code == 401  # admin endpoint
        assert anonymous.post("/rank", json={"query": "red shoes", "candidates": CANDS}).status_code == 200
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
        ok = anonymous.post("/events", json=body, headers=HEADERS)
        assert ok.status_code == 202 and app.state.service.sink.buffered == 1
        assert anonymous.get("/metrics", headers=HEADERS).status_code == 200  # no admin token: the events token
    with TestClient(app, headers=HEADERS) as client:
        assert metric(client, 'shoprank_serve_errors_total{route="/events",status="401"}') == 4.0


def test_rank_and_admin_tokens_when_set(settings, storage):
    auth = ServeAuth(events_token=TOKEN, rank_token="rank-token-1", admin_token="admin-token-1")
    reg = FakeRegistry(champion="1")
    app = create_app(settings, loader=reg.load, resolve_alias=reg.resolve, storage=storage, hash_key=KEY, auth=auth,
                     config=ServeConfig(poll_seconds=3600, events_flush_seconds=3600))
    q = {"query": "red shoes", "candidates": CANDS}
    with TestClient(app) as client:
        refused = client.post("/rank", json=q)
        assert refused.status_code == 401 and "SHOPRANK_SERVE_RANK_TOKEN" in refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert client.post("/rank", json=q, headers=HEADERS).status_code == 401  # the events token is not it
        assert client.post("/rank", json=q, headers={"Authorization": "Bearer rank-token-1"}).status_code == 200
        assert client.post("/rank", json={"query": ""}, headers={}).status_code == 401  # auth before validation
        assert client.post("/events", json=[_event(0)],
                           headers={"Authorization": "Bearer rank-token-1"}).status_code == 401
        assert client.get("/metrics", headers=HEADERS).status_code == 401  # an admin token is set: only it
        metrics = client.get("/metrics", headers={"Authorization": "Bearer admin-token-1"})
        assert metrics.status_code == 200 and 'route="/rank",status="401"' in metrics.text
    assert "rank-token-1" not in repr(auth) and TOKEN not in repr(auth)


def test_start_refuses_without_the_events_token_and_never_generates_secrets(settings, storage, tmp_path,
                                                                           monkeypatch):
    _no_secrets_in_env(monkeypatch, tmp_path)
    cfg = ServeConfig(poll_seconds=3600)
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_EVENTS_TOKEN is not set"):
        create_app(settings, scorer=FakeScorer("1"), config=cfg)
    monkeypatch.setenv("SHOPRANK_SERVE_EVENTS_TOKEN", "  ")
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_EVENTS_TOKEN"):
        create_app(settings, scorer=FakeScorer("1"), config=cfg)
    monkeypatch.setenv("SHOPRANK_SERVE_EVENTS_TOKEN", "two words")
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_EVENTS_TOKEN contains whitespace"):
        create_app(settings, scorer=FakeScorer("1"), config=cfg)
    with pytest.raises(ConfigError, match="SHOPRANK_SERVE_EVENTS_TOKEN is empty"):
        create_app(settings, scorer=FakeScorer("1"), config=cfg, auth=ServeAuth(events_token=""))
    # with storage, the user-id hash key is required too, and nothing makes one up
    monkeypatch.setenv("SHOPRANK_SERVE_EVENTS_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match="SHOPRANK_USER_HASH_KEY is not set"):
        create_app(settings, scorer=FakeScorer("1"), storage=storage, config=cfg)
    assert not (settings.home / "stack.env").exists(), "serving must not generate stack.env / secrets"


def test_tokens_and_hash_key_are_read_from_stack_env_and_the_environment_wins(settings, storage, tmp_path,
                                                                            monkeypatch):
    _no_secrets_in_env(monkeypatch, tmp_path)
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "stack.env").write_text("SHOPRANK_SERVE_EVENTS_TOKEN=from-stack-env\n"
                                             "SHOPRANK_USER_HASH_KEY=stack-hash-key\n")
    # a .env copied from .env.example: its blank values must not hide the stack's
    (tmp_path / "no.env").write_text("SHOPRANK_SERVE_EVENTS_TOKEN=\nSHOPRANK_USER_HASH_KEY=\n")
    auth = ServeAuth.from_env(home=settings.home)
    assert (auth.events_token, auth.rank_token, auth.metrics_token) == ("from-stack-env", None, "from-stack-env")
    monkeypatch.setenv("SHOPRANK_SERVE_EVENTS_TOKEN", "from-env")
    monkeypatch.setenv("SHOPRANK_SERVE_RANK_TOKEN", "rank-from-env")
    auth = ServeAuth.from_env(home=settings.home)
    assert (auth.events_token, auth.rank_token) == ("from-env", "rank-from-env")
    app = create_app(settings, scorer=FakeScorer("1"), storage=storage, config=ServeConfig(poll_seconds=3600))
    assert app.state.service.hash_key == "stack-hash-key"
    with TestClient(app) as client:
        assert client.post("/rank", json={"query": "mug", "candidates": CANDS}).status_code == 401
        assert client.post("/rank", json={"query": "mug", "candidates": CANDS},
                           headers={"Authorization": "Bearer rank-from-env"}).status_code == 200


def test_cli_serve_without_the_token_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from shoprank import cli

    _no_secrets_in_env(monkeypatch, tmp_path)
    monkeypatch.setenv("SHOPRANK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHOPRANK_DEBUG", raising=False)
    assert cli.main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shoprank: error: SHOPRANK_SERVE_EVENTS_TOKEN is not set") and "Traceback" not in err
    assert not (tmp_path / "home" / "stack.env").exists()  # `shoprank serve` generates nothing
