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
    "latency_ms_per_pair": "4.2",
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
        "packaged_model_latency": {"latency_ms_per_pair": "500"},
        "data_validation": {"validation_status": "failed"},
    }
    for rule, change in cases.items():
        d = evaluate_gate({**GOOD, **change}, GatePolicy())
        assert not d.eligible
        assert any(r.startswith(rule) for r in d.reasons), (rule, d.reasons)
        assert d.as_tags()[f"gate.{rule}"].startswith("fail")


def test_missing_evidence_is_not_eligible():
    tags = dict(GOOD)
    del tags["latency_ms_per_pair"]
    del tags["delta_ndcg_at_10_vs_bm25_lo"]
    d = evaluate_gate(tags, GatePolicy())
    assert not d.eligible and len(d.reasons) == 2


def test_first_model_has_no_champion_check():
    tags = {k: v for k, v in GOOD.items() if "champion" not in k}
    d = evaluate_gate(tags, GatePolicy())
    assert d.eligible
    assert d.checks["no_regression_vs_champion"].startswith("pass: no champion")


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
    p = GatePolicy.from_env()
    assert p.max_regression_vs_champion == 0.05 and p.auto_promote


def test_card_shows_metrics_intervals_slices_and_links():
    card = approval_card("7", {**GOOD, "data_snapshot": "2026-11-01-abc"}, "6",
                         {"MLflow run": "http://mlflow/r/1", "Data Docs": "http://docs"})
    assert "version 7" in card and "version 6" in card
    assert "+0.2100 [+0.1500, +0.2700]" in card
    assert "| query_freq_bucket_tail | 0.5000 |" in card
    assert "-0.0100 [-0.0300, +0.0100]" in card
    assert "[MLflow run](http://mlflow/r/1)" in card
    assert "2026-11-01-abc" in card
