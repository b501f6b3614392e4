"""Feedback -> labels: dedupe, bots, propensities, IPW utility, grades, replay mixing, holdout."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from shoprank.data.contracts import FEEDBACK, JUDGMENTS, product_text
from shoprank.data.simulator import oracle_rank_fn, random_rank_fn, simulate_day
from shoprank.data.synthetic import generate_marketplace
from shoprank.datasets import SNAPSHOT_COLUMNS
from shoprank.labels import (
    PAIR_COLUMNS,
    LabelParams,
    derive_labels,
    detect_bots,
    estimate_propensities,
    grade_of,
    holdout_split,
    mix_with_replay,
    to_judgments,
    to_training_rows,
)

T0 = pd.Timestamp("2026-11-02 10:00:00", tz="UTC")
POWER = LabelParams(propensity_method="power", eta=1.0, prior_impressions=0.0, min_impressions=1)


class Log:
    """Builds hand-made FEEDBACK events."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, kind: str, product: str, position: int, *, request: str = "r1", session: str = "s1",
            query: str = "red shoes", t: float = 0.0, event_id: str | None = None) -> "Log":
        self.rows.append({"event_id": event_id or f"e{len(self.rows)}", "ts": T0 + pd.Timedelta(seconds=t),
                          "request_id": request, "session_id": session, "user_id": "u-" + session,
                          "query": query, "product_id": product, "position": position, "event_type": kind,
                          "model_version": "1"})
        return self

    def shown(self, products: list[str], *, request: str, session: str = "s1", query: str = "red shoes",
              t: float = 0.0) -> "Log":
        for i, p in enumerate(products, start=1):
            self.add("impression", p, i, request=request, session=session, query=query, t=t)
        return self

    def frame(self) -> pd.DataFrame:
        return FEEDBACK.conform(pd.DataFrame(self.rows, columns=FEEDBACK.names))


def pair(res, product: str, query: str = "red shoes") -> pd.Series:
    p = res.pairs
    hit = p[(p["query"] == query) & (p["product_id"] == product)]
    assert len(hit) == 1, f"no single pair for {query!r}/{product!r}"
    return hit.iloc[0]


# ---------------------------------------------------------------------------------------
# params
# ---------------------------------------------------------------------------------------
def test_as_params_flat_strings_with_prefix():
    params = LabelParams()
    flat = params.as_params()
    assert flat and all(k.startswith("labels.") for k in flat)
    assert all(isinstance(v, str) for v in flat.values())
    assert flat["labels.w_purchase"] == "5.0"
    assert flat["labels.propensity_method"] == "harvest"
    assert flat["labels.grade_thresholds"] == "0.1,0.4,1.5"
    assert len(flat) == len(dataclasses.fields(LabelParams))
    assert all(len(k) <= 250 and len(v) <= 6000 for k, v in flat.items())  # MLflow limits
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.w_click = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [{"propensity_method": "magic"}, {"grade_thresholds": (1.0, 0.5, 2.0)},
                                 {"grade_thresholds": (0.1, 0.2)}, {"min_propensity": 0.0},
                                 {"w_click": -1.0}, {"min_impressions": 0}])
def test_params_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        LabelParams(**bad)


# ---------------------------------------------------------------------------------------
# cleaning
# ---------------------------------------------------------------------------------------
def test_dedupe_by_event_id_and_by_content_and_once_per_request():
    log = Log().shown(["a", "b", "c"], request="r1")
    log.add("click", "a", 1, t=5, event_id="click-1")
    log.add("click", "a", 1, t=5, event_id="click-1")  # same id, replayed
    log.add("click", "b", 2, t=9, event_id="click-2")
    log.add("click", "b", 2, t=9, event_id="click-2-retry")  # same content, new id
    log.add("click", "b", 2, t=12)  # a real second click on b in the same request
    log.add("impression", "c", 3, t=0)  # c's impression logged twice (same content)
    res = derive_labels(log.frame(), POWER)
    s = res.stats
    assert s["events_in"] == 9
    assert s["duplicates_dropped"] == 1
    assert s["content_duplicates_dropped"] == 2
    assert s["repeat_events_collapsed"] == 1  # b's second click counts once
    assert (pair(res, "a")["clicks"], pair(res, "b")["clicks"], pair(res, "c")["clicks"]) == (1, 1, 0)
    assert pair(res, "c")["impressions"] == 1
    assert set(res.pairs.columns) == set(PAIR_COLUMNS)
    assert (res.pairs["source"] == "derived").all()


