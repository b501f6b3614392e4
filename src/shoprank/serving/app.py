"""The ranking API: ``POST /rank`` scores candidates with ``@champion``; ``POST /events`` logs feedback.

``create_app(settings)`` builds a FastAPI app that

* loads ``@champion`` (and ``@challenger`` in ``ab``/``shadow`` mode) from the MLflow registry
  through a *loader* (default: ``shoprank.serving.scorers.load_version_scorer``: ONNX int8,
  falling back to the fp32 ONNX export, then PyTorch), polls the aliases every
  ``poll_seconds`` in a background thread and swaps a new version in atomically once it has
  loaded (the old one serves until then, and keeps serving if the new one fails to load);
* normalises the query (``contracts.normalize_query``: NFKC, lower case, whitespace
  collapsed, as in training) before the length check, scoring and the cache key;
* scores (query, text) pairs in batches of ``batch_size``; caches recent results in a bounded
  LRU keyed by (model version, backend, query, candidate ids and texts);
* resolves candidate texts from the latest validated catalogue partition when only ids are
  given; refuses bad input with 422 and a message naming the field / ids;
* records Prometheus metrics (``GET /metrics``) and feedback events (``shoprank.serving.events``:
  each accepted batch is fsync'd to a local write-ahead log before the 202, uploaded to S3
  later, and replayed at the next start after a crash);
* refuses request bodies over ``max_body_bytes`` with 413 before reading them (``BodyLimit``).

Settings are :class:`ServeConfig` (``SHOPRANK_SERVE_*``, table in docs/serving.md); secrets
(bearer tokens, the user-id hash key) are :mod:`shoprank.serving.auth`: ``/events`` and
``/metrics`` always need a token, ``/rank`` when ``SHOPRANK_SERVE_RANK_TOKEN`` is set.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from shoprank.config import ConfigError, Settings
from shoprank.data.contracts import normalize_query
from shoprank.serving.ab import CHALLENGER, CHAMPION, MODES, choose_arm
from shoprank.serving.auth import (ADMIN_TOKEN_ENV, EVENTS_TOKEN_ENV, RANK_TOKEN_ENV, ServeAuth, bearer,
                                   user_hash_key)
from shoprank.serving.events import EventSink, EventsRejected, validate_events

log = logging.getLogger(__name__)

Loader = Callable[..., Any]  # (settings, version, backend=..., workdir=...) -> Scorer
AliasResolver = Callable[[str], "str | None"]  # alias -> version number, None when unset


# ---- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    """Ranking-API settings; each field reads ``SHOPRANK_SERVE_<FIELD>`` (see docs/serving.md)."""

    mode: str = "champion"  # champion | ab | shadow
    challenger_share: float = 0.1  # ab: share of sessions served by @challenger
    backend: str = "onnx-int8"  # onnx-int8 | onnx | torch (int8 falls back to onnx, then torch)
    poll_seconds: float = 30.0  # registry alias polling interval
    batch_size: int = 64  # pairs per scorer call
    cache_size: int = 1024  # LRU entries (0 disables the cache)
    max_candidates: int = 200
    max_query_chars: int = 256
    max_text_chars: int = 4000
    max_events: int = 1000  # events per POST /events
    events_flush_size: int = 500  # flush the event buffer at this many events ...
    events_flush_seconds: float = 10.0  # ... or this often
    events_max_buffered: int = 100_000  # beyond this (S3 down) POST /events answers 503
    events_grace_minutes: float = 30.0  # a day's _SUCCESS marker: only after the day ended + this
    events_max_late_days: int = 7  # events older than this are refused (422 naming ``ts``)
    max_body_bytes: int = 1_048_576  # larger request bodies: 413, not read
    catalog_refresh_seconds: float = 300.0  # re-check for a newer validated catalogue partition
    ab_salt: str = "shoprank-ab"  # change it to re-draw the A/B split

    @staticmethod
    def env_name(name: str) -> str:
        return f"SHOPRANK_SERVE_{name.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServeConfig":
        """Defaults overridden by the settings tree's ``serving`` group (``SHOPRANK_SERVE_*``)."""
        return cls(**Settings.from_env(environ).serving.serve_overrides()).checked()

    def checked(self) -> "ServeConfig":
        if self.mode not in MODES:
            raise ConfigError(f"SHOPRANK_SERVE_MODE={self.mode!r}: use one of {list(MODES)}")
        if not 0.0 <= self.challenger_share <= 1.0:
            raise ConfigError(f"SHOPRANK_SERVE_CHALLENGER_SHARE={self.challenger_share}: must be within 0..1")
        for name in ("poll_seconds", "batch_size", "max_candidates", "max_query_chars", "max_text_chars",
                     "max_events", "events_flush_size", "events_flush_seconds", "events_max_buffered",
                     "events_max_late_days", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{self.env_name(name)}={getattr(self, name)}: must be > 0")
        if self.events_grace_minutes < 0:
            raise ConfigError(f"{self.env_name('events_grace_minutes')}={self.events_grace_minutes}: must be >= 0")
        if self.events_max_late_days > 3650:
            raise ConfigError(f"{self.env_name('events_max_late_days')}={self.events_max_late_days}: "
                              "must be <= 3650")
        return self


# ---- request / response shapes -------------------------------------------------------------------
class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    product_id: str = Field(min_length=1, max_length=200)
    text: str | None = Field(None, description="product text; omitted: taken from the validated catalogue")


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    candidates: list[Candidate] | None = Field(None, description="products to rank (ids with optional text)")
    product_ids: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, description="shorthand: ids only, texts from the catalogue")
    session_id: str | None = Field(None, max_length=200, description="stable A/B arm per session")
    top_k: int | None = Field(None, ge=1, description="return only the best top_k")


