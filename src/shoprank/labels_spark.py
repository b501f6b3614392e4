"""The label derivation and the per-arm online metrics on Spark, for days pandas cannot hold.

:func:`derive_labels_spark` is :func:`shoprank.labels.derive_labels` with the per-event steps
(cleaning, the two-level dedupe, the bot rules, one row per (request, product), the IPW
aggregation per (query, product)) as Spark DataFrame operations; only small aggregates reach
the driver: one row per session *flagged as a bot* (their ids are part of the result), the
propensity count table (one row per (query, product, position) for ``harvest``, per position
otherwise), a handful of counts, and the graded pairs themselves.  Those are finished with
the same pandas / numpy code as the pandas path (:func:`~shoprank.labels.propensities_from_counts`,
:func:`~shoprank.labels.finish_pairs`, :func:`~shoprank.labels.record_propensities`), so the
pairs, the stats (all but ``seconds``) and the bot session ids are those of ``derive_labels``
on the same events; the floating-point sums (``ipw_*``, ``utility``, the harvest's edge sums)
may differ in the last bits because Spark adds in another order.

Input order.  pandas keeps the *first* of tied rows (same ``ts``) in input order: the files of
the day in key order (``Storage.read_partition`` concatenates them so), then the rows of each
file.  Spark has no row order: ``monotonically_increasing_id()`` follows its *partitions*, and a
Parquet scan packs files into partitions largest first, so over several files it does not
follow file order.  :func:`read_events` therefore gives every row ``_input_row`` = file number
x 2^40 + the row's index in its file (Parquet's ``_metadata.row_index``).  A DataFrame without
that column (e.g. from ``spark.createDataFrame``) gets ``monotonically_increasing_id()``
instead, which is the input order only when its partitions are in row order (one Parquet file,
or a frame made from one pandas frame).

:func:`online_metrics_by_arm_spark` is :func:`shoprank.serving.online.online_metrics_by_arm` the
same way (per-arm sums collected, nothing per event).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import pandas as pd

from shoprank.data.contracts import EVENT_TYPES
from shoprank.labels import (
    DUPLICATE_KEY,
    REQUIRED_COLUMNS,
    LabelParams,
    LabelResult,
    finish_pairs,
    propensities_from_counts,
    propensity_top,
    record_propensities,
)

log = logging.getLogger(__name__)

ROW = "_input_row"  # input order of a row (shoprank.spark.read_parquet_in_order)
_STRING_COLUMNS = ("event_id", "request_id", "session_id", "query", "product_id", "event_type")
_INTEGRAL = ("tinyint", "smallint", "int", "bigint")
BROADCAST_KEYS = 2_000_000  # repeated hashes up to this many are broadcast (8 bytes each) to find their rows


def read_events(spark, paths: Sequence[str]):
    """The Parquet files ``paths`` (in the order pandas would concatenate them) as one
    DataFrame with the input-order column ``_input_row`` (:func:`shoprank.spark.read_parquet_in_order`)."""
    from shoprank.spark import read_parquet_in_order

    return read_parquet_in_order(spark, paths, ROW)


def _to_pandas(df) -> pd.DataFrame:
    """A small aggregate on the driver (through Arrow, whatever ``spark.sql.execution.arrow.*`` says)."""
    return df.toArrow().to_pandas()


def _input_order(events):
    from pyspark.sql import functions as F

    if ROW in events.columns:
        return F.col(ROW)
    log.info("labels: the events have no %s column (not from read_events): ties in ts are broken by Spark's "
             "partition order (monotonically_increasing_id)", ROW)
    return F.monotonically_increasing_id()


# ---------------------------------------------------------------------------------------
# derive_labels_spark
# ---------------------------------------------------------------------------------------
def derive_labels_spark(spark, events, params: LabelParams = LabelParams()) -> LabelResult:
    """:func:`shoprank.labels.derive_labels` of a Spark DataFrame of FEEDBACK-contract events
    (best from :func:`read_events`; see the module docstring for the input order)."""
    t0 = time.perf_counter()
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"feedback events lack columns {missing}")
    stats: dict[str, Any] = {}
    cached: list = []
    try:
        ev = _clean(events, stats)
        ev = _dedupe(ev, stats, cached)
        ev, bots = _drop_bots(ev, params, stats, cached)
        rp, max_pos = _per_request(ev, stats, cached)
        prop, method, eta_hat = _propensities(rp, max_pos, params)
        record_propensities(stats, prop, method, eta_hat)
        pairs = _aggregate(spark, rp, prop, params, stats)
    finally:
        for df in cached:
            df.unpersist()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("labels: %d events in -> %d pairs out (grades %s) in %.2fs on Spark", stats["events_in"],
             stats["pairs_out"], stats["grade_histogram"], stats["seconds"])
    return LabelResult(pairs=pairs, stats=stats, params=params, bot_session_ids=bots)


def _clean(events, stats: dict[str, Any]):
    """labels._clean: the required columns with their types, invalid rows counted and dropped."""
    from pyspark.sql import functions as F

    types = dict(events.dtypes)
    cols = {c: F.col(c).cast("string") for c in _STRING_COLUMNS}
    cols["ts"] = F.col("ts") if types["ts"] == "timestamp" else F.col("ts").try_cast("timestamp")
    if types["position"] in _INTEGRAL:
        cols["position"] = F.col("position").cast("long")
        pos_ok = cols["position"] >= 1
    else:  # pd.to_numeric(errors="coerce"), then astype int64 (truncation)
        num = F.col("position").try_cast("double")
        pos_ok = num.isNotNull() & ~F.isnan(num) & (num >= 1)
        cols["position"] = F.when(pos_ok, num).try_cast("long")
    ok = cols["event_type"].isin(*EVENT_TYPES) & pos_ok
    for c in REQUIRED_COLUMNS:
        ok = ok & cols[c].isNotNull()
    ev = events.select(*[cols[c].alias(c) for c in REQUIRED_COLUMNS], _input_order(events).alias(ROW),
                       F.coalesce(ok, F.lit(False)).alias("_ok"))
    row = ev.agg(F.count(F.lit(1)).alias("n"), F.sum((~F.col("_ok")).cast("long")).alias("bad")).first()
    stats["events_in"] = int(row["n"])
    stats["invalid_events_dropped"] = int(row["bad"] or 0)
    if stats["invalid_events_dropped"]:
        log.warning("labels: dropped %d invalid events (unknown event_type, position < 1 or missing fields)",
                    stats["invalid_events_dropped"])
    return ev.where("_ok").drop("_ok")


def _repeated(df, name: str, cached: list, *cols):
    """The rows of ``df`` whose ``cols`` hash like another row's: every row with a repeated key,
    plus the rare hash collision (never fewer); None when no hash repeats.  A hash aggregate of
    longs, no sort of the day.  The repeated hashes are counted first, so a short list reaches
    the rows as a broadcast (the day itself is not shuffled for the join)."""
    from pyspark.sql import functions as F

    h = F.xxhash64(*cols)
    repeated = (df.groupBy(h.alias(name)).agg(F.count(F.lit(1)).alias("_n")).where("_n > 1").select(name)
                .persist())
    cached.append(repeated)
    n = repeated.count()
    if n == 0:
        return None
    return df.join(F.broadcast(repeated) if n <= BROADCAST_KEYS else repeated, h == F.col(name), "left_semi")


def _dedupe(ev, stats: dict[str, Any], cached: list):
    """labels._dedupe: by ``event_id`` the earliest (ties: input order), then the first of each
    DUPLICATE_KEY among the rest (its rows share ``ts``: input order).

    Only a row whose id or content occurs more than once can be dropped, and those are few: they
    are found by counting 64-bit hashes of the id and of the content key (hash aggregates of
    longs, no sort of the day), and only these candidate rows, whole groups of them, are ranked
    with the two windows (a hash collision adds a candidate, never loses one; the ranking itself
    is exact).  The rows to drop are then removed by their input-row id."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ev = ev.persist()  # read by both counts, both rankings and the removal
    cached.append(ev)
    spark = ev.sparkSession
    none = spark.createDataFrame([], f"{ROW} long, _dup_id boolean")
    by_id = Window.partitionBy("event_id").orderBy("ts", ROW)
    same_id = _repeated(ev, "_h_id", cached, "event_id")
    drop_id = none if same_id is None else (
        same_id.withColumn("_r", F.row_number().over(by_id)).where("_r > 1").select(ROW)
        .withColumn("_dup_id", F.lit(True)).persist())
    cached.append(drop_id)
    # the content rank puts the rows already dropped by id last, so among the others it is the
    # rank pandas' second drop_duplicates sees
    by_content = Window.partitionBy(*DUPLICATE_KEY).orderBy("_dup_id", ROW)
    same_content = _repeated(ev, "_h_content", cached, *DUPLICATE_KEY)
    drop_content = none.select(ROW) if same_content is None else (
        same_content.join(drop_id, ROW, "left").withColumn("_dup_id", F.coalesce("_dup_id", F.lit(False)))
        .withColumn("_r", F.row_number().over(by_content))
        .where(~F.col("_dup_id") & (F.col("_r") > 1)).select(ROW).persist())
    cached.append(drop_content)
    stats["duplicates_dropped"] = drop_id.count()
    stats["content_duplicates_dropped"] = drop_content.count()
    log.info("labels: dedupe dropped %d repeated event ids and %d same-content events under other ids",
             stats["duplicates_dropped"], stats["content_duplicates_dropped"])
    if not stats["duplicates_dropped"] and not stats["content_duplicates_dropped"]:
        return ev
    return ev.join(drop_id.select(ROW).union(drop_content), ROW, "left_anti")