def test_invalid_events_dropped_and_counted():
    log = Log().shown(["a", "b"], request="r1")
    df = log.frame()
    bad = df.iloc[[0]].assign(event_id="x1", event_type="hover")
    bad2 = df.iloc[[0]].assign(event_id="x2", position=0)
    res = derive_labels(pd.concat([df, bad, bad2], ignore_index=True), POWER)
    assert res.stats["invalid_events_dropped"] == 2
    assert res.stats["pairs_out"] == 2


def test_missing_columns_raise():
    with pytest.raises(ValueError, match="position"):
        derive_labels(Log().shown(["a"], request="r1").frame().drop(columns=["position"]))


def test_empty_log_gives_empty_pairs():
    res = derive_labels(Log().frame())
    assert list(res.pairs.columns) == PAIR_COLUMNS and res.pairs.empty
    assert res.stats["pairs_out"] == 0 and res.stats["propensities"] == {1: 1.0}


# ---------------------------------------------------------------------------------------
# bots
# ---------------------------------------------------------------------------------------
def _bot_log() -> Log:
    log = Log()
    # human: two searches, a few clicks tens of seconds apart, buys one product
    log.shown(list("abcdefghij"), request="h1", session="human", t=0)
    log.add("click", "a", 1, request="h1", session="human", t=20)
    log.add("click", "c", 3, request="h1", session="human", t=60)
    log.add("add_to_cart", "c", 3, request="h1", session="human", t=90)
    log.add("purchase", "c", 3, request="h1", session="human", t=200)
    log.shown(list("abcdefghij"), request="h2", session="human", t=300)
    log.add("click", "b", 2, request="h2", session="human", t=330)
    # scraper: 5 searches, clicks 9 of 10 results 0.5 s apart, never buys
    t = 1000.0
    for r in range(5):
        log.shown(list("abcdefghij"), request=f"b{r}", session="bot", t=t)
        for i, p in enumerate("abcdefghi", start=1):
            t += 0.5
            log.add("click", p, i, request=f"b{r}", session="bot", t=t)
        t += 2
    # fast clicker (opens 9 tabs in 4 s) who then buys: a human
    log.shown(list("abcdefghij"), request="t1", session="tabber", t=5000)
    for i, p in enumerate("abcdefghi", start=1):
        log.add("click", p, i, request="t1", session="tabber", t=5000 + 0.5 * i)
    log.add("add_to_cart", "d", 4, request="t1", session="tabber", t=5100)
    log.add("purchase", "d", 4, request="t1", session="tabber", t=5200)
    # burst clicker: 8 clicks 1 s apart on 20 impressions, no purchase (gap rule only)
    log.shown(list("abcdefghij"), request="f1", session="fast", t=8000)
    log.shown(list("klmnopqrst"), request="f2", session="fast", t=8001)
    for i, p in enumerate("abcdefgh", start=1):
        log.add("click", p, i, request="f1", session="fast", t=8001 + i)
    return log


def test_bot_session_dropped_human_sessions_kept():
    ev = _bot_log().frame()
    res = derive_labels(ev, POWER)
    assert res.bot_session_ids == ["bot", "fast"]
    assert res.stats["bot_sessions"] == 2 and res.stats["sessions"] == 4
    assert res.stats["bot_events_dropped"] == int(ev["session_id"].isin(["bot", "fast"]).sum())
    rules = res.stats["bot_rules"]
    assert rules["many_clicks_no_purchase"] == 1  # 45 clicks > 30
    assert rules["fast_clicks_no_purchase"] == 2  # bot and burst clicker
    assert rules["high_ctr_no_purchase"] == 1  # bot: 45/50
    # the human and the tab-opener (buys) remain: c shown in h1, h2, t1; clicked in h1 and t1
    c = pair(res, "c")
    assert (c["impressions"], c["clicks"], c["carts"], c["purchases"]) == (3, 2, 1, 1)


def test_bot_rules_are_configurable():
    ev = _bot_log().frame()
    lenient = LabelParams(max_clicks_without_purchase=1000, min_clicks_for_gap_rule=1000,
                          min_clicks_for_ctr_rule=1000)
    assert len(detect_bots(ev, lenient)[0]) == 0
    strict = LabelParams(max_clicks_per_session=5)  # even buying sessions above 5 clicks
    assert set(detect_bots(ev, strict)[0]) == {"bot", "fast", "tabber"}


