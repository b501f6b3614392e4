"""Bulk shopper traffic: millions of feedback events for one day, vectorised, written in parts.

:func:`shoprank.data.simulator.simulate_day` plays one request at a time and calls a real
``rank_fn`` for each (~1 ms of simulator work per request, the whole day in one DataFrame):
right for the demo and for a few thousand sessions, too slow and too big for a 10M-event day.
This module draws the *same shopper model* (the probabilities, delays and counts are the
functions and constants of :mod:`shoprank.data.simulator`; see its docstring) for whole
batches of sessions with numpy, and streams the day out in time order, ``rows_per_part``
events per Parquet part, so memory stays flat whatever the size of the day.

Rankers: only rankers that can be vectorised.

* ``"random"``: a uniformly random order of the candidates (what
  :func:`~shoprank.data.simulator.random_rank_fn` gives the per-request path);
* ``"oracle"``: the marketplace's hidden true relevance, descending, plus Gaussian noise of
  standard deviation ``oracle_noise`` per (request, candidate) (0: the exact upper bound of
  :func:`~shoprank.data.simulator.oracle_rank_fn`); ties are broken at random.

A model (the champion cross-encoder) or BM25 with per-candidate-set statistics depends on the
request's whole candidate set and on text: use :func:`~shoprank.data.simulator.simulate_day`.

How a day is drawn
------------------
1. The number of sessions: ``n_sessions``, or for ``n_events`` the events per session of a
   pilot (2,000-20,000 sessions of its own random stream, nothing written); the day then holds
   about ``n_events`` events (within ~1% from a million events up, a few % for small days: the
   events of a session vary a lot; pass ``n_sessions`` for an exact count of sessions).
2. All session start times (hourly curve, UTC) are drawn and sorted; ``bot_fraction`` of the
   sessions (at least one when > 0) are bots, picked at random.
3. Sessions are played :data:`SESSIONS_PER_BATCH` at a time: per session a user (by activity)
   and a number of queries; per request the query (by frequency, half the time within the
   user's department; bots uniformly), the candidate set (the query's judged products listed
   that day + the ``n_fresh_candidates`` newest of its leaf, ``n_category_candidates`` random
   products of its leaf and ``n_random_candidates`` random listed products, duplicates
   removed), the ranking, the top ``top_k`` impressions and the clicks, add-to-carts,
   purchases and delays of the model.  A request starts when the previous one of its session
   ended (its last event plus a gap), exactly as in the per-request path.
4. Events are sorted by (time, event type).  Every event of a later batch happens after the
   start of that batch's first session, so the events before it are final: they are emitted
   (globally time-ordered across parts) and the rest waits for the next batch.  Memory holds
   one batch, the events of still-running sessions and one part.

Identifiers are random 126-bit hex strings (like the per-request path's ids) drawn from a
second generator of the same seed; ``user_id`` is HMAC-SHA256 of the raw user id
(:func:`~shoprank.data.simulator.pseudonymise`, key from
:func:`~shoprank.data.simulator.resolve_hash_key`: no default key).  Event ids are not checked
for uniqueness across parts (that would need every id in memory): two of 10^10 random
126-bit ids collide with probability below 10^-17.

Same marketplace, day, seed and parameters -> the same events and the same Parquet bytes;
``rows_per_part`` only decides where the parts are cut.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shoprank.data.contracts import EVENT_TYPES, FEEDBACK
from shoprank.data.simulator import (
    ADD_TO_CART,
    BOT_CLICK_GAP_US,
    BOT_CLICK_RATE,
    BOT_NEXT_QUERY_GAP_US,
    BOT_REQUESTS,
    CART_DELAY_US,
    CLICK,
    CLICK_GAP_US,
    HUMAN_EXTRA_QUERIES,
    HUMAN_MAX_QUERIES,
    IMPRESSION,
    NEXT_QUERY_GAP_US,
    PREFERRED_DEPARTMENT_SHARE,
    PURCHASE,
    PURCHASE_DELAY_US,
    attraction,
    bot_session_count,
    bot_user_count,
    bot_user_id,
    cart_probability,
    examination,
    price_factor,
    pseudonymise,
    purchase_probability,
    resolve_hash_key,
    session_starts,
)
from shoprank.data.synthetic import DAY_US, LEAF_TOP, Marketplace, _as_date, day_start_us

log = logging.getLogger(__name__)

RANKERS = ("random", "oracle")
ROWS_PER_PART = 1_000_000
SESSIONS_PER_BATCH = 8192  # part of what a seed means: changing it changes the day
PILOT_SESSIONS = (2_000, 20_000)  # the pilot plays n_events / 10 sessions, within these bounds
_SEED_TAG = 0xB0_1C  # keeps the bulk streams apart from simulate_day's for the same seed


# ---- the marketplace, prepared once per day ------------------------------------------------------

class _Model:
    """Arrays the batches index into: candidate pools, query and user tables, the id tables."""

    def __init__(self, mp: Marketplace, day: dt.date, *, top_k: int, n_category_candidates: int,
                 n_fresh_candidates: int, n_random_candidates: int) -> None:
        t = mp.truth
        self.mp, self.t = mp, t
        self.top_k = top_k
        self.n_cat, self.n_rand = n_category_candidates, n_random_candidates
        end_us = day_start_us(day) + DAY_US
        self.available = mp.available_index(day)
        if not len(self.available):
            raise ValueError(f"no products are listed by the end of {day}")
        listed = t.created_us < end_us
        n_q = len(mp.queries)
        self.q_leaf = np.asarray(t.q_leaf, dtype=np.int64)
        # leaf pools, concatenated (products listed by the end of the day, oldest first)
        pools = [mp.leaf_available_index(leaf, day) for leaf in range(int(self.q_leaf.max()) + 1)]
        self.pool = np.concatenate(pools + [np.zeros(1, dtype=np.int64)]).astype(np.int64)
        self.pool_len = np.array([len(p) for p in pools], dtype=np.int64)
        self.pool_off = np.concatenate([[0], np.cumsum(self.pool_len)[:-1]]).astype(np.int64)
        # the fixed part of each query's candidates: its judged listed products + the newest of its leaf
        fixed = []
        for qi in range(n_q):
            judged = t.judged[qi]
            parts = [judged[listed[judged]]]
            lp = pools[int(self.q_leaf[qi])]
            if len(lp) and n_fresh_candidates:
                parts.append(lp[-n_fresh_candidates:])
            fixed.append(np.unique(np.concatenate(parts).astype(np.int64)))
        width = max(1, max(len(f) for f in fixed))
        self.fixed = np.full((n_q, width), -1, dtype=np.int64)
        for qi, f in enumerate(fixed):
            self.fixed[qi, : len(f)] = f
        # queries: by frequency, or within a department
        freq = mp.queries["frequency"].to_numpy(dtype=float)
        self.q_cdf = _cdf(freq)
        q_top = LEAF_TOP[t.q_leaf]
        self.dept_queries = {int(d): np.nonzero(q_top == d)[0] for d in np.unique(q_top)}
        self.dept_cdf = {d: _cdf(freq[q]) for d, q in self.dept_queries.items()}
        self.n_queries = n_q
        # users: by activity; preferred brands padded with -1
        self.user_cdf = _cdf(np.asarray(t.user_activity, dtype=float))
        self.user_top = np.asarray(t.user_top, dtype=np.int64)
        self.user_sens = np.asarray(t.user_price_sensitivity, dtype=float)
        nb = max(1, max((len(b) for b in t.user_brands), default=1))
        self.user_brands = np.full((len(t.user_brands), nb), -1, dtype=np.int64)
        for u, b in enumerate(t.user_brands):
            self.user_brands[u, : len(b)] = b
        self.brand = np.asarray(t.brand, dtype=np.int64)
        self.price_pct = np.asarray(t.price_pct, dtype=float)
        # output tables (user index: humans 0..n_users-1, bot b at n_users + b; see set_users)
        self.n_users = len(mp.users)
        self.schema = _feedback_schema()
        string = self.schema.field("query").type
        self.user_ids = pa.nulls(0, type=string)
        self.queries = pa.array(mp.queries["query"].astype(str).tolist(), type=string)
        self.product_ids = pa.array(mp.catalog["product_id"].astype(str).tolist(), type=string)
        self.event_types = pa.array(list(EVENT_TYPES), type=string)

    def set_users(self, key: bytes, n_bot_ids: int) -> None:
        """The pseudonymised user ids: every user of the marketplace, then the bots'."""
        raw = [str(u) for u in self.mp.users["user_id"].to_numpy(dtype=object)]
        raw += [bot_user_id(b) for b in range(n_bot_ids)]
        self.user_ids = pa.array([pseudonymise(u, key) for u in raw], type=self.schema.field("user_id").type)

    def relevance(self, qi: np.ndarray, pidx: np.ndarray) -> np.ndarray:
        """Hidden relevance of pairs (query row, product row): the marketplace's own function, per query."""
        out = np.empty(len(qi), dtype=float)
        if not len(qi):
            return out
        order = np.argsort(qi, kind="stable")
        sq = qi[order]
        bounds = np.flatnonzero(np.diff(sq)) + 1
        for rows in np.split(order, bounds):
            out[rows] = self.mp.relevance_by_index(int(qi[rows[0]]), pidx[rows])
        return out


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(np.asarray(weights, dtype=float))
    return c / c[-1]


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw: index i with probability cdf[i] - cdf[i-1]."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _feedback_schema() -> pa.Schema:
    """The Arrow schema (and pandas metadata) that ``FEEDBACK.conform(df).to_parquet()`` writes."""
    empty = pd.DataFrame({c.name: pd.Series([], dtype=object) for c in FEEDBACK.columns})
    empty["ts"] = pd.Series([], dtype="datetime64[us, UTC]")
    empty["position"] = pd.Series([], dtype="int64")
    return pa.Table.from_pandas(FEEDBACK.conform(empty), preserve_index=False).schema


