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
from typing import Any, Collection, Iterable

import numpy as np
import pandas as pd

from shoprank.data.contracts import CONTRACTS, EVENT_TYPES, GRADE_MAX, GRADE_MIN, JUDGMENT_SOURCES, Contract
from shoprank.validation.options import ValidationOptions

DERIVED_PREFIX = "derived_"
UNKNOWN_PRODUCT = "derived_unknown_product_id"
BOT_SESSION = "derived_bot_session_id"
SESSION_CLICKS = "derived_session_clicks"
SESSION_IMPRESSIONS = "derived_session_impressions"
FIRST_EVENT_OF_SESSION = "derived_first_event_of_session"  # one row per session, to count sessions
LOOKALIKE_KEY = "derived_lookalike_key"  # the key, when another row's key differs only by look-alike characters
BLANK_TITLE = "derived_blank_title"
BLANK_QUERY = "derived_blank_query"
BAD_CATEGORY_PATH = "derived_bad_category_path"
ATTRIBUTES_NOT_OBJECT = "derived_attributes_not_object"
UNKNOWN_ARM = "derived_unknown_arm"

#: The A/B arms the ranking API writes into feedback's optional ``arm`` column.
FEEDBACK_ARMS = ("champion", "challenger")
#: Prices above this are refused (no shop lists an item at a trillion currency units; ``1e308``
#: is a broken export, and float64 cannot hold cents exactly much beyond it).
PRICE_MAX = 1e12
CATEGORY_SEPARATOR = " > "
_OTHER_SEPARATORS = (" / ", " | ", "|", "»", " :: ", " \\ ", " -> ")

# pandas dtype of a contract column -> the `type_` GX's ExpectColumnValuesToBeOfType checks
# (it compares ``dtype.type``: pandas' string dtypes have type ``str``, tz-aware datetimes
# ``Timestamp``, nullable Int64 ``int64``).  Object columns are checked value by value, so
# a CSV cell that did not parse is reported with its row.
GX_TYPES = {"string": "str", "int64": "int64", "float64": "float64", "datetime64[us, UTC]": "Timestamp"}

FEEDBACK_DUPLICATE_KEY = ["session_id", "request_id", "product_id", "event_type", "ts"]


def _gx():
    from shoprank.validation.runner import gx_modules

    return gx_modules()


def _exp(cls_name: str, check: str, notes: str, show: Iterable[str] = (), unit: str = "rows", rule: str | None = None,
         about: str | None = None, **kwargs: Any):
    """One expectation.  For checks on a derived column: ``rule`` says in words what a failing
    row is, ``about`` names the data column(s) it is about (used in messages)."""
    _, gxe = _gx()
    cls = getattr(gxe, cls_name)
    meta = {"check": check, "show": list(show), "unit": unit}
    if rule:
        meta["rule"] = rule
    if about:
        meta["column"] = about
    return cls(meta=meta, notes=notes, **kwargs)


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


def _lookalike_expectation(contract: Contract):
    key = list(contract.key)
    what = " and ".join(key)
    return _exp(
        "ExpectColumnValuesToBeNull", f"{'_'.join(key)}_no_lookalikes",
        f"No two rows have {what} values that differ only by look-alike Unicode characters (equal after NFKC "
        f"normalisation, invisible characters removed, e.g. 'p001' and the full-width '\uff50001'); "
        f"{LOOKALIKE_KEY} holds such keys.",
        show=key, column=LOOKALIKE_KEY, rule="with a key that differs from another row's only by look-alike characters",
        about=",".join(key),
    )