# ---------------------------------------------------------------------------------------
# propensities
# ---------------------------------------------------------------------------------------
def pbm_log(seed: int, eta: float = 1.0, n_queries: int = 40, n_cands: int = 15, n_requests: int = 250,
            top_k: int = 10, noise: float = 0.25) -> pd.DataFrame:
    """Position-based-model clicks: P(click) = (1 / pos ** eta) * attractiveness, where the logging
    ranker sorts by attractiveness + noise (so top positions hold the more attractive products:
    the raw CTR by position is confounded)."""
    rng = np.random.default_rng(seed)
    attract = rng.uniform(0.05, 0.9, size=(n_queries, n_cands))
    examine = 1.0 / np.arange(1, top_k + 1) ** eta
    q = np.repeat(np.arange(n_queries), n_requests)
    n = len(q)
    shown = np.argsort(-(attract[q] + rng.normal(0, noise, size=(n, n_cands))), axis=1)[:, :top_k]
    a = np.take_along_axis(attract[q], shown, axis=1)
    clicked = ((rng.random((n, top_k)) < examine) & (rng.random((n, top_k)) < a)).reshape(-1)
    req = np.repeat(np.arange(n), top_k)
    pos = np.tile(np.arange(1, top_k + 1), n)
    imp = pd.DataFrame({"request_id": req, "query": np.repeat(q, top_k), "product_id": shown.reshape(-1),
                        "position": pos, "ts": T0 + pd.to_timedelta(req * 60 + pos, unit="s"),
                        "event_type": "impression"})
    clk = imp[clicked].assign(event_type="click", ts=lambda d: d["ts"] + pd.Timedelta(seconds=30))
    ev = pd.concat([imp, clk], ignore_index=True)
    ev["request_id"] = "r" + ev["request_id"].astype(str)
    ev["session_id"] = ev["request_id"]
    ev["user_id"] = "u"
    ev["query"] = "q" + ev["query"].astype(str)
    ev["product_id"] = ev["query"] + "-p" + ev["product_id"].astype(str)
    ev["event_id"] = [f"e{i}" for i in range(len(ev))]
    ev["model_version"] = "1"
    return FEEDBACK.conform(ev)


@pytest.mark.parametrize("seed,eta", [(0, 1.0), (1, 0.7)])
def test_harvested_propensities_recover_known_position_bias(seed, eta):
    ev = pbm_log(seed, eta=eta)
    truth = 1.0 / np.arange(1, 11) ** eta
    res = derive_labels(ev, LabelParams(propensity_method="harvest"))
    p = res.propensities.to_numpy()
    assert res.stats["propensity_method_used"] == "harvest"
    assert p[0] == 1.0 and (np.diff(p) <= 0).all()
    assert np.max(np.abs(p / truth - 1)) < 0.2, p.round(3)
    assert res.stats["propensity_eta_hat"] == pytest.approx(eta, abs=0.1)
    # the raw CTR ratio is confounded by the ranker and much further from the truth
    naive = derive_labels(ev, LabelParams(propensity_method="ctr_ratio")).propensities.to_numpy()
    assert np.max(np.abs(naive / truth - 1)) > 2 * np.max(np.abs(p / truth - 1))


def test_propensity_fallback_without_position_variation_and_clipping():
    # every product always at the same position: nothing to harvest -> power law prior
    log = Log()
    for r in range(30):
        log.shown(list("abcdefghij"), request=f"r{r}", session=f"s{r}", t=r * 100)
        log.add("click", "a", 1, request=f"r{r}", session=f"s{r}", t=r * 100 + 10)
    params = LabelParams(eta=1.5, min_propensity=0.1)
    res = derive_labels(log.frame(), params)
    assert res.stats["propensity_method_used"] == "power"
    p = res.propensities
    assert p[2] == pytest.approx(2 ** -1.5, abs=1e-3)
    assert p[10] == pytest.approx(0.1)  # 10 ** -1.5 = 0.03 clipped to min_propensity


def test_isotonic_and_position_cap():
    rp = pd.DataFrame({"query": "q", "product_id": ["a", "b", "c", "d"], "position": [1, 2, 3, 50],
                       "clicked": [1, 1, 1, 0], "request_id": "r"})
    p, method, _ = estimate_propensities(rp, LabelParams(propensity_method="ctr_ratio", max_position=5))
    assert method == "ctr_ratio" and list(p.index) == [1, 2, 3, 4, 5]
    assert (np.diff(p.to_numpy()) <= 0).all() and p[1] == 1.0


