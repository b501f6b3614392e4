"""Scorers for serving: one interface over three backends.

* ``torch``     - the registered model's Hugging Face weights, eager PyTorch (always available);
* ``onnx``      - the fp32 ONNX export (``shoprank export``), onnxruntime on CPU;
* ``onnx-int8`` - the dynamically quantized int8 ONNX export (the default: fastest on CPU).

All three reuse :class:`shoprank.evaluation.CrossEncoderScorer` for tokenisation and batching
(pairs sorted by length, tight padding); the ONNX ones only swap the model for an onnxruntime
session.  A model trained with a lexical fusion (``shoprank_fusion.json`` beside its
weights, see :mod:`shoprank.fusion`) is scored with it in every backend.  ``score(queries, texts)`` returns one float32 logit per pair (higher = better).

An export lives in a directory holding ``model.onnx``, the tokenizer files and
``export_meta.json`` (max_length, input names, source version).  In MLflow it is logged under
the version's run as ``export/onnx/`` and ``export/onnx-int8/`` (see ``serving.export``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from shoprank.config import Settings

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("onnx-int8", "onnx", "torch")
ONNX_BACKENDS: tuple[str, ...] = ("onnx-int8", "onnx")
ONNX_FILE = "model.onnx"
META_FILE = "export_meta.json"
EXPORT_ARTIFACT_DIR = "export"  # under the version's MLflow run: export/<backend>/, export/report.json


class ScorerError(RuntimeError):
    """A scorer cannot be loaded (unknown backend, missing files).  The message says what to do."""


@runtime_checkable
class Scorer(Protocol):
    backend: str
    version: str | None
    max_length: int

    def score(self, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """One float32 relevance score per (query, text) pair."""
        ...


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ScorerError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


class _CrossEncoderBackedScorer:
    """Shared ``score``: wraps a ``CrossEncoderScorer`` (DataFrame in, scores out)."""

    backend: str
    version: str | None
    source: str

    def __init__(self, inner, backend: str, version: str | None, source: str):
        self._inner = inner
        # one call at a time: a fast tokenizer raises "Already borrowed" when two threads change
        # its truncation settings at once, and each call already uses every core
        self._lock = threading.Lock()
        self.backend = backend
        self.version = version
        self.source = source
        self.max_length = int(inner.max_length)

    def score(self, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        import pandas as pd

        queries, texts = list(queries), list(texts)
        if len(queries) != len(texts):
            raise ValueError(f"got {len(queries)} queries but {len(texts)} texts: pass one query per text")
        if not queries:
            return np.empty(0, dtype=np.float32)
        frame = pd.DataFrame({"query": queries, "text": texts})
        with self._lock:
            return np.asarray(self._inner(frame), dtype=np.float32)

    def __call__(self, df) -> np.ndarray:
        """Evaluation-style call (``ScoreFn``): a DataFrame with ``query`` and ``text``."""
        return self.score(df["query"].astype(str).tolist(), df["text"].fillna("").astype(str).tolist())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} version={self.version} source={self.source}>"


class TorchScorer(_CrossEncoderBackedScorer):
    """Eager PyTorch from a ``save_pretrained`` directory (the training output)."""

    def __init__(self, model_dir: str | Path, version: str | None = None, batch_size: int = 64,
                 device: str | None = None):
        from shoprank.evaluation import CrossEncoderScorer
        from shoprank.fusion import with_fusion

        inner = with_fusion(CrossEncoderScorer.from_dir(model_dir, batch_size=batch_size, device=device), model_dir)
        super().__init__(inner, "torch", version, str(model_dir))


class _OrtModel:
    """Quacks like a HF sequence-classification model for ``CrossEncoderScorer``."""

    def __init__(self, session):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def to(self, _device):
        return self

    def eval(self):
        return self

    def __call__(self, **batch):
        import torch

        ref = batch["input_ids"]
        feed = {name: (batch[name] if name in batch else torch.zeros_like(ref)).numpy()
                for name in self.input_names}
        logits = self.session.run(None, feed)[0]
        return SimpleNamespace(logits=torch.from_numpy(np.asarray(logits, dtype=np.float32)))


def ort_session(path: str | Path, threads: int | None = None):
    """CPU onnxruntime session.  ``threads`` (or SHOPRANK_ORT_THREADS) caps intra-op threads;
    idle threads sleep instead of spinning unless SHOPRANK_ORT_SPINNING=1 (spinning only pays
    on dedicated cores; on shared ones it steals CPU from the other threads and processes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    from shoprank.config import get_settings

    serving = get_settings().serving
    threads = threads if threads is not None else serving.ort_threads
    if threads > 0:
        opts.intra_op_num_threads = threads
    spinning = serving.ort_spinning
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxScorer(_CrossEncoderBackedScorer):
    """An exported ONNX model (fp32 or int8) + its tokenizer, on onnxruntime (CPU)."""

    def __init__(self, export_dir: str | Path, backend: str, version: str | None = None, batch_size: int = 64,
                 threads: int | None = None):
        from transformers import AutoTokenizer

        from shoprank.evaluation import CrossEncoderScorer

        export_dir = Path(export_dir)
        meta_path = export_dir / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.meta = meta
        model = _OrtModel(ort_session(export_dir / ONNX_FILE, threads))
        tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
        from shoprank.fusion import with_fusion

        inner = with_fusion(CrossEncoderScorer(model, tokenizer, max_length=int(meta.get("max_length", 64)),
                                               batch_size=batch_size, device="cpu"), export_dir)
        super().__init__(inner, backend, version if version is not None else meta.get("version"), str(export_dir))


def _find_export_dir(model_dir: Path, backend: str) -> Path | None:
    for cand in (model_dir, model_dir / backend, model_dir / EXPORT_ARTIFACT_DIR / backend):
        if (cand / ONNX_FILE).is_file():
            meta_path = cand / META_FILE
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            if cand == model_dir and meta.get("backend") not in (None, backend):
                continue  # a directory holding the other ONNX backend
            return cand
    return None


def _find_weights_dir(model_dir: Path) -> Path | None:
    if (model_dir / "config.json").is_file():
        return model_dir
    found = sorted(p.parent for p in model_dir.rglob("config.json"))
    return found[0] if found else None


def load_dir_scorer(model_dir: str | Path, backend: str = "onnx-int8", *, version: str | None = None,
                    batch_size: int = 64, threads: int | None = None) -> Scorer:
    """A scorer from a local directory.

    ``torch``: a ``save_pretrained`` directory (or one containing it).  ONNX backends: an
    export directory (``model.onnx`` + tokenizer + ``export_meta.json``), or a directory with
    ``<backend>/`` or ``export/<backend>/`` below it.  No fallback here: a missing export is an error.
    """
    check_backend(backend)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ScorerError(f"{model_dir} is not a directory")
    if backend == "torch":
        weights = _find_weights_dir(model_dir)
        if weights is None:
            raise ScorerError(f"{model_dir} holds no Hugging Face model (no config.json below it)")
        return TorchScorer(weights, version=version, batch_size=batch_size)
    found = _find_export_dir(model_dir, backend)
    if found is None:
        raise ScorerError(f"no {backend} export under {model_dir} (looked for {ONNX_FILE} in ., {backend}/, "
                          f"{EXPORT_ARTIFACT_DIR}/{backend}/): run `shoprank export` or use backend 'torch'")
    return OnnxScorer(found, backend, version=version, batch_size=batch_size, threads=threads)


def exported_backends(settings: Settings, version: str) -> tuple[list[str], str]:
    """(ONNX backends logged for a version, why others are missing) from its ``export.*`` tags."""
    from shoprank.registry import Registry

    tags = Registry(settings).tags(version)
    backends = [b for b in tags.get("export.backends", "").split(",") if b]
    status = tags.get("export.status")
    if status is None:
        why = "the version was never exported (run `shoprank export --version %s`)" % version
    else:
        why = tags.get("export.refused") or f"export status {status!r}"
    return backends, why


def fallback_chain(backend: str) -> tuple[str, ...]:
    """Backends tried, in order, for a requested one: int8 -> fp32 ONNX -> torch."""
    check_backend(backend)
    return BACKENDS[BACKENDS.index(backend):]


def load_version_scorer(settings: Settings, version: str = "champion", backend: str = "onnx-int8",
                        workdir: str | None = None, *, batch_size: int = 64, threads: int | None = None) -> Scorer:
    """A scorer for a registered version (number or alias) of ``settings.registered_model``.

    Downloads the artifacts from MLflow into ``workdir`` (a temp dir by default).  When the
    requested ONNX backend was not exported, was refused or does not load, it falls back along
    :func:`fallback_chain`: ``onnx-int8`` -> the fp32 ``onnx`` export when the version has one
    -> ``torch``, with a warning naming the reason; the returned scorer's ``.backend`` says what
    was loaded.  An unknown version or alias raises :class:`shoprank.registry.RegistryError`
    listing the known versions.
    """
    import mlflow

    from shoprank.mlflow_model import download_weights
    from shoprank.registry import Registry

    chain = fallback_chain(backend)
    registry = Registry(settings)
    number = registry.resolve(version)
    mv = registry.version(number)
    work = Path(workdir or tempfile.mkdtemp(prefix=f"shoprank-v{number}-"))
    work.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    problems: list[str] = []
    if chain[0] != "torch":
        backends, why = exported_backends(settings, number)
        for candidate in chain[:-1]:
            if candidate not in backends or not mv.run_id:
                problems.append(f"{candidate}: {why if candidate not in backends else 'the version has no run'}")
                continue
            try:
                target = work / candidate
                target.mkdir(parents=True, exist_ok=True)
                local = mlflow.artifacts.download_artifacts(
                    run_id=mv.run_id, artifact_path=f"{EXPORT_ARTIFACT_DIR}/{candidate}", dst_path=str(target),
                    tracking_uri=settings.mlflow_tracking_uri)
                found = _find_export_dir(Path(local), candidate)
                if found is None:
                    problems.append(f"{candidate}: artifact {EXPORT_ARTIFACT_DIR}/{candidate}/{ONNX_FILE} is "
                                    f"missing from run {mv.run_id}")
                    continue
                scorer = OnnxScorer(found, candidate, version=number, batch_size=batch_size, threads=threads)
            except Exception as exc:  # a corrupt or unreadable export: try the next backend
                problems.append(f"{candidate}: could not be loaded ({exc})")
                continue
            if problems:
                log.warning("version %s has no usable %s export (%s); falling back to its %s export",
                            number, backend, "; ".join(problems), candidate)
            else:
                log.info("version %s: loaded %s export from run %s", number, candidate, mv.run_id)
            return scorer
        log.warning("version %s has no usable %s export (%s); falling back to torch", number, backend,
                    "; ".join(problems))
    (work / "torch").mkdir(parents=True, exist_ok=True)
    weights = download_weights(settings, f"models:/{registry.name}/{number}", str(work / "torch"))
    return TorchScorer(weights, version=number, batch_size=batch_size)
