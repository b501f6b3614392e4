"""Promotion safety on a real MLflow server: nothing moves ``champion`` without a gate pass
(and a person's approval unless the gate cleared auto-promotion); rollback to any earlier
champion, or any version that passed the gate, is always possible."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shoprank.config import REPO_ROOT
from shoprank.registry import Registry, RegistryError
from shoprank.storage import Storage
from shoprank.workflow import (
    Lineage,
    StepError,
    apply_approval,
    apply_auto_promotion,
    gate_version,
    log_evaluation,
    register_model,
)

from .conftest import log_const_model

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

APPROVE = {"chosen_options": ["Approve"], "responded_by_user": {"id": "alice", "name": "alice"},
           "params_input": {"comment": "looks good"}}
REJECT = {"chosen_options": ["Reject"], "responded_by_user": {"id": "bob", "name": "bob"}, "params_input": {}}


@pytest.fixture(autouse=True)
def default_gate_policy(monkeypatch):
    """The documented defaults (the e2e suite relaxes them in the same process)."""
    for name, value in {"SHOPRANK_GATE_MUST_BEAT_BM25": "true", "SHOPRANK_GATE_MAX_REGRESSION": "0.01",
                        "SHOPRANK_GATE_MAX_LATENCY_MS": "4000", "SHOPRANK_GATE_MAX_LATENCY_RATIO": "1.25",
                        "SHOPRANK_GATE_MIN_TEST_QUERIES": "100", "SHOPRANK_AUTO_PROMOTE": "false"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture()
def reg(model_settings):
    return Registry(model_settings, Storage(model_settings))


def candidate(reg: Registry, run_key: str, good: bool = True, validation: str = "passed",
              vs_champion_lo: float | None = None) -> str:
    """Register a version through workflow.register_model (the DAG's path), compared with today's champion."""
    model_uri, run_id = log_const_model(reg.settings.mlflow_tracking_uri, fresh=True)  # one run per version
    champion = reg.version_by_alias("champion")
    metrics = {"ndcg_at_10": 0.6 if good else 0.2, "delta_ndcg_at_10_vs_bm25": 0.1 if good else -0.2,
               "delta_ndcg_at_10_vs_bm25_lo": 0.05 if good else -0.3, "n_queries": 150.0,
               "latency_candidates": 50.0, "latency_ms_per_request": 300.0}
    if champion is not None:
        lo = vs_champion_lo if vs_champion_lo is not None else (0.02 if good else -0.2)
        metrics.update({"delta_ndcg_at_10_vs_champion": lo + 0.01, "delta_ndcg_at_10_vs_champion_lo": lo,
                        "champion_latency_ms_per_request": 290.0, "latency_ratio_vs_champion": 300 / 290})
    trained = {"model_uri": model_uri, "mlflow_run_id": run_id, "snapshot": "snap-rel", "params": {}}
    evaluated = {"metrics": metrics, "champion_version": champion.version if champion else None,
                 "champion_compared": champion.version if champion else "none"}
    log_evaluation(reg.client, run_id, metrics, evaluated["champion_compared"])  # what evaluate_model logs
    out = register_model(reg.settings, reg.storage, trained, evaluated, Lineage(key=run_key),
                         validation_status=validation)
    return out["version"]


def champion(reg: Registry) -> str | None:
    mv = reg.version_by_alias("champion")
    return mv.version if mv else None


def champion_moves(reg: Registry) -> list[tuple[str, str]]:
    return [(r["action"], r["version"]) for r in reg.audit_trail() if r["alias"] == "champion"]


def test_every_code_path_that_moves_champion_is_known():
    """Fault: a new code path sets the ``champion`` alias directly (bypassing gate and approval).
    Expected: the only call of set_registered_model_alias is Registry._move, and the only
    callers that move CHAMPION are Registry.promote and Registry.rollback (this test lists them)."""
    hits, champion_moves_ = [], []
    for path in [*Path(REPO_ROOT, "src").rglob("*.py"), *Path(REPO_ROOT, "dags").rglob("*.py"),
                 *Path(REPO_ROOT, "plugins").rglob("*.py")]:
        text = path.read_text()
        rel = str(path.relative_to(REPO_ROOT))
        hits += [rel for _ in re.finditer(r"set_registered_model_alias\(", text)]
        champion_moves_ += [rel for _ in re.finditer(r"_move\(CHAMPION", text)]
    assert hits == ["src/shoprank/registry.py"], hits
    assert champion_moves_ == ["src/shoprank/registry.py"] * 2, champion_moves_
    source = Path(REPO_ROOT, "src/shoprank/registry.py").read_text()
    blocks = re.split(r"\n    def ", source)
    movers = sorted(b.split("(", 1)[0] for b in blocks if "_move(CHAMPION" in b)
    assert movers == ["promote", "rollback"]
    callers = sorted({str(p.relative_to(REPO_ROOT)) for p in [*Path(REPO_ROOT, "src").rglob("*.py"),
                                                             *Path(REPO_ROOT, "dags").rglob("*.py")]
                      if re.search(r"\.promote\(|\.rollback\(", p.read_text())})
    assert callers == ["dags/shoprank_rollback.py", "src/shoprank/cli.py", "src/shoprank/workflow.py"], callers


def test_promote_refuses_a_version_without_a_gate_pass(reg):
    """Fault: promote a version the gate never saw, and one the gate failed (also with an Approve answer).
    Expected: RegistryError naming the gate; champion unset; no champion record in the audit trail."""
    never_gated = candidate(reg, "rel/never-gated")
    with pytest.raises(RegistryError, match="has not passed the promotion gate"):
        reg.promote(never_gated, actor="mallory", approval=APPROVE)
    with pytest.raises(RegistryError, match="has not passed the promotion gate"):
        apply_approval(reg.settings, reg.storage, never_gated, APPROVE, airflow_run="manual__x")

    bad = candidate(reg, "rel/bad", good=False)
    decision = gate_version(reg.settings, bad)
    assert decision["eligible"] is False and "beats_bm25" in " ".join(decision["reasons"])
    with pytest.raises(RegistryError, match="has not passed the promotion gate.*beats_bm25"):
        apply_approval(reg.settings, reg.storage, bad, APPROVE, airflow_run="manual__y")
    assert champion(reg) is None
    assert champion_moves(reg) == []


def test_data_that_failed_validation_can_never_become_champion(reg):
    """Fault: a model trained on data whose validation failed reaches registration.
    Expected: the gate fails it (data_validation) and promote refuses it even when approved."""
    v = candidate(reg, "rel/unvalidated", validation="failed")
    decision = gate_version(reg.settings, v)
    assert not decision["eligible"] and "data_validation" in decision["checks"]
    with pytest.raises(RegistryError, match="data_validation"):
        reg.promote(v, actor="alice", approval=APPROVE)
    assert champion(reg) is None


def test_gate_pass_still_needs_an_approval_unless_auto_promotion_cleared_it(reg):
    """Fault: a gated version is promoted with no answer, a Reject, or a forged auto-promotion decision.
    Expected: each is refused; only an Approve moves champion (one audited move)."""
    v = candidate(reg, "rel/approved")
    decision = gate_version(reg.settings, v)  # train DAG: auto-promotion not allowed
    assert decision["eligible"] and not decision["auto_promote"]
    with pytest.raises(RegistryError, match="needs a person's approval"):
        reg.promote(v, actor="pipeline")
    with pytest.raises(StepError, match="without an approval"):
        apply_approval(reg.settings, reg.storage, v, REJECT, airflow_run="r1")
    with pytest.raises(StepError, match="without an approval"):
        apply_approval(reg.settings, reg.storage, v, {}, airflow_run="r1")
    forged = {**decision, "auto_promote": True}  # an XCom that claims more than the gate decided
    with pytest.raises(RegistryError, match="needs a person's approval"):
        apply_auto_promotion(reg.settings, reg.storage, v, forged, airflow_run="r1")
    assert champion(reg) is None

    record = apply_approval(reg.settings, reg.storage, v, APPROVE, airflow_run="r1")
    assert champion(reg) == v and record["actor"] == "alice"
    assert champion_moves(reg) == [("set_alias", v)]


def test_auto_promotion_only_when_the_gate_cleared_it(reg, monkeypatch):
    """Fault: auto-promotion policy on, challenger with and without a significant gain.
    Expected: the clear winner is promoted without a person (audited as the policy); the
    insignificant one is refused and the champion stays."""
    first = candidate(reg, "rel/auto-0")
    gate_version(reg.settings, first)
    apply_approval(reg.settings, reg.storage, first, APPROVE, airflow_run="r0")
    monkeypatch.setenv("SHOPRANK_AUTO_PROMOTE", "true")
    meh = candidate(reg, "rel/auto-1", vs_champion_lo=-0.005)  # within tolerance, not a significant gain
    d = gate_version(reg.settings, meh, auto_promote_allowed=True)
    assert d["eligible"] and not d["auto_promote"]
    with pytest.raises(StepError, match="not cleared for auto-promotion"):
        apply_auto_promotion(reg.settings, reg.storage, meh, d, airflow_run="r1")
    with pytest.raises(RegistryError, match="needs a person's approval"):
        apply_auto_promotion(reg.settings, reg.storage, meh, {**d, "auto_promote": True}, airflow_run="r1")
    assert champion(reg) == first

    win = candidate(reg, "rel/auto-2", vs_champion_lo=0.03)
    d = gate_version(reg.settings, win, auto_promote_allowed=True)
    assert d["auto_promote"], d
    record = apply_auto_promotion(reg.settings, reg.storage, win, d, airflow_run="r2")
    assert champion(reg) == win and record["actor"] == "auto-promotion policy"


def test_a_gate_pass_against_an_older_champion_is_stale(reg):
    """Fault: B is gated against champion A, then C becomes champion, then B is approved.
    Expected: refused (B was never compared with C): re-evaluate first. Champion stays C."""
    a = candidate(reg, "rel/stale-a")
    gate_version(reg.settings, a)
    apply_approval(reg.settings, reg.storage, a, APPROVE, airflow_run="ra")
    b = candidate(reg, "rel/stale-b")
    gate_version(reg.settings, b)
    c = candidate(reg, "rel/stale-c")
    gate_version(reg.settings, c)
    apply_approval(reg.settings, reg.storage, c, APPROVE, airflow_run="rc")
    with pytest.raises(RegistryError, match=f"compared with version {a}.*champion is now version {c}"):
        apply_approval(reg.settings, reg.storage, b, APPROVE, airflow_run="rb")
    assert champion(reg) == c


def test_rollback_reaches_any_earlier_champion_or_gated_version(reg):
    """Fault: roll back by number to each earlier champion, to a gated-but-never-promoted
    version, and to a version the gate failed.  Expected: the first two always work
    (whatever the current champion), the last is refused; every move is audited."""
    champions = []
    for i in range(3):
        v = candidate(reg, f"rel/rb-{i}")
        gate_version(reg.settings, v)
        apply_approval(reg.settings, reg.storage, v, APPROVE, airflow_run=f"r{i}")
        champions.append(v)
    gated_only = candidate(reg, "rel/rb-gated")
    assert gate_version(reg.settings, gated_only)["eligible"]
    failed = candidate(reg, "rel/rb-failed", good=False)
    assert not gate_version(reg.settings, failed)["eligible"]

    for target in (champions[0], champions[1], champions[2], champions[0], gated_only, champions[2]):
        reg.rollback(target, actor="oncall", reason="reliability test")
        assert champion(reg) == target
    with pytest.raises(RegistryError, match=f"version {failed} was never champion and did not pass the gate"):
        reg.rollback(failed, actor="oncall")
    assert champion(reg) == champions[2]
    reg.rollback(actor="oncall")  # default target: previous
    assert champion(reg) == gated_only
    moves = champion_moves(reg)
    assert moves[:3] == [("set_alias", v) for v in champions]
    assert [v for _, v in moves[3:]] == [champions[0], champions[1], champions[2], champions[0], gated_only,
                                         champions[2], gated_only]