# ---------------------------------------------------------------------------------------
# utility and grades
# ---------------------------------------------------------------------------------------
def test_ipw_lifts_relevant_product_shown_low():
    log = Log()
    for r in range(10):
        log.shown(["top", "x", "y", "z", "low"], request=f"r{r}", session=f"s{r}", t=100 * r)
    for r in range(3):
        log.add("click", "top", 1, request=f"r{r}", session=f"s{r}", t=100 * r + 10)
    for r in range(2):
        log.add("click", "low", 5, request=f"r{r}", session=f"s{r}", t=100 * r + 20)
    res = derive_labels(log.frame(), POWER)
    top, low = pair(res, "top"), pair(res, "low")
    assert low["clicks"] / low["impressions"] < top["clicks"] / top["impressions"]  # naive CTR 0.2 < 0.3
    assert low["ipw_clicks"] == pytest.approx(10.0)  # 2 clicks / p(5) = 0.2
    assert low["utility"] == pytest.approx(1.0) and top["utility"] == pytest.approx(0.3)
    assert low["grade"] > top["grade"]


def test_grade_mapping_on_hand_computed_utilities():
    th = (0.1, 0.4, 1.5)
    assert grade_of([0.0, 0.099, 0.1, 0.39, 0.4, 1.49, 1.5, 9.0], th).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    log = Log()
    for r in range(10):
        log.shown(["one", "two"], request=f"r{r}", session=f"s{r}", t=100 * r)
    log.add("click", "one", 1, request="r0", session="s0", t=5)  # 1/10 = 0.1 -> grade 1
    for r in range(2):  # position 2 (p=0.5): 2 clicks + 1 cart -> (1*4 + 3*2) / 10 = 1.0 -> grade 2
        log.add("click", "two", 2, request=f"r{r}", session=f"s{r}", t=100 * r + 6)
    log.add("add_to_cart", "two", 2, request="r0", session="s0", t=8)
    res = derive_labels(log.frame(), POWER)
    assert pair(res, "one")[["utility", "grade"]].tolist() == [pytest.approx(0.1), 1]
    assert pair(res, "two")[["utility", "grade"]].tolist() == [pytest.approx(1.0), 2]
    # shrinkage: one pseudo-impression of value 0 -> 1/11
    shrunk = derive_labels(log.frame(), dataclasses.replace(POWER, prior_impressions=1.0))
    assert pair(shrunk, "one")["utility"] == pytest.approx(1 / 11)
    assert pair(shrunk, "one")["grade"] == 0
    assert res.stats["grade_histogram"] == {0: 0, 1: 1, 2: 1, 3: 0}


def test_purchases_outrank_clicks():
    log = Log()
    for r in range(6):
        log.shown(["clicky", "bought"], request=f"r{r}", session=f"s{r}", t=100 * r)
    for r in range(3):
        log.add("click", "clicky", 1, request=f"r{r}", session=f"s{r}", t=100 * r + 5)
    log.add("click", "bought", 2, request="r5", session="s5", t=510)
    log.add("add_to_cart", "bought", 2, request="r5", session="s5", t=520)
    log.add("purchase", "bought", 2, request="r5", session="s5", t=530)
    res = derive_labels(log.frame(), dataclasses.replace(POWER, propensity_method="power", eta=0.0))
    clicky, bought = pair(res, "clicky"), pair(res, "bought")
    assert clicky["clicks"] > bought["clicks"]
    assert bought["utility"] == pytest.approx(9 / 6) and clicky["utility"] == pytest.approx(3 / 6)
    assert bought["grade"] > clicky["grade"]


def test_min_impressions_filter_and_weight():
    log = Log()
    for r in range(5):
        log.shown(["often"], request=f"r{r}", session=f"s{r}", t=100 * r)
    log.shown(["rare"], request="r9", session="s9", t=900)
    log.shown(["rare"], request="r8", session="s8", t=800)
    res = derive_labels(log.frame(), dataclasses.replace(POWER, min_impressions=3))
    assert res.pairs["product_id"].tolist() == ["often"]
    assert res.stats["pairs_dropped_min_impressions"] == 1
    assert pair(res, "often")["weight"] == pytest.approx(5 / 15)  # 5 / (5 + weight_half_impressions)


