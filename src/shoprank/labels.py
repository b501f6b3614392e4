"""Feedback logs -> training signal: dedupe, bot filter, position-bias correction, grades.

:func:`derive_labels` turns one or more days of FEEDBACK-contract events (impression, click,
add_to_cart, purchase) into graded (query, product) pairs with ``source = 'derived'``;
:func:`to_training_rows` puts them in the dataset-snapshot split format so the daily update
can train on them, mixed with replayed older data by :func:`mix_with_replay`.  Every knob
lives in :class:`LabelParams`; :meth:`LabelParams.as_params` gives them as flat MLflow
params (``labels.*``) and :meth:`LabelResult.as_metrics` the run's figures.
:mod:`shoprank.labels_spark` runs the same derivation on Spark (same pairs and stats) for days
too large for pandas.

The derivation, step by step
----------------------------
1. **Invalid rows** (unknown ``event_type``, ``position`` missing or < 1, missing ids / query
   / product) are dropped and counted.
2. **Dedupe.**  Events are stably sorted by ``ts``; (a) rows repeating an ``event_id`` keep the
   earliest (ties: input order); (b) rows with different ids but the same
   ``(session_id, request_id, product_id, event_type, ts)`` (a client retry that minted a new
   id; the same key the validation suite checks) keep the first.  Finally every signal is
   counted **at most once per request and product**: a product clicked three times on one
   result page (double clicks, back-and-forth) is one click; impressions logged twice for
   one page are one impression (``repeat_events_collapsed``).
3. **Bots**, by behaviour only (no labels exist in real logs).  A session is a bot when it has
   more than ``max_clicks_per_session`` clicks, or, *having no purchase*, any of:
   more than ``max_clicks_without_purchase`` clicks; at least ``min_clicks_for_gap_rule``
   clicks with a median gap between consecutive clicks under ``min_median_click_gap_s``;
   at least ``min_clicks_for_ctr_rule`` clicks on more than ``max_session_ctr`` of its
   impressions.  All events of bot sessions are dropped.
4. **Position of every signal.**  A click / add_to_cart / purchase takes the position of the
   impression of the same ``(request_id, product_id)``; when that impression is missing its
   own ``position`` column is used and the (request, product) counts as one implied
   impression (``orphan_events``), so the pair's denominator never misses a shown product.
5. **Propensities** P(examined | position), relative to position 1, estimated from the
   cleaned logs (``propensity_method``):

   * ``harvest`` (default), intervention harvesting (Agarwal et al., WSDM 2019, the
     "all pairs" estimator, simplified): the same (query, product) shown at positions j and
     k in different requests is a natural experiment, because under the position-based
     model its click rate at each position is ``p(pos) * attractiveness``.  For each position
     pair (j, k), ``p(k)/p(j) = sum_d w_d ctr_d(k) / sum_d w_d ctr_d(j)`` over the products
     seen at both, with ``w_d = n_j n_k / (n_j + n_k)`` (independent of the clicks); edges
     need ``min_harvest_clicks`` clicks on each side.  ``log p`` is then the weighted least
     squares solution of all edges (weights 1 / (1/C_j + 1/C_k), ``log p(1) = 0``).  Unlike the
     raw CTR by position, this is not confounded by the ranker putting relevant products on
     top.  Positions the edges do not reach get a power law ``k ** -eta_hat`` fitted to the
     reached ones; with no usable edge at all the method falls back to ``power``.
   * ``ctr_ratio``: ``CTR(k) / CTR(1)``; simple but biased (too steep) when the logging
     ranker is good, because top positions hold more relevant products.  Use it only on logs
     from a randomised ranker.
   * ``power``: ``k ** -eta`` with a known ``eta`` (e.g. from a randomisation experiment).

   The estimates are then made non-increasing in position (weighted isotonic regression),
   scaled so ``p(1) = 1`` and clipped to ``[min_propensity, 1]`` (clipping caps the inverse
   weights, trading a little bias for much less variance).  Positions past
   ``max_position`` use the propensity of ``max_position``.
6. **Aggregation per (query, product)**: ``impressions`` (requests that showed it),
   ``clicks``, ``carts``, ``purchases`` (requests with that signal) and their
   inverse-propensity-weighted sums ``ipw_clicks = sum(1 / p(position))`` etc.  Add-to-cart
   and purchase follow a click, so they carry the click's examination propensity.
7. **Utility** (documented choice)::

       utility = (w_click * ipw_clicks + w_add_to_cart * ipw_carts + w_purchase * ipw_purchases)
                 / (impressions + prior_impressions)

   i.e. the debiased value per impression, where a request's value adds the weights of
   every stage it reached (click 1, cart 3, purchase 5 by default: a full funnel is 9).
   ``ipw_clicks / impressions`` estimates the product's attractiveness as if it had always
   been examined, so a relevant product the ranker buried at position 8 is not mistaken for
   a poor one.  ``prior_impressions`` (pseudo-impressions of value 0) shrinks pairs seen
   only a few times towards "irrelevant": high grades need evidence.
8. **Grades**: ``grade = number of grade_thresholds <= utility`` (0..3).  The defaults put
   one debiased click in ten impressions at grade 1, four in ten (or fewer with carts /
   purchases) at grade 2 and a product that is clicked and regularly bought at grade 3.
   Pairs with fewer than ``min_impressions`` impressions are dropped.
9. **Weight** (the training loss weight) is a confidence in ``(0, 1)``:
   ``impressions / (impressions + weight_half_impressions)``; human judgments weigh 1.0.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shoprank.data.contracts import EVENT_TYPES, GRADE_MAX, JUDGMENTS, normalize_queries, product_text
from shoprank.datasets import SNAPSHOT_COLUMNS, frequency_buckets

log = logging.getLogger(__name__)

PARAM_PREFIX = "labels."
PROPENSITY_METHODS = ("harvest", "ctr_ratio", "power")
# Same key as the feedback validation suite's "no_duplicate_events" expectation.
DUPLICATE_KEY = ["session_id", "request_id", "product_id", "event_type", "ts"]
REQUIRED_COLUMNS = ["event_id", "ts", "request_id", "session_id", "query", "product_id", "position", "event_type"]
PAIR_COLUMNS = ["query", "product_id", "impressions", "clicks", "carts", "purchases", "ipw_clicks", "ipw_carts",
                "ipw_purchases", "mean_position", "utility", "grade", "weight", "source"]
_SIGNALS = ("click", "add_to_cart", "purchase")
_SIGNAL_COL = {"click": "clicks", "add_to_cart": "carts", "purchase": "purchases"}


@dataclass(frozen=True)
class LabelParams:
    """How feedback becomes labels (see the module docstring for each step)."""

    # derivation version: bump when the algorithm changes, so runs stay comparable
    version: str = "1"
    # utility weights per funnel stage
    w_click: float = 1.0
    w_add_to_cart: float = 3.0
    w_purchase: float = 5.0
    # bot rules (per session)
    max_clicks_per_session: int = 200  # bot even when it buys
    max_clicks_without_purchase: int = 30
    min_median_click_gap_s: float = 1.5  # median gap between consecutive clicks ...
    min_clicks_for_gap_rule: int = 8  # ... over at least this many clicks, no purchase
    max_session_ctr: float = 0.7  # clicks / impressions above this ...
    min_clicks_for_ctr_rule: int = 10  # ... with at least this many clicks, no purchase
    # propensities
    propensity_method: str = "harvest"
    eta: float = 1.0  # 'power' method, and the fallback when harvesting has no usable edge
    max_position: int = 20  # propensities are estimated for positions 1..max_position
    min_harvest_clicks: int = 10  # a position pair needs this many clicks on each side
    min_propensity: float = 0.05  # caps inverse-propensity weights at 20
    # aggregation and grades
    min_impressions: int = 3
    prior_impressions: float = 1.0
    grade_thresholds: tuple[float, float, float] = (0.1, 0.4, 1.5)
    weight_half_impressions: float = 10.0

    def __post_init__(self) -> None:
        if self.propensity_method not in PROPENSITY_METHODS:
            raise ValueError(f"propensity_method {self.propensity_method!r} is not one of {PROPENSITY_METHODS}")
        th = tuple(float(t) for t in self.grade_thresholds)
        if len(th) != GRADE_MAX or any(b < a for a, b in zip(th, th[1:])):
            raise ValueError(f"grade_thresholds must be {GRADE_MAX} non-decreasing numbers, got {self.grade_thresholds}")
        object.__setattr__(self, "grade_thresholds", th)
        if not 0.0 < self.min_propensity <= 1.0:
            raise ValueError("min_propensity must be in (0, 1]")
        if min(self.w_click, self.w_add_to_cart, self.w_purchase) < 0:
            raise ValueError("event weights must be >= 0")
        if self.max_position < 1 or self.min_impressions < 1:
            raise ValueError("max_position and min_impressions must be >= 1")
        if self.prior_impressions < 0 or self.weight_half_impressions <= 0:
            raise ValueError("prior_impressions must be >= 0 and weight_half_impressions > 0")

    def as_params(self) -> dict[str, str]:
        """Flat ``{'labels.<name>': str}`` for ``mlflow.log_params`` (tuples comma-joined)."""
        out = {}
        for k, v in asdict(self).items():
            out[PARAM_PREFIX + k] = ",".join(repr(float(x)) for x in v) if isinstance(v, (tuple, list)) else str(v)
        return out


@dataclass
class LabelResult:
    """Output of :func:`derive_labels`: the graded pairs, what happened, and the parameters."""

    pairs: pd.DataFrame
    stats: dict[str, Any]
    params: LabelParams
    bot_session_ids: list[str] = field(default_factory=list)

    @property
    def propensities(self) -> pd.Series:
        p = self.stats.get("propensities", {})
        return pd.Series({int(k): float(v) for k, v in p.items()}, name="propensity", dtype="float64")

    def as_metrics(self) -> dict[str, float]:
        """Numeric stats as flat MLflow metrics: ``labels.<stat>``, ``labels.propensity_pos_<k>``,
        ``labels.grade_<g>``."""
        out: dict[str, float] = {}
        for k, v in self.stats.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out[PARAM_PREFIX + k] = float(v)
        for pos, p in self.stats.get("propensities", {}).items():
            out[f"{PARAM_PREFIX}propensity_pos_{int(pos)}"] = float(p)
        for g, n in self.stats.get("grade_histogram", {}).items():
            out[f"{PARAM_PREFIX}grade_{int(g)}"] = float(n)
        for rule, n in self.stats.get("bot_rules", {}).items():
            out[f"{PARAM_PREFIX}bot_rule_{rule}"] = float(n)
        return out


# ---------------------------------------------------------------------------------------
# derive_labels
# ---------------------------------------------------------------------------------------
def derive_labels(events: pd.DataFrame, params: LabelParams = LabelParams()) -> LabelResult:
    """Feedback events (FEEDBACK contract) -> graded (query, product) pairs.

    Pure function of its inputs; see the module docstring for the steps.  ``user_id`` and
    ``model_version`` are not needed.
    """
    t0 = time.perf_counter()
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"feedback events lack columns {missing}")
    stats: dict[str, Any] = {"events_in": int(len(events))}
    ev = _clean(events, stats)
    ev = _dedupe(ev, stats)
    ev, bots = _drop_bots(ev, params, stats)
    rp = _per_request(ev, stats)
    prop, method, eta_hat = estimate_propensities(rp, params)
    record_propensities(stats, prop, method, eta_hat)
    pairs = _aggregate(rp, prop, params, stats)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("labels: %d events in -> %d pairs out (grades %s) in %.2fs", stats["events_in"], stats["pairs_out"],
             stats["grade_histogram"], stats["seconds"])
    return LabelResult(pairs=pairs, stats=stats, params=params, bot_session_ids=bots)


def record_propensities(stats: dict[str, Any], prop: pd.Series, method: str, eta_hat: float) -> None:
    """The propensity stats (``propensity_method_used``, ``propensity_eta_hat``, ``propensities``), logged."""
    stats["propensity_method_used"] = method
    stats["propensity_eta_hat"] = round(float(eta_hat), 4)
    stats["propensities"] = {int(k): round(float(v), 4) for k, v in prop.items()}
    log.info("labels: propensities (%s, eta_hat=%.2f): %s", method, eta_hat,
             ", ".join(f"{k}:{v:.3f}" for k, v in prop.items()))


def _clean(events: pd.DataFrame, stats: dict[str, Any]) -> pd.DataFrame:
    ev = events[REQUIRED_COLUMNS].copy()
    for c in ("event_id", "request_id", "session_id", "query", "product_id", "event_type"):
        ev[c] = ev[c].astype("string")
    ev["ts"] = pd.to_datetime(ev["ts"], utc=True)
    ev["position"] = pd.to_numeric(ev["position"], errors="coerce")
    ok = ev[REQUIRED_COLUMNS].notna().all(axis=1) & ev["event_type"].isin(EVENT_TYPES) & (ev["position"] >= 1)
    ok = ok.fillna(False).astype(bool)
    stats["invalid_events_dropped"] = int((~ok).sum())
    ev = ev[ok].copy()
    ev["position"] = ev["position"].astype("int64")
    if stats["invalid_events_dropped"]:
        log.warning("labels: dropped %d invalid events (unknown event_type, position < 1 or missing fields)",
                    stats["invalid_events_dropped"])
    return ev


def _dedupe(ev: pd.DataFrame, stats: dict[str, Any]) -> pd.DataFrame:
    ev = ev.sort_values("ts", kind="stable")
    n0 = len(ev)
    ev = ev.drop_duplicates("event_id", keep="first")
    stats["duplicates_dropped"] = n0 - len(ev)
    n1 = len(ev)
    ev = ev.drop_duplicates(DUPLICATE_KEY, keep="first")
    stats["content_duplicates_dropped"] = n1 - len(ev)
    log.info("labels: dedupe dropped %d repeated event ids and %d same-content events under other ids",
             stats["duplicates_dropped"], stats["content_duplicates_dropped"])
    return ev.reset_index(drop=True)


def detect_bots(events: pd.DataFrame, params: LabelParams = LabelParams()) -> tuple[pd.Index, dict[str, int]]:
    """Session ids that behave like bots (rules in the module docstring), and hits per rule.

    ``events`` must already be deduplicated (``ts`` a datetime column).
    """
    sessions = pd.Index(events["session_id"].unique())
    kind = events["event_type"]
    clicks_ev = events[kind == "click"].sort_values(["session_id", "ts"], kind="stable")
    clicks = clicks_ev.groupby("session_id").size().reindex(sessions, fill_value=0)
    imps = events[kind == "impression"].groupby("session_id").size().reindex(sessions, fill_value=0)
    buys = events[kind == "purchase"].groupby("session_id").size().reindex(sessions, fill_value=0)
    gap_s = clicks_ev["ts"].astype("int64").groupby(clicks_ev["session_id"]).diff() / 1e6
    median_gap = gap_s.groupby(clicks_ev["session_id"]).median().reindex(sessions)
    no_buy = buys == 0
    ctr = clicks / imps.where(imps > 0, np.nan)
    rules = {
        "too_many_clicks": clicks > params.max_clicks_per_session,
        "many_clicks_no_purchase": no_buy & (clicks > params.max_clicks_without_purchase),
        "fast_clicks_no_purchase": no_buy & (clicks >= params.min_clicks_for_gap_rule)
        & (median_gap < params.min_median_click_gap_s).fillna(False),
        "high_ctr_no_purchase": no_buy & (clicks >= params.min_clicks_for_ctr_rule)
        & ((ctr > params.max_session_ctr) | imps.eq(0)).fillna(True),
    }
    is_bot = pd.Series(False, index=sessions)
    for hit in rules.values():
        is_bot |= hit.astype(bool)
    return sessions[is_bot.to_numpy()], {k: int(v.sum()) for k, v in rules.items()}


def _drop_bots(ev: pd.DataFrame, params: LabelParams, stats: dict[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    bots, rules = detect_bots(ev, params)
    drop = ev["session_id"].isin(bots)
    stats["sessions"] = int(ev["session_id"].nunique())
    stats["bot_sessions"] = int(len(bots))
    stats["bot_events_dropped"] = int(drop.sum())
    stats["bot_rules"] = rules
    log.info("labels: %d of %d sessions look like bots (%s); dropped their %d events", len(bots),
             stats["sessions"], rules, stats["bot_events_dropped"])
    return ev[~drop].reset_index(drop=True), sorted(map(str, bots))


def _per_request(ev: pd.DataFrame, stats: dict[str, Any]) -> pd.DataFrame:
    """One row per (request, product): query, position, shown/clicked/carted/purchased flags."""
    for t in EVENT_TYPES:
        stats[f"{t}s_clean"] = int((ev["event_type"] == t).sum())
    n_before = len(ev)
    flags = (ev.assign(one=1).pivot_table(index=["request_id", "product_id"], columns="event_type", values="one",
                                          aggfunc="size", fill_value=0, observed=True)
             .reindex(columns=list(EVENT_TYPES), fill_value=0))
    stats["repeat_events_collapsed"] = int(n_before - (flags > 0).to_numpy().sum())
    imp = ev[ev["event_type"] == "impression"]
    imp_pos = imp.groupby(["request_id", "product_id"])[["position", "query"]].first()  # ts-sorted: first shown
    own = ev.groupby(["request_id", "product_id"])[["position", "query"]].first()
    rp = (flags > 0).astype("int64")
    rp.columns = ["shown", "clicked", "carted", "purchased"]
    rp = rp.join(imp_pos, how="left").reset_index()
    orphan = rp["position"].isna()
    if orphan.any():
        fallback = own.reindex(pd.MultiIndex.from_frame(rp.loc[orphan, ["request_id", "product_id"]]))
        rp.loc[orphan, "position"] = fallback["position"].to_numpy()
        rp.loc[orphan, "query"] = fallback["query"].to_numpy()
    stats["orphan_events"] = int(flags.loc[orphan.to_numpy(), ["click", "add_to_cart", "purchase"]].to_numpy().sum())
    stats["implied_impressions"] = int(orphan.sum())
    stats["requests"] = int(rp["request_id"].nunique())
    rp["position"] = rp["position"].astype("int64")
    rp["query"] = rp["query"].astype("string")
    if orphan.any():
        log.info("labels: %d click/cart/purchase events had no impression of the same request and product; "
                 "their own position is used (%d implied impressions)", stats["orphan_events"], int(orphan.sum()))
    return rp


# ---------------------------------------------------------------------------------------
# propensities
# ---------------------------------------------------------------------------------------
def estimate_propensities(rp: pd.DataFrame, params: LabelParams = LabelParams()) -> tuple[pd.Series, str, float]:
    """Relative examination propensity per position 1..P from per-request rows.

    ``rp`` has one row per (request, product) with ``query``, ``product_id``, ``position``
    and ``clicked`` (0/1).  Returns (propensity by position, method actually used, eta_hat of
    a power-law fit to the result).  P is the largest observed position, capped at
    ``max_position`` (at least 1).
    """
    top = propensity_top(int(rp["position"].max()) if len(rp) else None, params)
    pos = np.minimum(rp["position"].to_numpy(dtype=np.int64), top)
    # first-appearance order (sort=False), as the harvest's pair ids always were: same sums, same bits
    counts = (rp.assign(pos=pos).groupby(["query", "product_id", "pos"], sort=False)["clicked"]
              .agg(n="size", c="sum").reset_index())
    return propensities_from_counts(counts, top, params)


def propensity_top(max_position_seen: int | None, params: LabelParams) -> int:
    """P, the number of positions with a propensity: the largest position seen (None: none seen),
    capped at ``max_position``, at least 1."""
    seen = int(max_position_seen) if max_position_seen is not None else 1
    return int(min(max(seen, 1), params.max_position))


def propensities_from_counts(counts: pd.DataFrame, top: int,
                             params: LabelParams = LabelParams()) -> tuple[pd.Series, str, float]:
    """:func:`estimate_propensities` from a count table, for engines that aggregate elsewhere
    (Spark, DuckDB) and hand over only this small table.

    ``counts``: one row per (``query``, ``product_id``, ``pos``) with ``n`` requests that showed
    the product at ``pos`` and ``c`` of them clicked, ``pos`` already capped at ``top``
    (:func:`propensity_top`).  ``query`` / ``product_id`` are only read by the ``harvest``
    method: for ``ctr_ratio`` and ``power`` one row per ``pos`` is enough.  Returns
    (propensity by position 1..top, method actually used, eta_hat).
    """
    positions = np.arange(1, top + 1)
    by_pos = counts.groupby("pos")[["n", "c"]].sum().reindex(positions, fill_value=0)
    n_at = by_pos["n"].to_numpy(dtype=float)
    method = params.propensity_method
    raw: np.ndarray | None = None
    if method == "harvest":
        if top >= 2 and len(counts):
            t = counts.assign(pair=counts.groupby(["query", "product_id"], sort=False).ngroup())
            raw = harvest_counts(t[["pair", "pos", "n", "c"]], top, params)
        if raw is None:
            log.warning("labels: no position pair has %d+ clicks on both sides for intervention harvesting; "
                        "using the power law with eta=%.2f", params.min_harvest_clicks, params.eta)
            method = "power"
    elif method == "ctr_ratio":
        c_at = by_pos["c"].to_numpy(dtype=float)
        if n_at[0] > 0 and c_at[0] > 0:
            raw = np.where(n_at > 0, c_at / np.maximum(n_at, 1) / (c_at[0] / n_at[0]), np.nan)
        else:
            log.warning("labels: no clicks at position 1; using the power law with eta=%.2f", params.eta)
            method = "power"
    if raw is None:
        raw = positions.astype(float) ** -params.eta
    raw = _fill_power_law(raw, positions)
    p = _isotonic_decreasing(raw, np.maximum(n_at, 1.0))
    p = np.clip(p / p[0], params.min_propensity, 1.0)
    eta_hat = _fit_eta(p, positions)
    return pd.Series(p, index=pd.Index(positions, name="position"), name="propensity"), method, eta_hat


def harvest_counts(t: pd.DataFrame, top: int, params: LabelParams) -> np.ndarray | None:
    """Intervention harvesting: p(k) relative to p(1) by weighted least squares of log p over
    position pairs (see module docstring), NaN where no edge reaches; None when position 1 has
    no usable edge.  ``t``: one row per (``pair``, ``pos``) with ``n`` impressions and ``c``
    clicks, ``pair`` an integer id of the (query, product)."""
    if top < 2 or not len(t):
        return None
    multi = t.groupby("pair")["pos"].transform("size") > 1  # only products seen at 2+ positions help
    t = t[multi]
    if not len(t):
        return None
    m = t.merge(t, on="pair", suffixes=("_j", "_k"))
    m = m[m["pos_j"] < m["pos_k"]]
    w = m["n_j"] * m["n_k"] / (m["n_j"] + m["n_k"])
    m = m.assign(a_j=w * m["c_j"] / m["n_j"], a_k=w * m["c_k"] / m["n_k"])
    e = m.groupby(["pos_j", "pos_k"])[["a_j", "a_k", "c_j", "c_k"]].sum().reset_index()
    e = e[(e["c_j"] >= params.min_harvest_clicks) & (e["c_k"] >= params.min_harvest_clicks)
          & (e["a_j"] > 0) & (e["a_k"] > 0)]
    if not len(e):
        return None
    # positions connected to position 1 through usable edges
    adj: dict[int, set[int]] = {}
    for j, k in zip(e["pos_j"].tolist(), e["pos_k"].tolist()):
        adj.setdefault(j, set()).add(k)
        adj.setdefault(k, set()).add(j)
    if 1 not in adj:
        return None
    reached, stack = {1}, [1]
    while stack:
        for nb in adj[stack.pop()]:
            if nb not in reached:
                reached.add(nb)
                stack.append(nb)
    unknown = sorted(reached - {1})
    col = {k: i for i, k in enumerate(unknown)}
    e = e[e["pos_j"].isin(reached) & e["pos_k"].isin(reached)]
    a = np.zeros((len(e), len(unknown)))
    j = e["pos_j"].to_numpy()
    k = e["pos_k"].to_numpy()
    for r, (jj, kk) in enumerate(zip(j, k)):
        a[r, col[kk]] += 1.0
        if jj != 1:
            a[r, col[jj]] -= 1.0
    b = np.log(e["a_k"].to_numpy() / e["a_j"].to_numpy())
    sw = np.sqrt(1.0 / (1.0 / e["c_j"].to_numpy() + 1.0 / e["c_k"].to_numpy()))
    x = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)[0]
    out = np.full(top, np.nan)
    out[0] = 1.0
    for kk, i in col.items():
        out[kk - 1] = math.exp(x[i])
    return out


def _fit_eta(p: np.ndarray, positions: np.ndarray) -> float:
    """eta of p(k) = k ** -eta, least squares in log space through p(1) = 1."""
    ok = (positions > 1) & np.isfinite(p) & (p > 0)
    if not ok.any():
        return 0.0
    lk = np.log(positions[ok])
    return float(-(lk * np.log(p[ok])).sum() / (lk * lk).sum())


def _fill_power_law(raw: np.ndarray, positions: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw, dtype=float).copy()
    missing = ~np.isfinite(raw) | (raw <= 0)
    if missing.any():
        eta = _fit_eta(np.where(missing, np.nan, raw), positions)
        raw[missing] = positions[missing].astype(float) ** -eta
    return raw


def _isotonic_decreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted pool-adjacent-violators: the closest non-increasing sequence to ``y``."""
    blocks: list[list[float]] = []  # [mean, weight, size]
    for yi, wi in zip(y.tolist(), w.tolist()):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, s2 = blocks.pop()
            m1, w1, s1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, s1 + s2])
    return np.concatenate([np.full(int(s), m) for m, _, s in blocks])