class RankedItem(BaseModel):
    product_id: str
    score: float
    rank: int


class RankResponse(BaseModel):
    request_id: str
    model_version: str
    arm: str
    backend: str
    cached: bool
    results: list[RankedItem]


class InputError(Exception):
    """A bad request: answered with ``status`` and ``{"detail": {"field", "error", ...}}``."""

    def __init__(self, field: str, error: str, status: int = 422, **extra: Any):
        super().__init__(error)
        self.status, self.body = status, {"field": field, "error": error, **extra}


# ---- metrics -------------------------------------------------------------------------------------
class ServeMetrics:
    """One Prometheus registry per app (several apps in one process, e.g. tests, do not clash)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.latency = Histogram("shoprank_serve_request_seconds", "Request latency by route", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.requests = Counter("shoprank_serve_requests", "Requests by route and HTTP status", ["route", "status"],
                                registry=r)
        self.errors = Counter("shoprank_serve_errors", "4xx/5xx answers by route and status", ["route", "status"],
                              registry=r)
        self.ranked = Counter("shoprank_serve_rank_requests", "Rank requests served, by arm", ["arm"], registry=r)
        self.pairs = Counter("shoprank_serve_pairs_scored", "Pairs scored by the model, by arm", ["arm"], registry=r)
        self.cache_hits = Counter("shoprank_serve_cache_hits", "Rank results served from the cache", registry=r)
        self.cache_misses = Counter("shoprank_serve_cache_misses", "Rank results computed", registry=r)
        self.model_version = Gauge("shoprank_serve_model_version", "Loaded model version per alias", ["alias"],
                                   registry=r)
        self.model_info = Gauge("shoprank_serve_model_info", "1 for the loaded (alias, version, backend)",
                                ["alias", "version", "backend"], registry=r)
        self.reloads = Counter("shoprank_serve_model_reloads", "Model (re)loads by alias and outcome",
                               ["alias", "outcome"], registry=r)
        self.events_received = Counter("shoprank_serve_events_received", "Accepted events by type", ["event_type"],
                                       registry=r)
        self.events_rejected = Counter("shoprank_serve_events_rejected_batches", "Refused event batches",
                                       registry=r)
        self.events_buffered = Gauge("shoprank_serve_events_buffered", "Events waiting for the next flush",
                                     registry=r)
        self.events_flushed = Counter("shoprank_serve_events_flushed", "Events written to S3", registry=r)
        self.flush_errors = Counter("shoprank_serve_event_flush_errors", "Failed event flushes", registry=r)
        self.shadow_corr = Histogram("shoprank_serve_shadow_rank_correlation",
                                     "Spearman correlation of challenger vs champion scores (shadow mode)",
                                     buckets=(-0.5, 0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0), registry=r)
        self.shadow_top1 = Counter("shoprank_serve_shadow_top1", "Shadow requests by top-1 agreement", ["agree"],
                                   registry=r)
        self.shadow_skipped = Counter("shoprank_serve_shadow_skipped", "Shadow scorings skipped (backlog)",
                                      registry=r)


# ---- models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    alias: str
    version: str
    scorer: Any
    backend: str
    loaded_at: float


def registry_resolver(settings: Settings) -> AliasResolver:
    """alias -> version via the MLflow registry; None when the alias (or model) does not exist."""
    from mlflow.exceptions import MlflowException

    from shoprank.registry import Registry

    registry = Registry(settings)

    def resolve(alias: str) -> str | None:
        try:
            return registry.client.get_model_version_by_alias(registry.name, alias).version
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    return resolve


def default_loader(settings: Settings, version: str, backend: str = "onnx-int8", workdir: str | None = None):
    from shoprank.serving.scorers import load_version_scorer

    return load_version_scorer(settings, version, backend=backend, workdir=workdir)


class ModelManager:
    """Holds the loaded model per alias; :meth:`refresh` follows the registry aliases."""

    def __init__(self, settings: Settings, config: ServeConfig, loader: Loader, resolve: AliasResolver,
                 metrics: ServeMetrics, workdir: Path):
        self.settings, self.config, self.loader, self.resolve = settings, config, loader, resolve
        self.metrics, self.workdir = metrics, workdir
        self.models: dict[str, LoadedModel] = {}  # replaced whole (copy-on-write): readers need no lock
        self._refresh_lock = threading.Lock()
        self.last_error: str | None = None

    def aliases(self) -> tuple[str, ...]:
        return (CHAMPION,) if self.config.mode == "champion" else (CHAMPION, CHALLENGER)

    def get(self, alias: str) -> LoadedModel | None:
        return self.models.get(alias)

    def refresh(self) -> dict[str, str | None]:
        """Load the versions the aliases point at now; returns alias -> served version."""
        with self._refresh_lock:
            for alias in self.aliases():
                try:
                    self._refresh_alias(alias)
                except Exception as exc:  # keep serving what is loaded
                    self.last_error = f"{alias}: {exc}"
                    self.metrics.reloads.labels(alias, "error").inc()
                    log.warning("could not refresh @%s (still serving %s): %s", alias,
                                getattr(self.models.get(alias), "version", "nothing"), exc)
            return {a: m.version for a, m in self.models.items()}

    def _refresh_alias(self, alias: str) -> None:
        version = self.resolve(alias)
        current = self.models.get(alias)
        if version is None:
            if current is not None and alias == CHALLENGER:
                log.info("@challenger no longer set: all traffic goes to the champion")
                self._swap(alias, None)
            elif current is not None:
                log.warning("@champion is not set in the registry any more; still serving version %s",
                            current.version)
            return
        version = str(version)
        if current is not None and current.version == version:
            return
        same = next((m for m in self.models.values() if m.version == version), None)
        t0 = time.monotonic()
        if same is not None:
            scorer = same.scorer
        else:
            log.info("loading version %s for @%s (backend %s)...", version, alias, self.config.backend)
            vdir = self.workdir / f"v{version}"
            vdir.mkdir(parents=True, exist_ok=True)
            scorer = self.loader(self.settings, version, backend=self.config.backend, workdir=str(vdir))
        backend = str(getattr(scorer, "backend", self.config.backend))
        self._swap(alias, LoadedModel(alias, version, scorer, backend, time.time()))
        self.metrics.reloads.labels(alias, "loaded").inc()
        log.info("@%s now serves version %s (%s, loaded in %.1fs; was %s)", alias, version, backend,
                 time.monotonic() - t0, current.version if current else "nothing")

    def _swap(self, alias: str, model: LoadedModel | None) -> None:
        old = self.models.get(alias)
        models = dict(self.models)
        if model is None:
            models.pop(alias, None)
        else:
            models[alias] = model
        self.models = models  # one reference assignment: atomic for readers
        if old is not None:
            self.metrics.model_info.remove(alias, old.version, old.backend)
        if model is None:
            self.metrics.model_version.remove(alias)
        else:
            self.metrics.model_info.labels(alias, model.version, model.backend).set(1)
            self.metrics.model_version.labels(alias).set(float(model.version) if model.version.isdigit() else -1)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.config.poll_seconds):
            self.refresh()


# ---- catalogue texts -----------------------------------------------------------------------------
class CatalogTexts:
    """product_id -> product text from the latest validated catalogue partition (cached)."""

    def __init__(self, storage: Any, refresh_seconds: float, template: str | None = None):
        self.storage, self.refresh_seconds = storage, refresh_seconds
        self.template = template  # Settings.product_text_template (None: the default template)
        self.day: str | None = None
        self.texts: dict[str, str] = {}
        self._checked = 0.0
        self._lock = threading.Lock()

    def _maybe_reload(self) -> None:
        from shoprank.data.contracts import product_text

        with self._lock:
            if self._checked and time.monotonic() - self._checked < self.refresh_seconds:
                return
            self._checked = time.monotonic()
            day = self.storage.latest_partition("validated", "catalog")
            if day is None or day == self.day:
                return
            df = self.storage.read_partition("validated", "catalog", day)
            self.texts = dict(zip(df["product_id"].astype(str), product_text(df, self.template).astype(str)))
            self.day = day
            log.info("catalogue texts from validated/catalog/dt=%s: %d products", day, len(self.texts))

    def lookup(self, ids: list[str]) -> tuple[dict[str, str], list[str]]:
        if self.storage is None:
            return {}, list(ids)
        self._maybe_reload()
        texts = self.texts
        found = {i: texts[i] for i in ids if i in texts}
        return found, [i for i in ids if i not in texts]


# ---- helpers -------------------------------------------------------------------------------------
class LRU:
    """A small thread-safe LRU map."""

    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key, value) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


def score_pairs(scorer: Any, query: str, texts: list[str], batch_size: int) -> np.ndarray:
    """Scores of (query, text) pairs, ``batch_size`` pairs per scorer call."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        scores = np.asarray(scorer.score([query] * len(chunk), chunk), dtype=np.float64).reshape(-1)
        if len(scores) != len(chunk):
            raise RuntimeError(f"scorer returned {len(scores)} scores for {len(chunk)} pairs")
        out.append(scores)
    return np.concatenate(out) if out else np.zeros(0)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0
    return float(np.corrcoef(ra, rb)[0, 1])