def test_orphan_click_uses_own_position_and_counts_an_impression():
    log = Log().shown(["a", "b"], request="r1")
    log.add("click", "z", 4, request="r1", t=5)  # impression of z was lost
    res = derive_labels(log.frame(), POWER)
    z = pair(res, "z")
    assert (z["impressions"], z["clicks"], z["mean_position"]) == (1, 1, 4.0)
    assert z["ipw_clicks"] == pytest.approx(4.0)
    assert res.stats["orphan_events"] == 1 and res.stats["implied_impressions"] == 1


def test_as_metrics_flat_numbers():
    res = derive_labels(_bot_log().frame(), POWER)
    m = res.as_metrics()
    assert m["labels.bot_sessions"] == 2.0 and m["labels.propensity_pos_1"] == 1.0
    assert "labels.grade_0" in m and "labels.bot_rule_fast_clicks_no_purchase" in m
    assert all(isinstance(v, float) for v in m.values())


# ---------------------------------------------------------------------------------------
# training rows, replay, holdout
# ---------------------------------------------------------------------------------------
def _catalog() -> pd.DataFrame:
    return pd.DataFrame({"product_id": ["a", "b", "c"], "title": ["Red shoe", "Blue shoe", "Lamp"],
                         "description": ["nice", None, "bright"],
                         "category": ["Fashion > Shoes > Sneakers", "Fashion > Shoes > Boots", "Home > Lighting"],
                         "brand": ["Acme", "Bolt", None]})


def test_to_training_rows_snapshot_format():
    pairs = pd.DataFrame({"query": ["red shoes", "red shoes", "lamp", "lamp"], "product_id": ["a", "b", "c", "gone"],
                          "grade": [3, 1, 2, 3], "weight": [0.5, 0.2, 0.4, 0.9], "utility": [2.0, 0.2, 0.5, 3.0]})
    rows = to_training_rows(pairs, _catalog())
    assert list(rows.columns) == SNAPSHOT_COLUMNS and len(rows) == 3  # 'gone' is not in the catalogue
    a = rows[rows["product_id"] == "a"].iloc[0]
    assert a["text"] == product_text(_catalog().iloc[[0]]).iloc[0]
    assert (a["grade"], a["weight"], a["query_freq_bucket"], a["category"]) == (3, 0.5, "tail", "Fashion")
    assert rows.loc[rows["query"] == "lamp", "category"].tolist() == ["Home"]
    queries = pd.DataFrame({"query": ["red shoes", "lamp"], "frequency": [100, 1], "category": ["Sports > X", None]})
    with_q = to_training_rows(pairs, _catalog(), queries)
    assert with_q.set_index("product_id").loc["a", "query_freq_bucket"] == "head"
    assert with_q.set_index("product_id").loc["a", "category"] == "Sports"
    assert with_q.set_index("product_id").loc["c", "category"] == "Home"
    j = to_judgments(pairs)
    assert list(j.columns) == JUDGMENTS.names and (j["source"] == "derived").all()


def _rows(prefix: str, n_queries: int, rng: np.random.Generator, grade: int = 1) -> pd.DataFrame:
    out = []
    for qi in range(n_queries):
        for pi in range(int(rng.integers(2, 9))):
            out.append((f"{prefix}{qi}", f"p{pi}", "text", grade, 1.0, "tail", "Home"))
    return pd.DataFrame(out, columns=SNAPSHOT_COLUMNS)


def test_mix_with_replay_ratio_by_query_and_deterministic():
    rng = np.random.default_rng(0)
    new, replay = _rows("new", 40, rng, grade=2), _rows("old", 200, rng)
    replay = pd.concat([replay, new.iloc[:3].assign(grade=0)], ignore_index=True)  # overlaps new
    mixed = mix_with_replay(new, replay, 0.3, seed=7)
    picked = mixed[mixed["query"].str.startswith("old")]
    assert abs(len(picked) / len(mixed) - 0.3) < 0.02
    assert mixed.attrs["mix"]["replay_rows"] == len(picked)
    assert mixed.attrs["mix"]["replay_overlap_dropped"] == 3
    assert len(mixed.drop_duplicates(["query", "product_id"])) == len(mixed)
    sizes = replay.groupby("query").size()
    assert picked.groupby("query").size().to_dict() == sizes[sizes.index.isin(picked["query"])].to_dict()  # whole queries
    assert len(mixed[mixed["query"].str.startswith("new")]) == len(new)
    again = mix_with_replay(new, replay.sample(frac=1.0, random_state=1), 0.3, seed=7)
    assert set(again["query"]) == set(mixed["query"])  # seed decides, not row order
    other = mix_with_replay(new, replay, 0.3, seed=8)
    assert set(other["query"]) != set(mixed["query"])
    assert len(mix_with_replay(new, replay, 0.0, seed=7)) == len(new)
    few = mix_with_replay(new, replay.head(10), 0.9, seed=7)  # not enough replay: all of it
    assert few.attrs["mix"]["replay_rows"] == len(replay.head(10))
    with pytest.raises(ValueError):
        mix_with_replay(new, replay, 1.0)


