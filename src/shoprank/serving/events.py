"""Feedback capture: validate shopper events and append them to ``raw/feedback/dt=<day>/``.

Events follow the FEEDBACK contract (``shoprank.data.contracts``) plus the optional ``arm``.
:func:`validate_events` checks a whole batch and returns per-event errors (index + field);
a batch with any error is refused whole, so nothing of it is written.

Rules applied at ingest (documented in docs/serving.md):

* ``event_id`` may be omitted (a uuid4 hex is minted), but clients should send one: delivery
  is at-least-once (a client retries on 5xx/timeouts) and ``event_id`` is the dedupe key
  downstream (``shoprank.labels``);
* ``ts`` is ISO 8601 with a timezone (``Z`` or ``+hh:mm``), stored in UTC; omitted means
  "now"; more than 5 minutes in the future is refused, and so is an event more than
  ``max_late_days`` (``SHOPRANK_SERVE_EVENTS_MAX_LATE_DAYS``, default 7) days old (e.g. a
  ``ts`` of year 0001).  The event lands in the partition of its own UTC date, or in
  ``raw/feedback_late/`` when that day is already complete (the late-event rule below);
* ``user_id``: a 64-character lower-case hex string is taken as already pseudonymised (the
  output of :func:`shoprank.data.simulator.pseudonymise`); anything else is a raw id and is
  replaced by HMAC-SHA256 with ``SHOPRANK_USER_HASH_KEY`` before it is buffered, so raw ids
  never reach S3;
* ``model_version`` / ``arm``: when omitted they are filled from the ranking response with
  the same ``request_id`` if the server still remembers it.

:class:`EventSink` makes an accepted event durable *before* ``POST /events`` answers 202: the
batch is appended as one JSON line to a local write-ahead log (WAL) segment under
``$SHOPRANK_HOME/serving/wal/`` and fsync'd.  The events are also kept in memory and uploaded
every ``flush_seconds``, at ``flush_size`` events and on shutdown: each sealed segment becomes
one Parquet part per UTC day with a key derived from the segment's name,
``raw/feedback/dt=<day>/part-ev-<segment>.parquet`` (atomic put), and the segment file is
deleted only after all its parts are written.  A process that dies (SIGKILL, OOM, power) leaves
its segments behind; the next start replays them to the *same* keys, so a re-upload overwrites
instead of duplicating: every acknowledged event id is stored exactly once.  A live process
holds an exclusive ``flock`` on its segments, so a second process on the same home never
replays them.  When S3 is down the segments simply stay on disk (nothing is lost at shutdown).

Completeness and late events: the day's ``_SUCCESS`` marker is written only once the day has
ended plus ``grace`` (``SHOPRANK_SERVE_EVENTS_GRACE_MINUTES``, default 30) and no event of that
day is still waiting in this process.  An event whose day already has its marker (it arrived
after the grace, or another writer completed the day) is written to
``raw/feedback_late/dt=<day>/part-ev-<segment>.parquet`` instead (same contract, no marker);
:func:`merge_late_events` moves those parts into ``raw/feedback/dt=<day>/`` for a re-run of
that date.  Nothing is dropped.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
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
DEFAULT_MAX_LATE = dt.timedelta(days=7)
FEEDBACK_ROOT = "raw/feedback"
LATE_ROOT = "raw/feedback_late"  # late events of a day that is already complete (see the module doc)
PART_PREFIX = "part-ev-"  # parts written by the event sink: part-ev-<WAL segment id>.parquet
SUCCESS = "_SUCCESS"
WAL_SUFFIX = ".wal"
MAX_STRING = 2000
_REQUIRED_STRINGS = ("request_id", "session_id", "user_id", "query", "product_id")
_OPTIONAL_STRINGS = ("event_id", "model_version", "arm")
KNOWN_FIELDS = set(FEEDBACK.all_names)


class EventsRejected(ValueError):
    """A batch had invalid events; ``errors`` lists {index, field, error}."""

    def __init__(self, errors: list[dict]):
        self.errors = errors
        super().__init__(f"{len(errors)} problem(s) in the event batch; nothing was stored")


def _parse_ts(value: Any, now: dt.datetime,
              max_late: dt.timedelta | None = DEFAULT_MAX_LATE) -> tuple[dt.datetime | None, str | None]:
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
    try:
        ts = ts.astimezone(dt.timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 has no UTC time
        return None, f"{value!r} is out of range (no UTC time before year 1 or after 9999)"
    if ts > now + MAX_FUTURE_SKEW:
        return None, f"{value!r} is in the future (server time {now.isoformat(timespec='seconds')})"
    if max_late is not None and now - ts > max_late:
        days = max_late.total_seconds() / 86400
        return None, (f"{value!r} is {(now - ts).days} days old; events more than {days:g} days late are "
                      f"refused (SHOPRANK_SERVE_EVENTS_MAX_LATE_DAYS; server time "
                      f"{now.isoformat(timespec='seconds')})")
    return ts, None


def validate_events(raw: Any, *, hash_key: bytes | str, now: dt.datetime | None = None,
                    max_events: int = 1000, max_late: dt.timedelta | None = DEFAULT_MAX_LATE,
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
        ts, problem = _parse_ts(ev.get("ts"), now, max_late)
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


def _day(ts: dt.datetime) -> str:
    return ts.date().isoformat()


def day_end(day: str) -> dt.datetime:
    """The end of a UTC day (the next day's 00:00 UTC)."""
    return dt.datetime.combine(dt.date.fromisoformat(day) + dt.timedelta(days=1), dt.time(), dt.timezone.utc)


def part_key(day: str, segment: str, late: bool = False) -> str:
    return f"{LATE_ROOT if late else FEEDBACK_ROOT}/dt={day}/{PART_PREFIX}{segment}.parquet"


def _to_wal(row: dict) -> dict:
    return {**row, "ts": row["ts"].isoformat()}


def _from_wal(row: dict) -> dict:
    return {**row, "ts": dt.datetime.fromisoformat(row["ts"])}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class _Segment:
    """One WAL file and the events it holds (also kept in memory until they are in S3)."""

    id: str
    path: Path | None = None
    fd: int | None = None  # open, append-only, holding an exclusive flock while this process owns it
    rows: list[dict] = field(default_factory=list)
    days: set[str] = field(default_factory=set)
    replayed: bool = False  # found on disk at start: some parts may already be in S3
    dest: dict[str, str] = field(default_factory=dict)  # day -> key chosen for this segment's events

    def extend(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        self.days.update(_day(r["ts"]) for r in rows)

    def release(self, delete: bool) -> None:
        if delete and self.path is not None:
            self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # also drops the flock
            self.fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass
class EventSink:
    """Durable buffer of validated events (WAL on local disk), uploaded to S3 per UTC day.

    ``wal_dir=None`` keeps events in memory only (nothing survives a crash): for tests and tools.
    """

    storage: Any
    flush_size: int = 500
    max_buffered: int = 100_000
    wal_dir: Path | None = None
    spool_dir: Path | None = None  # legacy: spool files of older versions are uploaded at start
    grace: dt.timedelta = dt.timedelta(minutes=30)
    max_late: dt.timedelta = DEFAULT_MAX_LATE
    fsync: bool = True
    clock: Callable[[], dt.datetime] = _utcnow
    on_flush: Callable[[int], None] | None = None
    on_error: Callable[[Exception], None] | None = None
    _active: _Segment | None = None
    _sealed: list[_Segment] = field(default_factory=list)
    _pending: int = 0
    _open_days: set[str] = field(default_factory=set)  # days with our parts in raw/feedback/, no marker yet
    _complete: set[str] = field(default_factory=set)  # days known to have their marker
    _need_scan: bool = False  # the start-up scan for unmarked days has not succeeded yet
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _flush_lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)

    @property
    def buffered(self) -> int:
        """Events accepted but not yet in S3 (in the WAL and in memory)."""
        return self._pending

    def room(self) -> int:
        return self.max_buffered - self.buffered

    # ---- accepting ------------------------------------------------------------------------------
    def _new_segment(self) -> _Segment:
        seg_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        if self.wal_dir is None:
            return _Segment(seg_id)
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        path = self.wal_dir / f"{seg_id}{WAL_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if self.fsync:  # make the new file's directory entry durable too
            dfd = os.open(self.wal_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return _Segment(seg_id, path, fd)

    def add(self, rows: list[dict]) -> None:
        """Append a validated batch; when this returns, the batch survives a crash of this process.

        Raises ``OSError`` when the WAL cannot be written (disk full...): nothing was accepted.
        """
        if not rows:
            return
        line = (json.dumps({"rows": [_to_wal(r) for r in rows]}, separators=(",", ":")) + "\n").encode()
        with self._lock:
            seg = self._active
            if seg is None:
                seg = self._active = self._new_segment()
            if seg.fd is not None:
                pos = os.lseek(seg.fd, 0, os.SEEK_END)
                try:
                    _write_all(seg.fd, line)
                    if self.fsync:
                        os.fsync(seg.fd)
                except OSError:
                    try:  # leave no torn line behind for the next batch to follow
                        os.ftruncate(seg.fd, pos)
                    except OSError:
                        pass
                    raise
            seg.extend(rows)
            self._pending += len(rows)
            if len(seg.rows) >= self.flush_size:
                self._wake.set()

    # ---- uploading ------------------------------------------------------------------------------
    def _is_complete(self, day: str) -> bool:
        if day in self._complete:
            return True
        if self.storage.exists(f"{FEEDBACK_ROOT}/dt={day}/{SUCCESS}"):
            self._complete.add(day)
            self._open_days.discard(day)
            return True
        return False

    def _dest(self, seg: _Segment, day: str) -> str:
        """Where this segment's events of ``day`` go; the same answer on a replay."""
        if day in seg.dest:
            return seg.dest[day]
        main, late = part_key(day, seg.id), part_key(day, seg.id, late=True)
        key = None
        if seg.replayed:  # an earlier process may have written some parts: overwrite them in place
            key = main if self.storage.exists(main) else (late if self.storage.exists(late) else None)
        if key is None:
            key = late if self._is_complete(day) else main
        seg.dest[day] = key
        return key

    def _upload(self, seg: _Segment) -> None:
        df = to_frame(seg.rows)
        for day, part in df.groupby(df["ts"].dt.strftime("%Y-%m-%d"), sort=True):
            key = self._dest(seg, day)
            self.storage.write_parquet(part.reset_index(drop=True), key)
            if key.startswith(LATE_ROOT + "/"):
                log.warning("%d feedback events of dt=%s arrived after the day was complete: written to %s "
                            "(see merge_late_events)", len(part), day, key)
            else:
                if day not in self._complete:
                    self._open_days.add(day)
                log.info("wrote %d feedback events to %s", len(part), key)

    def _upload_sealed(self) -> tuple[int, bool]:
        written = 0
        while self._sealed:
            seg = self._sealed[0]
            try:
                self._upload(seg)
            except Exception as exc:  # keep the segment (disk + memory): S3 may be back next time
                log.warning("could not upload %d feedback events (kept in the write-ahead log): %s",
                            len(seg.rows), exc)
                if self.on_error:
                    self.on_error(exc)
                return written, False
            with self._lock:
                self._sealed.pop(0)
                self._pending -= len(seg.rows)
            seg.release(delete=True)
            written += len(seg.rows)
        return written, True

    def flush(self) -> int:
        """Upload everything accepted so far, then write the markers that are due.

        Returns the number of events written (0 on failure: they stay in the WAL)."""
        with self._flush_lock:
            written, ok = self._upload_sealed()  # earlier failures and replayed segments first
            if ok:
                with self._lock:
                    if self._active is not None and self._active.rows:
                        self._sealed.append(self._active)
                        self._active = None
                more, ok = self._upload_sealed()
                written += more
            if ok:
                try:
                    if self._need_scan:
                        self._scan_open_days()
                    self._mark_due()
                except Exception as exc:
                    log.warning("could not check or write feedback _SUCCESS markers (retried at the next flush): %s", exc)
                    if self.on_error:
                        self.on_error(exc)
            if written and self.on_flush:
                self.on_flush(written)
            return written

    def _mark_due(self) -> list[str]:
        """Write ``_SUCCESS`` for our days that ended more than ``grace`` ago and have nothing pending."""
        now = self.clock()
        with self._lock:
            pending = set(self._active.days) if self._active else set()
            for seg in self._sealed:
                pending |= seg.days
        marked = []
        for day in sorted(self._open_days):
            if day in pending or now < day_end(day) + self.grace:
                continue
            self.storage.put_bytes(f"{FEEDBACK_ROOT}/dt={day}/{SUCCESS}", b"")
            self._open_days.discard(day)
            self._complete.add(day)
            marked.append(day)
            log.info("%s/dt=%s is complete (the day ended %s ago, grace %s): _SUCCESS written", FEEDBACK_ROOT,
                     day, now - day_end(day), self.grace)
        return marked

    def run(self, stop: threading.Event, interval: float) -> None:
        """Background loop: flush every ``interval`` seconds or when ``flush_size`` events wait."""
        while not stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._pending or self._open_days or self._need_scan:
                self.flush()

    def close(self) -> int:
        """Final flush on shutdown; what S3 did not take stays in the WAL for the next start."""
        written = self.flush()
        with self._lock:
            left = self._pending
            segments = self._sealed + ([self._active] if self._active else [])
            self._active = None
            self._sealed = []
        for seg in segments:
            seg.release(delete=False)
        if left and self.wal_dir is not None:
            log.error("S3 unavailable at shutdown: %d feedback events stay in %s and are uploaded at the next "
                      "start", left, self.wal_dir)
        elif left:
            log.error("S3 unavailable at shutdown and no write-ahead log: %d feedback events LOST", left)
        return written

    # ---- start-up recovery ----------------------------------------------------------------------
    def recover(self) -> int:
        """At start: take over WAL segments a dead process left, find our days still without a
        marker, then upload (same keys as the first attempt) and mark what is due.

        Returns the number of events found in the WAL and in legacy spool files."""
        found = self.recover_spool()
        if self.wal_dir is not None and self.wal_dir.is_dir():
            for path in sorted(self.wal_dir.glob(f"*{WAL_SUFFIX}")):
                seg = self._take_over(path)
                if seg is not None:
                    found += len(seg.rows)
        self._need_scan = True  # done by the flush below, or retried by the flusher while S3 is down
        self.flush()
        return found

    def _take_over(self, path: Path) -> _Segment | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process owns it
            os.close(fd)
            return None
        with open(path, "rb") as fh:
            data = fh.read()
        seg = _Segment(path.name[: -len(WAL_SUFFIX)], path, fd, replayed=True)
        bad = 0
        for n, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                seg.extend([_from_wal(r) for r in json.loads(line)["rows"]])
            except (ValueError, KeyError, TypeError):
                # only a batch whose write was cut off (never acknowledged) can be torn
                bad += 1
                log.warning("%s: line %d is not a complete batch (cut off by the crash, never acknowledged); "
                            "skipped", path, n + 1)
        if not seg.rows:
            seg.release(delete=True)
            return None
        log.warning("write-ahead log %s: %d feedback events left by an earlier process; uploading them", path.name,
                    len(seg.rows))
        with self._lock:
            self._sealed.append(seg)
            self._pending += len(seg.rows)
        return seg

    def _scan_open_days(self) -> None:
        """Days of the last ``max_late`` (+1) with our parts but no marker (a crash before the marker)."""
        today = self.clock().date()
        for back in range(self.max_late.days + 2):
            day = (today - dt.timedelta(days=back)).isoformat()
            keys = self.storage.list_keys(f"{FEEDBACK_ROOT}/dt={day}/")
            names = {k.rsplit("/", 1)[-1] for k in keys}
            if SUCCESS in names:
                self._complete.add(day)
            elif any(n.startswith(PART_PREFIX) for n in names):
                self._open_days.add(day)
        self._need_scan = False

    def recover_spool(self) -> int:
        """Upload spool files written at shutdown by versions before the WAL (deleted once written)."""
        if self.spool_dir is None or not self.spool_dir.is_dir():
            return 0
        n = 0
        for path in sorted(self.spool_dir.glob("spool-*.parquet")):
            df = pd.read_parquet(path)
            rows = df.to_dict("records")
            for r in rows:
                r["ts"] = pd.Timestamp(r["ts"]).to_pydatetime()
            seg = _Segment(path.stem, replayed=True)
            seg.extend(rows)
            try:
                self._upload(seg)
            except Exception as exc:
                log.warning("spooled events in %s not uploaded yet (%s); retried at next start", path, exc)
                break
            path.unlink()
            n += len(df)
        return n


def merge_late_events(storage: Any, day: str) -> list[str]:
    """Move late parts of ``day`` (``raw/feedback_late/dt=<day>/``) into ``raw/feedback/dt=<day>/``,
    so that a run or re-run of that date validates them with the rest (the daily update does
    it before validating).  Returns the keys moved."""
    moved = []
    for key in storage.list_keys(f"{LATE_ROOT}/dt={day}/"):
        name = key.rsplit("/", 1)[-1]
        if not name.endswith(".parquet"):
            continue
        dst = f"{FEEDBACK_ROOT}/dt={day}/{name}"
        storage.copy(key, dst)
        storage.delete_prefix(key)
        moved.append(dst)
    if moved:
        log.info("merged %d late part(s) of %s from %s/ into %s/: %s", len(moved), day, LATE_ROOT, FEEDBACK_ROOT,
                 ", ".join(moved))
    return moved


def late_event_days(storage: Any, before: str) -> list[str]:
    """Days before ``before`` with late events waiting in ``raw/feedback_late/`` (their own
    daily run already happened): ``shoprank events merge-late --date D``, then re-run D."""
    from shoprank.storage import scan_partition_keys

    prefix = LATE_ROOT + "/"
    scan = scan_partition_keys(prefix, storage.list_keys(prefix))
    return [d for d in sorted(set(scan.incomplete) | set(scan.complete)) if d < before]
