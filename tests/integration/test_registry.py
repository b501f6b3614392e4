"""Registry aliases, promotion, rejection, rollback and audit on a real MLflow server + S3."""

import uuid
import mlflow
import pytest

from shoprank.registry import Registry, RegistryError
from shoprank.storage import Storage

pytestmark = pytest.mark.integration


class _Const(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [0.0] * len(model_input)


@pytest.fixture()
def registry(mlflow_server):
    settings = mlflow_server.replaced(registered_model=f"reg-test-{uuid.uuid4().hex[:6]}")
    return Registry(settings, Storage(settings))


def _new_version(registry, **tags):
    mlflow.set_tracking_uri(registry.settings.mlflow_tracking_uri)
    mlflow.set_experiment("registry-tests")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_Const())
    # gate-passed and cleared for auto-promotion, so promote() needs no approval answer here
    # (tests/reliability/test_reliability_promotion.py covers the refusals)
    return registry.register(info.model_uri, run.info.run_id,
                             {"ndcg_at_10": 0.5, "gate_eligible": "true", "gate_auto_promote": "true", **tags})


def test_promote_reject_rollback_with_audit(registry):
    v1 = _new_version(registry)
    assert registry.version_by_alias("challenger").version == v1
    assert registry.version_by_alias("champion") is None
    registry.promote(v1, actor="alice", reason="first model", airflow_run="manual__1")
    v2 = _new_version(registry)
    registry.promote(v2, actor="bob", airflow_run="manual__2", metrics={"ndcg_at_10": 0.6})
    assert registry.version_by_alias("champion").version == v2
    assert registry.version_by_alias("previous").version == v1
    assert registry.tags(v2)["promoted_by"] == "bob"
    assert registry.tags(v2)["promoted_at"] and "promoted_from_airflow_run" not in registry.tags(v2)

    v3 = _new_version(registry)
    registry.reject(v3, actor="carol", reason="worse on tail queries")
    assert registry.version_by_alias("challenger").version == v3  # kept for inspection
    assert registry.version_by_alias("champion").version == v2
    assert registry.tags(v3)["rejection_reason"] == "worse on tail queries"

    registry.rollback(actor="dave")  # default target: previous
    assert registry.version_by_alias("champion").version == v1
    assert registry.version_by_alias("previous").version == v2

    trail = registry.audit_trail()
    champion_moves = [(r["version"], r["actor"]) for r in trail if r["alias"] == "champion"]
    assert champion_moves == [(v1, "alice"), (v2, "bob"), (v1, "dave")]
    assert any(r["action"] == "reject" and r["actor"] == "carol" for r in trail)
    # a Registry built without a Storage reads the same trail (from the settings' S3)
    assert [r["ts"] for r in Registry(registry.settings, storage=None).audit_trail()] == [r["ts"] for r in trail]
    # the MLflow model page: no raw JSON in the model's tags; its description says who holds
    # which role and the latest moves in words, newest first
    model = registry.client.get_registered_model(registry.name)
    assert not [k for k in model.tags if k.startswith("audit.")], model.tags
    text = model.description
    assert f"**champion**: version {v1}" in text and f"**previous**: version {v2}" in text
    moves = [line for line in text.splitlines() if line.startswith("- ")]
    assert moves[0].endswith(f"version {v1} -> champion by dave (rollback)"), moves
    assert any(f"version {v3} rejected by carol (worse on tail queries)" in m for m in moves), moves
    assert "{" not in text


def test_evidence_joins_the_run_with_the_version(registry):
    """The gate reads metrics from the version's run (where the MLflow UI shows them), params
    as param.*, the run's train.*/gate.* tags, and the version's own tags on top."""
    mlflow.set_tracking_uri(registry.settings.mlflow_tracking_uri)
    mlflow.set_experiment("registry-tests")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_Const())
        mlflow.log_metrics({"ndcg_at_10": 0.71234567, "n_queries": 120})
        mlflow.log_param("lr", "3e-05")
        mlflow.set_tags({"train.global_step": "200", "gate.beats_bm25": "pass: x", "unrelated": "no"})
    v = registry.register(info.model_uri, run.info.run_id, {"validation_status": "passed", "n_queries": "7"})
    ev = registry.evidence(v)
    assert ev["ndcg_at_10"] == "0.712346" and ev["param.lr"] == "3e-05"
    assert ev["train.global_step"] == "200" and ev["gate.beats_bm25"] == "pass: x"
    assert "unrelated" not in ev and "delta_ndcg_at_10_vs_bm25_lo" not in ev  # never logged: absent
    assert ev["validation_status"] == "passed" and ev["n_queries"] == "7"  # the version's tag wins
    assert "ndcg_at_10" not in registry.tags(v)  # the version itself stays small


def test_unknown_versions_are_refused(registry):
    v1 = _new_version(registry)
    with pytest.raises(RegistryError, match="no version '99'.*known versions: \\['1'\\]"):
        registry.promote("99", actor="x")
    with pytest.raises(RegistryError, match="no alias 'previous'"):
        registry.rollback(actor="x")
    registry.promote(v1, actor="x")
    with pytest.raises(RegistryError, match="already the champion"):
        registry.rollback(target=v1, actor="x")
