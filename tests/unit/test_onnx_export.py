"""ONNX / int8 export and the serving scorers, on a tiny randomly initialised BERT (fast, no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shoprank.serving.export import ExportError, export_model_dir, format_report, sample_queries
from shoprank.serving.scorers import BACKENDS, META_FILE, ONNX_FILE, Scorer, ScorerError, load_dir_scorer

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_cross_encoder) -> Path:
    """A tiny cross-encoder saved like a trained one (weights + tokenizer + training meta)."""
    return tiny_cross_encoder(tmp_path_factory.mktemp("tiny") / "model", hidden=32, heads=2, intermediate=64,
                              max_positions=64, seed=0)


@pytest.fixture(scope="session")
def toy_test(toy_ranking_split):
    return toy_ranking_split


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory, toy_test):
    out = tmp_path_factory.mktemp("export")
    report = export_model_dir(tiny_dir, out, toy_test(), tolerance=1.0, version="7", progress=lambda _m: None)
    return out, report


def test_export_writes_both_backends_with_meta_and_report(exported):
    out, report = exported
    assert report["status"] == "exported" and sorted(report["accepted"]) == ["onnx", "onnx-int8"]
    assert report["refused"] == {} and report["queries"] == 8 and report["pairs"] == 96
    for backend in ("onnx", "onnx-int8"):
        d = out / backend
        assert (d / ONNX_FILE).is_file() and (d / "tokenizer.json").is_file()
        meta = json.loads((d / META_FILE).read_text())
        assert meta["backend"] == backend and meta["version"] == "7" and meta["max_length"] == 48
        assert meta["inputs"][:2] == ["input_ids", "attention_mask"]
        # onnxruntime's BERT fusion ran: one fused Attention per layer
        assert meta["fused_ops"].get("Attention") == 2 and meta["fused_ops"].get("EmbedLayerNormalization") == 1
        assert np.isfinite(meta["ndcg_at_10"]) and np.isfinite(meta["latency_ms_per_pair"])
    # fp32 export is numerically the torch model; int8 is smaller
    assert report["onnx_max_abs_diff"] < 1e-4
    assert report["backends"]["onnx-int8"]["size_bytes"] < report["backends"]["onnx"]["size_bytes"]
    for name in BACKENDS:
        e = report["backends"][name]
        assert 0.0 <= e["ndcg_at_10"] <= 1.0 and e["latency_ms_per_pair"] > 0
    assert abs(report["backends"]["onnx"]["ndcg_delta"]) < 1e-6
    json.dumps(report)  # JSON-able (logged as export/report.json)
    text = format_report(report)
    assert "onnx-int8" in text and "logged" in text


def test_dir_scorers_agree_with_torch_on_any_batch_and_length(exported, tiny_dir, toy_test):
    out, _ = exported
    torch_scorer = load_dir_scorer(tiny_dir, "torch")
    test = toy_test(n_queries=3, n_candidates=40, seed=3)
    q, t = test["query"].tolist(), test["text"].tolist()
    t[5] = "very long text " * 80  # longer than the export example and than max_length (truncated)
    ref = torch_scorer.score(q, t)
    for backend in ("onnx", "onnx-int8"):
        scorer = load_dir_scorer(out, backend, batch_size=16)  # 120 pairs -> several batches
        assert isinstance(scorer, Scorer) and scorer.backend == backend and scorer.version == "7"
        assert scorer.max_length == 48
        got = scorer.score(q, t)
        assert got.dtype == np.float32 and got.shape == (120,)
        if backend == "onnx":
            np.testing.assert_allclose(got, ref, atol=1e-4)
        else:
            assert np.corrcoef(got, ref)[0, 1] > 0.9
        one = scorer.score(q[:1], t[:1])  # batch of one
        if backend == "onnx":
            np.testing.assert_allclose(one, got[:1], atol=1e-4)
        else:  # dynamic quantization scales activations per batch: a pair's score moves a little
            assert abs(one[0] - got[0]) < 0.25 * ref.std()
    assert torch_scorer.backend == "torch" and ref.dtype == np.float32
    assert torch_scorer.score([], []).shape == (0,)


def test_refusal_logs_nothing_for_the_refused_backend(tiny_dir, tmp_path, toy_test):
    report = export_model_dir(tiny_dir, tmp_path, toy_test(n_queries=4), tolerance=-1.0, progress=lambda _m: None)
    assert report["status"] == "refused" and report["accepted"] == []
    assert set(report["refused"]) == {"onnx", "onnx-int8"}
    assert "exceeds the tolerance -1" in report["refused"]["onnx-int8"]
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx-int8").exists()
    assert "REFUSED" in format_report(report)


def test_clear_errors(tiny_dir, tmp_path, toy_test):
    with pytest.raises(ScorerError, match="unknown backend 'tensorrt'"):
        load_dir_scorer(tiny_dir, "tensorrt")
    with pytest.raises(ScorerError, match="no onnx-int8 export under .*shoprank export"):
        load_dir_scorer(tiny_dir, "onnx-int8")
    with pytest.raises(ScorerError, match="no Hugging Face model"):
        load_dir_scorer(tmp_path, "torch")
    with pytest.raises(ValueError, match="2 queries but 1 texts"):
        load_dir_scorer(tiny_dir, "torch").score(["a", "b"], ["x"])
    with pytest.raises(ExportError, match="no config.json"):
        export_model_dir(tmp_path, tmp_path / "out", toy_test(), tolerance=0.005)
    with pytest.raises(ExportError, match="lacks columns"):
        sample_queries(pd.DataFrame({"query": ["q"]}), 5)


def test_sample_queries_caps_queries_deterministically(toy_test):
    test = toy_test(n_queries=8, n_candidates=3)
    a, b = sample_queries(test, 5, seed=1), sample_queries(test, 5, seed=1)
    assert a["query"].nunique() == 5 and len(a) == 15
    pd.testing.assert_frame_equal(a, b)
    assert sample_queries(test, 0)["query"].nunique() == 8


def test_export_task_runs_only_after_a_promotion(tmp_path_factory):
    """In both DAGs: export hangs off promote / auto_promote only (not register), so a run that
    promoted nothing skips it, and it never gates record_decision."""
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # older layout
        from airflow.models.dagbag import DagBag
    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    for dag_id in ("shoprank_train", "shoprank_daily_update"):
        dag = bag.dags[dag_id]
        task = dag.get_task("export")
        assert task.upstream_task_ids == {"promote", "auto_promote"}, dag_id
        assert task.trigger_rule == "none_failed_min_one_success"
        assert task.downstream_task_ids == set()
        assert "export" not in dag.get_task("record_decision").upstream_task_ids


def test_a_scorer_can_be_shared_by_threads(exported, toy_test):
    """The API scores requests from a thread pool with one scorer per model."""
    from concurrent.futures import ThreadPoolExecutor

    out, _ = exported
    scorer = load_dir_scorer(out, "onnx")
    test = toy_test(n_queries=4, n_candidates=10, seed=9)
    jobs = [(test["query"].tolist()[i::4], test["text"].tolist()[i::4]) for i in range(4)]
    expected = [scorer.score(q, t) for q, t in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: scorer.score(*job), jobs * 5))
    for i, scores in enumerate(got):
        np.testing.assert_allclose(scores, expected[i % 4], atol=1e-5)
