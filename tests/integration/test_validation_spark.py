"""Feedback validation on Spark (local mode, the day staged from a real S3 server over HTTP):
the same checks, messages, quarantine, validated output and drift as the pandas engine.

Each case writes the same raw day into two buckets and validates it once per engine
(``SHOPRANK_FEEDBACK_ENGINE``); everything a user sees must agree."""

from __future__ import annotations

import json
import re
import shutil
import uuid

import pandas as pd
import pytest

from shoprank.validation import ValidationFailed, ValidationOptions, samples, validate_partition

pyspark = pytest.importorskip("pyspark", reason="the Spark engine needs pyspark (requirements.txt)")
if shutil.which("java") is None:  # pragma: no cover
    pytest.skip("the Spark engine needs a Java runtime", allow_module_level=True)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

D1, D2 = "2026-11-20", "2026-11-21"
NOW = pd.Timestamp("2026-11-23 06:00", tz="UTC").to_pydatetime()
OPTS = ValidationOptions(now=NOW, build_docs=False)
DOCS = ValidationOptions(now=NOW, build_docs=True)


@pytest.fixture()
def two_buckets(s3_server, monkeypatch):
    from shoprank.storage import Storage

    monkeypatch.setenv("SHOPRANK_SPARK_MASTER", "local[2]")
    out = {}
    for engine in ("pandas", "spark"):
        st = Storage(s3_server.replaced(bucket=f"t-{engine}-{uuid.uuid4().hex[:8]}"))
        st.ensure_bucket()
        out[engine] = st
    return out


def run(engine: str, monkeypatch, storage, dataset: str, day: str, run_id: str, options):
    monkeypatch.setenv("SHOPRANK_FEEDBACK_ENGINE", engine)
    try:
        return validate_partition(storage, dataset, day, run_id, options)
    except ValidationFailed as exc:
        return exc


def with_catalog(storage, monkeypatch, n: int):
    """A validated catalogue of ``n`` products on D1 (always on pandas: only feedback has two engines)."""
    cat = samples.catalog(n, day=D1)
    storage.write_partition(cat, "raw", "catalog", D1)
    monkeypatch.setenv("SHOPRANK_FEEDBACK_ENGINE", "pandas")
    validate_partition(storage, "catalog", D1, "c1", OPTS)
    return cat


def seen(outcome) -> dict:
    """Everything a user reads of an outcome, minus timings and the engine's name."""
    o = outcome.outcome if isinstance(outcome, ValidationFailed) else outcome
    text = (str(outcome) if isinstance(outcome, ValidationFailed) else o.summary()).replace(o.bucket, "BUCKET")
    text = re.sub(r"/\d{8}T\d{6}\.\d+Z/", "/RUN_TIME/", text)  # the Data Docs page of each run
    return {"success": o.success, "status": o.status, "rows": o.row_count, "checks": o.checks,
            "failures": [(f.check, f.column, f.summary, f.unexpected_count, f.examples) for f in o.failures],
            "message": text}


def dirty_day(cat_ids) -> pd.DataFrame:
    """Every kind of defect the feedback suite checks, each above its tolerance."""
    fb = samples.feedback(6_000, day=D2, ids=cat_ids, seed=3)
    fb.loc[1000:1049, "event_id"] = fb.loc[2000:2049, "event_id"].to_numpy()  # 100 rows share 50 ids
    same = fb.loc[3000:3079].copy()  # the same events again under new ids
    same["event_id"] = "retry-" + same["event_id"]
    fb.loc[100:199, "product_id"] = "p-gone"  # unknown products
    fb.loc[200, "query"] = " \u200b "  # blank (spaces and a zero-width space)
    fb.loc[300, "event_type"] = "hover"
    fb.loc[400, "event_id"] = "\uff45" + fb.loc[401, "event_id"][1:]  # full-width look-alike of row 401's id
    fb.loc[500, "position"] = 0
    bots = fb["session_id"].isin(fb["session_id"].drop_duplicates().iloc[20:35])  # 15 sessions click everything
    fb.loc[bots, "event_type"] = "click"
    return pd.concat([fb, same], ignore_index=True)