def _median_sorted(values):
    """Median of a sorted array column as pandas' group median computes it: the middle element,
    or (lower middle + upper middle) / 2 (bit for bit, unlike Spark's interpolating ``median``);
    null when empty."""
    from pyspark.sql import functions as F

    n = F.size(values)
    lower = F.try_element_at(values, ((n - 1) / 2).cast("int") + 1)
    upper = F.try_element_at(values, (n / 2).cast("int") + 1)
    return F.when(n == 0, F.lit(None).cast("double")).when(n % 2 == 1, lower).otherwise((lower + upper) / 2)


def _drop_bots(ev, params: LabelParams, stats: dict[str, Any], cached: list):
    """labels._drop_bots with labels.detect_bots' rules on a per-session table (stays in Spark;
    only the bot sessions' ids are collected)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    et = F.col("event_type")
    # gaps between consecutive clicks in seconds, as pandas computes them: int64 microseconds / 1e6
    micros = F.unix_micros("ts")
    gaps = (ev.where(et == "click").select("session_id", micros.alias("_us"))
            .withColumn("_gap", (F.col("_us") - F.lag("_us").over(Window.partitionBy("session_id").orderBy("_us")))
                        .cast("double") / 1e6)
            .groupBy("session_id").agg(_median_sorted(F.sort_array(F.collect_list("_gap"))).alias("median_gap")))
    per_s = (ev.groupBy("session_id")
             .agg(F.count(F.lit(1)).alias("events"), F.sum((et == "click").cast("long")).alias("clicks"),
                  F.sum((et == "impression").cast("long")).alias("imps"),
                  F.sum((et == "purchase").cast("long")).alias("buys"))
             .join(gaps, "session_id", "left"))
    clicks, imps = F.col("clicks"), F.col("imps")
    no_buy = F.col("buys") == 0
    ctr = F.try_divide(clicks, imps)  # null without impressions (pandas: NaN)
    rules = {
        "too_many_clicks": clicks > params.max_clicks_per_session,
        "many_clicks_no_purchase": no_buy & (clicks > params.max_clicks_without_purchase),
        "fast_clicks_no_purchase": no_buy & (clicks >= params.min_clicks_for_gap_rule)
        & F.coalesce(F.col("median_gap") < params.min_median_click_gap_s, F.lit(False)),
        "high_ctr_no_purchase": no_buy & (clicks >= params.min_clicks_for_ctr_rule)
        & F.coalesce((ctr > params.max_session_ctr) | (imps == 0), F.lit(True)),
    }
    is_bot = F.lit(False)
    for name, hit in rules.items():
        per_s = per_s.withColumn(f"_rule_{name}", F.coalesce(hit, F.lit(False)))
        is_bot = is_bot | F.col(f"_rule_{name}")
    per_s = per_s.withColumn("_bot", is_bot).persist()
    cached.append(per_s)
    row = per_s.agg(F.count(F.lit(1)).alias("sessions"), F.sum(F.col("_bot").cast("long")).alias("bots"),
                    F.sum(F.when(F.col("_bot"), F.col("events")).otherwise(0)).alias("bot_events"),
                    *[F.sum(F.col(f"_rule_{name}").cast("long")).alias(name) for name in rules]).first()
    bot_sessions = per_s.where("_bot").select("session_id")
    bots = sorted(str(r[0]) for r in bot_sessions.collect())
    stats["sessions"] = int(row["sessions"])
    stats["bot_sessions"] = len(bots)
    stats["bot_events_dropped"] = int(row["bot_events"] or 0)
    stats["bot_rules"] = {name: int(row[name] or 0) for name in rules}
    log.info("labels: %d of %d sessions look like bots (%s); dropped their %d events", len(bots),
             stats["sessions"], stats["bot_rules"], stats["bot_events_dropped"])
    if bots:
        ev = ev.join(F.broadcast(bot_sessions), "session_id", "left_anti")
    return ev, bots


def _per_request(ev, stats: dict[str, Any], cached: list):
    """labels._per_request: one row per (request, product) with the shown / clicked / carted /
    purchased flags and the position and query of its first impression (by ts, then input
    order), else of its first event (an orphan: one implied impression)."""
    from pyspark.sql import functions as F

    et = F.col("event_type")
    imp = et == "impression"
    first = F.struct("ts", ROW)
    n_type = {t: F.sum((et == t).cast("long")).alias(f"_n_{t}") for t in EVENT_TYPES}
    grouped = (ev.groupBy("request_id", "product_id")
               .agg(F.count(F.lit(1)).alias("_n"), *n_type.values(),
                    F.min_by(F.when(imp, F.col("position")), F.when(imp, first)).alias("_imp_pos"),
                    F.min_by(F.when(imp, F.col("query")), F.when(imp, first)).alias("_imp_query"),
                    F.min_by("position", first).alias("_own_pos"), F.min_by("query", first).alias("_own_query")))
    flag = {"shown": "impression", "clicked": "click", "carted": "add_to_cart", "purchased": "purchase"}
    rp = grouped.select(
        "request_id", "product_id",
        F.coalesce("_imp_pos", "_own_pos").alias("position"), F.coalesce("_imp_query", "_own_query").alias("query"),
        *[(F.col(f"_n_{t}") > 0).cast("long").alias(name) for name, t in flag.items()],
        (F.col("_n_impression") == 0).alias("_orphan"), "_n", *[f"_n_{t}" for t in EVENT_TYPES],
    ).persist()
    cached.append(rp)
    signals = F.col("_n_click") + F.col("_n_add_to_cart") + F.col("_n_purchase")
    row = rp.agg(F.sum("_n").alias("n"), *[F.sum(f"_n_{t}").alias(t) for t in EVENT_TYPES],
                 F.sum(sum((F.col(name) for name in flag), F.lit(0))).alias("kept"),
                 F.sum(F.when(F.col("_orphan"), signals).otherwise(0)).alias("orphan_events"),
                 F.sum(F.col("_orphan").cast("long")).alias("implied"),
                 F.count_distinct("request_id").alias("requests"), F.max("position").alias("max_pos"),
                 F.count(F.lit(1)).alias("rows")).first()
    for t in EVENT_TYPES:
        stats[f"{t}s_clean"] = int(row[t] or 0)
    stats["repeat_events_collapsed"] = int((row["n"] or 0) - (row["kept"] or 0))
    stats["orphan_events"] = int(row["orphan_events"] or 0)
    stats["implied_impressions"] = int(row["implied"] or 0)
    stats["requests"] = int(row["requests"] or 0)
    if stats["implied_impressions"]:
        log.info("labels: %d click/cart/purchase events had no impression of the same request and product; "
                 "their own position is used (%d implied impressions)", stats["orphan_events"],
                 stats["implied_impressions"])
    max_pos = row["max_pos"] if row["rows"] else None
    return rp.select("request_id", "product_id", "query", "position", *flag), max_pos


def _propensities(rp, max_pos: int | None, params: LabelParams):
    """labels.estimate_propensities: the count table built in Spark, collected (one row per
    (query, product, position) for ``harvest``, per position otherwise), finished by
    :func:`~shoprank.labels.propensities_from_counts`."""
    from pyspark.sql import functions as F

    top = propensity_top(max_pos, params)
    keys = ["query", "product_id", "pos"] if params.propensity_method == "harvest" else ["pos"]
    counts = (rp.withColumn("pos", F.least(F.col("position"), F.lit(top)))
              .groupBy(*keys).agg(F.count(F.lit(1)).alias("n"), F.sum("clicked").alias("c")))
    counts = _to_pandas(counts)
    counts = counts.sort_values(keys, kind="stable", ignore_index=True)  # a deterministic order
    return propensities_from_counts(counts, top, params)


def _aggregate(spark, rp, prop: pd.Series, params: LabelParams, stats: dict[str, Any]) -> pd.DataFrame:
    """labels._aggregate: counts and inverse-propensity-weighted sums per (query, product) in
    Spark (1 / p(min(position, P)) from a broadcast table), collected, sorted by query and
    product like pandas' group-by, finished by :func:`~shoprank.labels.finish_pairs`."""
    from pyspark.sql import functions as F

    inv = spark.createDataFrame([(int(k), float(1.0 / v)) for k, v in prop.items()], "pos long, inv double")
    top = len(prop)
    agg = (rp.withColumn("pos", F.least(F.col("position"), F.lit(top))).join(F.broadcast(inv), "pos")
           .groupBy("query", "product_id")
           .agg(F.count(F.lit(1)).alias("impressions"), F.sum("clicked").alias("clicks"),
                F.sum("carted").alias("carts"), F.sum("purchased").alias("purchases"),
                F.sum(F.col("clicked") * F.col("inv")).alias("ipw_clicks"),
                F.sum(F.col("carted") * F.col("inv")).alias("ipw_carts"),
                F.sum(F.col("purchased") * F.col("inv")).alias("ipw_purchases"),
                F.avg("position").alias("mean_position")))
    agg = _to_pandas(agg)
    agg = agg.sort_values(["query", "product_id"], kind="stable", ignore_index=True)
    for c in ("impressions", "clicks", "carts", "purchases"):
        agg[c] = agg[c].astype("int64")
    return finish_pairs(agg, params, stats)


