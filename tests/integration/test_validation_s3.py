"""validate_partition against a real S3 server (rclone serve s3 over HTTP): promotion,
quarantine with reports, raw left untouched, Data Docs upload, drift reports."""

from __future__ import annotations

import datetime as dt
import io
import json

import pandas as pd
import pytest

from shoprank.data.contracts import CONTRACTS
from shoprank.validation import (
    DriftDetected,
    DriftOptions,
    EmptyPartition,
    MalformedPartition,
    ValidationFailed,
    ValidationOptions,
    samples,
    validate_partition,
)

pytestmark = pytest.mark.integration

D1, D2 = "2026-11-20", "2026-11-21"
NOW = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.timezone.utc)
OPTS = ValidationOptions(now=NOW, build_docs=False)
DOCS = ValidationOptions(now=NOW, build_docs=True)


def snapshot(storage, prefix: str) -> dict[str, bytes]:
    return {k: storage.get_bytes(k) for k in storage.list_keys(prefix)}


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def put_files(storage, dataset: str, day: str, files: dict[str, bytes]) -> dict[str, bytes]:
    prefix = f"raw/{dataset}/dt={day}/"
    for name, data in files.items():
        storage.put_bytes(prefix + name, data)
    storage.put_bytes(prefix + "_SUCCESS", b"")  # the upload is complete: validation may read it
    return snapshot(storage, prefix)


def assert_quarantined(storage, exc, raw_before: dict[str, bytes], dataset: str, day: str, run_id: str):
    raw_prefix = f"raw/{dataset}/dt={day}/"
    assert snapshot(storage, raw_prefix) == raw_before, "raw must stay untouched (same keys, same bytes)"
    q = f"quarantine/{dataset}/dt={day}/{run_id}/"
    assert exc.outcome.quarantine_prefix == q
    quarantined = snapshot(storage, q)
    for key, data in raw_before.items():
        assert quarantined[q + key[len(raw_prefix):]] == data
    report = json.loads(quarantined[q + "_validation_report.json"])
    assert report["dataset"] == dataset and report["day"] == day and report["success"] is False
    assert report["copied_files"] and report["message"] == str(exc)
    summary = quarantined[q + "_validation_report.md"].decode()
    assert summary.startswith(f"# Validation report: {dataset} dt={day}")
    assert storage.list_partitions("validated", dataset) == [] or day not in storage.list_partitions("validated", dataset)
    return report, summary


def test_clean_days_are_promoted_with_docs_and_drift(storage):
    cat = samples.catalog(400, day=D1)
    outcomes = {}
    for i, day in enumerate((D1, D2)):
        storage.write_partition(cat, "raw", "catalog", day)
        fb = samples.feedback(6_000, day=day, ids=cat["product_id"], seed=i)
        storage.write_partition(fb, "raw", "feedback", day, rows_per_file=2_500)
        raw_before = snapshot(storage, "raw/")
        outcomes["catalog", day] = validate_partition(storage, "catalog", day, f"scheduled__{day}T00:00:00+00:00", DOCS)
        outcomes["feedback", day] = validate_partition(storage, "feedback", day, f"scheduled__{day}T00:00:00+00:00", DOCS)
        assert snapshot(storage, "raw/") == raw_before

    assert storage.list_partitions("validated", "feedback") == [D1, D2]
    assert storage.list_partitions("validated", "catalog") == [D1, D2]
    back = storage.read_partition("validated", "feedback", D2)
    assert list(back.columns) == CONTRACTS["feedback"].names and len(back) == 6_000
    assert str(back["ts"].dtype) == "datetime64[us, UTC]"
    summary = json.loads(storage.get_bytes(f"validated/feedback/dt={D2}/_validation.json"))
    assert summary["row_count"] == 6_000 and summary["success"] is True
    assert summary["parameters"]["previous_partition"] == D1  # row count checked against day 1
    assert summary["parameters"]["catalog_partition"] == D2  # referential integrity vs that day's catalogue

    # drift: day 2 compared with day 1
    fb2 = outcomes["feedback", D2]
    assert f"validated: s3://{storage.bucket}/validated/feedback/dt={D2}/" in fb2.summary()
    assert fb2.drift_report_key == f"reports/drift/feedback/dt={D2}.json"
    drift = json.loads(storage.get_bytes(fb2.drift_report_key))
    assert drift["reference_day"] == D1 and drift["mode"] == "warn" and drift["metrics"]
    assert json.loads(storage.get_bytes(f"reports/drift/feedback/dt={D1}.json"))["status"] == "no_reference"
    assert storage.exists(f"reports/drift/catalog/dt={D2}.json")

    # Data Docs: one index listing every run, a page per run
    assert fb2.docs_index_key == "reports/data-docs/index.html"
    index = storage.get_bytes(fb2.docs_index_key).decode()
    for (dataset, day), o in outcomes.items():
        assert storage.exists(o.docs_page_key), o.docs_page_key
        assert o.docs_page_key.startswith("reports/data-docs/validations/")
        assert o.docs_page_key.removeprefix("reports/data-docs/") in index
    assert storage.exists("reports/data-docs/expectations/feedback.html")
    assert storage.list_keys("reports/data-docs/static/")


