import pytest

from shoprank.promotion import GatePolicy, approval_card, evaluate_gate

GOOD = {
    "validation_status": "passed",
    "ndcg_at_10": "0.61", "bm25_ndcg_at_10": "0.40", "champion_ndcg_at_10": "0.58",
    "delta_ndcg_at_10_vs_bm25": "0.21", "delta_ndcg_at_10_vs_bm25_lo": "0.15", "delta_ndcg_at_10_vs_bm25_hi": "0.27",
    "delta_ndcg_at_10_vs_champion": "0.03", "delta_ndcg_at_10_vs_champion_lo": "0.005",
    "delta_ndcg_at_10_vs_champion_hi": "0.05",
    "query_freq_bucket_tail_ndcg_at_10": "0.5",
    "delta_ndcg_at_10_vs_champion_query_freq_bucket_tail": "-0.01",
    "delta_ndcg_at_10_vs_champion_query_freq_bucket_tail_lo": "-0.03",
    "delta_ndcg_at_10_vs_champion_query_freq_bucket_tail_hi": "0.01",
    "n_queries": "120", "champion_compared": "3", "latency_candidates": "50",
    "latency_ms_per_request": "900", "champion_latency_ms_per_request": "850", "latency_ratio_vs_champion": "1.06",
}


def test_good_challenger_is_eligible():
    d = evaluate_gate(GOOD, GatePolicy())
    assert d.eligible, d.reasons
    assert d.as_tags()["gate_eligible"] == "true"
    assert not d.auto_promote  # off by default


def test_each_rule_can_fail_with_a_reason():
    cases = {
        "beats_bm25": {"delta_ndcg_at_10_vs_bm25_lo": "-0.01"},
        "no_regression_vs_champion": {"delta_ndcg_at_10_vs_champion_lo": "-0.2"},
        "serving_latency": {"latency_ratio_vs_champion": "1.6"},
        "data_validation": {"validation_status": "failed: feedback dt=2026-11-02 (quarantined)"},
        "enough_evidence": {"n_queries": "39"},
    }
    for rule, change in cases.items():
        d = evaluate_gate({**GOOD, **change}, GatePolicy())
        assert not d.eligible
        assert any(r.startswith(rule) for r in d.reasons), (rule, d.reasons)
        assert d.as_tags()[f"gate.{rule}"].startswith("fail")


def test_missing_evidence_is_not_eligible():
    tags = dict(GOOD)
    del tags["latency_ms_per_request"]
    del tags["delta_ndcg_at_10_vs_bm25_lo"]
    d = evaluate_gate(tags, GatePolicy())
    assert not d.eligible and len(d.reasons) == 2


def test_every_check_fails_closed_on_a_missing_or_nan_value():
    for key, check in (("validation_status", "data_validation"), ("n_queries", "enough_evidence"),
                       ("delta_ndcg_at_10_vs_bm25_lo", "beats_bm25"),
                       ("champion_compared", "no_regression_vs_champion"),
                       ("delta_ndcg_at_10_vs_champion_lo", "no_regression_vs_champion"),
                       ("latency_ms_per_request", "serving_latency"), ("latency_ratio_vs_champion", "serving_latency")):
        missing = {k: v for k, v in GOOD.items() if k != key}
        nan = {**GOOD, key: "nan"}
        for tags in (missing, nan) if key not in ("validation_status", "champion_compared") else (missing,):
            d = evaluate_gate(tags, GatePolicy())
            assert not d.eligible, key
            assert d.checks[check].startswith("fail"), (key, d.checks)


def test_insufficient_evidence_is_a_named_refusal():
    d = evaluate_gate({**GOOD, "n_queries": "99"}, GatePolicy(min_test_queries=100))
    assert not d.eligible and d.reasons[0].startswith("enough_evidence") and "insufficient evidence" in d.reasons[0]
    assert evaluate_gate({**GOOD, "n_queries": "100"}, GatePolicy(min_test_queries=100)).eligible


def test_first_model_has_no_champion_check_only_when_the_evaluation_recorded_none():
    tags = {k: v for k, v in GOOD.items() if "champion" not in k}
    d = evaluate_gate({**tags, "champion_compared": "none"}, GatePolicy())
    assert d.eligible, d.reasons
    assert d.checks["no_regression_vs_champion"].startswith("pass: no champion")
    assert "ratio" not in d.checks["serving_latency"]
    assert not evaluate_gate(tags, GatePolicy()).eligible  # nothing recorded: not "no champion"


def test_latency_uses_the_absolute_budget_and_the_side_by_side_ratio():
    assert not evaluate_gate({**GOOD, "latency_ms_per_request": "4100"}, GatePolicy()).eligible
    assert evaluate_gate({**GOOD, "latency_ratio_vs_champion": "1.2"}, GatePolicy()).eligible
    assert not evaluate_gate({**GOOD, "latency_ratio_vs_champion": "1.3"}, GatePolicy()).eligible


