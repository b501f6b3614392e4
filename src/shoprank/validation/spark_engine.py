"""Validate a feedback day on Spark: the same Great Expectations suite, on GX's Spark engine.

Chosen by :func:`shoprank.spark.choose_engine` (``SHOPRANK_FEEDBACK_ENGINE``); the caller is
:func:`shoprank.validation.runner.validate_partition`, which keeps listing, completeness,
quarantine and the refusal path for both engines.  What differs from pandas, and why:

* **Reading.**  Spark reads Parquet column by column and cannot report a bad *cell* by file and
  row the way the pandas reader does.  So a day goes to Spark only when every file's footer
  already has the contract's types (:func:`spark_readable`: strings, integers for ``position``,
  UTC timestamps for ``ts``, the same schema in every file, no over-long strings); any other day
  (a mistyped column, a naive timestamp, a schema that differs between files, a file that does
  not open) is read by the pandas reader instead, which names the file, row, column and value.
* **The checks** are the suite of :func:`shoprank.validation.suites.feedback_suite_expectations`,
  unchanged but for the type names (Spark's ``StringType`` for pandas' ``str``, ...).  The
  ``derived_*`` columns are computed with Spark joins and group-bys over the whole day, so
  uniqueness, row counts and bots per session are exact, not sampled.
* **Example rows** in failure messages: every row carries ``derived_row_id`` (file number x 2^40 +
  row in file, from Parquet's ``_metadata``); GX returns the ids of the first unexpected rows
  (``unexpected_index_column_names``), those few rows are fetched, and the messages are built by
  the same code as on pandas (``part-00003.parquet row 1234: event_id=...``).
* **Two passes.**  With example rows GX runs every row check three times over the day (the
  count, the first values, their row ids; for the uniqueness checks three window sorts of the
  whole day).  So the suite runs once asking for counts only (``SPARK_COUNT_FORMAT``: every check
  one Spark job; success, unexpected counts and percentages as before), and only the checks that
  *failed* run again with examples (:func:`add_failure_examples`), their results replacing the
  first ones.  Messages, quarantine reports and the Data Docs page of a failed day are those of
  one SUMMARY run; a passing check shows its counts in Data Docs but not the example values of
  rows it tolerated (``mostly``).  At 3M events (``bench/bench_feedback_engines.py``-style day,
  2 cores): ``event_id_unique`` 13.4 s -> 5.3 s, ``no_duplicate_events`` 26.6 s -> 10.3 s.
* **Promotion**: the contract columns, cast to the contract's types, written by Spark as Parquet
  parts and uploaded one at a time (``Storage.write_partition_parts``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Sequence

import numpy as np
import pandas as pd

from shoprank.data.contracts import CONTRACTS
from shoprank.spark import ROW_SHIFT  # a row's id: file number x ROW_SHIFT + row in file
from shoprank.validation import suites as S
from shoprank.validation.options import ValidationOptions
from shoprank.validation.reading import RawBatch

if TYPE_CHECKING:
    from shoprank.validation.drift import FeedbackCounts

log = logging.getLogger(__name__)

ROW_ID = "derived_row_id"
#: pandas' GX type names (``suites.GX_TYPES``) -> Spark's
SPARK_TYPES = {"str": "StringType", "Timestamp": "TimestampType", "int64": "LongType", "float64": "DoubleType"}
#: contract dtype -> Spark SQL type it is cast to
SPARK_CAST = {"string": "string", "int64": "bigint", "float64": "double", "datetime64[us, UTC]": "timestamp"}
#: RESULT_FORMAT plus the column that identifies an unexpected row on Spark
SPARK_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20,
                       "unexpected_index_column_names": [ROW_ID]}
#: the first pass: counts and percentages, no example rows (GX skips the value and row-id jobs)
SPARK_COUNT_FORMAT = {**SPARK_RESULT_FORMAT, "partial_unexpected_count": 0}


@dataclass
class Readable:
    ok: bool
    why: str = ""
    notes: list[str] = field(default_factory=list)
    rows: int = 0
    file_rows: dict[str, int] = field(default_factory=dict)


def _arrow_kind(t) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "int64"
    if pa.types.is_floating(t):
        return "float64"
    if pa.types.is_timestamp(t):
        return "datetime64[us, UTC]" if t.tz is not None else "naive"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def spark_readable(dataset: str, keys: Sequence[str], paths: Sequence[str]) -> Readable:
    """Can Spark read these staged Parquet files with the contract's types as they are?  From the
    footers only (nothing but the schema and row counts is read)."""
    import pyarrow.parquet as pq

    contract = CONTRACTS[dataset]
    want = {c.name: c.dtype for c in (*contract.columns, *contract.optional_columns)}
    first: dict[str, str] | None = None
    out = Readable(ok=True)
    for key, path in zip(keys, paths):
        short = key.rsplit("/", 1)[-1]
        try:
            meta = pq.ParquetFile(path)
            schema = meta.schema_arrow
        except Exception as exc:  # the pandas reader explains it file by file
            return Readable(False, f"{short} does not open as Parquet ({type(exc).__name__})")
        kinds = {f.name: _arrow_kind(f.type) for f in schema}
        for name, dtype in want.items():
            if name not in kinds:
                if name in contract.names:
                    return Readable(False, f"{short} has no column {name!r}")
                continue
            if kinds[name] not in (dtype, "null"):  # an all-null column reads as any type
                return Readable(False, f"{short}: column {name!r} is stored as {kinds[name]}, not {dtype}")
        contract_kinds = {k: v for k, v in kinds.items() if k in want}
        if first is None:
            first = contract_kinds
        elif contract_kinds != first:
            return Readable(False, f"{short}: its schema differs from the first file's")
        out.file_rows[key] = meta.metadata.num_rows
        out.rows += meta.metadata.num_rows
        extra = sorted(set(kinds) - set(want))
        if extra:
            out.notes.append(f"{short}: extra columns {extra} are ignored")
    return out


def contract_parts(dataset: str, paths: Sequence[str], rows_per_part: int = 500_000):
    """The staged raw files as validated parts, one at a time and in file order: the contract's
    columns in its dtypes (``Contract.conform``), at most ``rows_per_part`` rows each, read in
    batches so a file of any size streams."""
    import pyarrow.parquet as pq

    contract = CONTRACTS[dataset]
    for path in paths:
        f = pq.ParquetFile(path)
        cols = [c for c in contract.all_names if c in f.schema_arrow.names]
        for batch in f.iter_batches(batch_size=rows_per_part, columns=cols):
            yield contract.conform(batch.to_pandas())


def spark_suite(dataset: str, options: ValidationOptions, name: str | None = None,
                checks: Collection[str] | None = None):
    """``suites.build_suite`` with the type names Spark reports."""
    return S.build_suite(dataset, options, name=name, type_names=SPARK_TYPES, checks=checks)


def read_day(spark, dataset: str, paths: Sequence[str]):
    """The staged files as one DataFrame, contract columns cast, with ``derived_row_id``."""
    from pyspark.sql import functions as F

    from shoprank.spark import read_parquet_in_order

    contract = CONTRACTS[dataset]
    df = read_parquet_in_order(spark, paths, ROW_ID)
    for c in (*contract.columns, *contract.optional_columns):
        if c.name in df.columns:
            df = df.withColumn(c.name, F.col(c.name).cast(SPARK_CAST[c.dtype]))
    return df


def derived_columns(spark, df, options: ValidationOptions, catalog_ids: pd.Index | None):
    """The ``derived_*`` columns of ``suites.add_derived_columns(df, 'feedback', ...)`` with Spark ops
    (same rules, same values; the pandas function is the reference and the tests compare both)."""
    from pyspark.sql import functions as F

    string = "string"
    et, sess = F.col("event_type"), F.col("session_id")
    per_session = (df.where(sess.isNotNull()).groupBy("session_id")
                   .agg(F.sum((et == "click").cast("long")).alias(S.SESSION_CLICKS),
                        F.sum((et == "impression").cast("long")).alias(S.SESSION_IMPRESSIONS),
                        F.min(ROW_ID).alias("_first_row")))
    d = df.join(per_session, "session_id", "left")
    if catalog_ids is not None:
        known = spark.createDataFrame(pd.DataFrame({"product_id": pd.Series(catalog_ids, dtype=object).astype(str),
                                                    "_known": True}))
        d = d.join(F.broadcast(known), "product_id", "left")
        unknown = F.when(F.col("_known").isNull() & F.col("product_id").isNotNull(), F.col("product_id"))
    else:
        d = d.withColumn("_known", F.lit(None))
        unknown = F.lit(None)
    clicks = F.coalesce(F.col(S.SESSION_CLICKS), F.lit(0))
    imps = F.coalesce(F.col(S.SESSION_IMPRESSIONS), F.lit(0))
    rate = clicks / F.greatest(imps, F.lit(1))
    implausible = (clicks > imps) | ((imps >= options.bot_min_impressions) & (rate > options.max_session_click_rate))
    d = (d.withColumn(S.SESSION_CLICKS, clicks).withColumn(S.SESSION_IMPRESSIONS, imps)
         .withColumn(S.BOT_SESSION, F.when(implausible & sess.isNotNull(), sess).cast(string))
         .withColumn(S.FIRST_EVENT_OF_SESSION, F.coalesce(F.col(ROW_ID) == F.col("_first_row"), F.lit(False)))
         .withColumn(S.UNKNOWN_PRODUCT, unknown.cast(string))
         # suites._is_blank: nothing left once whitespace and format (Cf) characters are removed
         .withColumn(S.BLANK_QUERY, F.when(F.regexp_replace("query", r"(?U)[\s\p{Cf}\x1c-\x1f]", "") == "",
                                           F.col("query")).cast(string)))
    if "arm" in df.columns:
        d = d.withColumn(S.UNKNOWN_ARM, F.when(F.col("arm").isNotNull() & ~F.col("arm").isin(*S.FEEDBACK_ARMS),
                                               F.col("arm")).cast(string))
    else:
        d = d.withColumn(S.UNKNOWN_ARM, F.lit(None).cast(string))
    # look-alike event ids (suites.lookalike_keys): only non-ASCII ids need NFKC; they are few by
    # nature, collected, grouped in Python and flagged by value
    odd = [r[0] for r in df.where(F.col("event_id").rlike(r"[^\x00-\x7F]")).select("event_id").distinct().collect()]
    flagged: list[str] = []
    if odd:
        groups: dict[str, set[str]] = {}
        for u in odd:
            groups.setdefault(S._nfkc_visible(u), set()).add(u)
        for r in df.where(F.col("event_id").isin(list(groups))).select("event_id").distinct().collect():
            groups[r[0]].add(r[0])
        flagged = [u for members in groups.values() if len(members) > 1 for u in members]
    d = d.withColumn(S.LOOKALIKE_KEY, (F.when(F.col("event_id").isin(flagged), F.col("event_id")) if flagged
                                       else F.lit(None)).cast(string))
    return d.drop("_known", "_first_row")


def _ids_of(er) -> list[int]:
    out = []
    for item in (er.result or {}).get("partial_unexpected_index_list") or []:
        if isinstance(item, dict) and item.get(ROW_ID) is not None:
            out.append(int(item[ROW_ID]))
    return out


def _first_duplicates(derived, result) -> None:
    """For a failed uniqueness check, GX on Spark names *some* rows of the duplicated groups;
    pandas names the first ones in file order.  Ask for those (a window count on the failure path
    only), so both engines show the same example rows and value counts."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    for er in result.results:
        cfg = er.expectation_config
        if er.success or not er.result or cfg.type not in ("expect_column_values_to_be_unique",
                                                           "expect_compound_columns_to_be_unique"):
            continue
        cols = [cfg.kwargs["column"]] if cfg.kwargs.get("column") else list(cfg.kwargs.get("column_list") or [])
        if not cols or any(c not in derived.columns for c in cols):
            continue
        keyed = derived.select(ROW_ID, *cols)
        for c in cols:  # GX ignores rows with a null in the key
            keyed = keyed.where(F.col(c).isNotNull())
        first = (keyed.withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy(*cols))).where("_n > 1")
                 .orderBy(ROW_ID).limit(SPARK_RESULT_FORMAT["partial_unexpected_count"]).select(ROW_ID).collect())
        er.result["partial_unexpected_index_list"] = [{ROW_ID: int(r[0])} for r in first]