# ---------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------
def grade_of(utility: np.ndarray | pd.Series | float, thresholds: tuple[float, ...]) -> np.ndarray:
    """Grade 0..3: how many thresholds are <= utility."""
    return np.searchsorted(np.asarray(thresholds, dtype=float), np.asarray(utility, dtype=float), side="right")


def _aggregate(rp: pd.DataFrame, prop: pd.Series, params: LabelParams, stats: dict[str, Any]) -> pd.DataFrame:
    p = prop.to_numpy()
    top = len(p)
    inv = 1.0 / p[np.minimum(rp["position"].to_numpy(dtype=np.int64), top) - 1]
    agg = (rp.assign(ipw_clicks=rp["clicked"] * inv, ipw_carts=rp["carted"] * inv, ipw_purchases=rp["purchased"] * inv)
           .groupby(["query", "product_id"], sort=True)
           .agg(impressions=("request_id", "size"), clicks=("clicked", "sum"), carts=("carted", "sum"),
                purchases=("purchased", "sum"), ipw_clicks=("ipw_clicks", "sum"), ipw_carts=("ipw_carts", "sum"),
                ipw_purchases=("ipw_purchases", "sum"), mean_position=("position", "mean"))
           .reset_index())
    return finish_pairs(agg, params, stats)


def finish_pairs(agg: pd.DataFrame, params: LabelParams, stats: dict[str, Any]) -> pd.DataFrame:
    """Step 6's end, 7, 8 and 9 on the (query, product) aggregate (one row per pair, sorted by
    query and product, with ``impressions``, ``clicks``, ``carts``, ``purchases``, the ``ipw_*``
    sums and ``mean_position``; from pandas or another engine): drop pairs under
    ``min_impressions``, grade, weigh, ``PAIR_COLUMNS`` with their dtypes; the pair stats."""
    stats["pairs_seen"] = int(len(agg))
    keep = agg["impressions"] >= params.min_impressions
    stats["pairs_dropped_min_impressions"] = int((~keep).sum())
    agg = grade_pairs(agg[keep].reset_index(drop=True), params)
    # every dtype stated: pandas' group-by sizes of string columns are nullable Int64, which made
    # utility and weight nullable Float64 (and the dtypes depend on the engine and pandas version)
    agg = agg[PAIR_COLUMNS].astype({"query": "string", "product_id": "string", "source": "string",
                                    "impressions": "int64", "clicks": "int64", "carts": "int64",
                                    "purchases": "int64", "grade": "int64", "ipw_clicks": "float64",
                                    "ipw_carts": "float64", "ipw_purchases": "float64", "mean_position": "float64",
                                    "utility": "float64", "weight": "float64"})
    stats["pairs_out"] = int(len(agg))
    stats["grade_histogram"] = {g: int((agg["grade"] == g).sum()) for g in range(GRADE_MAX + 1)}
    stats["queries_out"] = int(agg["query"].nunique())
    log.info("labels: %d (query, product) pairs seen, %d dropped with fewer than %d impressions, %d kept",
             stats["pairs_seen"], stats["pairs_dropped_min_impressions"], params.min_impressions, len(agg))
    return agg


