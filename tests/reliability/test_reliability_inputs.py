"""Bad inputs for every data contract through the real validation runner on a real S3
server (fixture ``storage``: a fresh bucket of the session's rclone server).

Each case breaks one clean partition in one way.  Expected for every case: the run raises
the documented exception naming the failing check, the column and an example row with its
file; the raw objects are byte-identical (same bytes, same ETag) before and after; the batch
and its JSON + Markdown report are copied to ``quarantine/``; nothing lands in
``validated/``.  Adversarial strings are accepted or rejected cleanly, never crash.
The training path refuses a quarantined day and the champion does not move.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from shoprank.validation import (
    EmptyPartition,
    MalformedPartition,
    ValidationError,
    ValidationFailed,
    samples,
)

from .conftest import DAY, IDS, clean, parquet, put, raw_state, run

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

TODAY = "2026-11-23"  # "now" below is 06:00 UTC on this day
FIGURES: dict[str, int] = {"bad_input_cases": 0, "adversarial_accepted": 0, "adversarial_refused": 0}


def assert_nothing_lost(storage, exc, before, dataset: str, day: str, run_id: str) -> dict:
    """Raw untouched (bytes + ETag), quarantine holds the batch and both reports, nothing validated."""
    raw = f"raw/{dataset}/dt={day}/"
    assert raw_state(storage, raw) == before, "raw objects must be byte-identical (same ETag)"
    q = f"quarantine/{dataset}/dt={day}/{run_id}/"
    assert exc.outcome is not None and exc.outcome.quarantine_prefix == q
    for key, (data, _etag) in before.items():
        assert storage.get_bytes(q + key[len(raw):]) == data
    report = json.loads(storage.get_bytes(q + "_validation_report.json"))
    assert report["dataset"] == dataset and report["day"] == day and report["success"] is False
    assert storage.get_bytes(q + "_validation_report.md").decode().startswith(f"# Validation report: {dataset}")
    assert storage.list_keys(f"validated/{dataset}/") == []
    FIGURES["bad_input_cases"] += 1
    return report


# ---- one breakage per row: (dataset, case, breakage, failing check, column, needle in message) ----
def _set(col, rows, value, cast=None):
    def apply(df):
        df = df.copy()
        if cast:
            df[col] = df[col].astype(cast)
        df.loc[rows, col] = value
        return df
    return apply


def _rename(old, new):
    return lambda df: df.rename(columns={old: new})


def _dup(rows):
    return lambda df: pd.concat([df, df.loc[rows]], ignore_index=True)


def _as_str(col):
    return lambda df: df.assign(**{col: df[col].astype(str)})


def _unknown_products(n):
    def apply(df):
        df = df.copy()
        df.loc[: n - 1, "product_id"] = [f"ghost-{i}" for i in range(n)]
        return df
    return apply


CASES = [
    ("catalog", "schema drift (renamed column)", _rename("price", "cost"), "columns_present", None, "price"),
    ("catalog", "wrong type", _as_str("price"), "price_type", "price", "price"),
    ("catalog", "null in required column", _set("title", [5], None), "title_not_null", "title", "row 5"),
    ("catalog", "duplicate key", _dup([7]), "product_id_unique", "product_id", "p000007"),
    ("catalog", "future timestamp", _set("created_at", [3], pd.Timestamp("2027-01-01", tz="UTC")),
     "created_at_not_in_future", "created_at", "row 3"),
    ("catalog", "broken JSON attributes", _set("attributes", [1], '{"color": "red"'), "attributes_valid_json",
     "attributes", "row 1"),
    ("judgments", "schema drift (renamed column)", _rename("grade", "label"), "columns_present", None, "grade"),
    ("judgments", "wrong type", _as_str("grade"), "grade_type", "grade", "grade"),
    ("judgments", "null in required column", _set("query", [4], None), "query_not_null", "query", "row 4"),
    ("judgments", "duplicate key", _dup([2]), "query_product_unique", None, "row"),
    ("judgments", "unknown product ids", _unknown_products(10), "product_id_in_catalog", None,
     "part-00000.parquet row 0: product_id='ghost-0'"),
    ("judgments", "grade out of scale", _set("grade", [0], 7), "grade_in_scale", "grade", "row 0"),
    ("feedback", "schema drift (renamed column)", _rename("event_type", "type"), "columns_present", None,
     "event_type"),
    ("feedback", "wrong type", _as_str("position"), "position_type", "position", "position"),
    ("feedback", "null in required column", _set("user_id", [6], None), "user_id_not_null", "user_id", "row 6"),
    ("feedback", "duplicate event ids", _set("event_id", list(range(40)), "e-dup"), "event_id_unique", "event_id",
     "e-dup"),
    ("feedback", "unknown product ids", _unknown_products(60), "product_id_in_catalog", None,
     "product_id='ghost-0'"),
    ("feedback", "position out of range", _set("position", [8], 0), "position_in_range", "position", "row 8"),
    ("queries", "schema drift (renamed column)", _rename("frequency", "freq"), "columns_present", None,
     "frequency"),
    ("queries", "wrong type", _set("frequency", [3], "many", cast="string"), "frequency_type", "frequency",
     "frequency"),
    ("queries", "null in required column", _set("query", [2], None), "query_not_null", "query", "row 2"),
    ("queries", "duplicate key", _dup([0, 1]), "query_unique", "query", "row"),
    ("queries", "negative frequency", _set("frequency", [9], -5), "frequency_non_negative", "frequency", "row 9"),
]


@pytest.mark.parametrize("dataset,case,breakage,check,column,needle", CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_broken_batch_is_quarantined_and_raw_untouched(storage, dataset, case, breakage, check, column, needle):
    """Fault: one contract rule broken in one raw partition (see the case id).
    Expected: ValidationFailed naming the check, column, file and an example; raw untouched;
    batch + reports in quarantine; nothing in validated/."""
    df = breakage(clean(dataset))
    before = put(storage, dataset, day=DAY, files={"part-00000.parquet": parquet(df)})
    run_id = f"rel-{dataset}-" + "-".join(case.replace("(", "").replace(")", "").split())
    with pytest.raises(ValidationFailed) as info:
        run(storage, dataset, day=DAY, run_id=run_id)
    msg = str(info.value)
    assert check in info.value.outcome.failed_checks, (info.value.outcome.failed_checks, msg)
    assert check in msg and needle in msg, msg
    if column:
        assert f"column {column!r}" in msg, msg
    if needle.startswith("row"):
        assert f"part-00000.parquet {needle}" in msg, msg
    report = assert_nothing_lost(storage, info.value, before, dataset, DAY, run_id)
    assert check in report["failed_checks"]


def test_future_timestamps_in_feedback_are_refused(storage):
    """Fault: today's click log holds events stamped later than now (clock skew / forged).
    Expected: ts_not_in_future fails with the row; quarantined; raw untouched."""
    fb = clean("feedback", day=TODAY)
    midnight = pd.Timestamp(TODAY, tz="UTC")
    fb["ts"] = midnight + (fb["ts"] - midnight) * 0.2  # the day so far: 00:00 - 04:48
    fb.loc[11, "ts"] = pd.Timestamp(TODAY + "T20:00:00", tz="UTC")
    before = put(storage, "feedback", day=TODAY, files={"part-00000.parquet": parquet(fb)})
    with pytest.raises(ValidationFailed) as info:
        run(storage, "feedback", day=TODAY, run_id="rel-future")
    assert "ts_not_in_future" in info.value.outcome.failed_checks
    assert "part-00000.parquet row 11" in str(info.value)
    assert_nothing_lost(storage, info.value, before, "feedback", TODAY, "rel-future")


@pytest.mark.parametrize("dataset", ["catalog", "judgments", "feedback", "queries"])
def test_malformed_files_are_quarantined(storage, dataset):
    """Fault: a truncated Parquet file and a Latin-1 (non-UTF-8) CSV in the same partition.
    Expected: MalformedPartition naming both files and problems; raw untouched; quarantined."""
    good = clean(dataset)
    data = parquet(good)
    csv = good.head(20).to_csv(index=False) + "caf\u00e9,\n"
    before = put(storage, dataset, day=DAY, files={"part-00000.parquet": data[: len(data) - 300],
                                         "extra.csv": csv.encode("latin-1", errors="replace")})
    with pytest.raises(MalformedPartition) as info:
        run(storage, dataset, day=DAY, run_id="rel-malformed")
    msg = str(info.value)
    assert "part-00000.parquet" in msg and "truncated Parquet" in msg, msg
    assert "extra.csv" in msg and "not valid UTF-8" in msg, msg
    report = assert_nothing_lost(storage, info.value, before, dataset, DAY, "rel-malformed")
    assert report["status"] == "malformed" and len(report["read_issues"]) == 2


@pytest.mark.parametrize("dataset", ["catalog", "judgments", "feedback", "queries"])
def test_empty_partition_is_skipped_not_failed(storage, dataset):
    """Fault: the producer delivered a file with zero rows.
    Expected: EmptyPartition (the daily DAG skips the day), not ValidationFailed; raw untouched."""
    before = put(storage, dataset, day=DAY, files={"part-00000.parquet": parquet(clean(dataset).head(0))})
    with pytest.raises(EmptyPartition) as info:
        run(storage, dataset, day=DAY, run_id="rel-empty")
    assert not isinstance(info.value, ValidationFailed)
    assert "zero rows" in str(info.value)
    assert_nothing_lost(storage, info.value, before, dataset, DAY, "rel-empty")


def test_huge_partition_vs_previous_day_is_quarantined(storage):
    """Fault: a day's click log is 8x the previous day's (a replayed/duplicated export).
    Expected: row_count_vs_previous_partition fails with the counts; raw untouched."""
    storage.write_partition(samples.feedback(2_000, day="2026-11-19", ids=IDS), "raw", "feedback", "2026-11-19")
    run(storage, "feedback", day="2026-11-19", run_id="rel-prev")
    big = samples.feedback(16_000, day=DAY, ids=IDS, seed=3)
    before = put(storage, "feedback", day=DAY, files={"part-00000.parquet": parquet(big)})
    with pytest.raises(ValidationFailed) as info:
        run(storage, "feedback", day=DAY, run_id="rel-huge")
    assert info.value.outcome.failed_checks == ["row_count_vs_previous_partition"]
    assert "16,000 rows" in str(info.value) or "16000 rows" in str(info.value), str(info.value)
    raw = f"raw/feedback/dt={DAY}/"
    assert raw_state(storage, raw) == before
    assert storage.list_partitions("validated", "feedback") == ["2026-11-19"]
    FIGURES["bad_input_cases"] += 1


ADVERSARIAL = [
    "'; DROP TABLE products; --", "<script>alert('x')</script>", "\" onmouseover=\"alert(1)",
    "a\x00b\x07c\x1b[31mred\x1b[0m", "x" * 20_000, "\U0001f45f\U0001f525 running shoes \U0001f3c3",
    "\u202egpj.exe", "zero\u200bwidth\ufeff", "line1\nline2\r\n\t,\"quoted\"", "{{ 7*7 }} ${jndi:ldap://x}",
    "\u0627\u062d\u0630\u064a\u0629 \u0631\u064a\u0627\u0636\u064a\u0629", "../../etc/passwd", "%s%n%x",
]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("dataset,column", [("catalog", "title"), ("queries", "query"), ("feedback", "query"),
                                            ("judgments", "query")])
def test_adversarial_strings_are_handled_cleanly(storage, dataset, column, fmt):
    """Fault: SQL/HTML/template injection, control characters, 20k-character values, emoji,
    RTL override, zero-width characters, newlines and quotes in a text column (Parquet and CSV).
    Expected: the run either passes and validated/ holds the exact strings, or fails with a
    ValidationError (quarantine, raw untouched); never any other exception."""
    df = clean(dataset)
    rows = list(range(len(ADVERSARIAL)))
    df.loc[rows, column] = ADVERSARIAL
    name = "part-00000.parquet" if fmt == "parquet" else "part-00000.csv"
    data = parquet(df) if fmt == "parquet" else df.to_csv(index=False).encode("utf-8")
    before = put(storage, dataset, day=DAY, files={name: data})
    try:
        outcome = run(storage, dataset, day=DAY, run_id=f"rel-adv-{fmt}")
    except ValidationError as exc:  # a clean refusal is fine
        if getattr(exc, "outcome", None) is not None:
            assert_nothing_lost(storage, exc, before, dataset, DAY, f"rel-adv-{fmt}")
        FIGURES["adversarial_refused"] += len(ADVERSARIAL)
        return
    assert outcome.success
    assert raw_state(storage, f"raw/{dataset}/dt={DAY}/") == before
    back = storage.read_partition("validated", dataset, DAY)
    values = back[column].tolist()
    for s in ADVERSARIAL:
        if fmt == "csv" and "\x00" in s:
            continue  # CSV cannot carry NUL faithfully; the row must still be there
        assert s in values, (dataset, column, fmt, repr(s)[:60])
    FIGURES["adversarial_accepted"] += len(ADVERSARIAL)


def test_extra_columns_such_as_raw_pii_never_reach_validated(storage):
    """Fault: the producer adds columns outside the contract (e.g. a raw e-mail address).
    Expected: accepted, but validated/ holds exactly the contract's columns."""
    fb = clean("feedback")
    fb["email"] = "someone@example.com"
    fb["ip_address"] = "203.0.113.7"
    put(storage, "feedback", day=DAY, files={"part-00000.parquet": parquet(fb)})
    run(storage, "feedback", day=DAY, run_id="rel-extra")
    back = storage.read_partition("validated", "feedback", DAY)
    assert "email" not in back.columns and "ip_address" not in back.columns
    assert not any(b"someone@example.com" in storage.get_bytes(k) for k in storage.list_keys("validated/"))


