"""Training of the cross-encoder ranker (Lightning), run as a subprocess / under torchrun.

Public API::

    TrainConfig                      options of a run (JSON round-trip)
    train(config, ...) -> TrainResult
    build_command(config_path, nproc_per_node=1, nnodes=1, ...) -> argv for subprocess/torchrun
    launch_options(config) -> build_command kwargs (config, then SHOPRANK_RDZV_* env)
    RankingDataModule, CrossEncoderModule, pointwise_loss, listwise_loss, split_by_query

Heavy imports (torch, lightning, transformers) happen on first attribute access, so importing
``shoprank.training`` (e.g. in a DAG file) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from shoprank.training.config import LOSSES, TrainConfig, TrainConfigError

_LAZY = {
    "train": "shoprank.training.run",
    "TrainResult": "shoprank.training.run",
    "build_command": "shoprank.training.run",
    "launch_options": "shoprank.training.run",
    "build_trainer": "shoprank.training.run",
    "load_splits": "shoprank.training.run",
    "resolve_precision": "shoprank.training.run",
    "main": "shoprank.training.run",
    "RankingDataModule": "shoprank.training.data",
    "PairDataset": "shoprank.training.data",
    "PairCollator": "shoprank.training.data",
    "ResumableBatchSampler": "shoprank.training.data",
    "split_by_query": "shoprank.training.data",
    "DataError": "shoprank.training.data",
    "CrossEncoderModule": "shoprank.training.module",
    "pointwise_loss": "shoprank.training.module",
    "listwise_loss": "shoprank.training.module",
    "VAL_METRIC": "shoprank.training.module",
    "ProgressLogger": "shoprank.training.callbacks",
    "S3MirrorCheckpointIO": "shoprank.training.callbacks",
    "RunMLFlowLogger": "shoprank.training.callbacks",
}

__all__ = ["LOSSES", "TrainConfig", "TrainConfigError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoprank.training' has no attribute {name!r}")
