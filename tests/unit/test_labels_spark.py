"""The label derivation and the online metrics on Spark equal the pandas ones (issue #19).

One simulated day with every defect the derivation handles (repeated event ids, same-content
events under new ids, ties in ``ts`` that only the input order breaks, orphan clicks, invalid
rows, bots of each rule, A/B arms) is written as three Parquet files of different sizes (Spark
would scan them largest first) and derived by both engines."""

from __future__ import annotations

import datetime as dt
import shutil

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyspark", reason="pyspark is not installed (optional: the Spark feedback engine)")
if shutil.which("java") is None:
    pytest.skip("no java on PATH: Spark needs a Java 17 runtime", allow_module_level=True)

from shoprank.config import Settings  # noqa: E402
from shoprank.data.contracts import FEEDBACK  # noqa: E402
from shoprank.data.simulator import random_rank_fn, simulate_day  # noqa: E402
from shoprank.data.synthetic import generate_marketplace  # noqa: E402
from shoprank.labels import LabelParams, derive_labels  # noqa: E402
from shoprank.labels_spark import ROW, derive_labels_spark, online_metrics_by_arm_spark, read_events  # noqa: E402
from shoprank.serving.online import online_metrics_by_arm  # noqa: E402
from shoprank.spark import spark_session  # noqa: E402

SEC = pd.Timedelta(seconds=1)
pytestmark = pytest.mark.slow  # a local Spark session and ten derivations: about a minute on 2 busy cores


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    home = tmp_path_factory.mktemp("spark-home")
    settings = Settings.from_env({"SHOPRANK_SPARK_MASTER": "local[1]", "SHOPRANK_SPARK_SHUFFLE_PARTITIONS": "2",
                                  "SHOPRANK_HOME": str(home), "SHOPRANK_ENV_FILE": str(home / "none.env")})
    session = spark_session(settings, app="shoprank-test-labels-spark")
    yield session
    session.stop()


def _crafted_sessions(t0: pd.Timestamp) -> pd.DataFrame:
    """Sessions that each hit one bot rule (or none), incl. an even number of click gaps."""
    rows = []

    def add(session, kind, product, position, t, request=None):
        rows.append({"event_id": f"{session}-{len(rows)}", "ts": t0 + pd.Timedelta(microseconds=int(t * 1e6)),
                     "request_id": request or f"{session}-r", "session_id": session, "user_id": "u-" + session,
                     "query": "crafted query", "product_id": f"P{product:07d}", "position": position,
                     "event_type": kind, "model_version": None})

    def session(name, n_imps, gaps, buy=False, imps=True):
        if imps:
            for i in range(n_imps):
                add(name, "impression", i, i + 1, 0.0)
        t = 1.0
        add(name, "click", 0, 1, t)
        for i, g in enumerate(gaps, start=1):
            t += g
            add(name, "click", i % n_imps, i % n_imps + 1, t)
        if buy:
            add(name, "purchase", 0, 1, t + 5)

    session("bot-gap", 20, [0.5, 0.5, 0.5, 1.2, 1.7, 3, 3, 3])  # 9 clicks, median gap (1.2+1.7)/2: gap rule
    session("edge-gap", 20, [0.5, 0.5, 0.5, 1.234567, 1.765433, 3, 3, 3])  # median at 1.5 up to rounding
    session("bot-ctr", 12, [10.0] * 9)  # 10 clicks on 12 impressions: CTR rule only
    session("bot-noimp", 12, [10.0] * 9, imps=False)  # clicks, no impression at all: CTR rule (and orphans)
    session("buyer", 50, [10.0] * 34, buy=True)  # 35 clicks but a purchase: human
    return pd.DataFrame(rows)


