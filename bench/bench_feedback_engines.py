"""Benchmark: the feedback path (raw -> validation -> labels -> snapshot) on pandas, Spark and DuckDB.

The measurement behind the engine choice of issue #19 item 3 (docs/scale.md).  One day of
bulk-simulated feedback per size (``shoprank.data.bulk_simulator.write_day_bulk`` into a local
``raw/feedback/dt=D/``, 1M events per Parquet part; marketplace 1500 products / 200 queries /
seed 42, synonyms 0.8, typos 0.3, random ranker, 0.2% bot sessions, as bench_daily_update.py),
generated once under ``--data`` and reused.  Then, per size and engine, a fresh child process
runs the two daily tasks back to back:

1. *validate*: read the raw day, the whole-day feedback checks, write the validated day;
2. *labels*: read the validated day, derive the graded (query, product) pairs, write them.

Engines:

* ``pandas``: the project's own code, as the DAG runs it today: ``read_files`` (the reader of
  ``validate_partition``), ``validate_frame``'s steps (``add_derived_columns`` + the real GX
  feedback suite on the pandas engine, no Data Docs, no S3, no drift), ``derive_labels``.  Refused above
  ``--pandas-max-events`` (default 3M: 10M would need far more memory than the machine has).
* ``spark`` / ``spark-2g``: PySpark ``local[2]`` (driver memory default 1g / 2g; ``spark-boolean``:
  1g with GX ``result_format`` BOOLEAN_ONLY instead of the project's SUMMARY, i.e. no counts or
  examples: the floor of GX's cost on Spark; ``spark-per-check``: validation only, the derived
  DataFrame cached first, then each expectation of the suite run alone and timed).  The same GX
  feedback suite (built by ``feedback_suite_expectations``; only the type names are mapped to
  Spark's) on a GX Spark data source; the ``derived_*`` columns are computed with Spark
  DataFrame ops (joins / group-bys over the whole day).  Labels: ``derive_labels``' steps as
  Spark DataFrame ops (clean, two-level dedupe, the four bot rules incl. the median click gap,
  one row per (request, product) with the first impression's position, orphans), the
  intervention-harvesting propensities from a small (query, product, position) count table
  collected to the driver, the IPW aggregation, grades and weights.
* ``duckdb`` / ``duckdb-1g``: DuckDB (threads 2; memory_limit default / 1GB; file-backed
  database) running the suite's checks as SQL counts (all but the look-alike rule, of which only
  the non-ASCII ids are counted; the type checks are Parquet's schema) and the same label
  derivation in SQL.  Not a GX engine and not distributed: the single-machine floor.

Every run reports the checks' unexpected counts and a summary of the labels (pairs, grade
histogram, propensities, sum of utilities) so the engines can be compared; ``--dirty`` runs on a
copy of the day with known defects (``make_dirty``).  ``--s3-staging`` instead times staging the
day from a private ``rclone serve s3`` with boto3 managed downloads (how Spark local mode would
read S3 without the s3a connector).

Wall time and peak RSS are measured from the parent: the child and all its descendants (the
JVM for Spark) summed, sampled with psutil every 0.2 s, per stage and in all.  The load
average (``uptime``) is recorded before and after every run.  Runs are one at a time.

    .venv/bin/python bench/bench_feedback_engines.py --events 1M 3M \\
        --engines pandas,spark,spark-2g,duckdb,duckdb-1g --json /tmp/scale-data/figures.json
    .venv/bin/python bench/bench_feedback_engines.py --events 10M \\
        --engines spark,duckdb,duckdb-1g,spark-2g --json /tmp/scale-data/figures.json
    .venv/bin/python bench/bench_feedback_engines.py --events 1M --dirty --engines pandas,spark,duckdb
    .venv/bin/python bench/bench_feedback_engines.py --events 3M --engines spark-boolean,spark-per-check
    .venv/bin/python bench/bench_feedback_engines.py --events 10M --s3-staging

(``--json`` appends to an existing file; ``--timeout`` kills a run, 600 s by default.)

Needs ``pip install pyspark==4.3.0 duckdb`` (not in requirements.txt) and a Java 17 runtime.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from bench_daily_update import event_count  # 3M / 10M / 3000000
from bench_validation import machine  # one machine description for all benches (bench/ is on sys.path)

DAY = "2026-11-10"  # the marketplace starts 2026-11-01
ENGINES = ("pandas", "spark", "spark-2g", "spark-boolean", "spark-per-check", "duckdb", "duckdb-1g")
MB = 1024 * 1024
NOW = dt.datetime(2026, 11, 11, 6, tzinfo=dt.timezone.utc)  # "now" of the run: the morning after the day


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)


# ---- the data -------------------------------------------------------------------------------
def day_paths(data: Path, name: str) -> dict[str, Path]:
    root = data / name
    return {"root": root, "feedback": root / "raw" / "feedback" / f"dt={DAY}",
            "catalog": root / "raw" / "catalog" / f"dt={DAY}" / "part-00000.parquet"}


def generate(data: Path, n: int) -> dict:
    """Child: write one bulk-simulated day of about ``n`` events and its catalogue under data/<n>/."""
    from shoprank.data.bulk_simulator import write_day_bulk
    from shoprank.data.contracts import CATALOG
    from shoprank.data.synthetic import generate_marketplace

    paths = day_paths(data, label(n))
    t = time.perf_counter()
    market = generate_marketplace(n_products=1500, n_queries=200, seed=42, start=dt.date(2026, 11, 1),
                                  synonym_rate=0.8, typo_rate=0.3)
    paths["catalog"].parent.mkdir(parents=True, exist_ok=True)
    CATALOG.conform(market.catalog_for_day(DAY)).to_parquet(paths["catalog"], index=False)
    bulk = write_day_bulk(paths["root"], market, DAY, n_events=n, seed=1, ranker="random", bot_fraction=0.002,
                          hmac_key=b"bench-feedback-engines", n_category_candidates=8, n_fresh_candidates=2,
                          n_random_candidates=6)
    info = {**bulk.as_dict(), "seconds": round(time.perf_counter() - t, 1),
            "parquet_mb": round(sum(p.stat().st_size for p in paths["feedback"].glob("*.parquet")) / 1e6, 1)}
    info.pop("keys", None)
    (paths["root"] / "day.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def ensure_day(data: Path, n: int, dirty: bool = False) -> dict:
    paths = day_paths(data, label(n))
    info_file = paths["root"] / "day.json"
    if not (paths["feedback"] / "_SUCCESS").exists() or not info_file.exists():
        log(f"generating a day of ~{n:,} events under {paths['root']} ...")
        subprocess.run([sys.executable, __file__, "--_generate", str(n), "--data", str(data)], check=True)
    if dirty:
        dirty_paths = day_paths(data, label(n) + "-dirty")
        info_file = dirty_paths["root"] / "day.json"
        if not info_file.exists():
            make_dirty(paths, dirty_paths)
    return json.loads(info_file.read_text())


def make_dirty(clean: dict[str, Path], out: dict[str, Path]) -> dict:
    """A copy of a clean day with known defects, one Parquet file (+ an optional ``arm`` column): repeated
    event ids (1% of rows logged twice, 1 s apart), same-content events under new ids (0.3%), unknown
    products (0.5%), blank queries, a look-alike event id, position 0, events of the next day, unknown arms.
    The whole-day checks must count them exactly alike on every engine."""
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(clean["feedback"])
    rng = np.random.default_rng(7)
    n = len(df)
    rep_ids = df.iloc[rng.choice(n, n // 100, replace=False)].copy()
    rep_ids["ts"] = rep_ids["ts"] + pd.Timedelta(seconds=1)
    same = df.iloc[rng.choice(n, n * 3 // 1000, replace=False)].copy()
    same["event_id"] = [f"{i:032x}dup" for i in range(len(same))]
    df = pd.concat([df, rep_ids, same], ignore_index=True)
    unknown = rng.choice(len(df), len(df) // 200, replace=False)
    df.loc[unknown, "product_id"] = [f"p-unknown-{i % 7}" for i in range(len(unknown))]
    df.loc[[3, 4, 5], "query"] = ["   ", "\u200b", "\t"]
    df.loc[10, "event_id"] = "".join(chr(ord(ch) + 0xFEE0) if ch.isalnum() else ch for ch in df.at[11, "event_id"])
    df.loc[[20, 21], "position"] = 0
    df.loc[[30, 31], "ts"] = df.loc[[30, 31], "ts"] + pd.Timedelta(days=1)
    df["arm"] = np.where(rng.random(len(df)) < 0.5, "champion", "challenger")
    df.loc[[40, 41, 42, 43, 44], "arm"] = "blue"
    df["arm"] = df["arm"].astype("string")
    df = df.sort_values("ts", kind="stable").reset_index(drop=True)
    out["feedback"].mkdir(parents=True, exist_ok=True)
    out["catalog"].parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out["feedback"] / "part-00000.parquet", index=False)
    (out["feedback"] / "_SUCCESS").write_bytes(b"")
    shutil.copy(clean["catalog"], out["catalog"])
    info = {"events": len(df), "parts": 1, "dirty_from": str(clean["root"]),
            "parquet_mb": round((out["feedback"] / "part-00000.parquet").stat().st_size / 1e6, 1),
            "defects": {"repeated_event_id_rows": len(rep_ids), "same_content_new_id_rows": len(same),
                        "unknown_product_rows": len(unknown), "blank_queries": 3, "lookalike_ids": 1,
                        "position_0": 2, "next_day_ts": 2, "unknown_arm": 5}}
    (out["root"] / "day.json").write_text(json.dumps(info, indent=2))
    return info


# ---- the child: one engine on one day ---------------------------------------------------------
class Stages:
    """Stage names for the parent's sampler (a small file) and wall time per stage."""

    def __init__(self, path: Path) -> None:
        self.path, self.times, self.current, self.t = path, {}, None, time.perf_counter()

    def __call__(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.current:
            self.times[self.current] = round(self.times.get(self.current, 0.0) + now - self.t, 2)
        self.current, self.t = name, now
        self.path.write_text(name or "")


def _fmt_checks(result: Any) -> tuple[dict[str, bool], dict[str, Any]]:
    """GX result -> {check: success}, {check: unexpected count / observed value} for the counted ones."""
    checks, observed = {}, {}
    for er in result.results:
        check = (er.expectation_config.meta or {}).get("check", er.expectation_config.type)
        checks[check] = bool(er.success)
        res = er.result or {}
        if "unexpected_count" in res:
            observed[check] = res["unexpected_count"]
        elif "observed_value" in res:
            ov = res["observed_value"]
            observed[check] = ov if isinstance(ov, (int, float, str)) or ov is None else str(ov)
        if er.exception_info and (er.exception_info.get("raised_exception") if isinstance(er.exception_info, dict)
                                  else False):
            observed[check + ".error"] = str(er.exception_info.get("exception_message"))[:300]
    return checks, observed


def _label_summary(pairs: Any, stats: dict[str, Any]) -> dict[str, Any]:
    keep = ("events_in", "invalid_events_dropped", "duplicates_dropped", "content_duplicates_dropped", "sessions",
            "bot_sessions", "bot_events_dropped", "requests", "orphan_events", "pairs_seen", "pairs_out",
            "grade_histogram", "propensity_method_used", "propensities")
    out = {k: stats[k] for k in keep if k in stats}
    if "propensities" in out:
        out["propensities"] = {int(k): round(float(v), 3) for k, v in list(out["propensities"].items())[:10]}
    out["sum_utility"] = round(float(pairs["utility"].sum()), 3)
    return out


def run_pandas(paths: dict[str, Path], out: Path, stage: Callable) -> dict:
    import pandas as pd

    from shoprank.data.contracts import CONTRACTS
    from shoprank.labels import derive_labels
    from shoprank.validation import ValidationOptions, read_files
    from shoprank.validation.runner import _outcome, _run_cached, gx_modules
    from shoprank.validation.suites import add_derived_columns, suite_parameters

    stage("import")
    gx_modules()
    stage("validate.read")
    files = {p.name: p.read_bytes() for p in sorted(paths["feedback"].glob("*.parquet"))}
    batch = read_files(files, CONTRACTS["feedback"])
    del files
    ids = pd.Index(pd.read_parquet(paths["catalog"], columns=["product_id"])["product_id"])
    options = ValidationOptions(now=NOW, build_docs=False)
    res: dict[str, Any] = {"rows": int(len(batch.df))}
    stage("validate.checks")
    # validate_frame's steps (runner.py), keeping the GX result for its counts
    derived = add_derived_columns(batch.df, "feedback", options, ids)
    params = suite_parameters("feedback", DAY, options, None)
    result = _run_cached("feedback", "bench", derived, params, options)
    outcome = _outcome(result, "feedback", DAY, "bench", derived, batch, params, options, None)
    res["success"] = outcome.success
    res["checks"], res["observed"] = _fmt_checks(result)
    res["failures"] = [f.describe()[:300] for f in outcome.failures]
    del derived, result, outcome
    stage("validate.write")
    (out / "validated").mkdir()
    batch.df.to_parquet(out / "validated" / "part-00000.parquet", index=False)
    del batch
    stage("labels.read")
    events = pd.read_parquet(out / "validated")
    stage("labels.derive")
    result = derive_labels(events)
    stage("labels.write")
    result.pairs.to_parquet(out / "pairs.parquet", index=False)
    res["labels"] = _label_summary(result.pairs, result.stats)
    return res


# -- Spark ------------------------------------------------------------------------------------------
def spark_session(driver_memory: str | None, local_dir: Path):
    from pyspark.sql import SparkSession

    b = (SparkSession.builder.master("local[2]").appName("shoprank-feedback-bench")
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.session.timeZone", "UTC")
         # 2 cores: the default 200 shuffle partitions are ~200 tiny tasks per shuffle (AQE still coalesces)
         .config("spark.sql.shuffle.partitions", os.environ.get("BENCH_SPARK_SHUFFLE_PARTITIONS", "16"))
         .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
         .config("spark.local.dir", str(local_dir)))  # shuffle / spill files, removed with the run
    if driver_memory:
        b = b.config("spark.driver.memory", driver_memory)
    return b.getOrCreate()


def spark_derived(spark, paths: dict[str, Path], options):
    """The raw day with ``derived_row_id`` and the ``derived_*`` columns, as the product computes
    them (``shoprank.validation.spark_engine``)."""
    import pandas as pd

    from shoprank.validation import spark_engine as SE

    files = sorted(str(p) for p in paths["feedback"].glob("*.parquet"))
    raw = SE.read_day(spark, "feedback", files)
    ids = pd.Index(pd.read_parquet(paths["catalog"], columns=["product_id"])["product_id"])
    return raw, SE.derived_columns(spark, raw, options, ids)


def spark_expectations(options) -> list:
    """The project's feedback expectations with Spark's type names (``spark_engine.spark_suite``)."""
    from shoprank.validation.spark_engine import spark_suite

    return list(spark_suite("feedback", options).expectations)


def run_spark(paths: dict[str, Path], out: Path, stage: Callable, driver_memory: str | None,
              result_format: dict | None = None, per_check: bool = False) -> dict:
    stage("import")
    import great_expectations as gx
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from shoprank.labels import LabelParams, propensities_from_counts
    from shoprank.validation import ValidationOptions
    from shoprank.validation.runner import RESULT_FORMAT, _quiet
    from shoprank.validation.suites import suite_parameters

    stage("spark.start")
    spark = spark_session(driver_memory, out / "spark-local")
    spark.sparkContext.setLogLevel("ERROR")
    res: dict[str, Any] = {"spark": spark.version,
                           "driver_memory": spark.conf.get("spark.driver.memory", "1g (default)")}

    # 1. validate ------------------------------------------------------------------------------
    stage("validate.prepare")
    options = ValidationOptions(now=NOW, build_docs=False)
    raw, derived = spark_derived(spark, paths, options)
    ctx = _quiet(gx.get_context(mode="ephemeral"))
    asset = ctx.data_sources.add_spark("spark").add_dataframe_asset("feedback")
    batch_def = asset.add_batch_definition_whole_dataframe("whole_day")
    from shoprank.validation.spark_engine import spark_suite

    suite = ctx.suites.add(spark_suite("feedback", options, name="feedback-spark"))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="feedback-spark", data=batch_def, suite=suite))
    params = suite_parameters("feedback", DAY, options, None, now=NOW)
    if per_check:
        return spark_per_check(ctx, batch_def, derived, params, options, stage, res)
    stage("validate.checks")
    result = vd.run(batch_parameters={"dataframe": derived}, expectation_parameters=params,
                    result_format=result_format or RESULT_FORMAT)
    res["result_format"] = result_format or RESULT_FORMAT
    res["success"] = bool(result.success)
    res["checks"], res["observed"] = _fmt_checks(result)
    stage("validate.write")
    raw.write.mode("overwrite").parquet(str(out / "validated"))
    spark.catalog.clearCache()

    # 2. labels (derive_labels' steps; see the module docstring of shoprank.labels) ---------------
    stage("labels.derive")
    p = LabelParams()
    ev = spark.read.parquet(str(out / "validated")).withColumn("_row", F.monotonically_increasing_id())
    req = ["event_id", "ts", "request_id", "session_id", "query", "product_id", "position", "event_type"]
    ok = F.lit(True)
    for c in req:
        ok = ok & F.col(c).isNotNull()
    ev = ev.where(ok & F.col("event_type").isin("impression", "click", "add_to_cart", "purchase")
                  & (F.col("position") >= 1)).select(*req, "_row")
    order = [F.col("ts"), F.col("_row")]
    ev = (ev.withColumn("_n", F.row_number().over(Window.partitionBy("event_id").orderBy(*order))).where("_n = 1")
          .withColumn("_n", F.row_number().over(Window.partitionBy("session_id", "request_id", "product_id",
                                                                   "event_type", "ts").orderBy(*order)))
          .where("_n = 1").drop("_n").persist())
    et = F.col("event_type")
    clicks_ev = ev.where(et == "click").select("session_id", "ts")
    gaps = (clicks_ev.withColumn("_gap", (F.col("ts").cast("double")
                                          - F.lag(F.col("ts").cast("double")).over(
                                              Window.partitionBy("session_id").orderBy("ts"))))
            .groupBy("session_id").agg(F.median("_gap").alias("median_gap")))
    per_s = (ev.groupBy("session_id").agg(F.sum((et == "click").cast("long")).alias("clicks"),
                                          F.sum((et == "impression").cast("long")).alias("imps"),
                                          F.sum((et == "purchase").cast("long")).alias("buys"))
             .join(gaps, "session_id", "left").persist())
    no_buy = F.col("buys") == 0
    c = F.col("clicks")
    ctr = F.when(F.col("imps") > 0, c / F.col("imps"))
    bot = ((c > p.max_clicks_per_session) | (no_buy & (c > p.max_clicks_without_purchase))
           | (no_buy & (c >= p.min_clicks_for_gap_rule) & F.coalesce(F.col("median_gap") < p.min_median_click_gap_s,
                                                                       F.lit(False)))
           | (no_buy & (c >= p.min_clicks_for_ctr_rule) & F.coalesce((ctr > p.max_session_ctr) | (F.col("imps") == 0),
                                                                       F.lit(True))))
    bots = per_s.where(bot).select("session_id")
    ev = ev.join(bots, "session_id", "left_anti")
    imp = et == "impression"
    key = F.struct(F.col("ts"), F.col("_row"))
    rp = (ev.groupBy("request_id", "product_id")
          .agg(F.max((et == "click").cast("int")).alias("clicked"),
               F.max((et == "add_to_cart").cast("int")).alias("carted"),
               F.max((et == "purchase").cast("int")).alias("purchased"),
               F.min_by(F.when(imp, F.col("position")), F.when(imp, key)).alias("imp_pos"),
               F.min_by(F.when(imp, F.col("query")), F.when(imp, key)).alias("imp_query"),
               F.min_by("position", key).alias("own_pos"), F.min_by("query", key).alias("own_query"))
          .select("request_id", "product_id", "clicked", "carted", "purchased",
                  F.coalesce("imp_pos", "own_pos").alias("position"),
                  F.coalesce("imp_query", "own_query").alias("query"),
                  F.col("imp_pos").isNull().alias("orphan"))
          .persist())
    top = int(min(max(rp.agg(F.max("position")).first()[0] or 1, 1), p.max_position))
    counts = (rp.withColumn("pos", F.least(F.col("position"), F.lit(top)))
              .groupBy("query", "product_id", "pos").agg(F.count("*").alias("n"), F.sum("clicked").alias("c"))
              .toPandas())
    prop, method, _eta_hat = propensities_from_counts(counts, top, p)  # labels' own finish
    prop = prop.tolist()
    inv = spark.createDataFrame([(k + 1, float(1.0 / v)) for k, v in enumerate(prop)], ["pos", "inv"])
    agg = (rp.withColumn("pos", F.least(F.col("position"), F.lit(top))).join(F.broadcast(inv), "pos")
           .groupBy("query", "product_id")
           .agg(F.count("*").alias("impressions"), F.sum("clicked").alias("clicks"), F.sum("carted").alias("carts"),
                F.sum("purchased").alias("purchases"), F.sum(F.col("clicked") * F.col("inv")).alias("ipw_clicks"),
                F.sum(F.col("carted") * F.col("inv")).alias("ipw_carts"),
                F.sum(F.col("purchased") * F.col("inv")).alias("ipw_purchases"),
                F.avg("position").alias("mean_position")))
    # one row per (query, product) seen: small (the catalogue x the queries at most), finished on the driver
    agg = agg.orderBy("query", "product_id").toPandas()
    res["labels"] = finish_labels(agg, p, {"events_in": res["observed"].get("row_count_vs_previous_partition"),
                                           "sessions": per_s.count(), "bot_sessions": bots.count(),
                                           "requests": rp.select("request_id").distinct().count()},
                                  method, prop, out, stage)
    spark.stop()
    return res