def test_auto_promotion_needs_significant_gain_and_no_slice_regression():
    policy = GatePolicy(auto_promote=True, auto_promote_max_slice_regression=0.02)
    assert evaluate_gate(GOOD, policy).auto_promote
    bad_slice = {**GOOD, "delta_ndcg_at_10_vs_champion_query_freq_bucket_tail": "-0.1"}
    assert not evaluate_gate(bad_slice, policy).auto_promote
    no_gain = {**GOOD, "delta_ndcg_at_10_vs_champion_lo": "-0.001"}
    assert not evaluate_gate(no_gain, policy).auto_promote


def test_policy_from_env(monkeypatch):
    monkeypatch.setenv("SHOPRANK_GATE_MAX_REGRESSION", "0.05")
    monkeypatch.setenv("SHOPRANK_AUTO_PROMOTE", "true")
    monkeypatch.setenv("SHOPRANK_GATE_MIN_TEST_QUERIES", "250")
    monkeypatch.setenv("SHOPRANK_GATE_MAX_LATENCY_RATIO", "1.5")
    p = GatePolicy.from_env()
    assert p.max_regression_vs_champion == 0.05 and p.auto_promote
    assert p.min_test_queries == 250 and p.max_latency_ratio == 1.5


def test_card_shows_metrics_intervals_slices_and_links():
    card = approval_card("7", {**GOOD, "data_snapshot": "2026-11-01-abc"}, "6",
                         {"MLflow run": "http://mlflow/r/1", "Data Docs": "http://docs"})
    assert "version 7" in card and "version 6" in card
    assert "+0.2100 [+0.1500, +0.2700]" in card
    assert "| query_freq_bucket_tail | 0.5000 |" in card
    assert "-0.0100 [-0.0300, +0.0100]" in card
    assert "[MLflow run](http://mlflow/r/1)" in card
    assert "2026-11-01-abc" in card


def test_card_shows_what_was_actually_trained():
    tags = {**GOOD, "param.epochs": "2", "train.global_step": "400", "train.max_steps": "400",
            "train.steps_per_epoch": "650", "train.epochs_run": "0.615", "train.train_pairs": "6400",
            "train.fusion": "fused", "train.fusion_reason": "validation NDCG@10 ..."}
    card = approval_card("7", tags, "6", {})
    assert "400 optimizer steps (cap 400, epoch budget 2)" in card
    assert "0.61 epochs of 650 steps" in card and "6,400 training pairs seen" in card
    assert "Ranking score: fused" in card


def test_validation_status_comes_from_the_validate_tasks_results():
    from shoprank.workflow import validation_status

    ok = {"dataset": "catalog", "date": "2026-11-01", "success": True, "status": "passed"}
    bad = {"dataset": "feedback", "date": "2026-11-02", "success": False, "status": "quarantined"}
    assert validation_status([ok, ok]) == "passed"
    assert validation_status([ok, bad]) == "failed: feedback dt=2026-11-02 (quarantined)"
    assert validation_status([]).startswith("missing")
    assert not evaluate_gate({**GOOD, "validation_status": validation_status([])}, GatePolicy()).eligible


def test_latency_request_and_side_by_side_rounds():
    import pandas as pd

    from shoprank.evaluation.latency import median_ms, ranking_request, timed_rounds

    test = pd.DataFrame({"query": ["a"] * 3 + ["b"] * 5, "text": list("xyz") + list("pqrst")})
    request = ranking_request(test, 12)
    assert len(request) == 12 and set(request["query"]) == {"b"} and request["text"].tolist()[:6] == list("pqrstp")
    calls = []
    rounds = timed_rounds({"challenger": lambda d: calls.append("c"), "champion": lambda d: calls.append("h")},
                          request, rounds=3, warmup=1)
    assert all(len(ts) == 3 for ts in rounds.values())
    timed = median_ms(rounds)
    assert set(timed) == {"challenger", "champion"} and all(v >= 0 for v in timed.values())
    assert calls == ["c", "h", "c", "h", "h", "c", "c", "h"]  # warm-up, then alternating order


def test_latency_ratio_pairs_the_calls_of_each_round():
    """A load burst that slows one round slows both calls of it: the paired ratio cancels it,
    the ratio of the medians does not (same model timed twice: true ratio 1.0)."""
    from statistics import median

    from shoprank.evaluation.latency import paired_ratio

    # load 3x in rounds 1-4; it ends between the two calls of round 4
    rounds = {"challenger": [300.0, 300.0, 300.0, 300.0, 100.0, 100.0, 100.0],
              "champion": [291.0, 291.0, 291.0, 97.0, 97.0, 97.0, 97.0]}
    assert median(rounds["challenger"]) / median(rounds["champion"]) > 3  # the unpaired ratio is fooled
    assert paired_ratio(rounds, "challenger", "champion") == pytest.approx(300 / 291)
    with pytest.raises(ValueError):
        paired_ratio({"a": [], "b": []}, "a", "b")