def example_batch(derived, result, keys: Sequence[str], file_rows: dict[str, int]) -> tuple[pd.DataFrame, RawBatch]:
    """The example rows GX named (by ``derived_row_id``) as a small pandas frame + its provenance,
    and every failing result's ``partial_unexpected_index_list`` rewritten to positions in it, so
    ``runner._outcome`` builds the messages exactly as on pandas."""
    from pyspark.sql import functions as F

    _first_duplicates(derived, result)
    ids = sorted({i for er in result.results if not er.success for i in _ids_of(er)})
    if ids:
        small = derived.where(F.col(ROW_ID).isin(ids)).toPandas().sort_values(ROW_ID).reset_index(drop=True)
        contract = CONTRACTS["feedback"]
        for c in (*contract.columns, *contract.optional_columns):  # Spark hands back naive UTC times
            if c.name in small.columns:
                small[c.name] = (pd.to_datetime(small[c.name]).dt.tz_localize("UTC") if c.dtype.startswith("datetime")
                                 else small[c.name].astype(c.dtype))
    else:
        small = pd.DataFrame(columns=[ROW_ID])
    pos = {int(v): i for i, v in enumerate(small[ROW_ID])}
    for er in result.results:
        if er.success or not er.result:
            continue
        if "partial_unexpected_index_list" in er.result:
            # in file and row order, as pandas lists them (Spark returns them in partition order)
            er.result["partial_unexpected_index_list"] = sorted(pos[i] for i in _ids_of(er) if i in pos)
    row_ids = small[ROW_ID].to_numpy(dtype=np.int64) if len(small) else np.zeros(0, dtype=np.int64)
    batch = RawBatch(df=small.drop(columns=[ROW_ID]), files=list(keys),
                     row_file=(row_ids // ROW_SHIFT).astype(np.int32), row_in_file=row_ids % ROW_SHIFT,
                     file_kind={k: "parquet" for k in keys}, file_rows=dict(file_rows))
    return batch.df, batch


def run_suite(derived, params: dict[str, Any], options: ValidationOptions, run_id):
    """The suite on an ephemeral context (no Data Docs): counts first, examples of failures second."""
    import great_expectations as gx

    from shoprank.validation.runner import _quiet

    ctx = _quiet(gx.get_context(mode="ephemeral"))
    vd = add_spark_definition(ctx, "feedback", options, "feedback", "feedback")
    result = vd.run(batch_parameters={"dataframe": derived}, expectation_parameters=params,
                    result_format=SPARK_COUNT_FORMAT, run_id=run_id)
    add_failure_examples(result, derived, params, options)
    return result


def _check_of(er) -> str | None:
    return (er.expectation_config.meta or {}).get("check") if er.expectation_config else None


def add_failure_examples(result, derived, params: dict[str, Any], options: ValidationOptions) -> list[str]:
    """The second pass: the row checks that failed in ``result`` (a ``SPARK_COUNT_FORMAT`` run) run
    again with example rows (``SPARK_RESULT_FORMAT``) and their results replace the first ones in
    place.  Returns the checks redone (none on a passing day: nothing runs)."""
    import great_expectations as gx

    from shoprank.validation.runner import _quiet

    failed = {_check_of(er): er for er in result.results
              if not er.success and er.result and "unexpected_count" in er.result and _check_of(er)}
    if not failed:
        return []
    t = time.perf_counter()
    ctx = _quiet(gx.get_context(mode="ephemeral"))
    vd = add_spark_definition(ctx, "feedback", options, "feedback_failures", "feedback_failures", checks=failed)
    again = vd.run(batch_parameters={"dataframe": derived}, expectation_parameters=params,
                   result_format=SPARK_RESULT_FORMAT)
    for er in again.results:
        first = failed.get(_check_of(er))
        if first is None:
            continue
        if er.success != first.success or er.result.get("unexpected_count") != first.result.get("unexpected_count"):
            log.warning("check %s: the second pass disagrees with the first (%s, %s unexpected vs %s, %s); "
                        "keeping the second", _check_of(er), er.success, er.result.get("unexpected_count"),
                        first.success, first.result.get("unexpected_count"))
            first.success = er.success
        first.result = er.result
    log.info("example rows of %d failed check(s) (%s) in %.1f s", len(failed), ", ".join(sorted(failed)),
             time.perf_counter() - t)
    return sorted(failed)


def add_spark_definition(ctx, dataset: str, options: ValidationOptions, suite_name: str, asset_name: str,
                         checks: Collection[str] | None = None):
    import great_expectations as gx

    from shoprank.validation.runner import DATASOURCE

    try:
        source = ctx.data_sources.get(DATASOURCE)
    except Exception:
        source = ctx.data_sources.add_spark(DATASOURCE)
    asset = source.add_dataframe_asset(asset_name)
    batch_def = asset.add_batch_definition_whole_dataframe("whole_partition")
    suite = ctx.suites.add(spark_suite(dataset, options, name=suite_name, checks=checks))
    return ctx.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch_def, suite=suite))


