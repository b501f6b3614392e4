"""Great Expectations suites for every dataset, written out in code so they can be reviewed.

Each expectation carries ``meta["check"]``, a short stable name used in failure messages,
reports and tests (``feedback: event_type_in_allowed_set``), ``meta["show"]``, the columns
printed next to an example bad row, and ``notes`` explaining the rule in words.

Run-time values (the partition's day, "now", the previous partition's row count) are
suite parameters (``{"$PARAMETER": name}``) filled by :func:`suite_parameters`, so the
suite itself stays the same from day to day.

Some rules need more than one row at a time (is this product in the catalogue? is this
session a bot?).  GX's ``UnexpectedRowsExpectation`` would express them as SQL, but it
only runs on SQL and Spark data sources, not pandas.  Instead :func:`add_derived_columns`
adds ``derived_*`` columns that hold the offending value (the unknown product id, the
implausible session id) or null, and the suite expects them to be (mostly) null.  The Data
Docs then list the offending ids themselves.  Derived columns never leave validation.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

import pandas as pd

from shoprank.data.contracts import CONTRACTS, EVENT_TYPES, GRADE_MAX, GRADE_MIN, JUDGMENT_SOURCES, Contract
from shoprank.validation.options import ValidationOptions

DERIVED_PREFIX = "derived_"
UNKNOWN_PRODUCT = "derived_unknown_product_id"
BOT_SESSION = "derived_bot_session_id"
SESSION_CLICKS = "derived_session_clicks"
SESSION_IMPRESSIONS = "derived_session_impressions"
FIRST_EVENT_OF_SESSION = "derived_first_event_of_session"  # one row per session, to count sessions

# pandas dtype of a contract column -> the `type_` GX's ExpectColumnValuesToBeOfType checks
# (it compares ``dtype.type``: pandas' string dtypes have type ``str``, tz-aware datetimes
# ``Timestamp``, nullable Int64 ``int64``).  Object columns are checked value by value, so
# a CSV cell that did not parse is reported with its row.
GX_TYPES = {"string": "str", "int64": "int64", "float64": "float64", "datetime64[us, UTC]": "Timestamp"}

FEEDBACK_DUPLICATE_KEY = ["session_id", "request_id", "product_id", "event_type", "ts"]


def _gx():
    from shoprank.validation.runner import gx_modules

    return gx_modules()


def _exp(cls_name: str, check: str, notes: str, show: Iterable[str] = (), unit: str = "rows", **kwargs: Any):
    _, gxe = _gx()
    cls = getattr(gxe, cls_name)
    return cls(meta={"check": check, "show": list(show), "unit": unit}, notes=notes, **kwargs)


def _row_condition(flag_column: str):
    """Restrict an expectation to rows where a boolean derived column is True."""
    from great_expectations.expectations.row_conditions import Column

    _gx()
    return Column(flag_column) == True  # noqa: E712  (builds a GX condition, not a bool)


def _day_bounds(day: dt.date | str) -> tuple[pd.Timestamp, pd.Timestamp]:
    d = dt.date.fromisoformat(day) if isinstance(day, str) else day
    start = pd.Timestamp(d.isoformat(), tz="UTC")
    return start, start + pd.Timedelta(days=1)


# ---- the suites ----------------------------------------------------------------------------
def schema_expectations(contract: Contract) -> list:
    """Columns present, types, nulls: the same recipe for every dataset."""
    out = [
        _exp(
            "ExpectTableColumnsToMatchSet", "columns_present",
            f"Every {contract.dataset} contract column is present (extra columns are ignored).",
            column_set=contract.names, exact_match=False,
        )
    ]
    for col in contract.columns:
        out.append(
            _exp(
                "ExpectColumnValuesToBeOfType", f"{col.name}_type",
                f"{col.name} is {col.dtype} ({col.doc}).", show=[*contract.key, col.name],
                column=col.name, type_=GX_TYPES[col.dtype],
            )
        )
    for col in contract.columns:
        if not col.nullable:
            out.append(
                _exp(
                    "ExpectColumnValuesToNotBeNull", f"{col.name}_not_null",
                    f"{col.name} is required.", show=list(contract.key),
                    column=col.name,
                )
            )
    return out


def _row_count_expectation(dataset: str, options: ValidationOptions):
    return _exp(
        "ExpectTableRowCountToBeBetween", "row_count_vs_previous_partition",
        f"Row count between {options.row_count_min_ratio}x and {options.row_count_max_ratio}x the previous "
        f"validated {dataset} partition (no bound when there is none).",
        min_value={"$PARAMETER": "row_count_min"}, max_value={"$PARAMETER": "row_count_max"},
    )


def _catalog_reference_expectation(options: ValidationOptions):
    return _exp(
        "ExpectColumnValuesToBeNull", "product_id_in_catalog",
        f"Referential integrity: at most {options.unknown_product_tolerance:.2%} of rows refer to a product "
        f"missing from the catalogue; {UNKNOWN_PRODUCT} holds such ids.",
        show=["product_id"], column=UNKNOWN_PRODUCT, mostly=1.0 - options.unknown_product_tolerance,
    )


def catalog_suite_expectations(options: ValidationOptions) -> list:
    c = CONTRACTS["catalog"]
    return [
        *schema_expectations(c),
        _exp("ExpectColumnValuesToBeUnique", "product_id_unique", "One row per product.",
             show=["product_id", "title"], column="product_id"),
        _exp("ExpectColumnValuesToBeBetween", "price_non_negative", "Prices are >= 0.",
             show=["product_id", "price"], column="price", min_value=0),
        _exp("ExpectColumnValueLengthsToBeBetween", "title_not_empty", "Titles are not empty strings.",
             show=["product_id", "title"], column="title", min_value=1),
        _exp("ExpectColumnValueLengthsToBeBetween", "category_not_empty", "Categories are not empty strings.",
             show=["product_id", "category"], column="category", min_value=1),
        _exp("ExpectColumnValuesToBeJsonParseable", "attributes_valid_json",
             "attributes holds a JSON object (or null).", show=["product_id", "attributes"], column="attributes"),
        _exp("ExpectColumnValuesToBeBetween", "created_at_not_in_future",
             "created_at is not after the partition's day, nor after now (+ clock skew).",
             show=["product_id", "created_at"], column="created_at",
             max_value={"$PARAMETER": "latest_allowed_ts"}),
        _row_count_expectation("catalog", options),
    ]


def judgments_suite_expectations(options: ValidationOptions) -> list:
    c = CONTRACTS["judgments"]
    return [
        *schema_expectations(c),
        _exp("ExpectColumnValuesToBeInSet", "grade_in_scale",
             f"Grades use the {GRADE_MIN}..{GRADE_MAX} scale (0 irrelevant, 1 complement, 2 substitute, 3 exact).",
             show=["query", "product_id", "grade"], column="grade", value_set=list(range(GRADE_MIN, GRADE_MAX + 1))),
        _exp("ExpectColumnValuesToBeInSet", "source_in_allowed_set", f"source is one of {list(JUDGMENT_SOURCES)}.",
             show=["query", "product_id", "source"], column="source", value_set=list(JUDGMENT_SOURCES)),
        _exp("ExpectCompoundColumnsToBeUnique", "query_product_unique", "One judgment per (query, product).",
             show=["query", "product_id", "grade"], column_list=["query", "product_id"]),
        _exp("ExpectColumnValueLengthsToBeBetween", "query_not_empty", "Queries are not empty strings.",
             show=["query", "product_id"], column="query", min_value=1),
        _catalog_reference_expectation(options),
        _row_count_expectation("judgments", options),
    ]


def feedback_suite_expectations(options: ValidationOptions) -> list:
    c = CONTRACTS["feedback"]
    dup_mostly = 1.0 - options.duplicate_event_tolerance
    return [
        *schema_expectations(c),
        _exp("ExpectColumnValuesToBeUnique", "event_id_unique",
             f"event_id is the dedupe key: at most {options.duplicate_event_tolerance:.2%} of rows share an id.",
             show=["event_id", "session_id", "event_type", "ts"], column="event_id", mostly=dup_mostly),
        _exp("ExpectCompoundColumnsToBeUnique", "no_duplicate_events",
             "The same event (session, request, product, type, timestamp) logged twice under different ids: "
             f"at most {options.duplicate_event_tolerance:.2%} of rows.",
             show=["event_id", *FEEDBACK_DUPLICATE_KEY], column_list=FEEDBACK_DUPLICATE_KEY, mostly=dup_mostly),
        _exp("ExpectColumnValuesToBeInSet", "event_type_in_allowed_set", f"event_type is one of {list(EVENT_TYPES)}.",
             show=["event_id", "event_type"], column="event_type", value_set=list(EVENT_TYPES)),
        _exp("ExpectColumnValuesToBeBetween", "position_in_range",
             f"position is the 1-based rank shown (1..{options.max_position}).",
             show=["event_id", "request_id", "position"], column="position", min_value=1, max_value=options.max_position),
        _exp("ExpectColumnValuesToBeBetween", "ts_within_partition_day",
             "Events belong to the partition's UTC day [day 00:00, next day 00:00).",
             show=["event_id", "ts"], column="ts",
             min_value={"$PARAMETER": "day_start"}, max_value={"$PARAMETER": "day_end"}, strict_max=True),
        _exp("ExpectColumnValuesToBeBetween", "ts_not_in_future", "Event times are not in the future (+ clock skew).",
             show=["event_id", "ts"], column="ts", max_value={"$PARAMETER": "now"}),
        _exp("ExpectColumnValueLengthsToBeBetween", "query_not_empty", "Queries are not empty strings.",
             show=["event_id", "query"], column="query", min_value=1),
        _catalog_reference_expectation(options),
        _exp("ExpectColumnValuesToBeNull", "no_bot_sessions",
             f"Bot signal: sessions with more clicks than impressions, or >= {options.bot_min_impressions} impressions "
             f"and a click rate above {options.max_session_click_rate:.0%}; at most {options.bot_session_tolerance:.2%} "
             f"of sessions may look like that ({BOT_SESSION} holds their id; counted on each session's first event).",
             show=["session_id", SESSION_CLICKS, SESSION_IMPRESSIONS], column=BOT_SESSION, unit="sessions",
             row_condition=_row_condition(FIRST_EVENT_OF_SESSION), mostly=1.0 - options.bot_session_tolerance),
        _row_count_expectation("feedback", options),
    ]


def queries_suite_expectations(options: ValidationOptions) -> list:
    c = CONTRACTS["queries"]
    return [
        *schema_expectations(c),
        _exp("ExpectColumnValuesToBeUnique", "query_unique", "One row per query.", show=["query", "frequency"],
             column="query"),
        _exp("ExpectColumnValueLengthsToBeBetween", "query_not_empty", "Queries are not empty strings.",
             show=["query"], column="query", min_value=1),
        _exp("ExpectColumnValuesToBeBetween", "frequency_non_negative", "frequency (searches per day) is >= 0.",
             show=["query", "frequency"], column="frequency", min_value=0),
        _row_count_expectation("queries", options),
    ]


SUITES = {
    "catalog": catalog_suite_expectations,
    "judgments": judgments_suite_expectations,
    "feedback": feedback_suite_expectations,
    "queries": queries_suite_expectations,
}


def contract_for(dataset: str) -> Contract:
    if dataset not in SUITES:
        raise ValueError(f"no validation suite for dataset {dataset!r}; known: {sorted(SUITES)}")
    return CONTRACTS[dataset]


def build_suite(dataset: str, options: ValidationOptions | None = None, name: str | None = None):
    """The GX ``ExpectationSuite`` for ``dataset`` (not yet added to any context)."""
    contract_for(dataset)
    gx, _ = _gx()
    options = options or ValidationOptions()
    suite = gx.ExpectationSuite(
        name=name or dataset,
        meta={"shoprank": {"dataset": dataset, "contract": CONTRACTS[dataset].doc, "options": options.public_dict()}},
    )
    for expectation in SUITES[dataset](options):
        suite.add_expectation(expectation)
    return suite


def check_names(dataset: str, options: ValidationOptions | None = None) -> list[str]:
    """The readable names of the checks in a suite, in order."""
    contract_for(dataset)
    return [e.meta["check"] for e in SUITES[dataset](options or ValidationOptions())]


# ---- run-time inputs -------------------------------------------------------------------------
def suite_parameters(
    dataset: str,
    day: dt.date | str,
    options: ValidationOptions | None = None,
    previous_row_count: int | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Values for the suite's ``$PARAMETER`` placeholders."""
    options = options or ValidationOptions()
    start, end = _day_bounds(day)
    now_ts = pd.Timestamp(now or options.now or dt.datetime.now(dt.timezone.utc))
    if now_ts.tzinfo is None:
        now_ts = now_ts.tz_localize("UTC")
    latest = now_ts + pd.Timedelta(seconds=options.clock_skew_seconds)
    params: dict[str, Any] = {
        "day_start": start,
        "day_end": end,
        "now": latest,
        "latest_allowed_ts": min(end, latest),
        "row_count_min": None,
        "row_count_max": None,
    }
    if previous_row_count:
        import math

        params["row_count_min"] = int(math.ceil(previous_row_count * options.row_count_min_ratio))
        params["row_count_max"] = int(math.floor(previous_row_count * options.row_count_max_ratio))
    return params