def _defects(ev: pd.DataFrame, bots: list[str], rng: np.random.Generator) -> pd.DataFrame:
    """The day plus repeated ids, same-content copies, ts ties, orphans, invalid rows and arms, shuffled."""
    clicks = ev[(ev["event_type"] == "click") & ~ev["session_id"].isin(bots)]  # orphans of humans: kept
    # orphans: the impressions of 15 clicked (request, product) removed; three of them also get an
    # add_to_cart at the click's ts with another position (the tie on ts is broken by input order)
    orphan = clicks.sample(15, random_state=1)
    key = pd.MultiIndex.from_frame(ev[["request_id", "product_id"]])
    lost = key.isin(pd.MultiIndex.from_frame(orphan[["request_id", "product_id"]])) & (ev["event_type"] == "impression")
    ev = ev[~lost]
    carts = orphan.head(3).assign(event_type="add_to_cart", position=orphan.head(3)["position"] + 4,
                                  event_id=[f"orphan-cart-{i}" for i in range(3)])
    stray = clicks.head(2).assign(request_id="request-never-shown", event_id=["stray-0", "stray-1"])
    # repeated event ids: later copies, copies at the same ts with another position, exact copies
    rep = ev.sample(30, random_state=2)
    rep_later = rep.iloc[:10].assign(ts=rep.iloc[:10]["ts"] + SEC)
    rep_tie = rep.iloc[10:20].assign(position=rep.iloc[10:20]["position"] + 1)
    rep_same = rep.iloc[20:]
    # same content under a new id (identical, or another position: same DUPLICATE_KEY, a tie)
    same = ev.sample(20, random_state=3)
    same = same.assign(event_id=[f"retry-{i}" for i in range(20)],
                       position=np.where(np.arange(20) < 10, same["position"], same["position"] + 2))
    # an impression shown again 2 s later at another position (not a duplicate: its first one counts)
    human = ~ev["session_id"].isin(bots)
    imps = ev[(ev["event_type"] == "impression") & human].sample(5, random_state=4)
    again = imps.assign(ts=imps["ts"] + 2 * SEC, position=imps["position"] + 3,
                        event_id=[f"again-{i}" for i in range(5)])
    # double clicks (a new id 0.3 s later): one click per request and product
    double = clicks.sample(5, random_state=6)
    double = double.assign(ts=double["ts"] + 0.3 * SEC, event_id=[f"double-{i}" for i in range(5)])
    # invalid rows
    bad = ev.sample(15, random_state=5).copy()
    bad["event_id"] = [f"bad-{i}" for i in range(15)]
    bad.iloc[:5, bad.columns.get_loc("event_type")] = "hover"
    bad.iloc[5:10, bad.columns.get_loc("position")] = 0
    bad.iloc[10:12, bad.columns.get_loc("position")] = -1
    bad.iloc[12:, bad.columns.get_loc("query")] = None
    out = pd.concat([ev, carts, stray, rep_later, rep_tie, rep_same, same, again, double, bad], ignore_index=True)
    out = out.iloc[rng.permutation(len(out))].reset_index(drop=True)
    # A/B arms by session, some missing or odd (online metrics map them to a key)
    sessions = out["session_id"].drop_duplicates().to_numpy()
    arms = dict(zip(sessions, rng.choice(["champion", "challenger", "blue team!", None], size=len(sessions),
                                         p=[0.45, 0.45, 0.05, 0.05])))
    out["arm"] = out["session_id"].map(arms).astype("string")
    return FEEDBACK.conform(out)


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    market = generate_marketplace(n_products=300, n_queries=30, seed=4)
    ev = simulate_day(market, market.start + dt.timedelta(days=1), random_rank_fn, n_sessions=250, seed=4,
                      bot_fraction=0.05, hmac_key=b"test")
    bots = [*ev.attrs["bot_session_ids"], "bot-gap", "bot-ctr", "bot-noimp"]
    ev = pd.concat([ev, FEEDBACK.conform(_crafted_sessions(ev["ts"].min() + pd.Timedelta(hours=12)))],
                   ignore_index=True)
    events = _defects(ev, bots, np.random.default_rng(19))
    folder = tmp_path_factory.mktemp("feedback")
    cuts = [0, len(events) // 10, len(events) * 7 // 10, len(events)]  # 10% / 60% / 30%: not by size
    paths = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        path = folder / f"part-{i:05d}.parquet"
        events.iloc[a:b].to_parquet(path, index=False)
        paths.append(str(path))
    # what Storage.read_partition hands to derive_labels: the files' frames concatenated in key order
    pandas_events = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    assert str(pandas_events["ts"].dtype) == "datetime64[us, UTC]"  # the contract's unit (bot gap rule)
    return pandas_events, paths


def test_read_events_keeps_the_input_order(spark, day):
    pandas_events, paths = day
    got = read_events(spark, paths).select("event_id", ROW).toPandas().sort_values(ROW)
    assert got["event_id"].tolist() == pandas_events["event_id"].tolist()


CASES = {
    "default": LabelParams(),
    "ctr_ratio": LabelParams(propensity_method="ctr_ratio"),
    "power": LabelParams(propensity_method="power", eta=0.7),
    "knobs": LabelParams(propensity_method="ctr_ratio", w_click=2.0, w_add_to_cart=1.0, w_purchase=7.0,
                         max_clicks_per_session=30, max_clicks_without_purchase=12, min_median_click_gap_s=3.0,
                         min_clicks_for_gap_rule=5, max_session_ctr=0.5, min_clicks_for_ctr_rule=6, max_position=5,
                         min_propensity=0.3, min_impressions=1, prior_impressions=0.0,
                         grade_thresholds=(0.05, 0.2, 0.8), weight_half_impressions=4.0),
    "harvest_falls_back": LabelParams(min_harvest_clicks=10**6, eta=1.3),
}


@pytest.mark.parametrize("case", [*CASES, "many_duplicates"])
def test_spark_labels_equal_pandas(spark, day, case, monkeypatch):
    pandas_events, paths = day
    if case == "many_duplicates":  # the repeated ids / contents too many to broadcast: a shuffle join finds them
        import shoprank.labels_spark as labels_spark

        monkeypatch.setattr(labels_spark, "BROADCAST_KEYS", 0)
    params = CASES.get(case, LabelParams())
    want = derive_labels(pandas_events, params)
    got = derive_labels_spark(spark, read_events(spark, paths), params)

    pd.testing.assert_frame_equal(got.pairs, want.pairs, check_exact=False, rtol=1e-9, atol=1e-12)
    strip = lambda stats: {k: v for k, v in stats.items() if k != "seconds"}  # noqa: E731
    assert list(strip(got.stats)) == list(strip(want.stats))
    assert strip(got.stats) == strip(want.stats)
    assert got.bot_session_ids == want.bot_session_ids
    assert got.params == params
    s = want.stats
    if case == "default":  # the day really has what the derivation must handle
        assert s["invalid_events_dropped"] == 15 and s["duplicates_dropped"] == 30
        assert s["content_duplicates_dropped"] >= 20 and s["orphan_events"] >= 20
        assert s["repeat_events_collapsed"] > 0 and s["propensity_method_used"] == "harvest"
        assert all(n > 0 for n in s["bot_rules"].values()) and len(set(s["bot_rules"].values())) > 1
        assert {"bot-gap", "bot-ctr", "bot-noimp"} <= set(want.bot_session_ids)
        assert "buyer" not in want.bot_session_ids
        assert set(want.pairs["grade"]) == {0, 1, 2, 3}
    if case == "harvest_falls_back":
        assert s["propensity_method_used"] == "power"


def test_spark_online_metrics_equal_pandas(spark, day):
    pandas_events, paths = day
    want = online_metrics_by_arm(pandas_events)
    got = online_metrics_by_arm_spark(read_events(spark, paths))
    assert sorted(got) == sorted(want)
    assert {k.split("_")[1] for k in want} >= {"champion", "challenger"} and any("blue_team_" in k for k in want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
    no_arm = online_metrics_by_arm_spark(read_events(spark, paths).drop("arm"))
    assert no_arm == pytest.approx(online_metrics_by_arm(pandas_events.drop(columns="arm")), rel=1e-12)
    assert online_metrics_by_arm_spark(read_events(spark, paths).limit(0)) == {}
    with pytest.raises(ValueError, match="position"):
        online_metrics_by_arm_spark(read_events(spark, paths).drop("position"))


def test_spark_labels_without_the_input_order_column(spark, day):
    """A frame not made by read_events (one pandas frame -> createDataFrame keeps its row order)."""
    pandas_events, _ = day
    frame = pandas_events.astype({c: object for c in pandas_events.columns if c not in ("ts", "position")})
    sdf = spark.createDataFrame(frame.where(frame.notna(), None))
    params = CASES["default"]
    want = derive_labels(pandas_events, params)
    got = derive_labels_spark(spark, sdf, params)
    pd.testing.assert_frame_equal(got.pairs, want.pairs, check_exact=False, rtol=1e-9, atol=1e-12)
    assert got.bot_session_ids == want.bot_session_ids