def _hex(words: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(n, 2) non-negative int64 -> n strings f"{a:016x}{b:016x}", built without Python objects."""
    n = len(words)
    data = binascii.hexlify(np.ascontiguousarray(words, dtype=">i8").tobytes())
    if pa.types.is_large_string(type_):
        offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int64)
        return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**63, size=(n, 2), dtype=np.int64)


# ---- one batch of sessions -----------------------------------------------------------------------

_COLS = ("ts", "kind", "pos", "prod", "query", "user", "req0", "req1", "ses0", "ses1")


def _play_batch(m: _Model, rng: np.random.Generator, starts: np.ndarray, is_bot: np.ndarray,
                bot_user: np.ndarray, ranker: str, oracle_noise: float, eta: float) -> dict[str, np.ndarray]:
    """Events of sessions starting at ``starts`` (batch-local request/session indices in ``req``/``ses``)."""
    n_s = len(starts)
    top_k = m.top_k
    # -- sessions: user and number of queries
    user = np.empty(n_s, dtype=np.int64)
    n_req = np.empty(n_s, dtype=np.int64)
    hs, bs = np.flatnonzero(~is_bot), np.flatnonzero(is_bot)
    user[hs] = _draw(m.user_cdf, rng.random(len(hs)))
    n_req[hs] = 1 + np.minimum(rng.poisson(HUMAN_EXTRA_QUERIES, len(hs)), HUMAN_MAX_QUERIES - 1)
    user[bs] = m.n_users + bot_user
    n_req[bs] = rng.integers(*BOT_REQUESTS, size=len(bs))
    req_ses = np.repeat(np.arange(n_s), n_req)
    n_r = len(req_ses)
    bot_req = is_bot[req_ses]
    req_user = user[req_ses]
    hr, br = np.flatnonzero(~bot_req), np.flatnonzero(bot_req)
    # -- queries
    qi = np.empty(n_r, dtype=np.int64)
    qi[br] = rng.integers(m.n_queries, size=len(br))
    dept = m.user_top[req_user[hr]]
    pref = (rng.random(len(hr)) < PREFERRED_DEPARTMENT_SHARE) & np.isin(dept, list(m.dept_queries))
    plain = hr[~pref]
    qi[plain] = _draw(m.q_cdf, rng.random(len(plain)))
    for d in np.unique(dept[pref]):
        rows = hr[pref & (dept == d)]
        qi[rows] = m.dept_queries[int(d)][_draw(m.dept_cdf[int(d)], rng.random(len(rows)))]
    # -- candidates: fixed part, random products of the leaf, random listed products; deduplicated
    leaf = m.q_leaf[qi]
    plen = m.pool_len[leaf]
    cat = m.pool[m.pool_off[leaf][:, None] + rng.integers(0, np.maximum(plen, 1)[:, None], size=(n_r, m.n_cat))]
    cat[plen == 0] = -1
    rnd = m.available[rng.integers(0, len(m.available), size=(n_r, m.n_rand))]
    cand = np.sort(np.concatenate([m.fixed[qi], cat, rnd], axis=1), axis=1)
    valid = cand >= 0
    valid[:, 1:] &= cand[:, 1:] != cand[:, :-1]
    # -- ranking: the top_k valid candidates
    k = min(top_k, cand.shape[1])
    if ranker == "random":
        key = rng.random(cand.shape)
        key[~valid] = 2.0
        order = np.argsort(key, axis=1)[:, :k]
    else:
        score = np.full(cand.shape, -np.inf)
        rows, cols = np.nonzero(valid)
        score[rows, cols] = m.relevance(qi[rows], cand[rows, cols])
        if oracle_noise:
            score[rows, cols] += oracle_noise * rng.standard_normal(len(rows))
        order = np.lexsort((rng.random(cand.shape), -score), axis=1)[:, :k]
    shown = np.take_along_axis(cand, order, axis=1)
    ok = np.take_along_axis(valid, order, axis=1)  # a prefix of each row: positions 1..k_r
    shown[~ok] = 0
    pos = np.broadcast_to(np.arange(1, k + 1), shown.shape)
    # -- humans: position-based clicks, add-to-cart, purchase
    clicked = np.zeros(shown.shape, dtype=bool)
    carted = np.zeros(shown.shape, dtype=bool)
    bought = np.zeros(shown.shape, dtype=bool)
    c_rel = np.zeros(shown.shape, dtype=np.int64)
    a_rel = np.zeros(shown.shape, dtype=np.int64)
    b_rel = np.zeros(shown.shape, dtype=np.int64)
    dur = np.zeros(n_r, dtype=np.int64)
    if len(hr):
        hk = (len(hr), k)
        s = shown[hr]
        rel = m.relevance(np.repeat(qi[hr], k), s.reshape(-1)).reshape(hk)
        ub = m.user_brands[req_user[hr]]
        fav = (ub[:, :, None] == m.brand[s][:, None, :]).any(axis=1)
        c = ok[hr] & (rng.random(hk) < examination(pos[: len(hr)], eta)) & (rng.random(hk) < attraction(rel, fav))
        pf = price_factor(m.user_sens[req_user[hr]][:, None], m.price_pct[s])
        a = c & (rng.random(hk) < cart_probability(rel, pf, fav))
        b = a & (rng.random(hk) < purchase_probability(rel, pf))
        cr = np.cumsum(rng.integers(*CLICK_GAP_US, size=hk), axis=1)
        ar = cr + rng.integers(*CART_DELAY_US, size=hk)
        br_ = ar + rng.integers(*PURCHASE_DELAY_US, size=hk)
        last = np.maximum.reduce([np.where(c, cr, 0).max(axis=1), np.where(a, ar, 0).max(axis=1),
                                  np.where(b, br_, 0).max(axis=1)])
        dur[hr] = last + rng.integers(*NEXT_QUERY_GAP_US, size=len(hr))
        clicked[hr], carted[hr], bought[hr] = c, a, b
        c_rel[hr], a_rel[hr], b_rel[hr] = cr, ar, br_
    # -- bots: click most of what they see, fast, never buy
    if len(br):
        bk = (len(br), k)
        c = ok[br] & (rng.random(bk) < BOT_CLICK_RATE)
        cr = np.cumsum(rng.integers(*BOT_CLICK_GAP_US, size=bk), axis=1)
        dur[br] = np.where(c, cr, 0).max(axis=1) + rng.integers(*BOT_NEXT_QUERY_GAP_US, size=len(br))
        clicked[br], c_rel[br] = c, cr
    # -- request start: the session's start plus the durations of its earlier requests
    before = np.cumsum(dur) - dur
    first = np.cumsum(n_req) - n_req
    now = starts[req_ses] + before - before[first][req_ses]
    out: dict[str, list[np.ndarray]] = {c: [] for c in ("ts", "kind", "pos", "prod", "req")}
    for kind, mask, rel_ts in ((IMPRESSION, ok, pos), (CLICK, clicked, c_rel), (ADD_TO_CART, carted, a_rel),
                               (PURCHASE, bought, b_rel)):
        r, col = np.nonzero(mask)
        out["ts"].append(now[r] + rel_ts[r, col])
        out["kind"].append(np.full(len(r), kind, dtype=np.int8))
        out["pos"].append(col + 1)
        out["prod"].append(shown[r, col])
        out["req"].append(r)
    ev = {c: np.concatenate(v) for c, v in out.items()}
    ev["query"] = qi[ev["req"]]
    ev["user"] = req_user[ev["req"]]
    ev["ses"] = req_ses[ev["req"]]
    ev["n_requests"] = np.array([n_r])
    return ev


# ---- a day ---------------------------------------------------------------------------------------

@dataclass
class BulkDay:
    """What a bulk day holds (filled while its parts are produced)."""

    day: str
    ranker: str
    sessions: int
    bot_sessions: int
    requests: int = 0
    events: int = 0
    parts: int = 0
    by_type: dict[str, int] = field(default_factory=lambda: {t: 0 for t in EVENT_TYPES})
    bot_session_ids: list[str] = field(default_factory=list, repr=False)
    keys: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The summary without the (possibly long) lists of bot session ids."""
        return {"date": self.day, "ranker": self.ranker, "sessions": self.sessions, "bot_sessions": self.bot_sessions,
                "requests": self.requests, "events": self.events, "parts": self.parts, "by_type": dict(self.by_type),
                "keys": list(self.keys), "seconds": round(self.seconds, 2)}


def _check(n_events: int | None, n_sessions: int | None, ranker: str, bot_fraction: float, top_k: int,
           rows_per_part: int, oracle_noise: float) -> None:
    if (n_events is None) == (n_sessions is None):
        raise ValueError("pass exactly one of n_events and n_sessions")
    if (n_events is not None and n_events < 1) or (n_sessions is not None and n_sessions < 1):
        raise ValueError("n_events / n_sessions must be >= 1")
    if ranker not in RANKERS:
        raise ValueError(f"the bulk simulator ranks with {' or '.join(RANKERS)}, not {ranker!r}: a model or BM25 "
                         "ranks one request at a time (shoprank.data.simulator.simulate_day)")
    if not 0.0 <= bot_fraction <= 1.0:
        raise ValueError("bot_fraction must be in [0, 1]")
    if top_k < 1 or rows_per_part < 1 or oracle_noise < 0:
        raise ValueError("top_k and rows_per_part must be >= 1 and oracle_noise >= 0")


def _seed_sequences(mp: Marketplace, seed: int, day: dt.date, traffic: tuple,
                    ranking: tuple) -> tuple[np.random.SeedSequence, np.random.SeedSequence, np.random.SeedSequence]:
    """Streams for the behaviour, the ids and the pilot, from the marketplace seed, ``seed``, the day
    and the parameters.  The behaviour stream ignores the ranker, so two rankers with the same seed
    see the same sessions, queries and candidates (a paired comparison); the ids depend on every
    parameter, so two such days never share an id."""

    def words(params: tuple) -> list[int]:
        digest = hashlib.blake2b(repr(params).encode(), digest_size=8).digest()
        return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")]

    base = [int(mp.seed) & 0xFFFFFFFF, int(seed) & 0xFFFFFFFF, day.toordinal(), _SEED_TAG]
    behaviour, pilot = np.random.SeedSequence(base + words(traffic)).spawn(2)
    ids = np.random.SeedSequence(base + words(traffic + ranking))
    return behaviour, ids, pilot


def _count_sessions(m: _Model, day: dt.date, n_events: int, pilot: np.random.SeedSequence,
                    bot_fraction: float, ranker: str, oracle_noise: float, eta: float) -> int:
    """Sessions for about ``n_events`` events: the events per session of a pilot (nothing written)."""
    rng = np.random.default_rng(pilot)
    n = int(np.clip(n_events // 10, *PILOT_SESSIONS))
    n_bots = bot_session_count(n, bot_fraction)
    is_bot = np.zeros(n, dtype=bool)
    is_bot[rng.choice(n, size=n_bots, replace=False)] = True
    starts = np.sort(session_starts(rng, n, day_start_us(day)))
    events = 0
    for lo in range(0, n, SESSIONS_PER_BATCH):
        sl = slice(lo, lo + SESSIONS_PER_BATCH)
        bot_user = rng.integers(bot_user_count(n_bots), size=int(is_bot[sl].sum()))
        events += len(_play_batch(m, rng, starts[sl], is_bot[sl], bot_user, ranker, oracle_noise, eta)["ts"])
    return max(1, int(round(n_events * n / max(events, 1))))


def iter_day_bulk(marketplace: Marketplace, day: dt.date | str, *, n_events: int | None = None,
                  n_sessions: int | None = None, seed: int = 0, ranker: str = "random", oracle_noise: float = 0.0,
                  model_version: str | None = None, bot_fraction: float = 0.0, hmac_key: bytes | str | None = None,
                  top_k: int = 10, eta: float = 1.0, n_category_candidates: int = 10, n_fresh_candidates: int = 2,
                  n_random_candidates: int = 10, rows_per_part: int = ROWS_PER_PART,
                  summary: BulkDay | None = None) -> Iterator[pa.Table]:
    """The day's events as Arrow tables in the FEEDBACK schema, ``rows_per_part`` rows each (the
    last one fewer), in time order across tables.  Pass ``summary`` (a :class:`BulkDay`, see
    :func:`bulk_day_summary`) to have it filled as the tables are produced.  See the module docstring."""
    _check(n_events, n_sessions, ranker, bot_fraction, top_k, rows_per_part, oracle_noise)
    day = _as_date(day)
    mp = marketplace
    key = resolve_hash_key(hmac_key)
    t0 = time.perf_counter()
    m = _Model(mp, day, top_k=top_k, n_category_candidates=n_category_candidates,
               n_fresh_candidates=n_fresh_candidates, n_random_candidates=n_random_candidates)
    traffic = (n_events, n_sessions, float(bot_fraction), top_k, float(eta), n_category_candidates,
               n_fresh_candidates, n_random_candidates)
    behaviour, ids, pilot = _seed_sequences(mp, seed, day, traffic, (ranker, float(oracle_noise)))
    if n_sessions is None:
        n_sessions = _count_sessions(m, day, int(n_events), pilot, bot_fraction, ranker, oracle_noise, eta)
    n_bots = bot_session_count(n_sessions, bot_fraction)
    m.set_users(key, bot_user_count(n_bots))
    rng, id_rng = np.random.default_rng(behaviour), np.random.default_rng(ids)
    start_us, end_us = day_start_us(day), day_start_us(day) + DAY_US
    is_bot = np.zeros(n_sessions, dtype=bool)
    is_bot[rng.choice(n_sessions, size=n_bots, replace=False)] = True
    starts = np.sort(session_starts(rng, n_sessions, start_us))
    s = summary if summary is not None else BulkDay(day.isoformat(), ranker, n_sessions, n_bots)
    s.day, s.ranker, s.sessions, s.bot_sessions = day.isoformat(), ranker, n_sessions, n_bots
    pending: dict[str, np.ndarray] = {c: np.zeros(0, dtype=np.int64) for c in _COLS}  # events not yet final
    ready: list[dict[str, np.ndarray]] = []  # final events, time-ordered, not yet in a part
    n_ready = 0

    def table(cols: dict[str, np.ndarray]) -> pa.Table:
        n = len(cols["ts"])
        event_words = _words(id_rng, n)
        string = m.schema.field("event_id").type
        arrays = {
            "event_id": _hex(event_words, string),
            "ts": pa.array(cols["ts"], type=m.schema.field("ts").type),
            "request_id": _hex(np.stack([cols["req0"], cols["req1"]], axis=1), string),
            "session_id": _hex(np.stack([cols["ses0"], cols["ses1"]], axis=1), string),
            "user_id": m.user_ids.take(pa.array(cols["user"])),
            "query": m.queries.take(pa.array(cols["query"])),
            "product_id": m.product_ids.take(pa.array(cols["prod"])),
            "position": pa.array(cols["pos"].astype(np.int64), type=pa.int64()),
            "event_type": m.event_types.take(pa.array(cols["kind"].astype(np.int64))),
            "model_version": (pa.nulls(n, type=string) if model_version is None
                              else pa.array(np.full(n, str(model_version), dtype=object), type=string)),
        }
        for kind, name in enumerate(EVENT_TYPES):
            s.by_type[name] += int((cols["kind"] == kind).sum())
        s.events += n
        s.parts += 1
        return pa.Table.from_arrays([arrays[f.name] for f in m.schema], schema=m.schema)

    def take_ready(n: int) -> dict[str, np.ndarray]:
        nonlocal ready, n_ready
        merged = {c: np.concatenate([r[c] for r in ready]) for c in _COLS}
        head = {c: v[:n] for c, v in merged.items()}
        rest = {c: v[n:] for c, v in merged.items()}
        ready = [rest] if len(rest["ts"]) else []
        n_ready = len(rest["ts"])
        return head

    batches = range(0, n_sessions, SESSIONS_PER_BATCH)
    progress_every = max(1, len(batches) // 10)
    for i, lo in enumerate(batches):
        hi = min(lo + SESSIONS_PER_BATCH, n_sessions)
        bots = is_bot[lo:hi]
        bot_user = rng.integers(bot_user_count(n_bots), size=int(bots.sum()))
        ev = _play_batch(m, rng, starts[lo:hi], bots, bot_user, ranker, oracle_noise, eta)
        n_req = int(ev["n_requests"][0])
        ses_words = _words(id_rng, hi - lo)
        req_words = _words(id_rng, n_req)
        if bots.any():
            s.bot_session_ids.extend(_hex(ses_words[bots], pa.string()).to_pylist())
        s.requests += n_req
        new = {"ts": np.minimum(ev["ts"], end_us - 1), "kind": ev["kind"], "pos": ev["pos"], "prod": ev["prod"],
               "query": ev["query"], "user": ev["user"], "req0": req_words[ev["req"], 0],
               "req1": req_words[ev["req"], 1], "ses0": ses_words[ev["ses"], 0], "ses1": ses_words[ev["ses"], 1]}
        cols = {c: np.concatenate([pending[c], new[c]]) for c in _COLS}
        order = np.argsort(cols["ts"] * 4 + cols["kind"], kind="stable")
        horizon = int(starts[hi]) if hi < n_sessions else end_us
        n_final = int(np.searchsorted(cols["ts"][order], horizon, side="left"))
        final, keep = order[:n_final], order[n_final:]
        pending = {c: v[keep] for c, v in cols.items()}
        if n_final:
            ready.append({c: v[final] for c, v in cols.items()})
            n_ready += n_final
        while n_ready >= rows_per_part:
            yield table(take_ready(rows_per_part))
        if (i + 1) % progress_every == 0:
            log.info("bulk %s: %d/%d sessions, %d events written, %.1fs", day, hi, n_sessions, s.events,
                     time.perf_counter() - t0)
    assert not len(pending["ts"]), "every event is final at the end of the day"
    if n_ready or s.parts == 0:
        yield table(take_ready(n_ready) if n_ready else {c: np.zeros(0, dtype=np.int64) for c in _COLS})
    s.seconds = time.perf_counter() - t0
    log.info("bulk %s: %d sessions (%d bots), %d requests, %d events %s in %d parts, %.1fs", day, n_sessions,
             n_bots, s.requests, s.events, s.by_type, s.parts, s.seconds)


def bulk_day_summary() -> BulkDay:
    """An empty summary for :func:`iter_day_bulk` to fill."""
    return BulkDay(day="", ranker="", sessions=0, bot_sessions=0)


def simulate_day_bulk(marketplace: Marketplace, day: dt.date | str, **kwargs: Any) -> pd.DataFrame:
    """The whole bulk day as one FEEDBACK DataFrame (``attrs["bot_session_ids"]``, ``attrs["summary"]``).

    For small days and tests: large days go to :func:`write_day_bulk`, which never holds the
    day in memory.  Arguments as :func:`iter_day_bulk`.
    """
    summary = bulk_day_summary()
    tables = list(iter_day_bulk(marketplace, day, summary=summary, **kwargs))
    df = FEEDBACK.conform(pa.concat_tables(tables).to_pandas())
    df.attrs["bot_session_ids"] = sorted(summary.bot_session_ids)
    df.attrs["summary"] = summary.as_dict()
    return df


# ---- writing -------------------------------------------------------------------------------------

class _LocalPartition:
    """``<root>/raw/feedback/dt=D/``: parts written to a temporary name and renamed, ``_SUCCESS`` last."""

    def __init__(self, root: str | os.PathLike, prefix: str) -> None:
        self.root, self.prefix = Path(root), prefix
        self.dir = self.root / prefix

    def begin(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def write(self, name: str, table: pa.Table) -> str:
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp, compression="snappy")
        os.replace(tmp, self.dir / name)
        return self.prefix + name

    def commit(self, marker: str) -> None:
        (self.dir / marker).write_bytes(b"")


def write_day_bulk(target: Any, marketplace: Marketplace, day: dt.date | str, **kwargs: Any) -> BulkDay:
    """Simulate a day in bulk and write it to raw/feedback/dt=day/ part by part, ``_SUCCESS`` last.

    ``target`` is a :class:`~shoprank.storage.Storage` (written with its
    ``write_partition_parts``: streamed, each part uploaded as it is drawn) or a local directory
    (``str`` / ``Path``: the same layout under it).  The partition's old parts are removed first.  Parts are
    ``part-00000.parquet``, ... of ``rows_per_part`` events (default 1M).  Returns the
    :class:`BulkDay` summary with the keys written.  Arguments as :func:`iter_day_bulk`.
    """
    from shoprank.storage import SUCCESS_MARKER, partition_prefix

    prefix = partition_prefix("raw", "feedback", _as_date(day))
    summary = bulk_day_summary()
    tables = iter_day_bulk(marketplace, day, summary=summary, **kwargs)
    if isinstance(target, (str, os.PathLike)):
        out = _LocalPartition(target, prefix)
        out.begin()
        for i, table in enumerate(tables):
            summary.keys.append(out.write(f"part-{i:05d}.parquet", table))
        out.commit(SUCCESS_MARKER)
    elif hasattr(target, "write_partition_parts"):  # a Storage: its own replace-a-partition protocol
        summary.keys.extend(target.write_partition_parts("raw", "feedback", _as_date(day), tables))
    else:
        raise TypeError(f"write_day_bulk writes to a Storage or a local directory, not {type(target).__name__}")
    log.info("wrote %s: %d events in %d parts", prefix, summary.events, summary.parts)
    return summary