def feedback_counts_spark(df, positions: int) -> "FeedbackCounts":
    """What feedback drift compares (:func:`shoprank.validation.drift.feedback_counts`), on Spark."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from shoprank.validation.drift import FeedbackCounts

    rows = df.count()
    types = {r[0]: int(r[1]) for r in df.groupBy("event_type").count().collect()}
    first = (df.where(F.col("request_id").isNotNull())
             .withColumn("_n", F.row_number().over(Window.partitionBy("request_id").orderBy(ROW_ID)))
             .where("_n = 1"))
    searches = {r[0]: int(r[1]) for r in first.groupBy("query").count().collect()}
    clicks = df.where(F.col("event_type") == "click")
    click_pos = {int(r[0]) if r[0] is not None else None: int(r[1]) for r in clicks.groupBy("position").count().collect()}
    top = (df.where(F.col("position").between(1, positions) & F.col("event_type").isin("impression", "click"))
           .groupBy("position", "event_type").count().collect())
    table: dict[int, dict[str, int]] = {}
    for r in top:
        table.setdefault(int(r[0]), {})[r[1]] = int(r[2])
    return FeedbackCounts(rows=rows, event_types=types, searches=searches, click_positions=click_pos,
                          position_events=table)


__all__ = ["SPARK_TYPES", "ROW_ID", "SPARK_COUNT_FORMAT", "add_failure_examples", "derived_columns", "example_batch",
           "read_day", "spark_readable", "spark_suite", "feedback_counts_spark", "add_spark_definition", "run_suite"]
