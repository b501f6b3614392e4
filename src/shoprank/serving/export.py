"""Export a registered version to ONNX (fp32) and dynamically quantized int8 ONNX.

``export(settings, storage, version)`` (what ``shoprank export`` and the DAGs' ``export``
task call):

1. downloads the version's Hugging Face weights from MLflow;
2. exports them with ``torch.onnx.export`` (dynamic batch and sequence axes), fuses the
   transformer blocks with onnxruntime's optimizer (BERT family) and checks the ONNX fp32
   logits against PyTorch on a few test pairs (max abs diff);
3. quantizes the fp32 graph with ``onnxruntime.quantization.quantize_dynamic`` (int8
   weights of every MatMul, also inside fused Attention; activations quantized per batch);
4. scores the version's test split (capped at ``SHOPRANK_EXPORT_EVAL_QUERIES`` queries, 40 by
   default) with torch, onnx and onnx-int8 and computes NDCG@10 with the evaluation code;
   a backend whose ``|NDCG@10 - torch NDCG@10|`` exceeds the tolerance
   (``SHOPRANK_EXPORT_MAX_NDCG_DELTA``, 0.005) is **refused**: not logged, reason recorded;
5. logs the accepted ones to the version's run as ``export/<backend>/`` (model.onnx +
   tokenizer + ``export_meta.json``), ``export/report.json``, metrics
   ``export_<backend>_ndcg_at_10`` / ``_ndcg_delta`` / ``_latency_ms_per_pair`` and version
   tags ``export.status`` (exported / partial / refused), ``export.backends``, ``export.refused``.

Re-running on an exported version returns the logged report unless ``force=True``.
:func:`export_model_dir` is the MLflow-free core (used by the tests and the benchmark).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from shoprank.config import Settings
from shoprank.serving.scorers import EXPORT_ARTIFACT_DIR, META_FILE, ONNX_BACKENDS, ONNX_FILE, OnnxScorer, TorchScorer
from shoprank.storage import Storage

log = logging.getLogger(__name__)

OPSET = 18
ONNX_ATOL = 1e-3  # fp32 ONNX vs PyTorch, on logits (plus ONNX_RTOL x the largest |logit|)
ONNX_RTOL = 1e-3
DEFAULT_EVAL_QUERIES = 40
REPORT_FILE = "report.json"
Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """The export cannot run (no weights, no test split...).  The message says why."""


def eval_queries_cap() -> int:
    """Queries of the test split scored per backend (SHOPRANK_EXPORT_EVAL_QUERIES, 0 = all)."""
    from shoprank.config import get_settings

    cap = get_settings().serving.export_eval_queries
    return DEFAULT_EVAL_QUERIES if cap is None else cap


def metric_key(backend: str) -> str:
    return backend.replace("-", "_")


# ---- the ONNX files ------------------------------------------------------------------------

def _example_inputs(tokenizer):
    enc = tokenizer(["red running shoes", "tv"], ["Acme Runner | Shoes > Running | red", "55 inch television"],
                    padding=True, return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return names, tuple(enc[k] for k in names)


def write_onnx(model_dir: str | Path, path: str | Path, opset: int = OPSET) -> list[str]:
    """``torch.onnx.export`` of a sequence-classification model: inputs named as the tokenizer's
    outputs, output ``logits`` [batch, 1]; batch and sequence axes dynamic.  Returns input names."""
    import torch

    from shoprank.models import load_cross_encoder, load_tokenizer

    # eager attention: the plain MatMul/Softmax pattern onnxruntime's optimizer fuses into Attention
    model = load_cross_encoder(str(model_dir), attn_implementation="eager").eval()
    names, args = _example_inputs(load_tokenizer(str(model_dir)))

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).logits

    wrapper = LogitsOnly(model).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}}
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter: one self-contained file (dynamo writes external data),
        # the graph the fusion patterns expect, and ~5x faster to export here; same logits
        torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    return names


def fuse_transformer_ops(src: str | Path, dst: str | Path, model_dir: str | Path) -> dict[str, int]:
    """onnxruntime's transformer optimizer (BERT-family graphs): fuses embeddings + LayerNorm,
    attention, bias + GELU and skip + LayerNorm into single CPU kernels.  Other architectures,
    or a failed fusion, keep the graph as exported (returns the fused-op counts, {} if none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("model_type") not in ("bert",):
        shutil.copy2(src, dst)
        return {}
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(src), model_type="bert", num_heads=int(config["num_attention_heads"]),
                             hidden_size=int(config["hidden_size"]), opt_level=1)
        opt.save_model_to_file(str(dst))
        return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    except Exception as exc:  # an unexpected graph: the unfused one is still correct
        log.warning("onnxruntime transformer fusion failed (%s); keeping the exported graph", exc)
        shutil.copy2(src, dst)
        return {}


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """Dynamic int8 quantization: QInt8 weights for every MatMul, including those inside fused
    Attention nodes; activations are quantized per batch at run time (the embeddings stay fp32)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger to "pre-process" first
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Attention"],
                         per_channel=False, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def _copy_side_files(model_dir: Path, out_dir: Path, meta: dict) -> None:
    from shoprank.models import TRAINING_META_FILE, load_tokenizer

    load_tokenizer(str(model_dir)).save_pretrained(str(out_dir))
    from shoprank.fusion import FUSION_FILE
    from shoprank.lexical import STATS_FILE

    for name in (TRAINING_META_FILE, FUSION_FILE, STATS_FILE):  # the fusion travels with every export
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


# ---- evaluation -------------------------------------------------------------------------------

def sample_queries(test: pd.DataFrame, max_queries: int | None, seed: int = 42) -> pd.DataFrame:
    """The rows of up to ``max_queries`` test queries (a seeded sample; 0/None = all)."""
    missing = [c for c in ("query", "text", "grade") if c not in test.columns]
    if missing:
        raise ExportError(f"the test split lacks columns {missing}")
    queries = sorted(test["query"].astype(str).unique())
    if max_queries and len(queries) > max_queries:
        rng = np.random.default_rng(seed)
        queries = sorted(rng.choice(queries, size=max_queries, replace=False))
    return test[test["query"].astype(str).isin(set(queries))].reset_index(drop=True)


def ndcg_at_10(test: pd.DataFrame, scores: np.ndarray) -> float:
    from shoprank.evaluation import NDCG_K, mean_metrics, per_query_metrics

    name = f"ndcg_at_{NDCG_K}"
    return mean_metrics(per_query_metrics(test, scores), [name])[name]


def score_per_query(scorer, test: pd.DataFrame) -> np.ndarray:
    """Scores in ``test``'s row order, one call per query (as ``/rank`` sends them: the int8
    activation scales depend on the batch, so the check scores what serving scores)."""
    scores = np.empty(len(test), dtype=np.float64)
    for _query, rows in test.groupby(test["query"].astype(str), sort=False).indices.items():
        scores[rows] = scorer(test.iloc[rows])
    return scores


def export_model_dir(model_dir: str | Path, out_dir: str | Path, test: pd.DataFrame, *, tolerance: float,
                     version: str | None = None, progress: Progress = print, latency_rows: int = 64) -> dict:
    """Export ``model_dir`` into ``out_dir/onnx`` and ``out_dir/onnx-int8``, check both against
    PyTorch on ``test`` and return the report (``accepted`` / ``refused`` backends)."""
    from shoprank.mlflow_model import latency_ms_per_pair

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a saved model directory (no config.json)")
    if test.empty:
        raise ExportError("the test split is empty: nothing to check the export against")
    t_start = time.perf_counter()
    torch_scorer = TorchScorer(model_dir, version=version, device="cpu")
    dirs = {b: out_dir / b for b in ONNX_BACKENDS}
    for d in dirs.values():
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    base_meta = {"version": version, "max_length": torch_scorer.max_length, "opset": OPSET,
                 "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    progress(f"export: torch.onnx.export (opset {OPSET}, dynamic batch/sequence axes) ...")
    t0 = time.perf_counter()
    raw = out_dir / "exported.onnx"
    names = write_onnx(model_dir, raw)
    fused = fuse_transformer_ops(raw, dirs["onnx"] / ONNX_FILE, model_dir)
    raw.unlink()
    base_meta["fused_ops"] = fused
    _copy_side_files(model_dir, dirs["onnx"], {**base_meta, "backend": "onnx", "inputs": names, "dtype": "fp32"})
    progress(f"export: onnx fp32 written in {time.perf_counter() - t0:.1f}s (fused: {fused or 'none'}); "
             "quantizing to int8 ...")
    t0 = time.perf_counter()
    quantize_int8(dirs["onnx"] / ONNX_FILE, dirs["onnx-int8"] / ONNX_FILE)
    _copy_side_files(model_dir, dirs["onnx-int8"], {**base_meta, "backend": "onnx-int8", "inputs": names,
                                                    "dtype": "int8 weights (dynamic quantization: MatMul, Attention)"})
    progress(f"export: int8 written in {time.perf_counter() - t0:.1f}s")

    scorers = {"torch": torch_scorer, **{b: OnnxScorer(d, b, version=version) for b, d in dirs.items()}}
    probe = test.head(32)
    ref = torch_scorer(probe)
    onnx_probe = scorers["onnx"](probe)
    max_abs_diff = float(np.max(np.abs(onnx_probe - ref)))
    allowed_diff = ONNX_ATOL + ONNX_RTOL * float(np.max(np.abs(ref)))
    progress(f"export: onnx fp32 vs torch on {len(probe)} pairs: max abs diff {max_abs_diff:.2e} "
             f"(allowed {allowed_diff:.1e})")

    n_q = test["query"].nunique()
    backends: dict[str, dict[str, Any]] = {}
    for name, scorer in scorers.items():
        t0 = time.perf_counter()
        scores = score_per_query(scorer, test)
        ndcg = ndcg_at_10(test, scores)
        latency = latency_ms_per_pair(scorer, test.head(latency_rows))
        backends[name] = {"ndcg_at_10": ndcg, "latency_ms_per_pair": latency,
                          "size_bytes": (dirs[name] / ONNX_FILE).stat().st_size if name in dirs else None}
        progress(f"export: {name:<9} NDCG@10 {ndcg:.4f} on {n_q} queries / {len(test)} pairs "
                 f"({time.perf_counter() - t0:.1f}s), {latency:.3f} ms/pair")
    base = backends["torch"]["ndcg_at_10"]
    accepted, refused = [], {}
    for name in ONNX_BACKENDS:
        entry = backends[name]
        entry["ndcg_delta"] = entry["ndcg_at_10"] - base
        entry["speedup_vs_torch"] = backends["torch"]["latency_ms_per_pair"] / max(entry["latency_ms_per_pair"], 1e-9)
        reason = None
        if not (abs(entry["ndcg_delta"]) <= tolerance):  # also refuses NaN
            reason = (f"NDCG@10 {entry['ndcg_at_10']:.4f} vs torch {base:.4f}: |delta| "
                      f"{abs(entry['ndcg_delta']):.4f} exceeds the tolerance {tolerance:g}")
        elif name == "onnx" and max_abs_diff > allowed_diff:
            reason = f"fp32 logits differ from torch by up to {max_abs_diff:.2e} (allowed {allowed_diff:.1e})"
        entry["accepted"] = reason is None
        if reason:
            refused[name] = reason
            shutil.rmtree(dirs[name], ignore_errors=True)
            progress(f"export: REFUSED {name}: {reason}")
        else:
            accepted.append(name)
            meta_path = dirs[name] / META_FILE
            meta = json.loads(meta_path.read_text())
            meta.update({k: entry[k] for k in ("ndcg_at_10", "ndcg_delta", "latency_ms_per_pair")})
            meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    status = "exported" if len(accepted) == len(ONNX_BACKENDS) else ("partial" if accepted else "refused")
    return {"version": version, "status": status, "accepted": accepted, "refused": refused,
            "tolerance": tolerance, "queries": int(n_q), "pairs": int(len(test)),
            "onnx_max_abs_diff": max_abs_diff, "opset": OPSET, "backends": backends,
            "seconds": round(time.perf_counter() - t_start, 1)}


# ---- the registered version ------------------------------------------------------------------

def _logged_report(settings: Settings, run_id: str, work: Path) -> dict | None:
    import mlflow

    work.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{EXPORT_ARTIFACT_DIR}/{REPORT_FILE}",
                                                    dst_path=str(work), tracking_uri=settings.mlflow_tracking_uri)
    except Exception:  # no report logged (never exported, or the run is gone)
        return None
    return json.loads(Path(local).read_text())


def export(settings: Settings, storage: Storage, version: str | int = "champion", *, force: bool = False,
           tolerance: float | None = None, max_queries: int | None = None, workdir: str | None = None,
           progress: Progress = print) -> dict:
    """Export a registered version (number or alias) and log the result to its MLflow run.

    Works in ``workdir`` (kept) or a temporary folder (removed afterwards)."""
    from shoprank.registry import Registry

    registry = Registry(settings, storage)
    number = registry.resolve(str(version))
    mv = registry.version(number)
    if not mv.run_id:
        raise ExportError(f"version {number} of {registry.name!r} has no MLflow run to log the export to")
    work = Path(workdir or tempfile.mkdtemp(prefix=f"shoprank-export-v{number}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _export_version(settings, storage, registry, number, mv, work, force=force, tolerance=tolerance,
                               max_queries=max_queries, progress=progress)
    finally:  # the weights and ONNX files are in MLflow now (or refused): ~200 MB off the worker
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _export_version(settings: Settings, storage: Storage, registry, number: int, mv, work: Path, *, force: bool,
                    tolerance: float | None, max_queries: int | None, progress: Progress) -> dict:
    from shoprank.datasets import load_split
    from shoprank.mlflow_model import download_weights

    tags = dict(mv.tags)
    if not force and tags.get("export.status"):
        report = _logged_report(settings, mv.run_id, work / "logged")
        if report is not None:
            progress(f"version {number} was already exported (status {tags['export.status']}, backends "
                     f"{tags.get('export.backends') or 'none'}); reusing it (--force re-exports)")
            return {**report, "reused": True}
    tolerance = settings.export_max_ndcg_delta if tolerance is None else float(tolerance)
    snapshot = tags.get("data_snapshot")
    if not snapshot:
        raise ExportError(f"version {number} has no data_snapshot tag: cannot find its test split")
    cap = eval_queries_cap() if max_queries is None else max_queries
    test = sample_queries(load_split(storage, snapshot, "test"), cap, seed=settings.seed)
    progress(f"export: version {number} (run {mv.run_id}), test split of {snapshot}: {test['query'].nunique()} "
             f"queries, {len(test)} pairs; tolerance {tolerance:g}")
    (work / "weights").mkdir(exist_ok=True)
    weights = download_weights(settings, f"models:/{registry.name}/{number}", str(work / "weights"))
    report = export_model_dir(weights, work / "out", test, tolerance=tolerance, version=number, progress=progress)
    report.update({"snapshot": snapshot, "run_id": mv.run_id, "model": registry.name, "reused": False})

    client = registry.client
    for name in report["accepted"]:
        progress(f"export: logging {EXPORT_ARTIFACT_DIR}/{name}/ to run {mv.run_id} ...")
        client.log_artifacts(mv.run_id, str(work / "out" / name), f"{EXPORT_ARTIFACT_DIR}/{name}")
    (work / "out" / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    client.log_artifact(mv.run_id, str(work / "out" / REPORT_FILE), EXPORT_ARTIFACT_DIR)
    for name, entry in report["backends"].items():
        for key in ("ndcg_at_10", "latency_ms_per_pair", "ndcg_delta"):
            value = entry.get(key)
            if value is not None and value == value:
                client.log_metric(mv.run_id, f"export_{metric_key(name)}_{key}", float(value))
    registry.set_tags(number, {
        "export.status": report["status"], "export.backends": ",".join(report["accepted"]),
        "export.refused": "; ".join(f"{k}: {v}" for k, v in report["refused"].items())})
    client.set_tag(mv.run_id, "export.tolerance", str(tolerance))  # the whole report: export/report.json
    progress(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [f"export of version {report.get('version')}: {report['status']} "
             f"(tolerance {report['tolerance']:g} on NDCG@10, {report['queries']} test queries)",
             f"  {'backend':<10} {'NDCG@10':>8} {'delta':>8} {'ms/pair':>8} {'speedup':>8}  verdict"]
    for name, e in report["backends"].items():
        verdict = "reference" if name == "torch" else ("logged" if e.get("accepted") else
                                                       "REFUSED: " + report["refused"].get(name, ""))
        delta = f"{e['ndcg_delta']:+.4f}" if "ndcg_delta" in e else ""
        speed = f"{e['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in e else ""
        lines.append(f"  {name:<10} {e['ndcg_at_10']:>8.4f} {delta:>8} {e['latency_ms_per_pair']:>8.3f} "
                     f"{speed:>8}  {verdict}")
    return "\n".join(lines)