def test_holdout_split_by_query():
    rows = _rows("q", 50, np.random.default_rng(1))
    train, held = holdout_split(rows, 0.2, seed=3)
    assert len(train) + len(held) == len(rows)
    assert not set(train["query"]) & set(held["query"])
    assert held["query"].nunique() == 10
    train2, held2 = holdout_split(rows.sample(frac=1.0, random_state=0), 0.2, seed=3)
    assert set(held2["query"]) == set(held["query"])
    assert set(holdout_split(rows, 0.2, seed=4)[1]["query"]) != set(held["query"])
    five = rows[rows["query"].isin(["q1", "q2", "q3", "q4", "q5"])]
    assert holdout_split(five, 0.01, seed=3)[1]["query"].nunique() == 1  # at least one query
    assert holdout_split(rows, 0.0)[1].empty


def test_holdout_is_capped_by_whole_queries_so_evaluation_does_not_grow_with_traffic():
    rows = _rows("q", 50, np.random.default_rng(1))
    _, held = holdout_split(rows, 0.2, seed=3)
    sizes = held["query"].value_counts()
    budget = int(sizes.sum() // 2)
    train, capped = holdout_split(rows, 0.2, seed=3, max_rows=budget)
    assert 0 < len(capped) <= budget and len(train) + len(capped) == len(rows)
    assert capped["query"].nunique() < held["query"].nunique()
    assert set(capped["query"]) <= set(held["query"])  # the same queries first: stable as traffic grows
    assert not set(train["query"]) & set(capped["query"])  # whole queries only
    assert holdout_split(rows, 0.2, seed=3, max_rows=1)[1]["query"].nunique() == 1  # never empty
    with pytest.raises(ValueError):
        holdout_split(rows, 0.2, max_rows=0)


def test_daily_train_params_follow_the_policy_per_mode(monkeypatch):
    from dataclasses import asdict

    from shoprank.daily import UpdatePolicy, train_params

    monkeypatch.setenv("SHOPRANK_DAILY_MAX_STEPS", "7")
    monkeypatch.setenv("SHOPRANK_DAILY_FULL_MAX_STEPS", "70")
    policy = asdict(UpdatePolicy.from_env())
    warm = train_params({"mode": "warm", "update_policy": policy})
    full = train_params({"mode": "full", "update_policy": policy})
    assert warm["max_steps"] == 7 and full["max_steps"] == 70
    assert warm["lr"] < full["lr"]  # a warm start moves the champion gently


# ---------------------------------------------------------------------------------------
# end to end on the simulator
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def market():
    return generate_marketplace(n_products=300, n_queries=30, seed=4)


@pytest.mark.parametrize("ranker", ["oracle", "random"])
def test_simulated_day_grades_follow_hidden_relevance_and_bots_removed(market, ranker):
    fn = oracle_rank_fn(market) if ranker == "oracle" else random_rank_fn
    ev = simulate_day(market, market.start + dt.timedelta(days=1), fn, n_sessions=250, seed=4,
                      bot_fraction=0.05, hmac_key=b"test")
    res = derive_labels(ev)
    assert res.stats["bot_sessions"] == len(ev.attrs["bot_session_ids"]) > 0
    assert res.bot_session_ids == sorted(ev.attrs["bot_session_ids"])  # all bots, no human
    pairs = res.pairs
    rel = np.concatenate([market.true_relevance(q, [p]) for q, p in zip(pairs["query"], pairs["product_id"])])
    rho = spearmanr(pairs["grade"], rel)[0]
    assert rho > 0.4, rho
    assert pairs["grade"].nunique() == 4
    assert 0.6 < res.stats["propensity_eta_hat"] < 1.5  # simulator's eta is 1
