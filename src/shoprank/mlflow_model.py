"""The cross-encoder as an MLflow pyfunc model.

Input: a DataFrame with columns ``query`` and ``text`` (product text, see
``shoprank.data.contracts.product_text``).  Output: one relevance score per row (higher is
better).  Loads with ``mlflow.pyfunc.load_model("models:/<name>@champion")``; the weights
travel as the ``model_dir`` artifact (Hugging Face format).

Code dependency: the ``shoprank`` package is shipped *inside* the model (``code_paths``: MLflow
copies it to the model's ``code/shoprank/`` and puts ``code/`` on ``sys.path`` when loading),
and ``requirements.txt`` lists only third-party packages pinned to the versions it was logged
with.  There is no bare ``shoprank`` requirement: shoprank is not on PyPI, so a package index
could satisfy that name with someone else's package.  In a process that already imports
shoprank (the API, the DAG tasks) the installed copy is the one used.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature


class CrossEncoderPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from shoprank.evaluation.scorers import CrossEncoderScorer
        from shoprank.fusion import with_fusion

        model_dir = context.artifacts["model_dir"]
        self.scorer = with_fusion(CrossEncoderScorer.from_dir(model_dir), model_dir)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        missing = [c for c in ("query", "text") if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks columns {missing}: pass a DataFrame with 'query' and 'text'")
        return self.scorer(model_input)


def log_cross_encoder(run_id: str, model_dir: Path, name: str = "model") -> str:
    """Log ``model_dir`` (save_pretrained output) as a pyfunc model in ``run_id``; return its URI."""
    example = pd.DataFrame({"query": ["red running shoes"], "text": ["Acme Runner | Shoes > Running | red"]})
    signature = infer_signature(example, np.array([0.0], dtype=np.float32))
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=CrossEncoderPyfunc(),
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
            code_paths=[str(package_dir())],
        )
    return info.model_uri


# third-party packages the shipped code imports to load and score (shoprank.evaluation pulls in
# torchmetrics; tokenizers / huggingface_hub come with transformers)
MODEL_REQUIREMENTS = ("torch", "transformers", "torchmetrics", "numpy", "pandas", "mlflow")


def package_dir() -> Path:
    """The directory of the ``shoprank`` package this process runs (shipped with each model)."""
    import shoprank

    return Path(shoprank.__file__).resolve().parent


def _requirements() -> list[str]:
    """Exact pins (``name==installed version``) of :data:`MODEL_REQUIREMENTS`; never ``shoprank``."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in MODEL_REQUIREMENTS]


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` into a temporary folder that is removed once it has loaded.

    :class:`CrossEncoderPyfunc` reads the weights, tokenizer and fusion into memory when it
    loads, so the downloaded copy is not needed afterwards; left to MLflow, every load would
    leave ~90 MB in the worker's temp folder."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="shoprank-model-") as tmp:
        return mlflow.pyfunc.load_model(model_uri, dst_path=tmp)


def load_scorer(model_uri: str):
    """(score_fn, ms_per_pair probe): load a packaged model and time it on a small batch."""
    model = load_pyfunc(model_uri)

    def score(df: pd.DataFrame) -> np.ndarray:
        return np.asarray(model.predict(df[["query", "text"]]), dtype=np.float64)

    return score


def latency_ms_per_pair(score_fn, sample: pd.DataFrame, repeats: int = 3) -> float:
    """Median wall time per pair of scoring ``sample`` (after one warm-up call)."""
    score_fn(sample.head(8))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score_fn(sample)
        times.append((time.perf_counter() - t0) * 1000 / max(len(sample), 1))
    return float(np.median(times))


def download_weights(settings, model_uri: str, workdir: str) -> str:
    """Download a registered model's Hugging Face weights directory (for warm starts)."""
    from pathlib import Path

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=workdir))
    found = [p.parent for p in local.rglob("config.json") if (p.parent / "shoprank_training.json").exists()
             or p.parent.name == "model_dir"]
    if not found:
        raise FileNotFoundError(f"{model_uri} holds no Hugging Face weights directory (looked in {local})")
    return str(found[0])