# ---------------------------------------------------------------------------------------
# pairs -> training rows / judgments; replay mixing; holdout
# ---------------------------------------------------------------------------------------
def grade_pairs(agg: pd.DataFrame, params: LabelParams) -> pd.DataFrame:
    """IPW utility, grade, weight and source of (query, product) aggregates that have
    ``impressions`` and ``ipw_clicks`` / ``ipw_carts`` / ``ipw_purchases`` (in place; returned)."""
    value = (params.w_click * agg["ipw_clicks"] + params.w_add_to_cart * agg["ipw_carts"]
             + params.w_purchase * agg["ipw_purchases"])
    agg["utility"] = value / (agg["impressions"] + params.prior_impressions)
    agg["grade"] = grade_of(agg["utility"], params.grade_thresholds).astype("int64")
    agg["weight"] = agg["impressions"] / (agg["impressions"] + params.weight_half_impressions)
    agg["source"] = "derived"
    return agg


def to_judgments(pairs: pd.DataFrame) -> pd.DataFrame:
    """Derived pairs as JUDGMENTS-contract rows (``source = 'derived'``)."""
    return JUDGMENTS.conform(pairs.assign(source="derived"))


def to_training_rows(pairs: pd.DataFrame, catalog: pd.DataFrame, queries: pd.DataFrame | None = None, *,
                     text_template: str | None = None) -> pd.DataFrame:
    """Derived pairs -> rows in the dataset-snapshot split format (``SNAPSHOT_COLUMNS``).

    ``query`` is :func:`~shoprank.data.contracts.normalize_query` of the pairs' query (the
    form serving scores); pairs that become duplicates of one (query, product) keep the row
    with the most impressions (else the highest weight).  ``queries`` is matched on the
    normalised text too (frequencies of variants added up).
    ``text`` comes from :func:`~shoprank.data.contracts.product_text` of the catalogue row
    (``text_template``: ``Settings.product_text_template``; None: the default template);
    pairs whose product is not in ``catalog`` are left out (logged).  ``query_freq_bucket``
    is the pairs' own column when present, else from ``queries`` (as in snapshots), else
    ``'tail'``.  ``category`` follows the snapshot rule, one per query: the query's category
    in ``queries``, else that of its best-graded product in the catalogue; top level only.
    ``weight`` is the pairs' confidence weight (1.0 when absent).
    """
    products = catalog.drop_duplicates("product_id").set_index("product_id")
    texts = product_text(products.reset_index(), text_template).set_axis(products.index)
    known = pairs[pairs["product_id"].isin(products.index)].copy()
    if len(known) < len(pairs):
        log.warning("labels: %d derived pairs name products missing from the catalogue; left out",
                    len(pairs) - len(known))
    known["query"] = normalize_queries(known["query"])
    known = known[known["query"].notna() & (known["query"] != "")]
    dup = known.duplicated(["query", "product_id"], keep=False)
    if dup.any():
        by = [c for c in ("impressions", "weight") if c in known.columns]
        n = len(known)
        if by:
            known = known.sort_values(by, ascending=False, kind="stable")
        known = known.drop_duplicates(["query", "product_id"], keep="first")
        log.info("labels: %d derived pairs repeat a (normalised query, product) pair; kept the one with the most "
                 "impressions (else weight)",
                 n - len(known))
    if queries is not None and len(queries):
        queries = queries.assign(query=normalize_queries(queries["query"]))
        queries = queries[queries["query"].notna()]
        if queries["query"].duplicated().any():
            agg = {"frequency": "sum"} if "frequency" in queries.columns else {}
            if "category" in queries.columns:
                agg["category"] = "first"  # first non-null
            queries = queries.groupby("query", sort=False, as_index=False).agg(agg) if agg else \
                queries.drop_duplicates("query")
    known["text"] = texts.reindex(known["product_id"]).to_numpy()
    known["grade"] = known["grade"].astype("int64")
    known["weight"] = known["weight"].astype("float64") if "weight" in known.columns else 1.0
    if "query_freq_bucket" not in known.columns:
        if queries is not None and len(queries):
            known["query_freq_bucket"] = frequency_buckets(queries).reindex(known["query"]).fillna("tail").to_numpy()
        else:
            known["query_freq_bucket"] = "tail"
    qcat = (queries.drop_duplicates("query").set_index("query")["category"]
            if queries is not None and "category" in queries.columns else pd.Series(dtype="object"))
    order = ["grade", "utility"] if "utility" in known.columns else ["grade"]
    best = (known.sort_values(order + ["product_id"], ascending=[False] * len(order) + [True], kind="stable")
            .drop_duplicates("query").set_index("query")["product_id"].map(products["category"]))
    cat = pd.Series(qcat.reindex(known["query"]).to_numpy(dtype=object), index=known.index)
    cat = cat.where(cat.notna(), best.reindex(known["query"]).to_numpy(dtype=object))
    known["category"] = cat.fillna("unknown").astype(str).str.split(" > ").str[0].to_numpy()
    return (known[SNAPSHOT_COLUMNS].sort_values(["query", "product_id"]).reset_index(drop=True)
            .astype({"query": "string", "product_id": "string", "text": "string", "grade": "int64",
                     "weight": "float64", "query_freq_bucket": "string", "category": "string"}))