def add_derived_columns(
    df: pd.DataFrame,
    dataset: str,
    options: ValidationOptions | None = None,
    catalog_product_ids: Iterable[str] | pd.Index | None = None,
) -> pd.DataFrame:
    """A shallow copy of ``df`` with the ``derived_*`` columns the suite of ``dataset`` reads.

    Robust to a broken schema: when an input column is missing the derived column is all
    null (the schema expectations report the missing column).
    """
    options = options or ValidationOptions()
    out = df.copy(deep=False)
    n = len(out)
    if dataset in ("judgments", "feedback"):
        unknown = pd.Series(None, index=out.index, dtype=object)
        if catalog_product_ids is not None and "product_id" in out.columns:
            ids = catalog_product_ids if isinstance(catalog_product_ids, pd.Index) else pd.Index(list(catalog_product_ids))
            pid = out["product_id"]
            missing = ~pid.isin(ids) & pid.notna()
            if missing.any():
                unknown = pid.where(missing, None).astype(object)
        out[UNKNOWN_PRODUCT] = unknown
    if dataset == "feedback":
        clicks = pd.Series(0, index=out.index, dtype="int64")
        impressions = pd.Series(0, index=out.index, dtype="int64")
        bot = pd.Series(None, index=out.index, dtype=object)
        if n and {"session_id", "event_type"} <= set(out.columns):
            et = out["event_type"]
            sess = out["session_id"]
            grouped = pd.DataFrame({"s": sess, "c": (et == "click").astype("int64"),
                                    "i": (et == "impression").astype("int64")}).groupby("s", sort=False, dropna=True)
            clicks = grouped["c"].transform("sum").fillna(0).astype("int64")
            impressions = grouped["i"].transform("sum").fillna(0).astype("int64")
            rate = clicks / impressions.clip(lower=1)
            implausible = (clicks > impressions) | (
                (impressions >= options.bot_min_impressions) & (rate > options.max_session_click_rate)
            )
            if implausible.any():
                bot = sess.where(implausible, None).astype(object)
        first = (~out["session_id"].duplicated() & out["session_id"].notna()) if "session_id" in out.columns else (
            pd.Series(False, index=out.index))
        out[SESSION_CLICKS] = clicks
        out[SESSION_IMPRESSIONS] = impressions
        out[BOT_SESSION] = bot
        out[FIRST_EVENT_OF_SESSION] = first.astype(bool)
    return out


def strip_derived(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not str(c).startswith(DERIVED_PREFIX)]]