# ---- the service ---------------------------------------------------------------------------------
class RankingService:
    """Everything the routes use; started and stopped by the app's lifespan."""

    def __init__(self, settings: Settings, config: ServeConfig, loader: Loader, resolve: AliasResolver,
                 storage: Any, hash_key: bytes | str, metrics: ServeMetrics):
        self.settings, self.config, self.storage, self.metrics = settings, config, storage, metrics
        self.hash_key = hash_key
        self.workdir = Path(tempfile.mkdtemp(prefix="shoprank-serve-"))
        self.models = ModelManager(settings, config, loader, resolve, metrics, self.workdir)
        self.catalog = CatalogTexts(storage, config.catalog_refresh_seconds,
                                    getattr(settings, "product_text_template", None))
        self.cache = LRU(config.cache_size)
        self.served = LRU(100_000)  # request_id -> (model_version, arm), to complete events
        self.sink = EventSink(storage, flush_size=config.events_flush_size,
                              max_buffered=config.events_max_buffered,
                              wal_dir=settings.home / "serving" / "wal",
                              spool_dir=settings.home / "serving" / "spool",
                              grace=dt.timedelta(minutes=config.events_grace_minutes),
                              max_late=dt.timedelta(days=config.events_max_late_days),
                              on_flush=self._flushed, on_error=lambda _e: metrics.flush_errors.inc())
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._shadow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()

    def _flushed(self, n: int) -> None:
        self.metrics.events_flushed.inc(n)
        self.metrics.events_buffered.set(self.sink.buffered)

    # lifecycle
    def start(self) -> None:
        if self.storage is not None:
            try:  # events a crashed process left in the write-ahead log (uploaded now or by the flusher)
                recovered = self.sink.recover()
                if recovered:
                    log.info("recovered %d feedback events from the write-ahead log (%d still waiting)",
                             recovered, self.sink.buffered)
            except Exception as exc:
                log.warning("event recovery at start failed (the flusher retries): %s", exc)
        self.models.refresh()
        if self.models.get(CHAMPION) is None:
            log.warning("no @champion loaded yet (%s); /rank answers 503 until one is",
                        self.models.last_error or "alias not set")
        for name, target in (("alias-poller", lambda: self.models.run(self._stop)),
                             ("event-flusher", lambda: self.sink.run(self._stop, self.config.events_flush_seconds))):
            t = threading.Thread(target=target, name=f"shoprank-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        log.info("shutdown: stopping the poller, flushing %d buffered feedback events", self.sink.buffered)
        self._stop.set()
        self.sink._wake.set()
        for t in self._threads:
            t.join(timeout=30)
        self._shadow.shutdown(wait=True, cancel_futures=True)
        self.sink.close()  # logs what was written, spooled or (without a spool dir) lost
        self.metrics.events_buffered.set(self.sink.buffered)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ranking
    def _candidates(self, req: RankRequest) -> tuple[list[str], list[str]]:
        cfg = self.config
        if (req.candidates is None) == (req.product_ids is None):
            raise InputError("candidates", "give exactly one of 'candidates' (ids with optional text) "
                                           "or 'product_ids'")
        items = req.candidates if req.candidates is not None else [Candidate(product_id=p) for p in
                                                                   (req.product_ids or [])]
        if not items:
            raise InputError("candidates", "is empty: send at least one product to rank")
        if len(items) > cfg.max_candidates:
            raise InputError("candidates", f"{len(items)} candidates; the limit is {cfg.max_candidates} "
                                           "(SHOPRANK_SERVE_MAX_CANDIDATES)", status=413)
        ids = [c.product_id for c in items]
        if any(not i.strip() for i in ids):
            raise InputError("candidates", "product ids must not be empty")
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        if dups:
            raise InputError("candidates", f"duplicate product ids: {sorted(set(dups))[:20]}",
                             duplicate_ids=sorted(set(dups))[:100])
        long = [c.product_id for c in items if c.text is not None and len(c.text) > cfg.max_text_chars]
        if long:
            raise InputError("candidates", f"text longer than {cfg.max_text_chars} characters for ids {long[:20]}")
        need = [c.product_id for c in items if c.text is None or not c.text.strip()]
        texts = {c.product_id: c.text for c in items if c.text is not None and c.text.strip()}
        if need:
            try:
                found, unknown = self.catalog.lookup(need)
            except Exception as exc:
                raise InputError("candidates", f"product texts could not be read from the catalogue ({exc}); "
                                               "send 'text' with each candidate", status=503) from None
            if unknown:
                where = (f"the validated catalogue (dt={self.catalog.day})" if self.catalog.day
                         else "any validated catalogue partition (none found)")
                raise InputError("candidates", f"{len(unknown)} product id(s) not found in {where}: "
                                               f"{unknown[:20]}; send their 'text' or fix the ids",
                                 unknown_ids=unknown[:100])
            texts.update(found)
        return ids, [texts[i] for i in ids]

    def rank(self, req: RankRequest) -> RankResponse:
        cfg = self.config
        query = normalize_query(req.query)  # the form training saw; also the cache key's
        if not query:
            raise InputError("query", "must not be empty")
        if len(query) > cfg.max_query_chars:
            raise InputError("query", f"is {len(query)} characters long; the limit is {cfg.max_query_chars} "
                                      "(SHOPRANK_SERVE_MAX_QUERY_CHARS)")
        ids, texts = self._candidates(req)
        arm = choose_arm(cfg.mode, req.session_id, cfg.challenger_share, cfg.ab_salt)
        model = self.models.get(arm)
        if model is None:
            arm, model = CHAMPION, self.models.get(CHAMPION)
        if model is None:
            raise InputError("model", f"no model loaded: the registry has no @champion for "
                                      f"{self.settings.registered_model!r} yet "
                                      f"({self.models.last_error or 'alias not set'})", status=503)
        key = (model.version, model.backend, query, tuple(zip(ids, texts)))
        scores = self.cache.get(key)
        cached = scores is not None
        if cached:
            self.metrics.cache_hits.inc()
        else:
            self.metrics.cache_misses.inc()
            scores = score_pairs(model.scorer, query, texts, cfg.batch_size)
            self.metrics.pairs.labels(arm).inc(len(texts))
            self.cache.put(key, scores)
        if cfg.mode == "shadow":
            self._submit_shadow(model, query, texts, scores)
        order = np.argsort(-scores, kind="stable")
        if req.top_k:
            order = order[:req.top_k]
        request_id = uuid.uuid4().hex
        self.served.put(request_id, (model.version, arm))
        self.metrics.ranked.labels(arm).inc()
        return RankResponse(
            request_id=request_id, model_version=model.version, arm=arm, backend=model.backend, cached=cached,
            results=[RankedItem(product_id=ids[i], score=float(scores[i]), rank=r + 1) for r, i in enumerate(order)])

    def _submit_shadow(self, champion: LoadedModel, query: str, texts: list[str], scores: np.ndarray) -> None:
        challenger = self.models.get(CHALLENGER)
        if challenger is None or challenger.version == champion.version:
            return
        with self._shadow_lock:
            if self._shadow_pending >= 8:
                self.metrics.shadow_skipped.inc()
                return
            self._shadow_pending += 1

        def done() -> None:
            with self._shadow_lock:
                self._shadow_pending -= 1

        def job() -> None:
            try:
                other = score_pairs(challenger.scorer, query, texts, self.config.batch_size)
                self.metrics.pairs.labels("shadow").inc(len(texts))
                self.metrics.shadow_corr.observe(_spearman(scores, other))
                self.metrics.shadow_top1.labels(str(int(np.argmax(scores)) == int(np.argmax(other))).lower()).inc()
            except Exception as exc:
                log.warning("shadow scoring failed: %s", exc)
            finally:
                done()

        try:
            self._shadow.submit(job)
        except RuntimeError:  # shutting down
            done()

    # events
    def ingest_bytes(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except ValueError:
            raise InputError("body", "is not valid JSON", status=400) from None
        return self.ingest(body)

    def ingest(self, body: Any) -> dict:
        events = body.get("events") if isinstance(body, dict) else body
        if isinstance(body, dict) and set(body) - {"events"}:
            raise EventsRejected([{"index": None, "field": sorted(set(body) - {"events"})[0],
                                   "error": "unknown top-level field; send {\"events\": [...]}"}])
        if self.storage is None:
            raise InputError("events", "no S3 storage configured: events cannot be stored", status=503)
        rows = validate_events(events, hash_key=self.hash_key, max_events=self.config.max_events,
                               now=self.sink.clock(), max_late=self.sink.max_late, lookup=self.served.get)
        if self.sink.room() < len(rows):
            raise InputError("events", f"event buffer full ({self.sink.buffered} events waiting; S3 unreachable?): "
                                       "retry later", status=503)
        try:
            self.sink.add(rows)  # durable (fsync'd write-ahead log) when this returns
        except OSError as exc:
            log.error("could not write %d events to the write-ahead log: %s", len(rows), exc)
            raise InputError("events", f"the events could not be written to the local write-ahead log ({exc}); "
                                       "nothing was stored: retry later", status=503) from None
        for r in rows:
            self.metrics.events_received.labels(r["event_type"]).inc()
        self.metrics.events_buffered.set(self.sink.buffered)
        return {"accepted": len(rows), "buffered": self.sink.buffered}


# ---- the app -------------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 without being read.

    A declared ``Content-Length`` over the limit is answered before any byte of the body is
    received; a body without one (chunked) is counted as it arrives and cut off at the limit."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send: Any, size: int | None) -> None:
        what = f"{size} bytes" if size is not None else f"more than {self.limit} bytes"
        body = json.dumps({"detail": {"field": "body", "error": (
            f"the request body is {what}; the limit is {self.limit} bytes (SHOPRANK_SERVE_MAX_BODY_BYTES): "
            "send fewer events or candidates per request")}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send, int(value))
                return
        received = 0
        started = refused = False

        async def limited_receive() -> dict:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if not started and not refused:
                        refused = True
                        await self._refuse(send, None)
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer; drop whatever the app makes of the cut-off body
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise


def create_app(settings: Settings | None = None, *, loader: Loader | None = None,
               resolve_alias: AliasResolver | None = None, storage: Any = "default",
               config: ServeConfig | None = None, hash_key: bytes | str | None = None,
               scorer: Any = None, auth: ServeAuth | None = None) -> FastAPI:
    """The ranking API.  Defaults are real (registry, S3, secrets from the environment /
    ``stack.env``: :mod:`shoprank.serving.auth`); tests inject ``loader`` / ``resolve_alias`` /
    ``storage`` / ``auth`` / ``hash_key``.  ``scorer``: serve this one scorer as the champion,
    with no registry (benchmarks, local trials); S3 is then used only if given.

    Raises :class:`~shoprank.config.ConfigError` naming the variable when a required secret
    (``SHOPRANK_SERVE_EVENTS_TOKEN``; ``SHOPRANK_USER_HASH_KEY`` when there is storage) is
    missing: nothing is generated here."""
    from shoprank.config import get_settings

    settings = settings or get_settings()
    config = (config or ServeConfig.from_env()).checked()
    auth = (auth or ServeAuth.from_env(home=settings.home)).checked()
    if scorer is not None:
        fixed = str(getattr(scorer, "version", None) or "local")
        loader = loader or (lambda *_a, **_k: scorer)
        resolve_alias = resolve_alias or (lambda alias: fixed if alias == CHAMPION else None)
        storage = None if storage == "default" else storage
    if storage == "default":
        from shoprank.storage import Storage

        storage = Storage(settings)
    if hash_key is None and storage is not None:
        hash_key = user_hash_key(home=settings.home)  # read, never generated
    metrics = ServeMetrics()
    service = RankingService(settings, config, loader or default_loader,
                             resolve_alias or registry_resolver(settings), storage, hash_key, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="shoprank ranking API", version="1", lifespan=lifespan,
                  description="Re-ranks search candidates with the @champion cross-encoder and logs feedback.")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)  # inside `observe`: 413s are counted

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500  # an unhandled exception (e.g. the scorer failed) is a 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.latency.labels(route).observe(time.perf_counter() - t0)
            metrics.requests.labels(route, str(status)).inc()
            if status >= 400:
                metrics.errors.labels(route, str(status)).inc()

    @app.exception_handler(InputError)
    async def input_error(_request: Request, exc: InputError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.body})

    @app.exception_handler(EventsRejected)
    async def events_rejected(_request: Request, exc: EventsRejected):
        metrics.events_rejected.inc()
        return JSONResponse(status_code=422, content={"detail": {"error": str(exc), "errors": exc.errors[:200]}})

    rank_auth = [Depends(bearer(auth.rank_token, RANK_TOKEN_ENV))]  # no check without a rank token
    events_auth = [Depends(bearer(auth.events_token, EVENTS_TOKEN_ENV))]
    admin_auth = [Depends(bearer(auth.metrics_token, ADMIN_TOKEN_ENV if auth.admin_token else
                                 f"{EVENTS_TOKEN_ENV}; no {ADMIN_TOKEN_ENV} is set"))]

    @app.post("/rank", response_model=RankResponse, dependencies=rank_auth)
    def rank(req: RankRequest) -> RankResponse:
        """Score and order the candidates for a query (see docs/serving.md)."""
        return service.rank(req)

    @app.post("/events", status_code=202, dependencies=events_auth)
    async def events(request: Request) -> dict:
        """Append feedback events (FEEDBACK contract); durable on local disk before the 202."""
        raw = await request.body()  # at most max_body_bytes (BodyLimit)
        return await run_in_threadpool(service.ingest_bytes, raw)  # JSON parse + fsync off the event loop

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "mode": config.mode,
                "models": {a: {"version": m.version, "backend": m.backend} for a, m in service.models.models.items()},
                "events_buffered": service.sink.buffered, "catalog_day": service.catalog.day}

    @app.get("/readyz")
    def readyz():
        model = service.models.get(CHAMPION)
        if model is None:
            return JSONResponse(status_code=503, content={"ready": False, "reason": service.models.last_error
                                                          or "no @champion loaded"})
        return {"ready": True, "champion": model.version}

    @app.get("/metrics", dependencies=admin_auth)
    def prometheus_metrics() -> Response:
        metrics.events_buffered.set(service.sink.buffered)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the API with uvicorn (``shoprank serve``); Ctrl-C flushes buffered events first."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level="info")