def spark_per_check(ctx, batch_def, derived, params, options, stage: Callable, res: dict) -> dict:
    """Seconds per expectation of the feedback suite on Spark, each run alone on the cached derived day."""
    import great_expectations as gx

    from shoprank.validation.runner import RESULT_FORMAT

    stage("validate.cache")
    derived = derived.persist()
    res["rows"] = derived.count()
    stage("validate.per_check")
    res["per_check_s"] = {}
    for i, e in enumerate(spark_expectations(options)):
        one = ctx.suites.add(gx.ExpectationSuite(name=f"one-{i}"))
        one.add_expectation(e)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"one-{i}", data=batch_def, suite=one))
        t = time.perf_counter()
        vd.run(batch_parameters={"dataframe": derived}, expectation_parameters=params, result_format=RESULT_FORMAT)
        res["per_check_s"][e.meta["check"]] = round(time.perf_counter() - t, 2)
    res["per_check_total_s"] = round(sum(res["per_check_s"].values()), 1)
    return res


def finish_labels(agg, p, counts: dict, method: str, prop, out: Path, stage: Callable) -> dict:
    """labels._aggregate's last step on an engine's (query, product) aggregate (pairs with enough
    impressions, graded by ``labels.grade_pairs``), the stats, the pairs written; the summary."""
    from shoprank.labels import grade_pairs

    pairs = grade_pairs(agg[agg["impressions"] >= p.min_impressions].reset_index(drop=True), p)
    stats = {**counts, "pairs_seen": len(agg), "pairs_out": len(pairs),
             "grade_histogram": {g: int((pairs["grade"] == g).sum()) for g in range(4)},
             "propensity_method_used": method, "propensities": {k + 1: v for k, v in enumerate(prop)}}
    stage("labels.write")
    pairs.to_parquet(out / "pairs.parquet", index=False)
    return _label_summary(pairs, stats)


