"""Day-over-day drift: PSI / KS on the key distributions, thresholds, warn vs block."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from shoprank.validation import DriftOptions, ValidationOptions, compute_drift, drift_report_key, psi, samples

FEEDBACK_COLS = ["request_id", "query", "position", "event_type"]


@pytest.fixture(scope="module")
def days():
    ref = samples.feedback(40_000, day="2026-11-20", seed=1)
    cur = samples.feedback(40_000, day="2026-11-21", seed=2)
    return ref, cur


def metric(report, name):
    return next(m for m in report.metrics if m.name == name)


def test_psi_basics():
    a = pd.Series({"x": 50, "y": 50})
    assert psi(a, a) == pytest.approx(0.0)
    assert psi(a, pd.Series({"x": 90, "y": 10})) > 0.25
    # categories present on one day only are smoothed, not infinite
    assert np.isfinite(psi(a, pd.Series({"x": 50, "y": 40, "z": 10})))


def test_same_process_two_days_does_not_drift(days):
    ref, cur = days
    report = compute_drift(cur, ref, "feedback", day="2026-11-21", reference_day="2026-11-20")
    assert report.status == "ok", report.summary()
    assert {m.name for m in report.metrics} == {"event_type_mix_psi", "query_mix_psi", "click_position_psi",
                                                  "ctr_by_position"}
    assert all(m.value is not None for m in report.metrics)


def test_event_type_mix_shift_drifts(days):
    ref, cur = days
    shifted = cur.copy()
    clicks = shifted.index[shifted["event_type"] == "impression"][::2]
    shifted.loc[clicks, "event_type"] = "click"
    report = compute_drift(shifted, ref, "feedback")
    assert "event_type_mix_psi" in [m.name for m in report.drifted]
    details = metric(report, "event_type_mix_psi").details["largest_share_changes"]
    assert details["click"]["change"] > 0.3


def test_query_mix_shift_drifts(days):
    ref, cur = days
    shifted = cur.copy()
    shifted["query"] = shifted["query"].where(shifted.index % 3 != 0, "brand new query")
    report = compute_drift(shifted, ref, "feedback")
    assert "query_mix_psi" in [m.name for m in report.drifted]


def test_ctr_by_position_shift_drifts(days):
    ref, cur = days
    shifted = cur.copy()
    # a ranking bug: position 1 results stop getting clicks
    top_clicks = shifted.index[(shifted["event_type"] == "click") & (shifted["position"] == 1)]
    shifted.loc[top_clicks, "position"] = 9
    report = compute_drift(shifted, ref, "feedback")
    ctr = metric(report, "ctr_by_position")
    assert ctr.drifted and ctr.details["worst_position"] in (1, 9)
    assert 1 in ctr.details["drifted_positions"]
    assert "click_position_psi" in [m.name for m in report.drifted]


def test_catalog_price_and_category_drift():
    ref = samples.catalog(3_000, seed=1)
    same = samples.catalog(3_000, seed=2)
    report = compute_drift(same, ref, "catalog")
    assert report.status == "ok", report.summary()
    pricier = same.assign(price=same["price"] * 3)
    report = compute_drift(pricier, ref, "catalog")
    assert {"price_ks", "price_psi"} <= {m.name for m in report.drifted}
    assert metric(report, "price_ks").details["p_value"] < 1e-6
    assert "category_mix_psi" not in [m.name for m in report.drifted]
    one_cat = same.assign(category="Garden > Tools")
    assert "category_mix_psi" in [m.name for m in compute_drift(one_cat, ref, "catalog").drifted]


def test_thresholds_are_configurable(days):
    ref, cur = days
    strict = ValidationOptions(drift=DriftOptions(psi_threshold=0.0, ctr_abs_threshold=0.0, alpha=1.0))
    report = compute_drift(cur, ref, "feedback", strict)
    assert len(report.drifted) == len(report.metrics)


def test_no_reference_and_small_days():
    cur = samples.feedback(100, seed=1)
    assert compute_drift(cur, None, "feedback").status == "no_reference"
    report = compute_drift(cur, samples.feedback(100, seed=2), "feedback")
    assert report.status == "ok" and all(m.value is None and m.note for m in report.metrics)


def test_warn_by_default_block_when_asked(days):
    ref, cur = days
    shifted = cur.assign(event_type="click")
    warn = compute_drift(shifted, ref, "feedback")
    assert warn.mode == "warn" and warn.drifted and not warn.blocking
    block = compute_drift(shifted, ref, "feedback", DriftOptions(mode="block"))
    assert block.blocking


def test_report_is_json(days):
    ref, cur = days
    report = compute_drift(cur, ref, "feedback", day="2026-11-21", reference_day="2026-11-20", run_id="r1")
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["dataset"] == "feedback" and doc["reference_day"] == "2026-11-20"
    assert doc["drifted_metrics"] == []
    assert drift_report_key("feedback", "2026-11-21") == "reports/drift/feedback/dt=2026-11-21.json"


def test_other_datasets_are_refused():
    with pytest.raises(ValueError, match="drift is computed for"):
        compute_drift(pd.DataFrame(), None, "queries")