def test_training_path_refuses_a_quarantined_day_and_the_champion_stays(storage, model_settings):
    """Fault: the daily update runs for a day whose feedback was quarantined (e.g. a retry
    after the validate task failed, or a manual run).  Expected: prepare_update refuses with
    an error naming the missing validated partition; no daily snapshot is written; the
    registry's champion does not move."""
    from shoprank.daily import prepare_update
    from shoprank.registry import Registry

    from .conftest import log_const_model

    reg = Registry(model_settings, storage)
    uri, run_id = log_const_model(model_settings.mlflow_tracking_uri)
    v = reg.register(uri, run_id, {"gate_eligible": "true", "gate_auto_promote": "true"})
    reg.promote(v, actor="setup")
    fb = clean("feedback")
    fb.loc[5, "event_type"] = "hover"
    before = put(storage, "feedback", day=DAY, files={"part-00000.parquet": parquet(fb)})
    with pytest.raises(ValidationFailed) as info:
        run(storage, "feedback", day=DAY, run_id="rel-train-path")
    assert_nothing_lost(storage, info.value, before, "feedback", DAY, "rel-train-path")
    settings = model_settings.replaced(bucket=storage.bucket)
    with pytest.raises(Exception, match=rf"validated/feedback/dt={DAY}"):
        prepare_update(settings, storage, DAY)
    assert storage.list_keys("datasets/") == [] and storage.list_keys("derived/") == []
    assert reg.version_by_alias("champion").version == v
    assert [r["version"] for r in reg.audit_trail() if r["alias"] == "champion"] == [v]


def test_report_figures(request):
    """Prints the counts for docs/reliability.md (runs last in this module)."""
    print(f"\nRELIABILITY FIGURES inputs: {FIGURES}")