# -- DuckDB -----------------------------------------------------------------------------------------
def run_duckdb(paths: dict[str, Path], out: Path, stage: Callable, memory_limit: str | None) -> dict:
    stage("import")
    import duckdb

    from shoprank.labels import LabelParams, propensities_from_counts
    from shoprank.validation import ValidationOptions
    from shoprank.validation.suites import FEEDBACK_DUPLICATE_KEY, suite_parameters

    con = duckdb.connect(str(out / "work.duckdb"))  # file-backed: tables can leave memory
    con.execute("SET threads = 2")
    con.execute(f"SET temp_directory = '{out / 'duckdb-tmp'}'")  # spill files, removed with the run
    con.execute("SET preserve_insertion_order = false")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    res: dict[str, Any] = {"duckdb": duckdb.__version__,
                           "memory_limit": con.execute("SELECT current_setting('memory_limit')").fetchone()[0]}
    options = ValidationOptions(now=NOW, build_docs=False)
    prm = suite_parameters("feedback", DAY, options, None, now=NOW)
    glob = str(paths["feedback"] / "*.parquet")

    # 1. validate: the suite's whole-day checks as SQL (unexpected counts) ---------------------------
    stage("validate.checks")
    con.execute(f"CREATE VIEW raw AS SELECT * FROM read_parquet('{glob}', filename = true, file_row_number = true)")
    con.execute(f"CREATE VIEW cat AS SELECT DISTINCT product_id FROM read_parquet('{paths['catalog']}')")
    cols = ["event_id", "ts", "request_id", "session_id", "user_id", "query", "product_id", "position", "event_type"]
    nulls = ", ".join(f"count(*) - count({c}) AS {c}_not_null" for c in cols)
    lo, hi, now = (prm["day_start"].isoformat(), prm["day_end"].isoformat(), prm["now"].isoformat())
    row = con.execute(f"""
        SELECT count(*) AS row_count, {nulls},
          count(*) FILTER (WHERE event_type NOT IN ('impression', 'click', 'add_to_cart', 'purchase'))
            AS event_type_in_allowed_set,
          count(*) FILTER (WHERE position < 1 OR position > {options.max_position}) AS position_in_range,
          count(*) FILTER (WHERE ts < TIMESTAMPTZ '{lo}' OR ts >= TIMESTAMPTZ '{hi}') AS ts_within_partition_day,
          count(*) FILTER (WHERE ts > TIMESTAMPTZ '{now}') AS ts_not_in_future,
          count(*) FILTER (WHERE regexp_replace(query, '[\\s\\p{{Z}}\\p{{Cf}}\\x{{0B}}\\x{{1C}}-\\x{{1F}}\\x{{85}}]',
                                                '', 'g') = '') AS query_not_blank,
          count(*) FILTER (WHERE NOT regexp_matches(event_id, '^[\\x00-\\x7F]*$')) AS non_ascii_event_ids
        FROM raw""").fetchdf().iloc[0].to_dict()
    observed = {k: int(v) for k, v in row.items()}
    dup_key = ", ".join(FEEDBACK_DUPLICATE_KEY)
    observed["event_id_unique"] = int(con.execute(
        "SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM raw GROUP BY event_id HAVING count(*) > 1)"
    ).fetchone()[0])
    observed["no_duplicate_events"] = int(con.execute(
        f"SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM raw GROUP BY {dup_key} HAVING count(*) > 1)"
    ).fetchone()[0])
    observed["product_id_in_catalog"] = int(con.execute(
        "SELECT count(*) FROM raw r ANTI JOIN cat c ON r.product_id = c.product_id WHERE r.product_id IS NOT NULL"
    ).fetchone()[0])
    sessions, bot_sessions = con.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE c > i OR (i >= {options.bot_min_impressions}
                                                      AND c / greatest(i, 1) > {options.max_session_click_rate}))
        FROM (SELECT session_id, count(*) FILTER (WHERE event_type = 'click') AS c,
                     count(*) FILTER (WHERE event_type = 'impression') AS i
              FROM raw WHERE session_id IS NOT NULL GROUP BY session_id)""").fetchone()
    observed["no_bot_sessions"] = int(bot_sessions)
    has_arm = "arm" in [r[0] for r in con.execute("DESCRIBE raw").fetchall()]
    observed["arm_in_allowed_set"] = int(con.execute(
        "SELECT count(*) FROM raw WHERE arm IS NOT NULL AND arm NOT IN ('champion', 'challenger')").fetchone()[0]
    ) if has_arm else 0
    n = observed["row_count"]
    dup_ok = 1.0 - options.duplicate_event_tolerance
    checks = {f"{c}_not_null": observed[f"{c}_not_null"] == 0 for c in cols}
    checks.update({
        "event_id_unique": observed["event_id_unique"] <= (1 - dup_ok) * n,
        "no_duplicate_events": observed["no_duplicate_events"] <= (1 - dup_ok) * n,
        "event_type_in_allowed_set": observed["event_type_in_allowed_set"] == 0,
        "position_in_range": observed["position_in_range"] == 0,
        "ts_within_partition_day": observed["ts_within_partition_day"] == 0,
        "ts_not_in_future": observed["ts_not_in_future"] == 0,
        "query_not_blank": observed["query_not_blank"] == 0,
        "product_id_in_catalog": observed["product_id_in_catalog"] <= options.unknown_product_tolerance * n,
        "no_bot_sessions": bot_sessions <= options.bot_session_tolerance * sessions,
        "arm_in_allowed_set": observed["arm_in_allowed_set"] == 0,
    })
    res.update(success=all(checks.values()), checks=checks, observed=observed)
    stage("validate.write")
    con.execute(f"COPY (SELECT * EXCLUDE (filename, file_row_number) FROM raw) TO '{out / 'validated'}' "
                "(FORMAT parquet, PER_THREAD_OUTPUT true)")

    # 2. labels --------------------------------------------------------------------------------
    stage("labels.derive")
    p = LabelParams()
    vglob = str(out / "validated" / "*.parquet")
    con.execute(f"""CREATE TEMP TABLE ev AS
        WITH v AS (SELECT *, (filename, file_row_number) AS _row
                   FROM read_parquet('{vglob}', filename = true, file_row_number = true)),
        c AS (SELECT * FROM v WHERE event_id IS NOT NULL AND ts IS NOT NULL AND request_id IS NOT NULL
                AND session_id IS NOT NULL AND query IS NOT NULL AND product_id IS NOT NULL AND position >= 1
                AND event_type IN ('impression', 'click', 'add_to_cart', 'purchase')),
        d1 AS (SELECT * FROM c QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY ts, _row) = 1)
        SELECT session_id, request_id, product_id, event_type, ts, position, query, _row FROM d1
        QUALIFY row_number() OVER (PARTITION BY {dup_key} ORDER BY ts, _row) = 1""")
    con.execute(f"""CREATE TEMP TABLE bots AS
        WITH g AS (SELECT session_id, epoch(ts) - lag(epoch(ts)) OVER (PARTITION BY session_id ORDER BY ts) AS gap
                   FROM ev WHERE event_type = 'click'),
        mg AS (SELECT session_id, median(gap) AS median_gap FROM g GROUP BY session_id),
        s AS (SELECT session_id, count(*) FILTER (WHERE event_type = 'click') AS clicks,
                     count(*) FILTER (WHERE event_type = 'impression') AS imps,
                     count(*) FILTER (WHERE event_type = 'purchase') AS buys FROM ev GROUP BY session_id)
        SELECT s.session_id, (SELECT count(*) FROM s) AS sessions FROM s LEFT JOIN mg USING (session_id)
        WHERE clicks > {p.max_clicks_per_session}
           OR (buys = 0 AND clicks > {p.max_clicks_without_purchase})
           OR (buys = 0 AND clicks >= {p.min_clicks_for_gap_rule}
               AND coalesce(median_gap < {p.min_median_click_gap_s}, false))
           OR (buys = 0 AND clicks >= {p.min_clicks_for_ctr_rule}
               AND coalesce(clicks / nullif(imps, 0) > {p.max_session_ctr} OR imps = 0, true))""")
    con.execute("""CREATE TEMP TABLE rp AS
        SELECT request_id, product_id,
               max((event_type = 'click')::INT) AS clicked, max((event_type = 'add_to_cart')::INT) AS carted,
               max((event_type = 'purchase')::INT) AS purchased,
               coalesce(arg_min(position, (ts, _row)) FILTER (WHERE event_type = 'impression'),
                        arg_min(position, (ts, _row))) AS position,
               coalesce(arg_min(query, (ts, _row)) FILTER (WHERE event_type = 'impression'),
                        arg_min(query, (ts, _row))) AS query,
               count(*) FILTER (WHERE event_type = 'impression') = 0 AS orphan
        FROM ev ANTI JOIN bots USING (session_id) GROUP BY request_id, product_id""")
    top = int(min(max(con.execute("SELECT max(position) FROM rp").fetchone()[0] or 1, 1), p.max_position))
    counts = con.execute(f"""SELECT query, product_id, least(position, {top}) AS pos, count(*) AS n, sum(clicked) AS c
                             FROM rp GROUP BY ALL""").fetchdf()
    prop, method, _eta_hat = propensities_from_counts(counts, top, p)  # labels' own finish
    prop = prop.tolist()
    con.execute("CREATE TEMP TABLE inv (pos INTEGER, inv DOUBLE)")
    con.executemany("INSERT INTO inv VALUES (?, ?)", [(k + 1, 1.0 / v) for k, v in enumerate(prop)])
    agg = con.execute(f"""
        SELECT query, product_id, count(*) AS impressions, sum(clicked) AS clicks, sum(carted) AS carts,
               sum(purchased) AS purchases, sum(clicked * inv) AS ipw_clicks, sum(carted * inv) AS ipw_carts,
               sum(purchased * inv) AS ipw_purchases, avg(position) AS mean_position
        FROM rp JOIN inv ON inv.pos = least(rp.position, {top}) GROUP BY query, product_id ORDER BY query, product_id
    """).fetchdf()
    bots_n, sessions_n = con.execute("SELECT count(*), coalesce(max(sessions), 0) FROM bots").fetchone()
    res["labels"] = finish_labels(agg, p, {"events_in": n, "bot_sessions": int(bots_n), "requests": con.execute(
        "SELECT count(DISTINCT request_id) FROM rp").fetchone()[0]}, method, prop, out, stage)
    con.close()
    return res


def child(engine: str, data: Path, name: str, out: Path) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    paths = day_paths(data, name)
    work = Path(tempfile.mkdtemp(prefix=f"fb-{engine}-", dir=out))
    stage = Stages(out / "stage")
    t = time.perf_counter()
    try:
        if engine == "pandas":
            res = run_pandas(paths, work, stage)
        elif engine.startswith("spark"):
            res = run_spark(paths, work, stage, "2g" if engine == "spark-2g" else None,
                            {"result_format": "BOOLEAN_ONLY"} if engine == "spark-boolean" else None,
                            per_check=engine == "spark-per-check")
        elif engine.startswith("duckdb"):
            res = run_duckdb(paths, work, stage, "1GB" if engine == "duckdb-1g" else None)
        else:
            raise SystemExit(f"unknown engine {engine}")
    finally:
        stage(None)
        shutil.rmtree(work, ignore_errors=True)
    res["stage_s"] = stage.times
    res["child_wall_s"] = round(time.perf_counter() - t, 2)
    (out / "result.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


# ---- staging through S3 ------------------------------------------------------------------------------
def s3_staging(data: Path, n: int) -> dict:
    """Upload the day to a private ``rclone serve s3`` (the embedded stack's S3, real HTTP) and time
    ``Storage.download_file`` (boto3 managed transfers) of every part to a local folder: what Spark
    local mode would do instead of reading s3a://.  Peak RSS of this Python process (the server not
    counted)."""
    import resource

    from shoprank.stack import Stack, free_port, prepared_settings
    from shoprank.storage import Storage

    home = tempfile.mkdtemp(prefix="shoprank-fbstage-")
    env = {"SHOPRANK_HOME": home, "SHOPRANK_S3_PORT": str(free_port()), "SHOPRANK_BUCKET": "bench",
           "SHOPRANK_ENV_FILE": os.path.join(home, "no.env"), "PATH": os.environ.get("PATH", "")}
    stack = Stack(prepared_settings(env))
    stack.up(("s3",), progress=lambda msg: log(f"[stack] {msg}"))
    dest = Path(tempfile.mkdtemp(prefix="fb-staged-"))
    try:
        storage = Storage(stack.settings)
        storage.ensure_bucket()
        files = sorted(day_paths(data, label(n))["feedback"].glob("*.parquet"))
        keys = [f"raw/feedback/dt={DAY}/{f.name}" for f in files]
        t = time.perf_counter()
        for f, k in zip(files, keys):
            storage.upload_file(str(f), k)
        up = time.perf_counter() - t
        before = uptime()
        t = time.perf_counter()
        for k in keys:
            storage.download_file(k, str(dest / k.rsplit("/", 1)[-1]))
        down = time.perf_counter() - t
        mb = sum(f.stat().st_size for f in files) / 1e6
        return {"events": n, "parts": len(files), "mb": round(mb, 1), "upload_s": round(up, 1),
                "download_s": round(down, 1), "download_mb_per_s": round(mb / down, 1),
                "peak_rss_mb_python": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "uptime_before": before, "uptime_after": uptime()}
    finally:
        shutil.rmtree(dest, ignore_errors=True)
        stack.down(progress=lambda msg: log(f"[stack] {msg}"))
        shutil.rmtree(home, ignore_errors=True)


# ---- the parent: spawn, sample, time out ---------------------------------------------------------
def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(engine: str, data: Path, n: int, timeout_s: float, name: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="fb-run-", dir=os.environ.get("BENCH_TMP", "/tmp")))
    cmd = [sys.executable, __file__, "--_engine", engine, "--_day", name, "--data", str(data), "--_out", str(out)]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "GX_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    before = uptime()
    t = time.perf_counter()
    popen = subprocess.Popen(cmd, env=env, start_new_session=True)
    proc = psutil.Process(popen.pid)
    peak, peaks, timed_out = 0, {}, False
    while popen.poll() is None:
        rss = tree_rss(proc)
        peak = max(peak, rss)
        try:
            st = (out / "stage").read_text() or "-"
        except OSError:
            st = "-"
        peaks[st] = max(peaks.get(st, 0), rss)
        if time.perf_counter() - t > timeout_s:
            timed_out = True
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t
    run = {"engine": engine, "events": n, "rc": popen.returncode, "timed_out": timed_out, "wall_s": round(wall, 1),
           "peak_rss_mb": round(peak / MB), "stage_peak_rss_mb": {k: round(v / MB) for k, v in peaks.items()},
           "uptime_before": before, "uptime_after": uptime()}
    if timed_out:
        try:
            run["stage_at_timeout"] = (out / "stage").read_text()
        except OSError:
            pass
    result = out / "result.json"
    if result.exists():
        run.update(json.loads(result.read_text()))
    shutil.rmtree(out, ignore_errors=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=event_count, nargs="+", default=[1_000_000, 3_000_000, 10_000_000],
                        help="events of each simulated day (1M, 3M, 10M or integers)")
    parser.add_argument("--engines", default="pandas,spark,duckdb",
                        help=f"comma-separated, in run order; of {', '.join(ENGINES)}")
    parser.add_argument("--data", default="/tmp/scale-data", help="where the simulated days are kept (reused)")
    parser.add_argument("--pandas-max-events", type=event_count, default=3_000_000,
                        help="larger days are not run on pandas (the machine would run out of memory)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is killed")
    parser.add_argument("--dirty", action="store_true",
                        help="run on a copy of each day with known defects (make_dirty) instead: every engine must "
                             "count them alike")
    parser.add_argument("--s3-staging", action="store_true",
                        help="instead of the engines: time staging each day from a local S3 server (boto3 managed "
                             "downloads)")
    parser.add_argument("--json", help="also write the figures to this file (appended to when it exists)")
    parser.add_argument("--_engine", help=argparse.SUPPRESS)
    parser.add_argument("--_day", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_generate", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data = Path(args.data)
    if args._generate:
        print(json.dumps(generate(data, args._generate), indent=2))
        return 0
    if args._engine:
        return child(args._engine, data, args._day, Path(args._out))

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        parser.error(f"unknown engine(s) {bad}; known: {', '.join(ENGINES)}")
    report: dict[str, Any] = {"benchmark": "feedback path (validate -> labels -> write) per engine",
                              "machine": machine(), "days": {}, "runs": []}
    if args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        report["runs"], report["days"] = old.get("runs", []), old.get("days", {})
        if "s3_staging" in old:
            report["s3_staging"] = old["s3_staging"]
    if args.s3_staging:
        report["s3_staging"] = report.get("s3_staging", [])
        for n in args.events:
            ensure_day(data, n)
            report["s3_staging"].append(r := s3_staging(data, n))
            log(f"staged {label(n)}: {r}")
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps(report.get("s3_staging"), indent=2))
        return 0
    for n in args.events:
        name = label(n) + ("-dirty" if args.dirty else "")
        report["days"][name] = day = ensure_day(data, n, args.dirty)
        log(f"day {name}: {day['events']:,} events, {day['parquet_mb']} MB Parquet in {day['parts']} parts")
        for engine in engines:
            if engine.startswith("pandas") and n > args.pandas_max_events:
                log(f"  {engine}: skipped above {args.pandas_max_events:,} events (--pandas-max-events)")
                continue
            log(f"  {engine} on {name} ...")
            run = measure(engine, data, n, args.timeout, name)
            run["day"] = name
            run["command"] = " ".join(["bench/bench_feedback_engines.py", "--events", label(n), "--engines", engine]
                                      + (["--dirty"] if args.dirty else []))
            report["runs"].append(run)
            log(f"  {engine} {name}: rc {run['rc']}{' TIMED OUT' if run['timed_out'] else ''}, "
                f"{run['wall_s']} s, peak {run['peak_rss_mb']} MB; stages {run.get('stage_s')}; "
                f"{run['uptime_after']}")
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
