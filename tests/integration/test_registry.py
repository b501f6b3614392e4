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
    assert registry.tags(v2)["promoted_from_airflow_run"] == "manual__2"

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
    # the same trail is readable from MLflow alone
    from_mlflow = Registry(registry.settings, storage=None).audit_trail()
    assert [r["ts"] for r in from_mlflow] == [r["ts"] for r in trail]


def test_unknown_versions_are_refused(registry):
    v1 = _new_version(registry)
    with pytest.raises(RegistryError, match="no version '99'.*known versions: \\['1'\\]"):
        registry.promote("99", actor="x")
    with pytest.raises(RegistryError, match="no alias 'previous'"):
        registry.rollback(actor="x")
    registry.promote(v1, actor="x")
    with pytest.raises(RegistryError, match="already the champion"):
        registry.rollback(target=v1, actor="x")