def mix_with_replay(new_rows: pd.DataFrame, replay_rows: pd.DataFrame, replay_ratio: float, seed: int = 0,
                    *, drop_overlap: bool = True) -> pd.DataFrame:
    """New rows plus whole replayed queries, so replay is about ``replay_ratio`` of the rows.

    Replay is sampled **by query** (a replayed query brings all its rows, so listwise training
    sees complete lists): the replay queries are put in a seeded random order and taken
    until the replay row count is closest to ``replay_ratio / (1 - replay_ratio) *
    len(new_rows)``.  With ``drop_overlap`` (default) replay rows of a (query, product) that
    the new rows also carry are removed first: fresh signal wins.  Deterministic for a seed
    (and independent of the input row order).  Returns ``SNAPSHOT_COLUMNS``, new rows first;
    ``attrs['mix']`` holds the counts.
    """
    if not 0.0 <= replay_ratio < 1.0:
        raise ValueError("replay_ratio must be in [0, 1)")
    for name, df in (("new_rows", new_rows), ("replay_rows", replay_rows)):
        missing = [c for c in SNAPSHOT_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    new = new_rows[SNAPSHOT_COLUMNS]
    replay = replay_rows[SNAPSHOT_COLUMNS]
    n_overlap = 0
    if drop_overlap and len(new) and len(replay):
        seen = pd.MultiIndex.from_frame(new[["query", "product_id"]].astype(str))
        dup = pd.MultiIndex.from_frame(replay[["query", "product_id"]].astype(str)).isin(seen)
        n_overlap = int(dup.sum())
        replay = replay[~dup]
    target = replay_ratio / (1.0 - replay_ratio) * len(new)
    sizes = replay.groupby("query", sort=True).size()
    order = np.random.default_rng(seed).permutation(len(sizes))
    cum = np.cumsum(sizes.to_numpy()[order])
    if target <= 0 or not len(cum):
        n_take = 0
    else:
        i = int(np.searchsorted(cum, target))  # first prefix reaching the target
        if i >= len(cum):
            n_take = len(cum)
            log.warning("labels: replay holds %d rows, fewer than the %.0f wanted for ratio %.2f; using all",
                        int(cum[-1]), target, replay_ratio)
        else:
            below = cum[i - 1] if i > 0 else 0
            n_take = i if target - below < cum[i] - target else i + 1
    chosen = sizes.index[order[:n_take]]
    picked = replay[replay["query"].isin(chosen)]
    out = pd.concat([new, picked], ignore_index=True)
    mix = {"new_rows": int(len(new)), "replay_rows": int(len(picked)), "replay_queries": int(n_take),
           "replay_overlap_dropped": n_overlap,
           "replay_share": float(len(picked) / len(out)) if len(out) else 0.0}
    out.attrs["mix"] = mix
    log.info("labels: mixed %d new rows with %d replay rows from %d queries (replay share %.2f, target %.2f)",
             mix["new_rows"], mix["replay_rows"], mix["replay_queries"], mix["replay_share"], replay_ratio)
    return out


def _query_hash(query: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:holdout:{query}".encode("utf-8")).digest()[:8], "big") / 2**64


def holdout_split(rows: pd.DataFrame, fraction: float, seed: int = 0,
                  max_rows: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout) by query: the ``round(fraction * n_queries)`` queries with the smallest
    seeded hash (at least one when ``fraction > 0`` and there are 2+ queries) go to holdout.
    ``max_rows`` caps the holdout: queries are taken in hash order while their rows fit (the
    first one always), the rest stay in train, so evaluating the holdout does not grow with a
    day's traffic.

    A query's rank by hash does not depend on the other queries, so the split is stable as
    data grows except at the boundary.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError("fraction must be in [0, 1)")
    if max_rows is not None and max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    query = rows["query"].astype(str)
    queries = sorted(set(query))
    n = int(round(fraction * len(queries)))
    if fraction > 0 and n == 0 and len(queries) >= 2:
        n = 1
    chosen = sorted(queries, key=lambda q: (_query_hash(q, seed), q))[:n]
    if max_rows is not None and chosen:
        sizes = query.value_counts()
        fits = np.cumsum([int(sizes[q]) for q in chosen]) <= max_rows
        chosen = chosen[:max(1, int(fits.sum()))] if fits[0] else chosen[:1]
    mask = query.isin(set(chosen)).to_numpy()
    return rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)


__all__ = [
    "DUPLICATE_KEY", "LabelParams", "LabelResult", "PAIR_COLUMNS", "PROPENSITY_METHODS", "derive_labels",
    "detect_bots", "estimate_propensities", "finish_pairs", "grade_of", "harvest_counts", "holdout_split",
    "mix_with_replay", "propensities_from_counts", "propensity_top", "record_propensities", "to_judgments",
    "to_training_rows",
]
