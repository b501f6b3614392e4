"""Feedback capture: validate shopper events and append them to ``raw/feedback/dt=<day>/``.

Events follow the FEEDBACK contract (``shoprank.data.contracts``) plus the optional ``arm``.
:func:`validate_events` checks a whole batch and returns per-event errors (index + field);
a batch with any error is refused whole, so nothing of it is written.

Rules applied at ingest (documented in docs/serving.md):

* ``event_id`` may be omitted (a uuid4 hex is minted), but clients should send one: delivery
  is at-least-once (a client retries on 5xx/timeouts) and ``event_id`` is the dedupe key
  downstream (``shoprank.labels``);
* ``ts`` is ISO 8601 with a timezone (``Z`` or ``+hh:mm``), stored in UTC; omitted means
  "now"; more than 5 minutes in the future is refused.  The event lands in the partition of
  its own UTC date;
* ``user_id``: a 64-character lower-case hex string is taken as already pseudonymised (the
  output of :func:`shoprank.data.simulator.pseudonymise`); anything else is a raw id and is
  replaced by HMAC-SHA256 with ``SHOPRANK_USER_HASH_KEY`` before it is buffered, so raw ids
  never reach S3;
* ``model_version`` / ``arm``: when omitted they are filled from the ranking response with
  the same ``request_id`` if the server still remembers it.

:class:`EventSink` buffers accepted events and writes one Parquet part per day, named
``part-<uuid>.parquet`` through ``Storage.write_parquet`` (atomic put), plus the
partition's ``_SUCCESS`` marker, when the buffer reaches ``flush_size`` events, every
``flush_seconds``, and on shutdown.  A failed write keeps the events in the buffer; on
shutdown they are spooled to ``$SHOPRANK_HOME/serving/spool/`` and uploaded at next start.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from shoprank.data.contracts import EVENT_TYPES, FEEDBACK
from shoprank.data.simulator import pseudonymise

log = logging.getLogger(__name__)

HASHED_USER_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_FUTURE_SKEW = dt.timedelta(minutes=5)
MAX_STRING = 2000
_REQUIRED_STRINGS = ("request_id", "session_id", "user_id", "query", "product_id")
_OPTIONAL_STRINGS = ("event_id", "model_version", "arm")
KNOWN_FIELDS = set(FEEDBACK.all_names)


class EventsRejected(ValueError):
    """A batch had invalid events; ``errors`` lists {index, field, error}."""

    def __init__(self, errors: list[dict]):
        self.errors = errors
        super().__init__(f"{len(errors)} problem(s) in the event batch; nothing was stored")


def _parse_ts(value: Any, now: dt.datetime) -> tuple[dt.datetime | None, str | None]:
    if value is None:
        return now, None
    if not isinstance(value, str) or not value.strip():
        return None, "must be an ISO 8601 timestamp string with a timezone, e.g. 2026-11-22T10:15:00Z"
    try:
        ts = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None, f"{value!r} is not an ISO 8601 timestamp (e.g. 2026-11-22T10:15:00Z)"
    if ts.tzinfo is None:
        return None, f"{value!r} has no timezone: add 'Z' for UTC or an offset like +01:00"
    ts = ts.astimezone(dt.timezone.utc)
    if ts > now + MAX_FUTURE_SKEW:
        return None, f"{value!r} is in the future (server time {now.isoformat(timespec='seconds')})"
    return ts, None


def validate_events(raw: Any, *, hash_key: bytes | str, now: dt.datetime | None = None,
                    max_events: int = 1000,
                    lookup: Callable[[str], tuple[str | None, str | None] | None] | None = None) -> list[dict]:
    """Check a batch against the FEEDBACK contract; return contract rows or raise EventsRejected."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if not isinstance(raw, list):
        raise EventsRejected([{"index": None, "field": "events", "error": "must be a list of event objects"}])
    if not raw:
        raise EventsRejected([{"index": None, "field": "events", "error": "is empty: send at least one event"}])
    if len(raw) > max_events:
        raise EventsRejected([{"index": None, "field": "events",
                               "error": f"{len(raw)} events in one request; the limit is {max_events}"}])
    errors: list[dict] = []
    rows: list[dict] = []

    def err(i: int, f: str | None, msg: str) -> None:
        errors.append({"index": i, "field": f, "error": msg})

    for i, ev in enumerate(raw):
        if not isinstance(ev, dict):
            err(i, None, f"must be a JSON object, got {type(ev).__name__}")
            continue
        unknown = sorted(set(ev) - KNOWN_FIELDS)
        if unknown:
            err(i, unknown[0], f"unknown field(s) {unknown}; allowed: {sorted(KNOWN_FIELDS)}")
        row: dict[str, Any] = {}
        for name in _REQUIRED_STRINGS + _OPTIONAL_STRINGS:
            value = ev.get(name)
            if value is None:
                if name in _REQUIRED_STRINGS:
                    err(i, name, "is required")
                continue
            if isinstance(value, int) and not isinstance(value, bool) and name not in ("query",):
                value = str(value)  # numeric ids are common; store them as strings
            if not isinstance(value, str):
                err(i, name, f"must be a string, got {type(value).__name__}")
                continue
            if not value.strip():
                err(i, name, "must not be empty")
                continue
            if len(value) > MAX_STRING:
                err(i, name, f"is {len(value)} characters long; the limit is {MAX_STRING}")
                continue
            row[name] = value
        etype = ev.get("event_type")
        if etype not in EVENT_TYPES:
            err(i, "event_type", f"{etype!r} is not one of {list(EVENT_TYPES)}")
        row["event_type"] = etype
        pos = ev.get("position")
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 1:
            err(i, "position", f"must be a 1-based integer rank, got {pos!r}")
        row["position"] = pos
        ts, problem = _parse_ts(ev.get("ts"), now)
        if problem:
            err(i, "ts", problem)
        row["ts"] = ts
        if "arm" in row and row["arm"] not in ("champion", "challenger"):
            err(i, "arm", f"{row['arm']!r} is not 'champion' or 'challenger'")
        rows.append(row)
    if errors:
        raise EventsRejected(errors)
    for row in rows:
        row.setdefault("event_id", uuid.uuid4().hex)
        if not HASHED_USER_ID.match(row["user_id"]):
            row["user_id"] = pseudonymise(row["user_id"], hash_key)
        if lookup is not None and ("model_version" not in row or "arm" not in row):
            known = lookup(row["request_id"])
            if known:
                row.setdefault("model_version", known[0])
                if known[1]:
                    row.setdefault("arm", known[1])
        row.setdefault("model_version", None)
        row.setdefault("arm", None)
    return rows


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Contract-typed FEEDBACK frame (with the optional ``arm`` column)."""
    df = pd.DataFrame(rows, columns=FEEDBACK.all_names)
    df["ts"] = pd.to_datetime(df["ts"], utc=True)
    return FEEDBACK.conform(df)


@dataclass
class EventSink:
    """Thread-safe buffer of validated events, flushed to S3 per UTC day."""

    storage: Any
    flush_size: int = 500
    max_buffered: int = 100_000
    spool_dir: Path | None = None
    on_flush: Callable[[int], None] | None = None
    on_error: Callable[[Exception], None] | None = None
    _buf: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _flush_lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)

    _inflight: int = 0

    @property
    def buffered(self) -> int:
        """Events not yet in S3 (waiting, or being written right now)."""
        return len(self._buf) + self._inflight

    def room(self) -> int:
        return self.max_buffered - self.buffered

    def add(self, rows: list[dict]) -> None:
        with self._lock:
            self._buf.extend(rows)
            if len(self._buf) >= self.flush_size:
                self._wake.set()

    def flush(self) -> int:
        """Write everything buffered; returns the number of events written (0 on failure)."""
        with self._flush_lock:
            with self._lock:
                batch, self._buf = self._buf, []
                self._inflight = len(batch)
            if not batch:
                return 0
            try:
                self._write(batch)
                self._inflight = 0
            except Exception as exc:  # keep the events: S3 may be back at the next flush
                with self._lock:
                    self._buf[:0] = batch
                    self._inflight = 0
                log.warning("could not flush %d feedback events (kept in the buffer): %s", len(batch), exc)
                if self.on_error:
                    self.on_error(exc)
                return 0
            if self.on_flush:
                self.on_flush(len(batch))
            return len(batch)

    def _write(self, batch: list[dict]) -> list[str]:
        df = to_frame(batch)
        keys = []
        for day, part in df.groupby(df["ts"].dt.strftime("%Y-%m-%d"), sort=True):
            prefix = f"raw/feedback/dt={day}/"
            key = f"{prefix}part-{uuid.uuid4().hex}.parquet"
            self.storage.write_parquet(part.reset_index(drop=True), key)
            self.storage.put_bytes(prefix + "_SUCCESS", b"")
            keys.append(key)
            log.info("wrote %d feedback events to %s", len(part), key)
        return keys

    def run(self, stop: threading.Event, interval: float) -> None:
        """Background loop: flush every ``interval`` seconds or when the buffer is full."""
        while not stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._buf:
                self.flush()

    def close(self) -> int:
        """Final flush on shutdown; what cannot be written is spooled to local disk."""
        written = self.flush()
        if self._buf and self.spool_dir is not None:
            with self._lock:
                batch, self._buf = self._buf, []
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            path = self.spool_dir / f"spool-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
            to_frame(batch).to_parquet(path, index=False)
            log.error("S3 unavailable at shutdown: %d feedback events spooled to %s (uploaded at next start)",
                      len(batch), path)
        elif self._buf:
            log.error("S3 unavailable at shutdown and no spool directory: %d feedback events LOST", len(self._buf))
        return written

    def recover_spool(self) -> int:
        """Upload events spooled by an earlier shutdown; each file is deleted once written."""
        if self.spool_dir is None or not self.spool_dir.is_dir():
            return 0
        n = 0
        for path in sorted(self.spool_dir.glob("spool-*.parquet")):
            df = pd.read_parquet(path)
            try:
                self._write(df.to_dict("records"))
            except Exception as exc:
                log.warning("spooled events in %s not uploaded yet (%s); retried at next start", path, exc)
                break
            path.unlink()
            n += len(df)
        return n
