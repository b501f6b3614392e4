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


# ---- sample size: threshold + sampling noise ----------------------------------------------------
def _consistent(m) -> None:
    """The printed status comes from the decision: never "[ok]" over the threshold."""
    text = m.describe()
    if m.value is None:
        assert "not evaluated" in text and not m.drifted
    elif m.drifted:
        assert text.endswith("[DRIFT]") and m.status == "drift" and m.value > m.threshold + m.noise - 1e-6
    elif m.value > m.threshold:
        assert "[within noise:" in text and "[ok]" not in text and m.status == "within_noise"
        assert m.value <= m.threshold + m.noise + 1e-6
    else:
        assert text.endswith("[ok]") and m.status == "ok"


def _move_searches(df: pd.DataFrame, share: float, queries: list[str], seed: int = 0) -> pd.DataFrame:
    """``share`` of the requests now search one of ``queries`` (a trend)."""
    rng = np.random.default_rng(seed)
    reqs = df["request_id"].unique()
    moved = pd.Series(rng.choice(queries, len(reqs)), index=reqs)[rng.random(len(reqs)) < share]
    out = df.copy()
    hit = out["request_id"].isin(moved.index)
    out.loc[hit, "query"] = out.loc[hit, "request_id"].map(moved).to_numpy()
    return out


def _halve_ctr_at_1(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    clicks = df.index[(df["event_type"] == "click") & (df["position"] == 1)]
    return df.drop(np.random.default_rng(seed).choice(clicks, len(clicks) // 2, replace=False))


@pytest.mark.parametrize("n_events", [200, 500, 1_000, 2_000, 3_000])
def test_steady_small_days_raise_no_alarm(n_events):
    # same distribution every day, ~20-270 searches over up to 100 queries: raw PSI and CTR
    # changes are often over their thresholds by sampling noise alone
    for seed in range(6):
        ref = samples.feedback(n_events, seed=100 + seed)
        cur = samples.feedback(n_events, seed=200 + seed)
        report = compute_drift(cur, ref, "feedback")
        assert report.status == "ok" and not report.drifted, report.summary()
        for m in report.metrics:
            _consistent(m)


def test_noise_is_reported_next_to_the_raw_value():
    ref, cur = samples.feedback(3_000, seed=11), samples.feedback(3_000, seed=12)
    report = compute_drift(cur, ref, "feedback")
    q = metric(report, "query_mix_psi")
    d = q.details
    assert q.value is not None and q.noise > 0 and {"expected", "critical", "p_value", "noise_corrected"} <= set(d)
    # the bootstrap agrees with the chi-square form E0 = (k - 1)(1/n1 + 1/n2); its tail is heavier
    # than (1/n1 + 1/n2) chi2_(1-alpha)(k-1) on bins of a few counts, and converges to it on large days
    assert d["expected"] == pytest.approx(d["asymptotic_expected"], rel=0.25)
    assert d["critical"] >= d["asymptotic_critical"]
    big = metric(compute_drift(samples.feedback(40_000, seed=12), samples.feedback(40_000, seed=11), "feedback"),
                 "query_mix_psi").details
    assert big["expected"] == pytest.approx(big["asymptotic_expected"], rel=0.1)
    assert big["critical"] == pytest.approx(big["asymptotic_critical"], rel=0.25)
    assert q.noise == pytest.approx(max(d["expected"], d["critical"] - q.threshold), abs=1e-5)
    doc = json.loads(json.dumps(report.to_dict()))
    assert {m["status"] for m in doc["metrics"]} <= {"ok", "within_noise"}
    assert all(m["noise"] is not None for m in doc["metrics"])
    # deterministic: the same two days give the same band
    assert metric(compute_drift(cur, ref, "feedback"), "query_mix_psi").noise == q.noise


def test_value_over_threshold_within_noise_is_not_printed_ok():
    from shoprank.validation import DriftMetric

    m = DriftMetric.decide("ctr_by_position", "max_abs_diff", 0.0962, 0.05, 0.07)
    assert not m.drifted and m.status == "within_noise"
    assert "[ok]" not in m.describe() and "[within noise: 0.0962 > 0.05 but <= 0.1200" in m.describe()
    assert DriftMetric.decide("x", "psi", 0.78, 0.2, 0.5).describe().endswith("[DRIFT]")
    assert DriftMetric.decide("x", "psi", 0.1, 0.2, 0.5).describe().endswith("[ok]")


@pytest.mark.parametrize("n_events", [3_000, 40_000])
def test_query_mix_shift_drifts_on_small_and_large_days(n_events):
    for seed in range(3):
        ref, cur = samples.feedback(n_events, seed=300 + seed), samples.feedback(n_events, seed=400 + seed)
        trending = ["mini lamp", "kids novel", "smart chair"]  # 30% of searches move to three rare queries
        report = compute_drift(_move_searches(cur, 0.3, trending, seed), ref, "feedback")
        m = metric(report, "query_mix_psi")
        assert m.drifted, m.describe()
        _consistent(m)


@pytest.mark.parametrize("n_events", [10_000, 40_000])
def test_ctr_at_position_1_halved_drifts(n_events):
    for seed in range(3):
        ref, cur = samples.feedback(n_events, seed=500 + seed), samples.feedback(n_events, seed=600 + seed)
        m = metric(compute_drift(_halve_ctr_at_1(cur, seed), ref, "feedback"), "ctr_by_position")
        assert m.drifted and 1 in m.details["drifted_positions"], m.describe()
        _consistent(m)


def test_alpha_one_turns_the_noise_correction_off():
    ref, cur = samples.feedback(500, seed=1), samples.feedback(500, seed=2)
    raw = compute_drift(cur, ref, "feedback", DriftOptions(alpha=1.0))
    for m in raw.metrics:
        if m.value is not None:
            assert m.noise == 0 and m.drifted == (m.value > m.threshold)
            _consistent(m)


def test_small_catalogues_do_not_drift():
    for seed in range(4):
        for n in (200, 600):
            report = compute_drift(samples.catalog(n, seed=10 + seed), samples.catalog(n, seed=20 + seed), "catalog")
            assert report.status == "ok", report.summary()
            for m in report.metrics:
                _consistent(m)