def _blank_expectation(column: str, derived: str, show: list[str]):
    return _exp(
        "ExpectColumnValuesToBeNull", f"{column}_not_blank",
        f"{column} holds visible text: not empty, not only spaces or invisible characters ({derived} holds "
        "such values).", show=show, column=derived, rule=f"with a blank {column}", about=column,
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
        _lookalike_expectation(c),
        _exp("ExpectColumnValuesToBeBetween", "price_non_negative", "Prices are >= 0.",
             show=["product_id", "price"], column="price", min_value=0),
        _exp("ExpectColumnValuesToBeBetween", "price_in_range",
             f"Prices are at most {PRICE_MAX:.0e} (a larger price is a broken export; non-finite prices "
             "fail price_type).", show=["product_id", "price"], column="price", max_value=PRICE_MAX),
        _blank_expectation("title", BLANK_TITLE, ["product_id", "title"]),
        _exp("ExpectColumnValuesToBeNull", "category_is_a_path",
             f"category is a path of non-empty levels joined by {CATEGORY_SEPARATOR!r}, e.g. 'Home > Kitchen > "
             f"Kettles' (a single level such as 'unknown' is fine); {BAD_CATEGORY_PATH} holds other values.",
             show=["product_id", "category"], column=BAD_CATEGORY_PATH,
             rule=f"whose category is not a path of non-empty levels joined by {CATEGORY_SEPARATOR!r}",
             about="category"),
        _exp("ExpectColumnValuesToBeJsonParseable", "attributes_valid_json",
             "attributes holds valid JSON (or null).", show=["product_id", "attributes"], column="attributes"),
        _exp("ExpectColumnValuesToBeNull", "attributes_json_object",
             "attributes holds a JSON object of name -> value (not a list, a number, a string or null); "
             f"{ATTRIBUTES_NOT_OBJECT} holds other JSON values.",
             show=["product_id", "attributes"], column=ATTRIBUTES_NOT_OBJECT,
             rule="whose attributes are JSON but not an object", about="attributes"),
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
        _lookalike_expectation(c),
        _blank_expectation("query", BLANK_QUERY, ["query", "product_id"]),
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
        _lookalike_expectation(c),
        _exp("ExpectColumnValuesToBeInSet", "event_type_in_allowed_set", f"event_type is one of {list(EVENT_TYPES)}.",
             show=["event_id", "event_type"], column="event_type", value_set=list(EVENT_TYPES)),
        _exp("ExpectColumnValuesToBeNull", "arm_in_allowed_set",
             f"The optional arm column is one of {list(FEEDBACK_ARMS)} (or null); {UNKNOWN_ARM} holds other values.",
             show=["event_id", "arm"], column=UNKNOWN_ARM, rule=f"with an arm not in {list(FEEDBACK_ARMS)}",
             about="arm"),
        _exp("ExpectColumnValuesToBeBetween", "position_in_range",
             f"position is the 1-based rank shown (1..{options.max_position}).",
             show=["event_id", "request_id", "position"], column="position", min_value=1, max_value=options.max_position),
        _exp("ExpectColumnValuesToBeBetween", "ts_within_partition_day",
             "Events belong to the partition's UTC day [day 00:00, next day 00:00).",
             show=["event_id", "ts"], column="ts",
             min_value={"$PARAMETER": "day_start"}, max_value={"$PARAMETER": "day_end"}, strict_max=True),
        _exp("ExpectColumnValuesToBeBetween", "ts_not_in_future", "Event times are not in the future (+ clock skew).",
             show=["event_id", "ts"], column="ts", max_value={"$PARAMETER": "now"}),
        _blank_expectation("query", BLANK_QUERY, ["event_id", "query"]),
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
        _lookalike_expectation(c),
        _blank_expectation("query", BLANK_QUERY, ["query"]),
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


def build_suite(dataset: str, options: ValidationOptions | None = None, name: str | None = None,
                type_names: dict[str, str] | None = None, checks: Collection[str] | None = None):
    """The GX ``ExpectationSuite`` for ``dataset`` (not yet added to any context).  ``type_names``
    maps the pandas type names of the ``*_type`` checks (``GX_TYPES``) to another engine's;
    ``checks`` keeps only the checks of those names."""
    contract_for(dataset)
    gx, _ = _gx()
    options = options or ValidationOptions()
    suite = gx.ExpectationSuite(
        name=name or dataset,
        meta={"shoprank": {"dataset": dataset, "contract": CONTRACTS[dataset].doc, "options": options.public_dict()}},
    )
    for expectation in SUITES[dataset](options):
        if checks is not None and expectation.meta["check"] not in checks:
            continue
        if type_names and type(expectation).__name__ == "ExpectColumnValuesToBeOfType":
            expectation = type(expectation)(column=expectation.column, type_=type_names[expectation.type_],
                                            meta=expectation.meta, notes=expectation.notes)
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
    out[LOOKALIKE_KEY] = lookalike_keys(out, list(CONTRACTS[dataset].key)) if dataset in CONTRACTS else (
        pd.Series(None, index=out.index, dtype=object))
    if dataset == "catalog":
        out[BLANK_TITLE] = _flag_values(out, "title", _is_blank)
        out[BAD_CATEGORY_PATH] = _flag_values(out, "category", _bad_category_path)
        out[ATTRIBUTES_NOT_OBJECT] = _flag_values(out, "attributes", _json_but_not_object)
    if dataset in ("judgments", "feedback", "queries"):
        out[BLANK_QUERY] = _flag_values(out, "query", _is_blank)
    if dataset == "feedback":
        out[UNKNOWN_ARM] = _flag_values(out, "arm", lambda v: v not in FEEDBACK_ARMS, any_type=True)
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


def _visible(text: str) -> str:
    """``text`` without whitespace and invisible (format) characters such as zero-width spaces."""
    import unicodedata

    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) != "Cf")