def test_spark_and_pandas_agree_on_clean_and_dirty_days(two_buckets, monkeypatch):
    results = {}
    for engine, storage in two_buckets.items():
        cat = with_catalog(storage, monkeypatch, 400)
        storage.write_partition(samples.feedback(6_000, day=D1, ids=cat["product_id"], seed=1), "raw", "feedback", D1,
                                rows_per_file=2_500)
        clean = run(engine, monkeypatch, storage, "feedback", D1, f"scheduled__{D1}", OPTS)
        storage.write_partition(dirty_day(cat["product_id"]), "raw", "feedback", D2, rows_per_file=2_500)
        raw_before = {k: storage.get_bytes(k) for k in storage.list_keys(f"raw/feedback/dt={D2}/")}
        dirty = run(engine, monkeypatch, storage, "feedback", D2, "manual__dirty", DOCS)
        assert {k: storage.get_bytes(k) for k in storage.list_keys(f"raw/feedback/dt={D2}/")} == raw_before
        results[engine] = (clean, dirty, storage)

    (p_clean, p_dirty, p_st), (s_clean, s_dirty, s_st) = results["pandas"], results["spark"]
    assert s_clean.engine == "spark" and p_clean.engine == "pandas"
    assert seen(s_clean) == seen(p_clean)
    # the validated day: same rows, same types, same order
    pd.testing.assert_frame_equal(s_st.read_partition("validated", "feedback", D1),
                                  p_st.read_partition("validated", "feedback", D1))

    assert isinstance(s_dirty, ValidationFailed) and isinstance(p_dirty, ValidationFailed)
    assert seen(s_dirty) == seen(p_dirty)
    failed = s_dirty.outcome.failed_checks
    for check in ("event_id_unique", "no_duplicate_events", "product_id_in_catalog", "query_not_blank", "event_type_in_allowed_set",
                  "event_id_no_lookalikes", "position_in_range", "no_bot_sessions"):
        assert check in failed, (check, failed)
    msg = str(s_dirty)
    assert "part-00000.parquet row 300: event_id=" in msg and "event_type='hover'" in msg
    # quarantine: raw copied byte for byte with both reports; a Data Docs page for the failure
    q = s_dirty.outcome.quarantine_prefix
    report = json.loads(s_st.get_bytes(q + "_validation_report.json"))
    assert report["engine"] == "spark" and report["message"] == msg
    assert report["gx_validation_result"]["success"] is False
    assert s_st.exists(s_dirty.outcome.docs_page_key)
    assert D2 not in s_st.list_partitions("validated", "feedback")
    # GX ran counts first and the failed checks again with examples: every check's outcome and count
    # are pandas', and the failures' example values reach the report and the Data Docs page
    p_report = json.loads(p_st.get_bytes(p_dirty.outcome.quarantine_prefix + "_validation_report.json"))

    def by_check(rep: dict) -> dict:
        return {r["expectation_config"]["meta"]["check"]: (r["success"], (r["result"] or {}).get("unexpected_count"))
                for r in rep["gx_validation_result"]["results"]}

    assert by_check(report) == by_check(p_report)
    hover = next(r["result"] for r in report["gx_validation_result"]["results"]
                 if r["expectation_config"]["meta"]["check"] == "event_type_in_allowed_set")
    assert hover["unexpected_count"] == 1 and hover["partial_unexpected_list"] == ["hover"]
    assert "hover" in s_st.get_bytes(s_dirty.outcome.docs_page_key).decode()


def test_drift_on_spark_matches_pandas(two_buckets, monkeypatch):
    reports = {}
    for engine, storage in two_buckets.items():
        cat = with_catalog(storage, monkeypatch, 300)
        for i, day in enumerate((D1, D2)):
            fb = samples.feedback(5_000, day=day, ids=cat["product_id"], seed=i)
            if i:  # day 2: clicks move to the top position
                fb.loc[fb["event_type"] == "click", "position"] = 1
            storage.write_partition(fb, "raw", "feedback", day, rows_per_file=2_000)
            out = run(engine, monkeypatch, storage, "feedback", day, f"scheduled__{day}", OPTS)
            assert out.success and out.engine == engine
        reports[engine] = json.loads(storage.get_bytes(f"reports/drift/feedback/dt={D2}.json"))
    strip = ("run_id", "key", "created_at", "generated_at")
    s, p = ({k: v for k, v in r.items() if k not in strip} for r in (reports["spark"], reports["pandas"]))
    for a, b in zip(s["metrics"], p["metrics"]):
        assert a == b, (a, b)
    assert s == p
    assert any(m["drifted"] for m in s["metrics"])  # the moved clicks are seen by both


def test_a_day_spark_cannot_read_cell_by_cell_goes_to_the_pandas_reader(two_buckets, monkeypatch):
    storage = two_buckets["spark"]
    cat = with_catalog(storage, monkeypatch, 200)
    fb = samples.feedback(2_000, day=D1, ids=cat["product_id"])
    fb["position"] = fb["position"].astype(str)  # a string column where the contract has int64
    storage.write_partition(fb, "raw", "feedback", D1)
    out = run("spark", monkeypatch, storage, "feedback", D1, "r1", OPTS)
    assert isinstance(out, ValidationFailed) and out.outcome.engine == "pandas"
    msg = str(out)
    assert "position_type" in msg and "found str x2,000" in msg
    assert "part-00000.parquet row 0: event_id='e0-0', position='1'" in msg


def test_a_day_with_an_over_long_cell_goes_to_the_pandas_reader(two_buckets, monkeypatch):
    """The longest cell per text column is measured on Spark; a cell over max_field_chars sends
    the day to the pandas reader, which names file, row and column."""
    storage = two_buckets["spark"]
    cat = with_catalog(storage, monkeypatch, 200)
    fb = samples.feedback(2_000, day=D1, ids=cat["product_id"])
    fb.loc[1234, "query"] = "x" * 61
    storage.write_partition(fb, "raw", "feedback", D1)
    out = run("spark", monkeypatch, storage, "feedback", D1, "r1",
              ValidationOptions(now=NOW, build_docs=False, max_field_chars=60))
    assert isinstance(out, ValidationFailed) and out.outcome.engine == "pandas"
    msg = str(out)
    assert "part-00000.parquet" in msg and "column 'query' row 1234 holds a 61-character value" in msg
    assert D1 not in storage.list_partitions("validated", "feedback")