def test_broken_batch_is_quarantined_with_report_and_raw_untouched(storage):
    cat = samples.catalog(300, day=D1)
    storage.write_partition(cat, "raw", "catalog", D1)
    validate_partition(storage, "catalog", D1, "r0", OPTS)
    fb = samples.feedback(3_000, day=D1, ids=cat["product_id"])
    fb.loc[2_600, "event_type"] = "hover"
    storage.write_partition(fb, "raw", "feedback", D1, rows_per_file=2_000)
    raw_before = snapshot(storage, f"raw/feedback/dt={D1}/")

    with pytest.raises(ValidationFailed) as info:
        validate_partition(storage, "feedback", D1, "manual__2026-11-23T09:00:00+00:00", DOCS)
    msg = str(info.value)
    assert "event_type_in_allowed_set" in msg and "column 'event_type'" in msg
    assert "part-00001.parquet row 600: event_id='e0-2600', event_type='hover'" in msg
    run = "manual__2026-11-23T09_00_00_00_00"
    report, summary = assert_quarantined(storage, info.value, raw_before, "feedback", D1, run)
    assert report["failed_checks"] == ["event_type_in_allowed_set"]
    assert report["gx_validation_result"]["success"] is False
    assert "### event_type_in_allowed_set" in summary and "part-00001.parquet row 600" in summary
    assert storage.exists(info.value.outcome.docs_page_key)  # failures get a Data Docs page too


MALFORMED = {
    "wrong encoding": ("queries", {"q.csv": "query,frequency,category\ncafé,3,Food\n".encode("latin-1")},
                       ["q.csv", "not valid UTF-8"]),
    "truncated parquet": ("feedback", None, ["part-00001.parquet", "truncated Parquet"]),
    "csv missing header": ("queries", {"q.csv": b"shoes,3,Fashion\nboots,4,Fashion\n"}, ["q.csv", "no header row"]),
    "huge string field": ("catalog", None, ["c.parquet", "'description' row 3", "-character value"]),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_files_are_quarantined_with_a_clear_error(storage, kind):
    dataset, files, needles = MALFORMED[kind]
    if kind == "truncated parquet":
        data = parquet_bytes(samples.feedback(500, day=D1))
        files = {"part-00000.parquet": data, "part-00001.parquet": data[: len(data) - 200]}
    if kind == "huge string field":
        cat = samples.catalog(50, day=D1)
        cat.loc[3, "description"] = "spam " * 40_000
        files = {"c.parquet": parquet_bytes(cat)}
    raw_before = put_files(storage, dataset, D1, files)
    with pytest.raises(MalformedPartition) as info:
        validate_partition(storage, dataset, D1, "r1", OPTS)
    for needle in needles:
        assert needle in str(info.value)
    report, summary = assert_quarantined(storage, info.value, raw_before, dataset, D1, "r1")
    assert report["status"] == "malformed" and report["read_issues"]
    assert needles[0] in summary


def test_empty_partitions_raise_empty_partition(storage):
    with pytest.raises(EmptyPartition, match="has no data files"):
        validate_partition(storage, "feedback", D1, "r2", OPTS)
    assert storage.list_keys("quarantine/") == []
    raw_before = put_files(storage, "feedback", D2, {"part-0.parquet": parquet_bytes(samples.feedback(10).head(0))})
    with pytest.raises(EmptyPartition, match="zero rows") as info:
        validate_partition(storage, "feedback", D2, "r2", OPTS)
    assert not isinstance(info.value, ValidationFailed)  # the DAG skips, it does not fail
    assert_quarantined(storage, info.value, raw_before, "feedback", D2, "r2")


def test_row_count_is_checked_against_the_previous_partition(storage):
    storage.write_partition(samples.queries(day=D1), "raw", "queries", D1)
    validate_partition(storage, "queries", D1, "r3", OPTS)
    raw_before = put_files(storage, "queries", D2, {"q.parquet": parquet_bytes(samples.queries(day=D2).head(10))})
    with pytest.raises(ValidationFailed) as info:
        validate_partition(storage, "queries", D2, "r3", OPTS)
    assert info.value.outcome.failed_checks == ["row_count_vs_previous_partition"]
    assert "10 rows, expected between 20 and 500 (previous partition: 100 rows)" in str(info.value)
    assert_quarantined(storage, info.value, raw_before, "queries", D2, "r3")


def test_csv_partition_is_validated_and_promoted_as_parquet(storage):
    cat = samples.catalog(200, day=D1)
    storage.write_partition(cat, "raw", "catalog", D1)
    validate_partition(storage, "catalog", D1, "r4", OPTS)
    j = samples.judgments(cat["product_id"], n=150)
    put_files(storage, "judgments", D1, {"a.csv": j.iloc[:70].to_csv(index=False).encode(),
                                         "b.parquet": parquet_bytes(j.iloc[70:])})
    outcome = validate_partition(storage, "judgments", D1, "r4", OPTS)
    assert outcome.success and outcome.row_count == 150
    back = storage.read_partition("validated", "judgments", D1)
    assert back["grade"].dtype == "int64" and len(back) == 150
    assert all(k.endswith(".parquet") for k in storage.partition_files("validated", "judgments", D1))


def test_blocking_drift_quarantines(storage):
    fb1 = samples.feedback(20_000, day=D1, seed=1)
    storage.write_partition(fb1, "raw", "feedback", D1)
    validate_partition(storage, "feedback", D1, "r5", OPTS)
    fb2 = samples.feedback(20_000, day=D2, seed=2)
    fb2["query"] = fb2["query"].where(fb2.index % 2 == 0, "brand new query")  # half the searches change
    options = ValidationOptions(now=NOW, build_docs=False, drift=DriftOptions(mode="block"))
    storage.write_partition(fb2, "raw", "feedback", D2)
    raw_before = snapshot(storage, f"raw/feedback/dt={D2}/")
    with pytest.raises(DriftDetected) as info:
        validate_partition(storage, "feedback", D2, "r5", options)
    assert "query_mix_psi" in str(info.value) and "[DRIFT]" in str(info.value)
    assert info.value.report.key == f"reports/drift/feedback/dt={D2}.json"
    assert storage.exists(info.value.report.key)
    assert_quarantined(storage, info.value, raw_before, "feedback", D2, "r5")
