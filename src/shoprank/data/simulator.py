"""Shopper traffic simulator: a day of search sessions against a ranking function.

:func:`simulate_day` plays ``n_sessions`` shopper sessions on a :class:`~shoprank.data.
synthetic.Marketplace` and returns the events in the FEEDBACK contract (impression, click,
add_to_cart, purchase).  The ranking under test is any ``rank_fn(query, candidates) ->
scores``; the shoppers react to the *hidden* true relevance, so a better ranker earns more
clicks and purchases.

Model of one search request
---------------------------
1. **Query**: a human session (user drawn by activity; start time drawn from a daily curve
   with quiet nights and busy evenings, UTC) issues 1-5 queries, drawn by query frequency
   (half the time among queries of the user's preferred department).
2. **Candidates** (what the shop's search engine retrieves): the query's judged products
   listed that day, ``n_category_candidates`` random products of the query's target leaf,
   the ``n_fresh_candidates`` newest products of that leaf (a freshness boost, so cold-start
   products get exposure) and ``n_random_candidates`` random catalogue products.  Only
   products listed by the end of the day take part (cold start respected).  The candidates
   are shuffled before ``rank_fn`` sees them.
3. **Ranking**: candidates are sorted by ``rank_fn`` scores (descending, stable) and the top
   ``top_k`` (10) are shown; each gets an ``impression`` event with its 1-based position.
4. **Clicks** follow the position-based model (PBM), P(click) = P(examined | position) x
   P(attractive | relevance), where

   * P(examined | position) = 1 / position ** ``eta`` (``eta`` = 1 by default: the shopper
     looks at position 1 always, position 10 one time in ten), and
   * P(attractive | relevance) = 0.03 + 0.92 * relevance ** 2, plus 0.1 when the product's
     brand is one of the user's preferred brands (capped at 1).  Relevance is the
     marketplace's hidden true relevance (grade 3 ~ 1.0, grade 2 ~ 0.5-0.85, grade 1 ~ 0.3).

5. **add_to_cart** given a click: (0.05 + 0.45 * relevance ** 2) x price factor x 1.3 for a
   preferred brand; **purchase** given add_to_cart: (0.3 + 0.5 * relevance) x price factor.
   The price factor is 1 - 0.7 x user price sensitivity x the product's price percentile in
   its leaf, so price-sensitive users buy fewer expensive products.

Bots (``bot_fraction`` of the sessions) fire 15-40 requests a few seconds apart with
uniformly drawn queries, click about 85% of everything shown whatever the position or
relevance, and never add to cart or buy.  Downstream bot filters should catch them; their
session ids are listed in ``events.attrs["bot_session_ids"]`` (not written to storage).

Cost: one ``rank_fn`` call per request, ~50 candidates each (about 1 ms of simulator work
per request on these machines; a CPU cross-encoder at ~75 pairs/s makes that ~0.7 s, so
size ``n_sessions`` and the candidate counts to the ranker).  For millions of events use the
bulk path, :mod:`shoprank.data.bulk_simulator` (``write_day_bulk``): the same model drawn for
whole batches with numpy and written in parts (random or hidden-relevance rankers only; ~15 s
for 10M events).  The probabilities, delays and counts above are the functions and constants
below (:func:`attraction`, :data:`CLICK_GAP_US`, ...), shared by both paths.

Identifiers: ``event_id``, ``request_id`` and ``session_id`` are random 128-bit hex strings
drawn from the seeded generator (same seed, same ids); ``user_id`` is
HMAC-SHA256(key, raw user id).  The key is a secret, ``SHOPRANK_USER_HASH_KEY`` (read by
:func:`shoprank.serving.auth.user_hash_key`; ``shoprank stack up`` generates one), passed as
``hmac_key``: there is no default key, and a missing one raises
:class:`~shoprank.config.ConfigError`.  Timestamps are UTC and inside the simulated day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from shoprank.config import ConfigError
from shoprank.data.contracts import EVENT_TYPES, FEEDBACK
from shoprank.data.synthetic import (
    DAY_US,
    LEAF_TOP,
    Marketplace,
    _as_date,
    PartitionWriter,
    day_start_us,
)

log = logging.getLogger(__name__)

RankFn = Callable[[str, pd.DataFrame], np.ndarray]

HASH_KEY_ENV = "SHOPRANK_USER_HASH_KEY"

IMPRESSION, CLICK, ADD_TO_CART, PURCHASE = range(4)
_EVENT_NAMES = np.array(EVENT_TYPES, dtype=object)
assert tuple(_EVENT_NAMES) == ("impression", "click", "add_to_cart", "purchase")

# ---- the shopper model: shared by simulate_day and the bulk simulator ------------------------
# (shoprank.data.bulk_simulator draws the same quantities for whole batches of requests; keep
# every number here so that the two paths cannot drift apart)

# Share of sessions per hour of day (UTC): quiet nights, busy evenings.
_HOURLY = np.array([2, 1, 1, 1, 1, 2, 3, 4, 5, 6, 6, 6, 7, 6, 6, 6, 6, 7, 8, 9, 9, 8, 6, 4], dtype=float)
HOUR_US = 3_600_000_000
# A human session issues 1 + min(Poisson(HUMAN_EXTRA_QUERIES), HUMAN_MAX_QUERIES - 1) queries,
# PREFERRED_DEPARTMENT_SHARE of them among the queries of the user's preferred department.
HUMAN_EXTRA_QUERIES = 0.8
HUMAN_MAX_QUERIES = 5
PREFERRED_DEPARTMENT_SHARE = 0.5
# Bots: Generator.integers(*BOT_REQUESTS) requests (15-40), each shown result clicked with BOT_CLICK_RATE.
BOT_REQUESTS = (15, 41)
BOT_CLICK_RATE = 0.85
# Delays in microseconds, drawn uniformly from [lo, hi) (Generator.integers).
CLICK_GAP_US = (2_000_000, 40_000_000)  # between successive results examined (cumulative)
CART_DELAY_US = (5_000_000, 120_000_000)  # click -> add_to_cart
PURCHASE_DELAY_US = (10_000_000, 300_000_000)  # add_to_cart -> purchase
NEXT_QUERY_GAP_US = (5_000_000, 90_000_000)  # last event of a request -> the next request
BOT_CLICK_GAP_US = (200_000, 1_500_000)
BOT_NEXT_QUERY_GAP_US = (1_000_000, 3_000_000)


def session_starts(rng: np.random.Generator, n_sessions: int, day_start: int) -> np.ndarray:
    """Session start times (µs, UTC) inside the day, following the hourly curve."""
    hours = rng.choice(24, size=n_sessions, p=_HOURLY / _HOURLY.sum())
    return day_start + hours * HOUR_US + rng.integers(0, HOUR_US, size=n_sessions)


def bot_session_count(n_sessions: int, bot_fraction: float) -> int:
    """``bot_fraction`` of ``n_sessions``, rounded, at least one when the fraction is > 0."""
    n_bots = 0 if bot_fraction == 0 else max(1, int(round(n_sessions * bot_fraction)))
    return min(n_bots, n_sessions)


def bot_user_count(n_bots: int) -> int:
    """How many distinct bot user ids the bot sessions share (bots come back)."""
    return max(1, n_bots // 2 + 1)


def bot_user_id(i: int) -> str:
    return f"bot-{int(i):04d}"


def examination(positions: np.ndarray, eta: float) -> np.ndarray:
    """P(examined | 1-based position) = 1 / position ** eta."""
    return 1.0 / np.asarray(positions, dtype=float) ** eta


def attraction(rel: np.ndarray, fav: np.ndarray) -> np.ndarray:
    """P(attractive | relevance, preferred brand)."""
    return np.minimum(1.0, 0.03 + 0.92 * rel**2 + 0.1 * fav)


def price_factor(price_sensitivity: np.ndarray | float, price_pct: np.ndarray) -> np.ndarray:
    """1 - 0.7 x the user's price sensitivity x the product's price percentile in its leaf."""
    return 1.0 - 0.7 * price_sensitivity * price_pct


def cart_probability(rel: np.ndarray, pf: np.ndarray, fav: np.ndarray) -> np.ndarray:
    """P(add_to_cart | click)."""
    return np.minimum(1.0, (0.05 + 0.45 * rel**2) * pf * np.where(fav, 1.3, 1.0))


def purchase_probability(rel: np.ndarray, pf: np.ndarray) -> np.ndarray:
    """P(purchase | add_to_cart)."""
    return np.minimum(1.0, (0.3 + 0.5 * rel) * pf)


def resolve_hash_key(key: bytes | str | None) -> bytes:
    """The HMAC key for user ids as bytes.  There is no default: a missing or empty key raises."""
    if key is None or not (key.strip() if isinstance(key, str) else bytes(key)):
        raise ConfigError(f"no user-id hash key: pass hmac_key, the value of {HASH_KEY_ENV} "
                          "(shoprank.serving.auth.user_hash_key() reads it; `shoprank stack up` generates one). "
                          "The simulator has no default key")
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def pseudonymise(user_id: str, key: bytes | str) -> str:
    """HMAC-SHA256 of a raw user id (hex): stable per key, not reversible without it."""
    k = key.encode("utf-8") if isinstance(key, str) else key
    return hmac.new(k, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def random_rank_fn(query: str, candidates: pd.DataFrame) -> np.ndarray:
    """Random scores, reproducible from the query and the candidates' order.

    The simulator shuffles candidates per request, so each request gets a fresh random
    order while a whole simulated day stays deterministic for its seed.
    """
    ids = "\x1f".join(map(str, candidates["product_id"].to_numpy(dtype=object)))
    digest = hashlib.blake2b(f"{query}\x1e{ids}".encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little")).random(len(candidates))


def oracle_rank_fn(marketplace: Marketplace) -> RankFn:
    """A ranker that scores candidates by the hidden true relevance (an upper bound)."""

    def rank(query: str, candidates: pd.DataFrame) -> np.ndarray:
        return marketplace.true_relevance(query, candidates)

    return rank


def _hex_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64)
    return np.array([f"{a:016x}{b:016x}" for a, b in words.tolist()], dtype=object)


class _Log:
    """Column buffers of events; strings are resolved once at the end."""

    def __init__(self) -> None:
        self.ts: list[np.ndarray] = []
        self.req: list[np.ndarray] = []
        self.prod: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.kind: list[np.ndarray] = []

    def add(self, ts: np.ndarray, req: int, prod: np.ndarray, pos: np.ndarray, kind: int) -> None:
        if len(prod):
            self.ts.append(np.asarray(ts, dtype=np.int64))
            self.req.append(np.full(len(prod), req, dtype=np.int64))
            self.prod.append(np.asarray(prod, dtype=np.int64))
            self.pos.append(np.asarray(pos, dtype=np.int64))
            self.kind.append(np.full(len(prod), kind, dtype=np.int8))

    def cat(self) -> dict[str, np.ndarray]:
        def c(x: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(x) if x else np.zeros(0, dtype=dtype)

        return {"ts": c(self.ts, np.int64), "req": c(self.req, np.int64), "prod": c(self.prod, np.int64),
                "pos": c(self.pos, np.int64), "kind": c(self.kind, np.int8)}


def simulate_day(marketplace: Marketplace, day: dt.date | str, rank_fn: RankFn, n_sessions: int = 500,
                 seed: int = 0, model_version: str | None = None, *, bot_fraction: float = 0.0,
                 hmac_key: bytes | str | None = None, top_k: int = 10, eta: float = 1.0,
                 n_category_candidates: int = 10, n_fresh_candidates: int = 2,
                 n_random_candidates: int = 10) -> pd.DataFrame:
    """Simulate one day of search traffic; returns FEEDBACK-contract events sorted by time.

    See the module docstring for the click / cart / purchase model.  ``seed`` (with the
    marketplace seed and the day) fixes everything; ``model_version`` is written on every
    event.  ``bot_fraction`` of the sessions (at least one when > 0) are bots.
    """
    if not 0.0 <= bot_fraction <= 1.0:
        raise ValueError("bot_fraction must be in [0, 1]")
    if n_sessions < 0 or top_k < 1:
        raise ValueError("n_sessions must be >= 0 and top_k >= 1")
    day = _as_date(day)
    mp, t = marketplace, marketplace.truth
    key = resolve_hash_key(hmac_key)
    rng = np.random.default_rng(np.random.SeedSequence([int(mp.seed) & 0xFFFFFFFF, int(seed) & 0xFFFFFFFF,
                                                        day.toordinal()]))
    t0 = time.perf_counter()
    start_us, end_us = day_start_us(day), day_start_us(day) + DAY_US
    available = mp.available_index(day)
    if not len(available):
        raise ValueError(f"no products are listed by the end of {day}")
    listed = t.created_us < end_us
    catalog = mp.catalog
    freq = mp.queries["frequency"].to_numpy(dtype=float)
    q_text = mp.queries["query"].to_numpy(dtype=object)
    q_p = freq / freq.sum()
    q_top = LEAF_TOP[t.q_leaf]
    top_q = {int(k): np.nonzero(q_top == k)[0] for k in np.unique(q_top)}
    user_p = t.user_activity / t.user_activity.sum()
    examine = examination(np.arange(1, top_k + 1), eta)

    n_bots = bot_session_count(n_sessions, bot_fraction)
    is_bot = np.zeros(n_sessions, dtype=bool)
    is_bot[rng.choice(n_sessions, size=n_bots, replace=False)] = True
    session_start = session_starts(rng, n_sessions, start_us)

    events = _Log()
    req_session: list[int] = []
    req_query: list[int] = []
    session_user: list[str] = []
    n_bot_ids = bot_user_count(n_bots)
    progress_every = max(1, n_sessions // 5)
    leaf_pools: dict[int, np.ndarray] = {}

    for s in range(n_sessions):
        now = int(session_start[s])
        if is_bot[s]:
            session_user.append(bot_user_id(rng.integers(n_bot_ids)))
            n_req = int(rng.integers(*BOT_REQUESTS))
            u = -1
        else:
            u = int(rng.choice(len(user_p), p=user_p))
            session_user.append(str(mp.users["user_id"].iat[u]))
            n_req = 1 + min(int(rng.poisson(HUMAN_EXTRA_QUERIES)), HUMAN_MAX_QUERIES - 1)
        for _ in range(n_req):
            if is_bot[s]:
                qi = int(rng.integers(len(q_text)))
            else:
                pref = top_q.get(int(t.user_top[u]))
                if pref is not None and rng.random() < PREFERRED_DEPARTMENT_SHARE:
                    qi = int(pref[rng.choice(len(pref), p=q_p[pref] / q_p[pref].sum())])
                else:
                    qi = int(rng.choice(len(q_text), p=q_p))
            # -- candidates (cold start: only products listed by the end of the day) --
            judged = t.judged[qi]
            parts = [judged[listed[judged]]]
            ql = int(t.q_leaf[qi])
            if ql not in leaf_pools:
                leaf_pools[ql] = mp.leaf_available_index(ql, day)
            leaf_pool = leaf_pools[ql]
            if len(leaf_pool):
                parts.append(leaf_pool[rng.integers(len(leaf_pool), size=n_category_candidates)])
                parts.append(leaf_pool[-n_fresh_candidates:] if n_fresh_candidates else leaf_pool[:0])
            parts.append(available[rng.integers(len(available), size=n_random_candidates)])
            cand = rng.permutation(pd.unique(np.concatenate(parts)))
            cand_df = catalog.iloc[cand].reset_index(drop=True)
            scores = np.asarray(rank_fn(str(q_text[qi]), cand_df), dtype=np.float64).reshape(-1)
            if scores.shape != (len(cand),):
                raise ValueError(f"rank_fn returned {scores.shape[0]} scores for {len(cand)} candidates")
            if not np.isfinite(scores).all():
                raise ValueError("rank_fn returned non-finite scores")
            shown = cand[np.argsort(-scores, kind="stable")[:top_k]]
            k = len(shown)
            pos = np.arange(1, k + 1)
            req = len(req_session)
            req_session.append(s)
            req_query.append(qi)
            events.add(np.full(k, now) + pos, req, shown, pos, IMPRESSION)
            rel = mp.relevance_by_index(qi, shown)

            if is_bot[s]:
                clicked = rng.random(k) < BOT_CLICK_RATE
                c_ts = now + np.cumsum(rng.integers(*BOT_CLICK_GAP_US, size=k))[clicked]
                events.add(c_ts, req, shown[clicked], pos[clicked], CLICK)
                now = int(c_ts[-1]) if len(c_ts) else now
                now += int(rng.integers(*BOT_NEXT_QUERY_GAP_US))
                continue

            fav = np.isin(t.brand[shown], t.user_brands[u])
            clicked = (rng.random(k) < examine[:k]) & (rng.random(k) < attraction(rel, fav))
            pf = price_factor(t.user_price_sensitivity[u], t.price_pct[shown])
            carted = clicked & (rng.random(k) < cart_probability(rel, pf, fav))
            bought = carted & (rng.random(k) < purchase_probability(rel, pf))
            c_ts = now + np.cumsum(rng.integers(*CLICK_GAP_US, size=k))
            a_ts = c_ts + rng.integers(*CART_DELAY_US, size=k)
            b_ts = a_ts + rng.integers(*PURCHASE_DELAY_US, size=k)
            events.add(c_ts[clicked], req, shown[clicked], pos[clicked], CLICK)
            events.add(a_ts[carted], req, shown[carted], pos[carted], ADD_TO_CART)
            events.add(b_ts[bought], req, shown[bought], pos[bought], PURCHASE)
            last = max([now] + [int(x.max()) for x in (c_ts[clicked], a_ts[carted], b_ts[bought]) if len(x)])
            now = last + int(rng.integers(*NEXT_QUERY_GAP_US))
        if (s + 1) % progress_every == 0:
            log.info("simulate %s: %d/%d sessions, %d requests", day, s + 1, n_sessions, len(req_session))

    e = events.cat()
    n = len(e["ts"])
    ts = np.minimum(e["ts"], end_us - 1)  # sessions that run past midnight end with the day
    req_ids = _hex_ids(rng, len(req_session))
    session_ids = _hex_ids(rng, n_sessions)
    hashed = {raw: pseudonymise(raw, key) for raw in set(session_user)}
    user_of_session = np.array([hashed[raw] for raw in session_user], dtype=object)
    req_session_a = np.asarray(req_session, dtype=np.int64)
    req_query_a = np.asarray(req_query, dtype=np.int64)
    sess = req_session_a[e["req"]] if n else np.zeros(0, dtype=np.int64)
    df = pd.DataFrame({
        "event_id": _hex_ids(rng, n),
        "ts": pd.to_datetime(ts, unit="us", utc=True),
        "request_id": req_ids[e["req"]] if n else np.zeros(0, dtype=object),
        "session_id": session_ids[sess] if n else np.zeros(0, dtype=object),
        "user_id": user_of_session[sess] if n else np.zeros(0, dtype=object),
        "query": q_text[req_query_a[e["req"]]] if n else np.zeros(0, dtype=object),
        "product_id": catalog["product_id"].to_numpy(dtype=object)[e["prod"]],
        "position": e["pos"],
        "event_type": _EVENT_NAMES[e["kind"]],
        "model_version": model_version,
        "_kind": e["kind"],
    })
    df = df.sort_values(["ts", "_kind"], kind="stable").reset_index(drop=True)
    df = FEEDBACK.conform(df)
    df.attrs["bot_session_ids"] = sorted(session_ids[is_bot].tolist())
    counts = {name: int((e["kind"] == i).sum()) for i, name in enumerate(EVENT_TYPES)}
    log.info("simulated %s: %d sessions (%d bots), %d requests, %s in %.1fs", day, n_sessions, n_bots,
             len(req_session), counts, time.perf_counter() - t0)
    return df


def write_day(storage: PartitionWriter, marketplace: Marketplace, day: dt.date | str,
              events: pd.DataFrame) -> list[str]:
    """Write ``events`` to raw/feedback/dt=day after checking they belong to that day."""
    day = _as_date(day)
    df = FEEDBACK.conform(events)
    if len(df):
        lo = pd.Timestamp(day_start_us(day), unit="us", tz="UTC")
        hi = lo + pd.Timedelta(days=1)
        outside = (df["ts"] < lo) | (df["ts"] >= hi)
        if outside.any():
            raise ValueError(f"{int(outside.sum())} events fall outside {day} (UTC)")
        if df["event_id"].duplicated().any():
            raise ValueError("event_id is not unique")
        known = marketplace.catalog_for_day(day)["product_id"]
        unknown = ~df["product_id"].isin(known)
        if unknown.any():
            raise ValueError(f"{int(unknown.sum())} events name products not listed on {day}, "
                             f"e.g. {df.loc[unknown, 'product_id'].iat[0]}")
    keys = storage.write_partition(df, "raw", "feedback", day)
    log.info("wrote raw/feedback/dt=%s: %d events", day.isoformat(), len(df))
    return keys
