"""GX suites on in-memory frames: clean data passes; each deliberately broken batch fails with
the right check named (and only that one), with example rows; malformed files are reported
by file and problem.  One GX context per session (``validate_frame`` caches it)."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pandas as pd
import pytest

from shoprank.validation import (
    ValidationOptions,
    build_suite,
    check_names,
    read_files,
    samples,
    validate_frame,
)
from shoprank.data.contracts import CONTRACTS

DAY = "2026-11-20"
NOW = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.timezone.utc)
OPTS = ValidationOptions(now=NOW)


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return samples.catalog(300, day=DAY)


@pytest.fixture(scope="module")
def ids(catalog) -> pd.Index:
    return pd.Index(catalog["product_id"])


def clean(dataset: str, ids: pd.Index) -> pd.DataFrame:
    if dataset == "catalog":
        return samples.catalog(300, day=DAY)
    if dataset == "queries":
        return samples.queries(day=DAY)
    if dataset == "judgments":
        return samples.judgments(ids, n=300)
    return samples.feedback(2_000, day=DAY, ids=ids)


def run(df: pd.DataFrame, dataset: str, ids: pd.Index, **kw):
    kw.setdefault("catalog_product_ids", ids if dataset in ("judgments", "feedback") else None)
    return validate_frame(df, dataset, DAY, kw.pop("options", OPTS), **kw)


# ---- suites ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["catalog", "judgments", "feedback", "queries"])
def test_clean_data_passes_every_check(dataset, ids):
    outcome = run(clean(dataset, ids), dataset, ids, previous_row_count=None)
    assert outcome.success, outcome.message()
    assert list(outcome.checks) == check_names(dataset)
    assert all(outcome.checks.values())


@pytest.mark.parametrize("dataset", ["catalog", "judgments", "feedback", "queries"])
def test_suites_are_readable_and_cover_the_contract(dataset):
    suite = build_suite(dataset)
    names = [e.meta["check"] for e in suite.expectations]
    assert len(names) == len(set(names)), "check names are unique within a suite"
    assert all(e.notes for e in suite.expectations), "every expectation explains itself"
    contract = CONTRACTS[dataset]
    assert "columns_present" in names
    assert {f"{c}_type" for c in contract.names} <= set(names)
    assert {f"{c.name}_not_null" for c in contract.columns if not c.nullable} <= set(names)
    assert "row_count_vs_previous_partition" in names


def test_feedback_suite_has_the_click_log_contract():
    names = check_names("feedback")
    for check in ("event_id_unique", "no_duplicate_events", "event_type_in_allowed_set", "position_in_range",
                  "ts_within_partition_day", "ts_not_in_future", "product_id_in_catalog", "no_bot_sessions"):
        assert check in names


def test_tolerances_land_in_the_suite():
    suite = build_suite("feedback", ValidationOptions(unknown_product_tolerance=0.05, bot_session_tolerance=0.1))
    by_name = {e.meta["check"]: e for e in suite.expectations}
    assert by_name["product_id_in_catalog"].mostly == pytest.approx(0.95)
    assert by_name["no_bot_sessions"].mostly == pytest.approx(0.9)


# ---- one broken batch per failure kind ---------------------------------------------------------
def _break_catalog_type(df):
    df = df.copy()
    df["price"] = df["price"].astype(str)
    return df


def _future_created_at(df):
    df = df.copy()
    df.loc[3, "created_at"] = pd.Timestamp("2027-01-01", tz="UTC")
    return df


def _set(col, rows, value):
    def apply(df):
        df = df.copy()
        if col in ("position", "grade", "frequency") and value is None:
            df[col] = df[col].astype("Int64")
        df.loc[rows, col] = value
        return df

    return apply


def _dup_rows(rows):
    def apply(df):
        return pd.concat([df, df.loc[rows]], ignore_index=True)

    return apply


def _same_event_id(n):
    def apply(df):
        df = df.copy()
        df.loc[: n - 1, "event_id"] = "e-dup"
        return df

    return apply


def _replayed_events(n):
    """The same events logged again under new ids (a client retry)."""

    def apply(df):
        extra = df.iloc[:n].copy()
        extra["event_id"] = [f"retry-{i}" for i in range(n)]
        return pd.concat([df, extra], ignore_index=True)

    return apply


def _bot_sessions(sessions=5, n=40, click_rate=0.85):
    """Sessions that click ~85% of the n results they see (the simulator's bots do that)."""

    def apply(df):
        base = df.iloc[0]
        rows = []
        for s in range(sessions):
            for i in range(n):
                kinds = ["impression"] + (["click"] if (i % 20) < click_rate * 20 else [])
                for kind in kinds:
                    rows.append({**base.to_dict(), "event_id": f"bot-{s}-{i}-{kind}", "session_id": f"s-bot-{s}",
                                 "request_id": f"r-bot-{s}-{i // 10}", "position": i % 10 + 1, "event_type": kind,
                                 "ts": base["ts"] + pd.Timedelta(seconds=i)})
        return pd.concat([df, pd.DataFrame(rows).astype(df.dtypes.to_dict())], ignore_index=True)

    return apply


def _clicks_without_impressions(df):
    """Sessions s0..s3 log clicks but no impressions (4 of ~60 sessions, over the 5% tolerated)."""
    df = df.copy()
    rows = df.index[df["session_id"].isin(["s0", "s1", "s2", "s3"]) & (df["event_type"] == "impression")]
    df.loc[rows, "event_type"] = "click"
    return df


def _unknown_products(frac):
    def apply(df):
        df = df.copy()
        n = int(len(df) * frac)
        df.loc[: n - 1, "product_id"] = [f"ghost-{i}" for i in range(n)]
        return df

    return apply


def _ts_other_day(df):
    df = df.copy()
    df.loc[[4, 9], "ts"] = pd.Timestamp(DAY, tz="UTC") - pd.Timedelta(minutes=5)
    return df


def _drop(col):
    return lambda df: df.drop(columns=[col])


def _dup_queries(df):
    return pd.concat([df, df.head(2)], ignore_index=True)


BROKEN = [
    # (dataset, breakage, expected failing checks, column named, a value that must appear)
    ("catalog", _drop("price"), {"columns_present"}, None, "price"),
    ("catalog", _break_catalog_type, {"price_type"}, "price", "str"),
    ("catalog", _set("title", [5], None), {"title_not_null"}, "title", "row 5"),
    ("catalog", _dup_rows([7]), {"product_id_unique"}, "product_id", "p000007"),
    ("catalog", _set("price", [2], -1.0), {"price_non_negative"}, "price", "-1.0"),
    ("catalog", _future_created_at, {"created_at_not_in_future"}, "created_at", "2027-01-01"),
    ("catalog", _set("attributes", [1], "{color: red"), {"attributes_valid_json"}, "attributes", "{color: red"),
    ("judgments", _set("grade", [0], 7), {"grade_in_scale"}, "grade", "7"),
    ("judgments", _set("source", [1], "crowd"), {"source_in_allowed_set"}, "source", "crowd"),
    ("judgments", _dup_rows([3]), {"query_product_unique"}, "query,product_id", "row 3"),
    ("judgments", _unknown_products(0.05), {"product_id_in_catalog"}, "derived_unknown_product_id", "ghost-0"),
    ("judgments", _set("grade", [2], None), {"grade_not_null"}, "grade", "row 2"),
    ("feedback", _set("event_type", [5], "hover"), {"event_type_in_allowed_set"}, "event_type", "hover"),
    ("feedback", _set("position", [6], 0), {"position_in_range"}, "position", "position=0"),
    ("feedback", _ts_other_day, {"ts_within_partition_day"}, "ts", "row 4"),
    ("feedback", _set("session_id", [8], None), {"session_id_not_null"}, "session_id", "row 8"),
    ("feedback", _same_event_id(40), {"event_id_unique"}, "event_id", "e-dup"),
    ("feedback", _replayed_events(60), {"no_duplicate_events"}, "session_id,request_id,product_id,event_type,ts",
     "row 0"),
    ("feedback", _unknown_products(0.02), {"product_id_in_catalog"}, "derived_unknown_product_id", "ghost-"),
    ("feedback", _bot_sessions(), {"no_bot_sessions"}, "derived_bot_session_id", "s-bot-0"),
    ("feedback", _clicks_without_impressions, {"no_bot_sessions"}, "derived_bot_session_id", "s0"),
    ("queries", _dup_queries, {"query_unique"}, "query", "red phone"),
    ("queries", _set("frequency", [0], -3), {"frequency_non_negative"}, "frequency", "-3"),
]


@pytest.mark.parametrize("dataset,breakage,expected,column,needle", BROKEN,
                         ids=[f"{b[0]}-{sorted(b[2])[0]}-{i}" for i, b in enumerate(BROKEN)])
def test_broken_batch_fails_with_the_right_check(dataset, breakage, expected, column, needle, ids):
    df = breakage(clean(dataset, ids))
    outcome = run(df, dataset, ids)
    assert not outcome.success
    assert set(outcome.failed_checks) == expected, outcome.message()
    # nothing lost: every check of the suite was evaluated and reported
    assert list(outcome.checks) == check_names(dataset)
    failure = outcome.failures[0]
    assert failure.column == column
    message = outcome.message()
    assert failure.check in message and needle in message, message
    if failure.unexpected_count:
        assert failure.examples and all("<dataframe> row " in e for e in failure.examples)


def test_ts_in_the_future_is_its_own_failure(ids):
    today = "2026-11-23"
    df = samples.feedback(2_000, day=today, ids=ids)
    opts = ValidationOptions(now=pd.Timestamp("2026-11-23T12:00:00Z").to_pydatetime())
    future = df["ts"] > pd.Timestamp("2026-11-23T12:05:00Z")  # now + the default 300 s clock skew
    assert future.any()
    outcome = validate_frame(df, "feedback", today, opts, catalog_product_ids=ids)
    assert set(outcome.failed_checks) == {"ts_not_in_future"}, outcome.message()
    assert outcome.failures[0].unexpected_count == int(future.sum())


def test_row_count_vs_previous_partition(ids):
    df = clean("feedback", ids)
    ok = run(df, "feedback", ids, previous_row_count=len(df) * 2)
    assert ok.success, ok.message()
    shrunk = run(df, "feedback", ids, previous_row_count=len(df) * 10)
    assert shrunk.failed_checks == ["row_count_vs_previous_partition"]
    assert "previous partition: 20,000 rows" in shrunk.message()
    grown = run(df, "feedback", ids, previous_row_count=len(df) // 6)
    assert grown.failed_checks == ["row_count_vs_previous_partition"]
    # the ratio is configurable
    lenient = run(df, "feedback", ids, previous_row_count=len(df) * 10,
                  options=ValidationOptions(now=NOW, row_count_min_ratio=0.05))
    assert lenient.success


def test_unknown_products_within_tolerance_pass(ids):
    df = _unknown_products(0.005)(clean("feedback", ids))
    assert run(df, "feedback", ids).success
    strict = ValidationOptions(now=NOW, unknown_product_tolerance=0.0)
    out = run(df, "feedback", ids, options=strict)
    assert out.failed_checks == ["product_id_in_catalog"]
    assert "10 of 2,000 rows" in out.message()


def test_bots_are_counted_per_session_with_a_tolerance(ids):
    df = clean("feedback", ids)
    sessions = df["session_id"].nunique()
    assert run(_bot_sessions(sessions=1)(df), "feedback", ids).success  # 1 bot of ~60 sessions: tolerated
    out = run(_bot_sessions(sessions=6)(df), "feedback", ids)
    assert out.failed_checks == ["no_bot_sessions"]
    assert f"6 of {sessions + 6:,} sessions" in out.message()
    assert "derived_session_clicks=34, derived_session_impressions=40" in out.message()
    humans = ValidationOptions(now=NOW, max_session_click_rate=0.9)  # the threshold is configurable
    assert run(_bot_sessions(sessions=6)(df), "feedback", ids, options=humans).success


def test_missing_catalogue_is_reported_not_failed(ids):
    out = run(clean("feedback", ids), "feedback", ids, catalog_product_ids=None)
    assert out.success
    assert any("referential integrity not checked" in w for w in out.warnings)


def test_missing_column_is_one_clear_failure(ids):
    df = clean("feedback", ids).drop(columns=["position"])
    out = run(df, "feedback", ids)
    assert out.failed_checks == ["columns_present"]
    assert "missing columns ['position']" in out.message()
    assert "position_in_range" in out.message()  # the checks that could not run are named


# ---- files: formats and malformed inputs ---------------------------------------------------
def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def csv_bytes(df: pd.DataFrame, **kw) -> bytes:
    return df.to_csv(index=False, **kw).encode("utf-8")


FB = CONTRACTS["feedback"]


def test_csv_and_parquet_files_are_read_together_with_provenance(ids):
    df = clean("feedback", ids)
    a, b = df.iloc[:1200], df.iloc[1200:].copy()
    b.loc[1500, "event_type"] = "hover"
    batch = read_files({"raw/feedback/dt=x/part-0.parquet": parquet_bytes(a),
                        "raw/feedback/dt=x/extra.csv": csv_bytes(b)}, FB)
    assert not batch.issues
    assert batch.n_rows == len(df)
    assert str(batch.df["ts"].dtype) == "datetime64[us, UTC]" and batch.df["position"].dtype == "int64"
    out = validate_frame(batch.df, "feedback", DAY, OPTS, catalog_product_ids=ids, batch=batch)
    assert out.failed_checks == ["event_type_in_allowed_set"]
    # row 1500 of the frame is data row 300 of extra.csv, i.e. line 302 (header is line 1)
    assert "extra.csv line 302: event_id='e0-1500', event_type='hover'" in out.message()


def test_csv_cell_that_does_not_parse_is_named_with_its_line(ids):
    df = clean("feedback", ids)
    text = df.to_csv(index=False).splitlines()
    cells = text[11].split(",")
    cells[FB.names.index("position")] = "third"
    text[11] = ",".join(cells)
    batch = read_files({"events.csv": ("\n".join(text) + "\n").encode()}, FB)
    out = validate_frame(batch.df, "feedback", DAY, OPTS, catalog_product_ids=ids, batch=batch)
    assert "position_type" in out.failed_checks
    assert "events.csv line 12" in out.message() and "'third'" in out.message()


def test_wrong_encoding_is_named():
    df = pd.DataFrame({"query": ["café", "crème brûlée"], "frequency": [3, 4], "category": ["Food", "Food"]})
    batch = read_files({"raw/queries/dt=x/q.csv": df.to_csv(index=False).encode("latin-1")}, CONTRACTS["queries"])
    (issue,) = batch.issues
    assert issue.file == "raw/queries/dt=x/q.csv"
    assert "not valid UTF-8" in issue.problem and "Latin-1" in issue.problem and "line 2" in issue.problem


def test_truncated_parquet_is_named(ids):
    data = parquet_bytes(clean("feedback", ids))
    batch = read_files({"good.parquet": data, "cut.parquet": data[: len(data) // 2]}, FB)
    assert [i.file for i in batch.malformed] == ["cut.parquet"]
    assert "truncated Parquet" in batch.malformed[0].problem


def test_not_parquet_at_all_is_named():
    batch = read_files({"x.parquet": b"event_id,ts\n1,2\n"}, FB)
    assert "not a Parquet file" in batch.malformed[0].problem


def test_csv_without_header_is_named(ids):
    data = clean("feedback", ids).to_csv(index=False, header=False).encode()
    batch = read_files({"no_header.csv": data}, FB)
    (issue,) = batch.malformed
    assert "no header row" in issue.problem and "event_id,ts,request_id" in issue.problem


def test_ragged_csv_is_named():
    data = b"query,frequency,category\nshoes,3,Fashion\nboots,4,Fashion,extra\n"
    (issue,) = read_files({"q.csv": data}, CONTRACTS["queries"]).malformed
    assert "CSV is malformed" in issue.problem and "line 3" in issue.problem


def test_huge_string_field_is_named(ids):
    df = clean("catalog", ids)
    df.loc[17, "description"] = "x" * 250_000
    batch = read_files({"cat.parquet": parquet_bytes(df)}, CONTRACTS["catalog"], max_field_chars=100_000)
    (issue,) = batch.malformed
    assert "'description' row 17" in issue.problem and "250,000-character" in issue.problem


def test_empty_files_are_empty_not_malformed(ids):
    header_only = clean("feedback", ids).head(0)
    batch = read_files({"a.parquet": parquet_bytes(header_only), "b.csv": b""}, FB)
    assert batch.n_rows == 0 and not batch.malformed
    assert {i.file for i in batch.issues} == {"a.parquet", "b.csv"}


def test_unsupported_file_type_is_named():
    (issue,) = read_files({"notes.txt": b"hello"}, FB).malformed
    assert "unsupported file type" in issue.problem


# ---- options ------------------------------------------------------------------------------------
def test_options_from_env_and_mapping():
    opts = ValidationOptions.from_env({"SHOPRANK_VALIDATION_UNKNOWN_PRODUCT_TOLERANCE": "0.2",
                                       "SHOPRANK_VALIDATION_BUILD_DOCS": "false",
                                       "SHOPRANK_DRIFT_MODE": "block", "SHOPRANK_DRIFT_PSI_THRESHOLD": "0.3"})
    assert opts.unknown_product_tolerance == 0.2 and opts.build_docs is False
    assert opts.drift.mode == "block" and opts.drift.psi_threshold == 0.3
    opts = ValidationOptions.from_mapping({"row_count_min_ratio": 0.1, "drift.mode": "off"})
    assert opts.row_count_min_ratio == 0.1 and opts.drift.mode == "off"
    with pytest.raises(ValueError, match="unknown validation option 'row_count_ratio'"):
        ValidationOptions.from_mapping({"row_count_ratio": 1})
    with pytest.raises(ValueError, match="SHOPRANK_VALIDATION_BOT_SESSION_TOLERANCE='lots'.*valid number"):
        ValidationOptions.from_env({"SHOPRANK_VALIDATION_BOT_SESSION_TOLERANCE": "lots"})
    with pytest.raises(ValueError, match="drift mode"):
        ValidationOptions.from_mapping({"drift.mode": "panic"})
    with pytest.raises(ValueError, match="between 0 and 1"):
        ValidationOptions(duplicate_event_tolerance=2)


def test_samples_are_deterministic():
    a, b = samples.feedback(500, seed=3), samples.feedback(500, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert np.all(a["ts"].dt.strftime("%Y-%m-%d") == DAY)


# ---- issue 17: per-cell casting, key rules, folder rules (in memory) -----------------------------
def test_csv_integer_cells_keep_their_text_and_lossless_forms_pass(ids):
    df = clean("feedback", ids)
    lines = df.to_csv(index=False).splitlines()
    pos = FB.names.index("position")
    for row, text in ((3, "1e20"), (4, "inf"), (5, ""), (6, "3.0"), (7, "9223372036854775808")):
        cells = lines[row + 1].split(",")
        cells[pos] = text
        lines[row + 1] = ",".join(cells)
    batch = read_files({"e.csv": ("\n".join(lines) + "\n").encode()}, FB)
    assert batch.type_errors["position"]["rows"] == 3
    assert [batch.shown(i, "position") for i in range(3, 8)] == ["'1e20'", "'inf'", "''", "'3.0'",
                                                                "'9223372036854775808'"]
    out = validate_frame(batch.df, "feedback", DAY, OPTS, catalog_product_ids=ids, batch=batch)
    assert set(out.failed_checks) == {"position_type", "position_not_null"}, out.message()
    assert "e.csv line 6: event_id='e0-4', position='inf'" in out.message()


def test_nested_and_non_finite_values_are_type_failures_not_crashes(ids):
    df = clean("catalog", ids)
    df["attributes"] = df["attributes"].astype(object)
    df.at[2, "attributes"] = {"color": "red"}
    df.loc[4, "price"] = np.inf
    out = run(df, "catalog", ids)
    assert set(out.failed_checks) == {"attributes_type", "price_type"}, out.message()
    assert "attributes='{\"color\": \"red\"}'" in out.message() and "price='inf'" in out.message()


@pytest.mark.parametrize("breakage,check", [
    (_set("title", [3], " \u200b "), "title_not_blank"),
    (_set("category", [3], "Home>Kitchen"), "category_is_a_path"),
    (_set("attributes", [3], "[1, 2]"), "attributes_json_object"),
    (_set("price", [3], 1e308), "price_in_range"),
    (lambda df: df.assign(product_id=df["product_id"].where(df.index != 3, "\uff50000004")),
     "product_id_no_lookalikes"),
])
def test_catalog_contract_rules(breakage, check, ids):
    out = run(breakage(clean("catalog", ids)), "catalog", ids)
    assert out.failed_checks == [check], out.message()
    assert "<dataframe> row 3" in out.message()


def test_feedback_arm_must_be_a_known_arm(ids):
    df = clean("feedback", ids).assign(arm="champion")
    df.loc[11, "arm"] = "treatment"
    out = run(df, "feedback", ids)
    assert out.failed_checks == ["arm_in_allowed_set"] and "arm='treatment'" in out.message()


def test_format_hints():
    import gzip

    q = samples.queries(day=DAY)
    buf = io.BytesIO()
    q.set_index("query").to_parquet(buf)
    cases = {"a.csv": (q.to_csv(index=False, sep=";").encode(), "semicolon"),
             "b.csv": (gzip.compress(q.to_csv(index=False).encode()), "name it .csv.gz"),
             "c.parquet": (buf.getvalue(), "pandas index")}
    for name, (data, hint) in cases.items():
        (issue,) = read_files({name: data}, CONTRACTS["queries"]).malformed
        assert hint in issue.problem, issue.problem


def test_non_data_keys_and_partition_folders_follow_rules():
    from shoprank.storage import classify_partition_keys, non_data_reason, parse_partition_folder, scan_partition_keys
    from shoprank.validation.runner import safe_run_id

    for rel in ("_SUCCESS", "_validation.json", "_committed_1", "_temporary/0/part-0.parquet", "backup/",
                "part-0.parquet.crc", ".hidden", "x_$folder$"):
        assert non_data_reason(rel), rel
    assert non_data_reason("part-0.parquet") is None and non_data_reason("sub/part-0.parquet") is None
    listing = classify_partition_keys("p/", ["p/a.parquet", "p/_SUCCESS", "p/sub/b.parquet", "p/_temporary/c"])
    assert listing.data == ["p/a.parquet"] and listing.nested == ["p/sub/b.parquet"] and listing.complete
    assert parse_partition_folder("dt=2026-11-20") == ("2026-11-20", None)
    for bad in ("dt=2026-02-30", "dt=2026-13-01", "date=2026-11-20", "2026-11-20", "dt=20261120", "dt=2026-1-5"):
        assert parse_partition_folder(bad)[0] is None, bad
    scan = scan_partition_keys("raw/q/", ["raw/q/dt=2026-11-20/_SUCCESS", "raw/q/dt=2026-02-30/_SUCCESS",
                                          "raw/q/dt=2026-11-21/a.parquet", "raw/q/_SUCCESS"])
    assert scan.complete == ["2026-11-20"] and scan.incomplete == ["2026-11-21"]
    assert [k for k, _ in scan.malformed] == ["raw/q/dt=2026-02-30/"]
    assert safe_run_id("manual__2026-11-23T09:00:00+00:00") == "manual__2026-11-23T09_00_00_00_00"
    for rid in ("..", "../../x", "a/../b", "", "."):
        seg = safe_run_id(rid)
        assert seg and "/" not in seg and ".." not in seg and not seg.startswith("."), (rid, seg)
