"""Malformed and unusual uploads, one or more cases per class of issue 17, through the real
validation runner (and the inventory, latest-partition lookup and CLI) on a real S3 server.

Expected for every refusal: one path -- a :class:`ValidationError` whose message names the
check, the file, the row (or line), the column and the value *as written*; the raw objects are
byte-identical (same bytes, same ETag); the batch is copied byte for byte to ``quarantine/``
with ``_validation_report.json`` and ``_validation_report.md``; nothing reaches ``validated/``;
never a bare traceback.  Clean batches in unusual but lossless shapes pass.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shoprank.validation import (
    EmptyPartition,
    IncompletePartition,
    MalformedPartition,
    ValidationFailed,
)
from shoprank.validation.runner import safe_run_id

from .conftest import DAY, clean, parquet, put, raw_state, run

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

FIGURES: dict[str, int] = {"cases": 0, "refused": 0, "accepted": 0}


# ---- helpers -----------------------------------------------------------------------------------
def csv_with(df: pd.DataFrame, cells: dict[tuple[int, str], str]) -> bytes:
    """``df`` as CSV text with some cells replaced by raw text, exactly as written."""
    lines = df.to_csv(index=False).splitlines()
    cols = list(df.columns)
    for (row, col), text in cells.items():
        parts = lines[row + 1].split(",")
        parts[cols.index(col)] = text
        lines[row + 1] = ",".join(parts)
    return ("\n".join(lines) + "\n").encode()


def refused(storage, dataset: str, files: dict[str, bytes], run_id: str, error=ValidationFailed, day: str = DAY):
    """Upload, validate, expect a refusal through the one path; returns (exception, report)."""
    before = put(storage, dataset, files, day=day)
    with pytest.raises(error) as info:
        run(storage, dataset, run_id, day=day)
    exc = info.value
    raw = f"raw/{dataset}/dt={day}/"
    assert raw_state(storage, raw) == before, "raw objects must be byte-identical (same ETag)"
    q = f"quarantine/{dataset}/dt={day}/{safe_run_id(run_id)}/"
    assert exc.outcome is not None and exc.outcome.quarantine_prefix == q, str(exc)
    for key, (data, _etag) in before.items():
        assert storage.get_bytes(q + key[len(raw):]) == data, key
    report = json.loads(storage.get_bytes(q + "_validation_report.json"))
    assert report["success"] is False and report["message"] == str(exc)
    assert storage.get_bytes(q + "_validation_report.md").decode().startswith(f"# Validation report: {dataset}")
    assert storage.list_keys(f"validated/{dataset}/") == []
    assert "Traceback" not in str(exc)
    FIGURES["cases"] += 1
    FIGURES["refused"] += 1
    return exc, report


def assert_named(msg: str, check: str, column: str | None, where: str, value: str) -> None:
    assert check in msg, msg
    if column:
        assert f"column {column!r}" in msg, msg
    assert where in msg and value in msg, msg
    line = next(line for line in msg.splitlines() if where in line)
    assert value in line, (line, msg)  # the example row shows the value as written


# ---- 1. non-finite / out-of-range numbers in CSV integer columns --------------------------------
@pytest.mark.parametrize("written,check", [("1e20", "position_type"), ("inf", "position_type"),
                                           ("-inf", "position_type"), ("9223372036854775808", "position_type"),
                                           ("2.5", "position_type"), ("", "position_not_null")])
def test_csv_integer_cells_that_do_not_fit_are_named_as_written(storage, written, check):
    """Fault: a feedback CSV whose position column holds `inf`, `1e20`, a value past int64, a
    fraction, or an empty cell (next to empty cells elsewhere).  Expected: the check, the file and
    line, the column and the cell exactly as written (not int64 min); quarantined, raw untouched."""
    df = clean("feedback")
    data = csv_with(df, {(9, "position"): written, (20, "model_version"): ""})
    exc, _ = refused(storage, "feedback", {"events.csv": data}, f"rel-int-{written or 'empty'}")
    assert exc.outcome.failed_checks == [check], str(exc)
    assert_named(str(exc), check, "position", "events.csv line 11", repr(written))
    assert "position=-9223372036854775808" not in str(exc)  # never int64 min instead of the value


def test_out_of_range_integers_in_other_contracts(storage):
    """Fault: judgments grade `inf` and queries frequency `1e20` in CSV.  Expected: `<col>_type`
    with the value as written, for every contract with an integer column."""
    j = clean("judgments")
    exc, _ = refused(storage, "judgments", {"j.csv": csv_with(j, {(4, "grade"): "inf"})}, "rel-grade-inf")
    assert_named(str(exc), "grade_type", "grade", "j.csv line 6", "'inf'")
    q = clean("queries")
    exc, _ = refused(storage, "queries", {"q.csv": csv_with(q, {(7, "frequency"): "1e20"})}, "rel-freq-1e20")
    assert_named(str(exc), "frequency_type", "frequency", "q.csv line 9", "'1e20'")


# ---- 2. nested values where the contract has a string -------------------------------------------
def _replace(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, values)


@pytest.mark.parametrize("dataset,column,kind", [("catalog", "attributes", "struct"), ("catalog", "brand", "map"),
                                                 ("feedback", "session_id", "list"), ("queries", "category", "struct")])
def test_nested_values_in_string_columns_are_refused_cleanly(storage, dataset, column, kind):
    """Fault: a Parquet file whose string column holds a struct, a map or a list.
    Expected: `<column>_type` names the file, row and the nested value as JSON; no crash while
    deriving columns (sessions, look-alike keys); quarantined, raw untouched."""
    df = clean(dataset)
    table = pa.Table.from_pandas(df, preserve_index=False)
    n = len(df)
    if kind == "struct":
        values = pa.array([{"color": "red", "size": i} for i in range(n)])
    elif kind == "map":
        values = pa.array([[("k", f"v{i}")] for i in range(n)], type=pa.map_(pa.string(), pa.string()))
    else:
        values = pa.array([[f"s{i}", "x"] for i in range(n)])
    exc, report = refused(storage, dataset, {"part-00000.parquet": parquet(_replace(table, column, values))},
                          f"rel-nested-{dataset}-{column}")
    assert f"{column}_type" in exc.outcome.failed_checks, str(exc)
    msg = str(exc)
    assert f"column {column!r}" in msg and "part-00000.parquet row 0" in msg, msg
    assert "nested values" in msg and "json.dumps" in msg, msg
    assert report["status"] == "failed"


# ---- 3. completeness -------------------------------------------------------------------------------
def test_incomplete_partition_waits_and_is_never_promoted(storage):
    """Fault: a day's upload in progress (parts present, no `_SUCCESS`).
    Expected: IncompletePartition (an EmptyPartition: the daily run skips it, never a failure),
    a message naming the missing marker; nothing quarantined or promoted; not chosen as latest.
    Once the marker exists the same day validates and is promoted."""
    storage.write_partition(clean("catalog"), "raw", "catalog", "2026-11-19")
    before = put(storage, "catalog", {"part-00000.parquet": parquet(clean("catalog"))}, complete=False)
    with pytest.raises(IncompletePartition) as info:
        run(storage, "catalog", "rel-incomplete")
    assert isinstance(info.value, EmptyPartition) and not isinstance(info.value, ValidationFailed)
    assert "no _SUCCESS marker" in str(info.value) and f"raw/catalog/dt={DAY}/_SUCCESS" in str(info.value)
    assert raw_state(storage, f"raw/catalog/dt={DAY}/") == before
    assert storage.list_keys("quarantine/") == [] and storage.list_keys("validated/") == []
    assert storage.latest_partition("raw", "catalog") == "2026-11-19"
    storage.put_bytes(f"raw/catalog/dt={DAY}/_SUCCESS", b"")
    assert run(storage, "catalog", "rel-complete").success
    assert storage.list_partitions("validated", "catalog") == [DAY]
    FIGURES["cases"] += 1


def test_daily_run_waits_for_an_incomplete_feedback_day_then_skips_it(storage):
    """Fault: day D's feedback upload in progress (parts, no `_SUCCESS`) when D's daily run starts.
    Expected: the daily DAG's sensor rule says wait until SHOPRANK_DAILY_WAIT_HOURS after D ended,
    then give up (the run skips D, saying how to run it later); a complete or absent day is ready
    at once. Late events of D (raw/feedback_late/dt=D/) are merged into dt=D before validation,
    and late days of earlier dates are listed, never dropped."""
    from shoprank.daily import UpdatePolicy, feedback_readiness
    from shoprank.serving.events import late_event_days, merge_late_events, part_key

    policy = UpdatePolicy(wait_hours=6)
    day_end = dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)
    assert feedback_readiness(storage, DAY, now=day_end, policy=policy).state == "ready"  # nothing there
    data = parquet(clean("feedback"))
    put(storage, "feedback", {"part-00000.parquet": data}, complete=False)
    waiting = feedback_readiness(storage, DAY, now=day_end + dt.timedelta(hours=5, minutes=59), policy=policy)
    assert waiting.state == "wait" and not waiting.done
    assert f"raw/feedback/dt={DAY}/_SUCCESS" in waiting.message and "2026-11-21 06:00" in waiting.message
    late = feedback_readiness(storage, DAY, now=day_end + dt.timedelta(hours=6), policy=policy)
    assert late.state == "give_up" and late.done and "skipped" in late.message and "clear this run" in late.message
    assert storage.list_keys("validated/") == [] and storage.list_keys("quarantine/") == []
    storage.put_bytes(f"raw/feedback/dt={DAY}/_SUCCESS", b"")
    assert feedback_readiness(storage, DAY, now=day_end, policy=policy).state == "ready"

    storage.put_bytes(part_key(DAY, "late-1", late=True), data)
    storage.put_bytes(part_key("2026-11-18", "late-2", late=True), data)
    assert late_event_days(storage, before=DAY) == ["2026-11-18"]
    moved = merge_late_events(storage, DAY)
    assert moved == [f"raw/feedback/dt={DAY}/part-ev-late-1.parquet"]
    assert storage.list_keys(f"raw/feedback_late/dt={DAY}/") == []
    assert storage.get_bytes(moved[0]) == data
    assert late_event_days(storage, before="2026-12-31") == ["2026-11-18"]
    FIGURES["cases"] += 1


# ---- 4. stray or malformed partition folders ----------------------------------------------------------
def test_malformed_partition_folders_are_reported_and_never_latest(storage, caplog):
    """Fault: folders `dt=2026-02-30`, `dt=2026-13-01`, `date=2026-11-21`, `2026-11-22` and a file
    outside any folder next to a good `dt=2026-11-20`, each with data and a marker.
    Expected: latest partition = 2026-11-20; the inventory does not crash and lists each bad folder
    with its S3 key; validating a day lists them in the report; validating 2026-11-21 (only a
    `date=` upload) says it has no data and points at the `date=` folder."""
    from shoprank.inventory import inventory

    data = parquet(clean("queries"))
    storage.write_partition(clean("queries"), "raw", "queries", DAY)
    bad = ["dt=2026-02-30", "dt=2026-13-01", "date=2026-11-21", "2026-11-22"]
    for folder in bad:
        storage.put_bytes(f"raw/queries/{folder}/part-0.parquet", data)
        storage.put_bytes(f"raw/queries/{folder}/_SUCCESS", b"")
    storage.put_bytes("raw/queries/stray.parquet", data)
    assert storage.list_partitions("raw", "queries") == [DAY]
    assert storage.latest_partition("raw", "queries") == DAY
    assert storage.latest_partition("raw", "queries", on_or_before="2026-12-31") == DAY
    inv = inventory(storage, zones=("raw",))
    assert inv["raw"]["queries"] == {DAY: 100}
    keys = {p["key"] for p in inv["problems"]}
    for folder in bad:
        assert storage.uri(f"raw/queries/{folder}/") in keys, (folder, inv["problems"])
    assert storage.uri("raw/queries/stray.parquet") in keys
    outcome = run(storage, "queries", "rel-stray")
    assert outcome.success and len(outcome.stray_folders) == 5
    summary = json.loads(storage.get_bytes(f"validated/queries/dt={DAY}/_validation.json"))
    assert any(s.startswith("raw/queries/dt=2026-02-30/") for s in summary["stray_folders"])
    with pytest.raises(EmptyPartition) as info:
        run(storage, "queries", "rel-date-folder", day="2026-11-21")
    assert "raw/queries/date=2026-11-21/" in str(info.value) and "rename it to dt=2026-11-21/" in str(info.value)
    FIGURES["cases"] += 1


# ---- 5. a dtype problem in one file is blamed on that file ----------------------------------------------
def test_dtype_problem_is_blamed_on_its_own_file(storage):
    """Fault: a.parquet is clean; b.parquet stores `position` as text and c.csv has one bad cell.
    Expected: position_type lists rows of b.parquet and the line of c.csv only, never a.parquet."""
    df = clean("feedback")
    a, b, c = df.iloc[:800], df.iloc[800:1400].copy(), df.iloc[1400:]
    b["position"] = b["position"].astype(str)
    exc, report = refused(storage, "feedback", {"a.parquet": parquet(a), "b.parquet": parquet(b),
                                                "c.csv": csv_with(c.reset_index(drop=True), {(3, "position"): "third"})},
                          "rel-blame")
    msg = str(exc)
    assert exc.outcome.failed_checks == ["position_type"], msg
    assert "601 of 2,000 rows" in msg and "b.parquet row 0" in msg, msg
    assert "a.parquet" not in "\n".join(line for line in msg.splitlines() if "e.g." in line), msg
    assert "found str x600, text x1" in msg, msg  # b.parquet stores text; c.csv's cell is not a number
    failure = report["failures"][0]
    assert failure["unexpected_count"] == 601


# ---- 6. non-finite floats --------------------------------------------------------------------------------
@pytest.mark.parametrize("value,fmt,check,shown", [(np.inf, "parquet", "price_type", "'inf'"),
                                                   (-np.inf, "parquet", "price_type", "'-inf'"),
                                                   (1e308, "parquet", "price_in_range", "1e+308"),
                                                   ("inf", "csv", "price_type", "'inf'"),
                                                   ("1e308", "csv", "price_in_range", "'1e308'"),
                                                   ("nan", "csv", "price_type", "'nan'")])
def test_non_finite_and_absurd_prices_are_refused(storage, value, fmt, check, shown):
    """Fault: price = +inf / -inf / 1e308 (Parquet) or the text `inf` / `1e308` / `nan` (CSV).
    Expected: price_type (not a finite number) or price_in_range, value shown as written."""
    df = clean("catalog")
    if fmt == "parquet":
        df.loc[5, "price"] = value
        files = {"part-00000.parquet": parquet(df)}
        where = "part-00000.parquet row 5"
    else:
        files = {"cat.csv": csv_with(df, {(5, "price"): value})}
        where = "cat.csv line 7"
    exc, _ = refused(storage, "catalog", files, f"rel-price-{fmt}-{value}")
    assert exc.outcome.failed_checks == [check], str(exc)
    assert_named(str(exc), check, "price", where, shown)


# ---- 7. what the contract describes -------------------------------------------------------------------
def _lookalike(df):
    df = df.copy()
    df.loc[3, "product_id"] = "\uff50" + df.loc[4, "product_id"][1:]  # full-width p: NFKC-equal to row 4's id
    return df


def _zero_width_event(df):
    df = df.copy()
    df.loc[3, "event_id"] = df.loc[4, "event_id"][:2] + "\u200b" + df.loc[4, "event_id"][2:]
    return df


def _setv(col, row, value):
    def apply(df):
        df = df.copy()
        df[col] = df[col].astype(object)
        df.at[row, col] = value
        return df
    return apply


CONTRACT_RULES = [
    ("catalog", _setv("attributes", 2, '["red", "large"]'), "attributes_json_object", "attributes", "row 2"),
    ("catalog", _setv("attributes", 2, '"red"'), "attributes_json_object", "attributes", "row 2"),
    ("catalog", _setv("category", 6, "Home>Kitchen"), "category_is_a_path", "category", "'Home>Kitchen'"),
    ("catalog", _setv("category", 6, "Home >  > Kettles"), "category_is_a_path", "category", "row 6"),
    ("catalog", _setv("category", 6, "Home / Kitchen / Kettles"), "category_is_a_path", "category", "row 6"),
    ("catalog", _setv("title", 8, "   "), "title_not_blank", "title", "title='   '"),
    ("catalog", _setv("title", 8, "\u200b\u00a0"), "title_not_blank", "title", "row 8"),
    ("catalog", _lookalike, "product_id_no_lookalikes", "product_id", "row 3"),
    ("feedback", lambda df: df.assign(arm="champion").pipe(_setv("arm", 7, "blue")), "arm_in_allowed_set", "arm",
     "arm='blue'"),
    ("feedback", _zero_width_event, "event_id_no_lookalikes", "event_id", "row 3"),
    ("queries", _setv("query", 5, " \t "), "query_not_blank", "query", "row 5"),
    ("judgments", _setv("query", 5, ""), "query_not_blank", "query", "row 5"),
]


@pytest.mark.parametrize("dataset,breakage,check,column,needle", CONTRACT_RULES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CONTRACT_RULES)])
def test_contract_rules_nothing_checked_before(storage, dataset, breakage, check, column, needle):
    """Fault: attributes that are JSON but not an object; a category that is not `A > B > C`; a
    blank title or query; an A/B arm outside its set; ids that differ only by look-alike
    (NFKC-equal or invisible) characters.  Expected: the named check fails with the row."""
    df = breakage(clean(dataset))
    exc, _ = refused(storage, dataset, {"part-00000.parquet": parquet(df)}, f"rel-rule-{check}")
    assert exc.outcome.failed_checks == [check], str(exc)
    msg = str(exc)
    assert f"column {column!r}" in msg and needle in msg and "part-00000.parquet row" in msg, msg


def test_clean_batches_in_unusual_but_lossless_shapes_pass(storage):
    """Not a fault: Parquet with categorical and Arrow strings, narrow and nullable integers,
    float32 prices, millisecond timestamps, integral floats for an integer column; a CSV with
    `3.0` for an integer.  Expected: every one passes and validated/ has the contract dtypes."""
    cat = clean("catalog")
    cat2 = cat.assign(category=cat["category"].astype("category"), brand=cat["brand"].astype(object),
                      price=cat["price"].astype("float32").astype("float64").round(2),
                      created_at=cat["created_at"].astype("datetime64[ms, UTC]"))
    put(storage, "catalog", {"part-00000.parquet": parquet(cat2)})
    assert run(storage, "catalog", "rel-clean-cat").success
    j = clean("judgments")
    put(storage, "judgments", {"a.parquet": parquet(j.iloc[:150].assign(grade=j["grade"].iloc[:150].astype("int8"))),
                               "b.parquet": parquet(j.iloc[150:].assign(grade=j["grade"].iloc[150:].astype("Int64"))),
                               })
    assert run(storage, "judgments", "rel-clean-j").success
    fb = clean("feedback")
    fb2 = fb.assign(position=fb["position"].astype("float64"), query=fb["query"].astype("category"))
    put(storage, "feedback", {"part-00000.parquet": parquet(fb2)})
    assert run(storage, "feedback", "rel-clean-fb").success
    q = clean("queries")
    put(storage, "queries", {"q.csv": csv_with(q, {(0, "frequency"): f"{q.loc[0, 'frequency']}.0"})})
    assert run(storage, "queries", "rel-clean-q").success
    back = storage.read_partition("validated", "judgments", DAY)
    assert str(back["grade"].dtype) == "int64" and len(back) == len(j)
    assert str(storage.read_partition("validated", "feedback", DAY)["position"].dtype) == "int64"
    FIGURES["cases"] += 4
    FIGURES["accepted"] += 4


# ---- 8. keys that are not data ------------------------------------------------------------------------
def test_non_data_keys_are_ignored_by_rule_and_listed(storage):
    """Fault: a clean day plus an S3 console folder marker (`backup/`), Spark's `_temporary/` copy
    of the part, `_committed_*`/`_started_*` files, `.crc` checksums and a `_$folder$` marker.
    Expected: the day passes with its true row count (nothing counted twice), the ignored keys
    are listed in the report; the inventory counts the same rows."""
    from shoprank.inventory import inventory

    df = clean("feedback")
    data = parquet(df)
    put(storage, "feedback", {"part-00000.parquet": data, "backup/": b"", "_temporary/0/task_1/part-00000.parquet": data,
                              "_committed_4711": b"{}", "_started_4711": b"", "part-00000.parquet.crc": b"crc",
                              ".part-00000.parquet.crc": b"crc", "_SUCCESS.crc": b"crc", "old_$folder$": b""})
    outcome = run(storage, "feedback", "rel-nondata")
    assert outcome.success and outcome.row_count == len(df)
    ignored = "\n".join(outcome.ignored_keys)
    # rclone's file-backed S3 lists the console marker "backup/" as "backup" (an empty object): both are ignored
    assert f"raw/feedback/dt={DAY}/backup" in ignored, ignored
    for name in ( "_temporary/0/task_1/part-00000.parquet", "_committed_4711", "part-00000.parquet.crc",
                 "old_$folder$", "_SUCCESS"):
        assert f"raw/feedback/dt={DAY}/{name}:" in ignored, (name, ignored)
    summary = json.loads(storage.get_bytes(f"validated/feedback/dt={DAY}/_validation.json"))
    assert summary["ignored_keys"] == outcome.ignored_keys
    assert inventory(storage, zones=("raw",))["raw"]["feedback"] == {DAY: len(df)}
    FIGURES["cases"] += 1
    FIGURES["accepted"] += 1


def test_files_in_a_subfolder_are_refused_not_silently_added(storage):
    """Fault: a second copy of the data in a plain subfolder (`backup/part-00000.parquet`).
    Expected: MalformedPartition naming the key and what to do; never double-counted."""
    data = parquet(clean("queries"))
    exc, _ = refused(storage, "queries", {"part-00000.parquet": data, "backup/part-00000.parquet": data},
                     "rel-subfolder", error=MalformedPartition)
    assert f"raw/queries/dt={DAY}/backup/part-00000.parquet: in a subfolder" in str(exc)


# ---- 9. a run id with path characters -------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["..", "../../etc/x", "manual__a/../b", "a\\..\\b", "  "])
def test_run_id_with_path_characters_keeps_the_quarantine(storage, run_id):
    """Fault: a run id with `..`, `/` or backslashes (a hand-typed CLI run id, a crafted conf).
    Expected: the quarantine lands under one safe segment inside quarantine/<dataset>/dt=<day>/,
    the message still shows the data problem, nothing is written elsewhere."""
    df = clean("queries")
    df.loc[9, "frequency"] = -5
    exc, report = refused(storage, "queries", {"part-00000.parquet": parquet(df)}, run_id)
    assert "frequency_non_negative" in str(exc) and "part-00000.parquet row 9" in str(exc)
    assert report["run_id"] == run_id
    segment = safe_run_id(run_id)
    assert "/" not in segment and ".." not in segment and not segment.startswith(".")
    keys = storage.list_keys("")
    assert all(k.startswith((f"raw/queries/dt={DAY}/", f"quarantine/queries/dt={DAY}/{segment}/")) for k in keys), keys


# ---- 10. common format mistakes get a hint ------------------------------------------------------------------
def _semicolon():
    return {"q.csv": clean("queries").to_csv(index=False, sep=";").encode()}


def _gzip_under_csv():
    return {"q.csv": gzip.compress(clean("queries").to_csv(index=False).encode())}


def _index_column():
    return {"q.parquet": parquet(clean("queries").set_index("query"), index=True)}


def _parquet_under_csv():
    return {"q.csv": parquet(clean("queries"))}


def _plain_under_gz():
    return {"q.csv.gz": clean("queries").to_csv(index=False).encode()}


HINTS = [(_semicolon, "';' (semicolon) as the delimiter"), (_gzip_under_csv, "name it .csv.gz"),
         (_index_column, "stored as the pandas index"), (_parquet_under_csv, "name it .parquet"),
         (_plain_under_gz, "the content is not gzip")]


@pytest.mark.parametrize("files,hint", HINTS, ids=[h[0].__name__.strip("_") for h in HINTS])
def test_common_format_mistakes_get_a_hint(storage, files, hint):
    """Fault: a semicolon-delimited CSV, gzip content named .csv, Parquet whose `query` column
    was written as the pandas index, Parquet named .csv, plain text named .csv.gz.
    Expected: MalformedPartition naming the file and the fix."""
    exc, report = refused(storage, "queries", files(), "rel-hint", error=MalformedPartition)
    assert hint in str(exc), str(exc)
    assert report["status"] == "malformed" and len(report["read_issues"]) == 1


# ---- 11. one path, no traceback, whatever breaks -----------------------------------------------------------
def test_an_unexpected_error_is_refused_through_the_same_path(storage, monkeypatch):
    """Fault: checking itself breaks (simulated: the derived columns raise).  Expected:
    ValidationFailed with status `error`, the stage and error in words, the batch quarantined
    with both reports (the traceback only inside the JSON report), raw untouched."""
    from shoprank.validation import runner

    def boom(*_a, **_k):
        raise KeyError("something nobody foresaw")

    monkeypatch.setattr(runner, "add_derived_columns", boom)
    exc, report = refused(storage, "queries", {"part-00000.parquet": parquet(clean("queries"))}, "rel-boom")
    assert report["status"] == "error" and exc.outcome.failed_checks == ["validation_could_not_run"]
    assert "while preparing the checks: KeyError" in str(exc)
    assert "Traceback" in report["parameters"]["internal_error"]


def test_shoprank_validate_prints_a_message_not_a_traceback(storage, monkeypatch, capsys):
    """Fault: `shoprank validate` on a bad batch, on an incomplete day and on a day without data.
    Expected: exit code 2, one `shoprank: error:` message on stderr, no traceback; 0 for a pass."""
    from shoprank import cli

    monkeypatch.setattr(cli, "get_settings", lambda: storage.settings)
    monkeypatch.setenv("SHOPRANK_VALIDATION_BUILD_DOCS", "false")
    df = clean("queries")
    put(storage, "queries", {"q.csv": csv_with(df, {(3, "frequency"): "1e20"})})
    put(storage, "queries", {"q.parquet": parquet(df)}, day="2026-11-21", complete=False)
    put(storage, "queries", {"q.parquet": parquet(df)}, day="2026-11-22")
    for day, code, needle in ((DAY, 2, "'1e20'"), ("2026-11-21", 2, "no _SUCCESS marker"),
                              ("2026-11-23", 2, "has no data files"), ("2026-11-22", 0, "passed")):
        rc = cli.main(["validate", "queries", "--date", day, "--run-id", f"cli-{day}"])
        out = capsys.readouterr()
        assert rc == code, (day, out.err[-2000:])
        assert "Traceback" not in out.out + out.err
        assert needle in (out.err if code else out.out), (day, out.err[-2000:], out.out[-2000:])


def test_report_figures():
    """Prints the counts for docs/reliability.md (runs last in this module)."""
    print(f"\nRELIABILITY FIGURES uploads: {FIGURES}")
