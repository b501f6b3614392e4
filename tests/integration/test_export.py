"""`shoprank export` on a registered version, against a real MLflow server with artifacts in a
real S3 (rclone): artifacts, metrics and tags logged, the int8 scorer loads from MLflow and
ranks like PyTorch, refusal and fallback paths, idempotence."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest

from shoprank.evaluation import per_query_metrics
from shoprank.mlflow_model import log_cross_encoder
from shoprank.registry import Registry, RegistryError
from shoprank.serving.export import export
from shoprank.serving.scorers import load_version_scorer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_cross_encoder) -> Path:
    """A small cross-encoder (2-layer BERT, MiniLM tokenizer) whose scores spread enough to rank."""
    return tiny_cross_encoder(tmp_path_factory.mktemp("model") / "model", hidden=64, heads=4, intermediate=128,
                              max_positions=128, seed=1)


@pytest.fixture(scope="session")
def toy_test(toy_ranking_split):
    return toy_ranking_split


@pytest.fixture()
def env(mlflow_server, storage, toy_test):
    settings = mlflow_server.replaced(registered_model=f"export-test-{uuid.uuid4().hex[:6]}")
    storage.write_parquet(toy_test(n_queries=12, n_candidates=15, seed=5), "datasets/snap-1/test.parquet")
    return settings, storage


def _register(settings, storage, model_dir) -> tuple[str, str]:
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("export-tests")
    with mlflow.start_run() as run:
        pass
    uri = log_cross_encoder(run.info.run_id, model_dir)
    tags = {"data_snapshot": "snap-1", "gate_eligible": "true", "gate_auto_promote": "true"}  # promotable
    version = Registry(settings, storage).register(uri, run.info.run_id, tags)
    return version, run.info.run_id


def _artifacts(settings, run_id: str, path: str) -> set[str]:
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


def test_export_logs_both_backends_and_the_int8_scorer_ranks_like_torch(env, model_dir, tmp_path, toy_test):
    settings, storage = env
    version, run_id = _register(settings, storage, model_dir)
    Registry(settings, storage).promote(version, actor="test")
    lines: list[str] = []
    report = export(settings, storage, "champion", tolerance=0.2, workdir=str(tmp_path / "w"), progress=lines.append)
    assert report["status"] == "exported", report["refused"]
    assert report["version"] == version and report["queries"] == 12 and not report["reused"]
    assert any("onnx fp32 vs torch" in line for line in lines)

    assert _artifacts(settings, run_id, "export") >= {"onnx", "onnx-int8", "report.json"}
    for backend in ("onnx", "onnx-int8"):
        assert {"model.onnx", "export_meta.json", "tokenizer.json"} <= _artifacts(settings, run_id, f"export/{backend}")
    metrics = mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(run_id).data.metrics
    for key in ("export_torch_ndcg_at_10", "export_onnx_int8_ndcg_at_10", "export_onnx_int8_latency_ms_per_pair",
                "export_onnx_ndcg_delta"):
        assert key in metrics, key
    assert metrics["export_onnx_int8_ndcg_at_10"] == pytest.approx(report["backends"]["onnx-int8"]["ndcg_at_10"])
    tags = Registry(settings).tags(version)
    assert tags["export.status"] == "exported"
    assert set(tags["export.backends"].split(",")) == {"onnx", "onnx-int8"}

    # the serving loader: int8 from MLflow, ranking the test queries like the PyTorch model
    int8 = load_version_scorer(settings, "champion", "onnx-int8", workdir=str(tmp_path / "int8"))
    eager = load_version_scorer(settings, version, "torch", workdir=str(tmp_path / "torch"))
    assert (int8.backend, int8.version, eager.backend, eager.version) == ("onnx-int8", version, "torch", version)
    test = toy_test(n_queries=12, n_candidates=15, seed=5)
    s_int8 = int8.score(test["query"].tolist(), test["text"].tolist())
    s_torch = eager.score(test["query"].tolist(), test["text"].tolist())
    assert np.corrcoef(s_int8, s_torch)[0, 1] > 0.9
    ndcg = {name: per_query_metrics(test, s)["ndcg_at_10"].mean() for name, s in (("int8", s_int8), ("torch", s_torch))}
    assert abs(ndcg["int8"] - ndcg["torch"]) <= 0.2  # the tolerance this export was accepted with
    top = [test.assign(s=s).sort_values("s", ascending=False).groupby("query").head(1)["product_id"].tolist()
           for s in (s_int8, s_torch)]
    assert np.mean([a == b for a, b in zip(sorted(top[0]), sorted(top[1]))]) >= 0.5

    # idempotent: a second export reuses the logged one
    again = export(settings, storage, version, workdir=str(tmp_path / "again"), progress=lambda _m: None)
    assert again["reused"] and again["status"] == "exported"


def test_refused_backends_are_not_logged_and_the_loader_falls_back_to_torch(env, model_dir, tmp_path, caplog):
    settings, storage = env
    version, run_id = _register(settings, storage, model_dir)
    report = export(settings, storage, version, tolerance=-1.0, workdir=str(tmp_path / "w"),
                    progress=lambda _m: None)
    assert report["status"] == "refused" and report["accepted"] == []
    assert "exceeds the tolerance -1" in report["refused"]["onnx-int8"]
    assert _artifacts(settings, run_id, "export") == {"report.json"}  # nothing for a refused backend
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/export/report.json"))
    assert logged["refused"]["onnx"].startswith("NDCG@10")
    tags = Registry(settings).tags(version)
    assert tags["export.status"] == "refused" and tags["export.backends"] == ""
    assert "exceeds the tolerance" in tags["export.refused"]

    with caplog.at_level(logging.WARNING, logger="shoprank.serving.scorers"):
        scorer = load_version_scorer(settings, version, "onnx-int8", workdir=str(tmp_path / "s"))
    assert scorer.backend == "torch" and scorer.version == version
    assert "falling back to torch" in caplog.text and "exceeds the tolerance" in caplog.text
    assert scorer.score(["red shoes"], ["red shoes | brand1"]).shape == (1,)


def test_unknown_versions_are_refused_with_the_known_ones(env, model_dir):
    settings, storage = env
    version, _ = _register(settings, storage, model_dir)
    with pytest.raises(RegistryError, match=rf"no version '99'.*known versions: \['{version}'\]"):
        export(settings, storage, "99")
    with pytest.raises(RegistryError, match="no alias 'champion'"):
        load_version_scorer(settings, "champion")
