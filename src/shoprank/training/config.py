"""``TrainConfig``: every knob of a training run, serialisable to/from JSON.

The Airflow form, the CLI and tests all produce one of these; the training subprocess reads it
from ``--config-json``.  Defaults for ``base_model``, ``max_length``, ``seed`` and ``num_threads``
(``SHOPRANK_TRAIN_THREADS``) come from :class:`shoprank.config.Settings` when built with
:meth:`TrainConfig.from_settings`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from shoprank.config import DEFAULT_BASE_MODEL, Settings

LOSSES = ("pointwise", "pairwise", "listwise")
DEFAULT_LOSS = "listwise"  # chosen by validation figures: bench/README.md "Ranking recipe"
FUSIONS = ("auto", "off")
# Lightning precision names the form offers; None (or "auto") picks bf16/16-mixed on CUDA, 32 on CPU
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


class TrainConfigError(ValueError):
    """A training option is missing or invalid; the message names the option."""


@dataclass
class TrainConfig:
    """Options of one training run.

    Data comes either from a snapshot in S3 (``snapshot`` -> ``datasets/<snapshot>/{train,val,
    test}.parquet``) or from local parquet files (``train_path`` / ``val_path`` / ``test_path``),
    the latter mainly for tests.  Without a validation split, ``val_fraction`` of the training
    *queries* (never single rows) is held out.
    """

    # model
    base_model: str = DEFAULT_BASE_MODEL
    init_from: str | None = None  # warm start: local HF model dir (weights only, fresh optimizer)
    max_length: int = 64
    # optimisation
    epochs: int = 3
    max_steps: int = -1  # -1: run `epochs` epochs
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 32  # pairs per batch (listwise: queries_per_batch = batch_size // list_size)
    eval_batch_size: int = 64
    # "pointwise" (BCE vs grade/3), "listwise" (softmax cross-entropy) or "pairwise" (RankNet)
    loss: str = "pointwise"  # library default; the train form and the daily update use DEFAULT_LOSS
    list_size: int = 16  # listwise: candidates per query per step (sampled, keeps a relevant one)
    gradient_clip_val: float | None = 1.0
    early_stopping_patience: int = 2  # validations without val_ndcg@10 improvement; 0 disables
    # lexical fusion (shoprank.fusion): "auto" fits cross-encoder + BM25 weights on the
    # validation split and keeps the best of fused / cross-encoder / BM25; "off": cross-encoder
    fusion: str = "auto"
    lexical_stats_path: str | None = None  # local lexical.json; default: the snapshot's
    seed: int = 42
    # hardware
    accelerator: str = "auto"  # auto | cpu | gpu | cuda
    devices: int = 1  # per node; under torchrun taken from LOCAL_WORLD_SIZE
    num_nodes: int = 1
    precision: str | None = None  # None / "auto": bf16-mixed/16-mixed on CUDA, 32-true on CPU
    # multi-node launch (read by the launcher, not by the training processes; env fallbacks
    # SHOPRANK_RDZV_ENDPOINT / SHOPRANK_RDZV_ID / SHOPRANK_NODE_RANK, see run.launch_options)
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous, reachable from every node
    rdzv_id: str | None = None  # same on every node of one job; default: derived from run_key
    node_rank: int | None = None  # optional with c10d (ranks are assigned at rendezvous)
    num_threads: int | None = None  # torch intra-op threads per process; None: worker's cores / local ranks
    num_workers: int = 0  # DataLoader workers (tokenisation is done up front, 0 is usually right)
    # validation / checkpoints
    val_check_interval: float | int | None = None  # None/1.0: once per epoch; int: every N steps
    checkpoint_every_n_steps: int = 200  # mid-epoch last.ckpt (uploaded to S3) every N steps
    checkpoint_every_minutes: float | None = None  # instead: every N minutes (fast GPUs, big models)
    log_every_n_steps: int = 20  # progress line + logger step metrics
    run_key: str | None = None  # S3 checkpoints go to checkpoints/<run_key>/; needed for resume
    s3_checkpoints: bool = True  # mirror last.ckpt/best.ckpt to S3 (needs run_key)
    resume: bool = True  # continue from checkpoints/<run_key>/last.ckpt when it exists
    # a finished run re-exports from best.ckpt, never resumes: its last.ckpt (weights + optimizer
    # state, ~270 MB for MiniLM) is deleted from S3 unless kept here (or there is no best.ckpt)
    keep_last_checkpoint: bool = False
    checkpoint_dir: str | None = None  # local dir; default <tmp>/shoprank/checkpoints/<run_key>
    # data
    snapshot: str | None = None
    train_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    val_fraction: float = 0.1
    # outputs
    output_dir: str = "model"  # save_pretrained target (model + tokenizer)
    result_json: str | None = None  # JSON result (metrics, steps, timings); rank 0 only
    # tracking (optional; the caller owns the MLflow run)
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI

    def __post_init__(self) -> None:
        self.validate()

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"unknown training options {unknown}; valid options: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise TrainConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise TrainConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(values)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> "TrainConfig":
        """Defaults from the product settings (base model, max length, seed, threads), then overrides.

        ``num_threads=None`` (or ``""``) in ``overrides`` keeps the setting's default
        (``SHOPRANK_TRAIN_THREADS``; unset: the worker's cores / local ranks).
        """
        values: dict[str, Any] = {
            "base_model": settings.base_model,
            "max_length": settings.max_length,
            "seed": settings.seed,
            "mlflow_tracking_uri": settings.mlflow_tracking_uri,
            "num_threads": getattr(settings, "train_threads", None),
        }
        if overrides.get("num_threads") in (None, ""):  # a blank form field keeps SHOPRANK_TRAIN_THREADS
            overrides = {k: v for k, v in overrides.items() if k != "num_threads"}
        values.update(overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        return path

    # ---- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise TrainConfigError(msg)

        need(self.loss in LOSSES, f"loss={self.loss!r}: choose one of {LOSSES}")
        need(self.fusion in FUSIONS, f"fusion={self.fusion!r}: choose one of {FUSIONS}")
        if self.precision in ("", "auto"):
            self.precision = None
        need(self.precision is None or str(self.precision) in PRECISIONS,
             f"precision={self.precision!r}: choose 'auto' or one of {PRECISIONS}")
        need(self.accelerator in ACCELERATORS, f"accelerator={self.accelerator!r}: choose one of {ACCELERATORS}")
        if self.node_rank is not None:
            need(0 <= self.node_rank < self.num_nodes,
                 f"node_rank={self.node_rank}: must be in [0, num_nodes={self.num_nodes})")
        if self.rdzv_endpoint:
            need(_is_host_port(self.rdzv_endpoint),
                 f"rdzv_endpoint={self.rdzv_endpoint!r}: expected host:port (e.g. 10.0.0.5:29400)")
        need(self.epochs >= 1, f"epochs={self.epochs}: must be >= 1")
        need(self.max_steps == -1 or self.max_steps >= 1, f"max_steps={self.max_steps}: -1 or >= 1")
        need(self.lr > 0, f"lr={self.lr}: must be > 0")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        need(self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1")
        need(8 <= self.max_length <= 512, f"max_length={self.max_length}: must be in [8, 512]")
        need(self.list_size >= 2, f"list_size={self.list_size}: must be >= 2")
        need(self.devices >= 1 and self.num_nodes >= 1, "devices and num_nodes must be >= 1")
        if isinstance(self.num_threads, str):  # from a form or JSON written by hand
            raw = self.num_threads.strip()
            need(raw == "" or raw.isdigit(), f"num_threads={self.num_threads!r}: must be >= 1 (or empty for the "
                                              "worker's cores)")
            self.num_threads = int(raw) if raw else None
        if self.num_threads == 0:
            self.num_threads = None  # 0 / blank: the worker's cores
        need(self.num_threads is None or (isinstance(self.num_threads, int) and self.num_threads >= 1),
             f"num_threads={self.num_threads!r}: must be >= 1 (or empty for the worker's cores)")
        need(self.checkpoint_every_n_steps >= 0, "checkpoint_every_n_steps must be >= 0 (0 disables)")
        if self.checkpoint_every_minutes is not None:
            need(self.checkpoint_every_minutes > 0, "checkpoint_every_minutes must be > 0")
        need(self.log_every_n_steps >= 1, "log_every_n_steps must be >= 1")
        need(0 < self.val_fraction < 1, f"val_fraction={self.val_fraction}: must be in (0, 1)")
        need(self.early_stopping_patience >= 0, "early_stopping_patience must be >= 0")
        if self.val_check_interval is not None:
            need(self.val_check_interval > 0, "val_check_interval must be > 0")
        if self.snapshot is None and self.train_path is None:
            # allowed at construction (the caller may pass DataFrames to train()); checked at load
            pass
        if self.snapshot is not None and self.train_path is not None:
            raise TrainConfigError("give either snapshot (S3) or train_path (local parquet), not both")

    @property
    def global_batch_size(self) -> int:
        """Pairs per optimizer step over all processes (per-device batch x devices x nodes)."""
        return self.batch_size * self.devices * self.num_nodes

    @property
    def queries_per_batch(self) -> int:
        """Listwise: how many query lists make one batch (at least one)."""
        return max(1, self.batch_size // self.list_size)


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