# ---------------------------------------------------------------------------------------
# online metrics per arm
# ---------------------------------------------------------------------------------------
def online_metrics_by_arm_spark(events) -> dict[str, float]:
    """:func:`shoprank.serving.online.online_metrics_by_arm` of a Spark DataFrame of feedback
    events: the same rules (dedupe by ``event_id`` keeping the first in input order, one arm per
    request: its first event's, signals once per (request, product, type), the first click's
    position), per-request and per-arm sums in Spark, one row per arm collected."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from shoprank.serving.online import DEFAULT_ARM

    if events is None or events.isEmpty():
        return {}
    need = {"request_id", "product_id", "event_type", "position"}
    missing = sorted(need - set(events.columns))
    if missing:
        raise ValueError(f"online metrics need feedback columns {sorted(need)}; missing {missing}")
    num = F.col("position").try_cast("double")
    if "arm" in events.columns:
        # serving.online._arm_key: every character outside [0-9A-Za-z_] becomes "_", empty: the default arm
        arm = F.coalesce(F.col("arm").cast("string"), F.lit(DEFAULT_ARM))
        arm = F.when(arm == "", F.lit(DEFAULT_ARM)).otherwise(F.regexp_replace(arm, r"[^0-9A-Za-z_]", "_"))
    else:
        arm = F.lit(DEFAULT_ARM)
    df = events.select(*[F.col(c).cast("string").alias(c) for c in ("request_id", "product_id", "event_type")],
                       F.when(~F.isnan(num), num).alias("_pos"), arm.alias("_arm"),
                       _input_order(events).alias(ROW),
                       *([F.col("event_id")] if "event_id" in events.columns else []))
    if "event_id" in events.columns:  # drop_duplicates("event_id"): the first in input order
        df = (df.withColumn("_n", F.row_number().over(Window.partitionBy("event_id").orderBy(ROW)))
              .where("_n = 1").drop("_n", "event_id"))
    # one arm per request: that of its first event
    df = df.withColumn("_arm", F.min_by("_arm", ROW).over(Window.partitionBy("request_id")))
    et = F.col("event_type")
    signal = (df.groupBy("_arm", "request_id", "product_id", "event_type")
              .agg(F.min_by("_pos", ROW).alias("_pos")))  # position of the first of each signal
    per_request = (signal.groupBy("_arm", "request_id")
                   .agg(*[F.sum((et == t).cast("long")).alias(t) for t in ("impression", "click")],
                        *[F.max((et == t).cast("long")).alias(t) for t in ("add_to_cart", "purchase")],
                        F.min(F.when(et == "click", F.col("_pos"))).alias("_best")))
    known = F.col("request_id").isNotNull()  # nunique() leaves a missing request id out
    shown = known & (F.col("impression") > 0)
    rr = F.when(F.col("_best").isNotNull(), 1.0 / F.greatest(F.col("_best"), F.lit(1.0))).otherwise(0.0)
    rows = (per_request.groupBy("_arm")
            .agg(F.sum(shown.cast("long")).alias("requests"), F.sum("impression").alias("impressions"),
                 F.sum("click").alias("clicks"),
                 F.sum((known & (F.col("click") > 0)).cast("long")).alias("with_click"),
                 F.sum((known & (F.col("add_to_cart") > 0)).cast("long")).alias("with_add_to_cart"),
                 F.sum((known & (F.col("purchase") > 0)).cast("long")).alias("with_purchase"),
                 F.sum(F.when(shown, rr).otherwise(0.0)).alias("rr_sum"))
            .collect())
    out: dict[str, float] = {}
    for r in sorted(rows, key=lambda r: r["_arm"]):
        requests = int(r["requests"] or 0)
        if requests == 0:
            continue
        impressions, clicks = int(r["impressions"] or 0), int(r["clicks"] or 0)
        values = {
            "requests": float(requests),
            "impressions": float(impressions),
            "clicks": float(clicks),
            "ctr": float(clicks / impressions),
            "click_rate": int(r["with_click"]) / requests,
            "add_to_cart_rate": int(r["with_add_to_cart"]) / requests,
            "purchase_rate": int(r["with_purchase"]) / requests,
            "mrr": float(r["rr_sum"]) / requests,
        }
        out.update({f"online_{r['_arm']}_{k}": float(v) for k, v in values.items()})
    return out