def _is_blank(value: str) -> bool:
    return _visible(value) == ""


def _bad_category_path(value: str) -> bool:
    levels = value.strip().split(CATEGORY_SEPARATOR)
    if any(_is_blank(level) or ">" in level for level in levels):
        return True
    return len(levels) == 1 and any(sep in value for sep in _OTHER_SEPARATORS)


def _json_but_not_object(value: str) -> bool:
    import json

    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return False  # not JSON at all: attributes_valid_json reports it
    return not isinstance(parsed, dict)


def _flag_values(df: pd.DataFrame, column: str, is_bad, any_type: bool = False) -> pd.Series:
    """``column``'s value where ``is_bad(value)`` (evaluated once per distinct text), else null.

    Only text is judged (a cell of the wrong type fails its ``<column>_type`` check); with
    ``any_type`` other values are judged by their text."""
    out = pd.Series(None, index=df.index, dtype=object)
    if column not in df.columns or not len(df):
        return out
    from shoprank.validation.reading import as_text

    values = df[column].astype(object)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    flags = []
    for u in uniques:
        if isinstance(u, str):
            flags.append(bool(is_bad(u)))
        elif any_type:
            flags.append(bool(is_bad(as_text(u))))
        else:
            flags.append(False)
    flags_arr = np.array(flags + [False], dtype=bool)
    row_flags = flags_arr[codes]  # code -1 (null) hits the trailing False
    if row_flags.any():
        out[row_flags] = [as_text(v) for v in values[row_flags]]
    return out


def _nfkc_visible(text: str) -> str:
    import unicodedata

    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", "".join(ch for ch in text if unicodedata.category(ch) != "Cf"))


def lookalike_keys(df: pd.DataFrame, key: list[str]) -> pd.Series:
    """Per row: its key (text; compound keys joined by ' | ') when another row's key is different
    but equal after NFKC normalisation with invisible characters removed; else null.

    ASCII text is already in that form, so only keys with a non-ASCII character are normalised
    (a batch of ASCII ids costs one vectorised pass)."""
    out = pd.Series(None, index=df.index, dtype=object)
    if not key or any(c not in df.columns for c in key) or not len(df):
        return out
    sep = "\x1f"
    joined = None
    valid = pd.Series(True, index=df.index)
    for c in key:
        col = df[c]
        if col.dtype == object:  # cells that did not cast (bytes) take no part
            is_text = col.map(lambda v: isinstance(v, str)).astype(bool)
            valid &= is_text
            col = col.where(is_text, None)
        text = col.astype("string")
        valid &= text.notna()
        joined = text if joined is None else joined + sep + text
    joined = joined.where(valid)
    non_ascii = (~joined.str.isascii()).fillna(False).astype(bool)
    if not non_ascii.any():
        return out
    odd = pd.unique(joined[non_ascii].to_numpy(dtype=object))
    norms = {u: _nfkc_visible(u) for u in odd}
    groups: dict[str, set[str]] = {}
    for u, nrm in norms.items():
        groups.setdefault(nrm, set()).add(u)
    plain = joined[~non_ascii & valid]
    for u in pd.unique(plain[plain.isin(list(groups))].to_numpy(dtype=object)):
        groups[u].add(u)
    flagged = [u for members in groups.values() if len(members) > 1 for u in members]
    if flagged:
        rows = joined.isin(flagged).fillna(False).astype(bool)
        out[rows] = [v.replace(sep, " | ") for v in joined[rows]]
    return out


def strip_derived(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not str(c).startswith(DERIVED_PREFIX)]]
