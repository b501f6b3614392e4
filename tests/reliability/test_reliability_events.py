"""The ranking API's event writer on REAL processes: a uvicorn process of ``create_app`` against the
session's rclone S3 server, killed with SIGKILL in the middle of a load of concurrent clients,
then restarted.  Every event id is read back from S3 and counted (see docs/reliability.md)."""

from __future__ import annotations

import collections
import datetime as dt
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from shoprank.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.slow]

# the real app with a constant scorer (no registry needed: /events is what is under test)
APP = '''
import os

import numpy as np

from shoprank.config import Settings
from shoprank.serving.app import create_app
from shoprank.storage import Storage


class Const:
    version, backend, max_length = "1", "const", 64

    def score(self, queries, texts):
        return np.zeros(len(texts), dtype=np.float32)


settings = Settings.from_env()
app = create_app(settings, scorer=Const(), storage=Storage(settings), hash_key=os.environ["SHOPRANK_USER_HASH_KEY"])
'''

CLIENTS, BATCH, KILL_AFTER = 16, 50, 2_500
TOKEN = "reliability-events-token"  # SHOPRANK_SERVE_EVENTS_TOKEN of the API process
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class ApiProcess:
    """``python -m uvicorn`` serving the app above on a private SHOPRANK_HOME (kept across restarts)."""

    def __init__(self, tmp_path: Path, storage, **serve_env: str):
        self.dir = tmp_path
        (tmp_path / "rel_events_app.py").write_text(APP)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        s = storage.settings
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHOPRANK_"))},
                    "SHOPRANK_HOME": str(tmp_path / "home"), "SHOPRANK_ENV_FILE": str(tmp_path / "none.env"),
                    "SHOPRANK_S3_ENDPOINT_URL": s.s3_endpoint_url, "SHOPRANK_BUCKET": s.bucket,
                    "AWS_ACCESS_KEY_ID": s.aws_access_key_id, "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key,
                    "AWS_DEFAULT_REGION": s.aws_region, "SHOPRANK_USER_HASH_KEY": "reliability-hash-key",
                    "SHOPRANK_SERVE_EVENTS_TOKEN": TOKEN, **serve_env}
        self.env = {k: v for k, v in self.env.items() if v is not None}  # serve_env=None: unset
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def wal(self) -> Path:
        return self.dir / "home" / "serving" / "wal"

    def start(self) -> None:
        self.starts += 1
        log = open(self.dir / f"api-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "rel_events_app:app", "--app-dir", str(self.dir), "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "info"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"the API exited: {self.log()[-3000:]}"
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the API did not start: {self.log()[-3000:]}"
            time.sleep(0.2)

    def log(self) -> str:
        return (self.dir / f"api-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def api(tmp_path, storage):
    procs: list[ApiProcess] = []

    def make(**serve_env: str) -> ApiProcess:
        p = ApiProcess(tmp_path, storage, **serve_env)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


def _event(event_id: str, ts: str) -> dict:
    return {"event_id": event_id, "ts": ts, "request_id": "r-" + event_id[:9], "session_id": "s-" + event_id[:3],
            "user_id": "shopper-" + event_id[:3], "query": "red shoes", "product_id": "p1",
            "position": 1 + int(event_id[-2:]) % 10, "event_type": "impression"}


class Load:
    """``CLIENTS`` threads posting batches of ``BATCH`` new events until stopped or the server dies."""

    def __init__(self, url: str, tag: str, max_batches: int | None = None):
        self.url, self.tag, self.max_batches = url, tag, max_batches
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.failed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(CLIENTS)]

    def _client(self, c: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60, headers=AUTH) as http:
            n = 0
            while not self.stop.is_set() and (self.max_batches is None or n < self.max_batches):
                ts = dt.datetime.now(dt.timezone.utc).isoformat()
                ids = [f"{self.tag}{c:02d}-{n:05d}-{i:02d}" for i in range(BATCH)]
                with self.lock:
                    self.sent.update(ids)
                try:
                    r = http.post("/events", json={"events": [_event(i, ts) for i in ids]})
                except httpx.HTTPError:
                    with self.lock:
                        self.failed += 1
                    return  # the server is gone: not acknowledged, so not counted
                with self.lock:
                    if r.status_code == 202:
                        self.acked.update(ids)
                    else:
                        self.failed += 1
                n += 1

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def wait_acked(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} events acknowledged"
            time.sleep(0.005)


def _stored(storage) -> collections.Counter:
    """event_id -> number of times it is stored, over every part the event writer can produce."""
    counts: collections.Counter = collections.Counter()
    for root in ("raw/feedback/", "raw/feedback_late/"):
        for key in storage.list_keys(root):
            if key.endswith(".parquet"):
                counts.update(pd.read_parquet(io.BytesIO(storage.get_bytes(key)))["event_id"].tolist())
    return counts


def test_sigkill_mid_load_loses_no_acknowledged_event(api, storage):
    """Fault: 16 clients post batches of 50 events; the API process gets SIGKILL once 2,500
    were acknowledged, with events still waiting for their upload; it is restarted, more load
    follows, then a graceful stop.  Expected: every acknowledged event id is in S3 exactly once
    (read back from every part); nothing else is stored twice; the restart uploads what the
    crash left in the write-ahead log; today's partition gets no _SUCCESS (the day has not ended)."""
    server = api(SHOPRANK_SERVE_EVENTS_FLUSH_SIZE="1000", SHOPRANK_SERVE_EVENTS_FLUSH_SECONDS="3600")
    server.start()
    with Load(server.url, "a") as first:
        first.wait_acked(KILL_AFTER)
        server.kill()
    before = _stored(storage)
    left_in_wal = sorted(server.wal.glob("*.wal"))
    only_local = first.acked - set(before)
    assert only_local, "the kill found every acknowledged event already in S3: nothing was tested"
    assert left_in_wal

    server.start()  # recovery runs before the server answers
    after_restart = _stored(storage)
    assert first.acked <= set(after_restart), f"{len(first.acked - set(after_restart))} acknowledged events lost"
    assert max(after_restart.values()) == 1
    assert list(server.wal.glob("*.wal")) == []  # replayed, uploaded, deleted
    assert "left by an earlier process" in server.log()

    with Load(server.url, "b", max_batches=10) as second:
        for t in second.threads:
            t.join(timeout=300)
    server.stop()  # graceful: the final flush
    stored = _stored(storage)
    acked = first.acked | second.acked
    twice = {i: n for i, n in stored.items() if n > 1}
    lost = acked - set(stored)
    assert not lost and not twice, f"lost {len(lost)}, stored twice {len(twice)}"
    assert set(stored) <= first.sent | second.sent
    assert list(server.wal.glob("*.wal")) == []
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert not storage.exists(f"raw/feedback/dt={today}/_SUCCESS")
    print(f"\nRELIABILITY FIGURES events-kill: {CLIENTS} clients x {BATCH} events/batch; acknowledged before the "
          f"kill {len(first.acked)} (sent {len(first.sent)}, {first.failed} batches cut off by the kill); "
          f"in S3 at the kill {sum(before.values())}, only in the WAL {len(only_local)} "
          f"({len(left_in_wal)} segment files); after the restart {len(first.acked & set(after_restart))} of "
          f"{len(first.acked)}; after more load and a graceful stop: acknowledged {len(acked)}, stored once "
          f"{sum(1 for i in acked if stored[i] == 1)}, stored twice {len(twice)}, lost {len(lost)}; "
          f"stored in all {len(stored)} (acknowledged + {len(stored) - len(acked)} fsync'd but cut off before "
          f"their 202)")


def test_real_server_refuses_huge_bodies_unread_and_ancient_events(api, storage):
    """Fault: a request declaring a 5 MB body (only its first 64 KiB sent), and events with
    ``ts`` of year 0001.  Expected: 413 comes back before the rest of the body is sent; the
    ancient events get 422 naming ``ts``; nothing is stored."""
    server = api(SHOPRANK_SERVE_MAX_BODY_BYTES="1048576")
    server.start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000000\r\n\r\n" + b"[" * 65536)
        t0 = time.monotonic()
        answer = sock.recv(65536)
        waited = time.monotonic() - t0
        while b"}}" not in answer:  # the rest of the JSON answer (the server closes the connection after it)
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"SHOPRANK_SERVE_MAX_BODY_BYTES" in answer
    r = httpx.post(server.url + "/events", json={"events": [_event("old-00001-00", "0001-01-01T00:00:00Z")]},
                   timeout=30, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["errors"][0]["field"] == "ts"
    assert "SHOPRANK_SERVE_EVENTS_MAX_LATE_DAYS" in r.text
    server.stop()
    assert storage.list_keys("raw/") == []
    print(f"\nRELIABILITY FIGURES events-limits: 413 after {waited * 1000:.0f} ms with 64 KiB of a declared "
          f"5,000,000-byte body sent; year-0001 ts refused with 422 (field ts)")


def test_real_server_needs_the_events_token_and_will_not_start_without_one(api, storage):
    """Fault: the API process is started with no SHOPRANK_SERVE_EVENTS_TOKEN; then, started with
    one, it gets /events without a token, with a wrong one, and /metrics without one.
    Expected: the first start exits non-zero, its log naming the variable, before it listens;
    then 401 with ``WWW-Authenticate: Bearer`` for each refused
    call, nothing stored from them, 202 with the token."""
    bare = api(SHOPRANK_SERVE_EVENTS_TOKEN=None)
    with pytest.raises(AssertionError, match="the API exited"):
        bare.start()
    assert "SHOPRANK_SERVE_EVENTS_TOKEN is not set" in bare.log()
    bare.proc.wait(timeout=30)
    assert bare.proc.returncode != 0

    server = api()
    server.start()
    ts = dt.datetime.now(dt.timezone.utc).isoformat()
    body = {"events": [_event("auth-00001-00", ts)]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.post(server.url + "/events", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (headers, r.text)
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 401
    assert httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).status_code == 200
    assert httpx.post(server.url + "/events", json=body, headers=AUTH, timeout=30).status_code == 202
    server.stop()
    stored = _stored(storage)
    assert dict(stored) == {"auth-00001-00": 1}
    print("\nRELIABILITY FIGURES events-auth: start without SHOPRANK_SERVE_EVENTS_TOKEN refused; 3 unauthenticated "
          "/events calls and 1 /metrics call got 401; 1 event stored (the authenticated one)")
