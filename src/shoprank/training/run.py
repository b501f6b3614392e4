"""Training entrypoint: ``python -m shoprank.training --config-json PATH``.

This is what the Airflow task runs, as a **subprocess** (one process) or under ``torchrun``
(several processes / nodes; see :func:`build_command`).  Never call :func:`train` with
several devices inside the Airflow task process itself: Lightning's ``ddp`` launcher would
re-execute the ``airflow`` command line.

What a run does:

1. reads the snapshot (``datasets/<snapshot>/{train,val,test}.parquet`` via
   :class:`shoprank.storage.Storage`) or local parquet files;
2. looks for ``checkpoints/<run_key>/last.ckpt`` in S3; when present it is downloaded and the
   fit continues from it (optimizer, scheduler, loop counters, early-stopping state and the
   position inside the epoch), otherwise a fresh run starts (from ``base_model`` or, for a warm
   start, from the weights in ``init_from``);
3. trains with Lightning: validation NDCG@10 per epoch (or every ``val_check_interval``),
   early stopping on it, ``last.ckpt`` every ``checkpoint_every_n_steps`` steps and
   ``best.ckpt`` on improvement, both mirrored to S3 by rank 0;
4. rank 0 saves the best weights with ``save_pretrained`` (model + tokenizer + a
   ``shoprank_training.json`` with max_length etc.) into ``output_dir`` and writes the JSON
   result (:class:`TrainResult`) to ``result_json``.

MLflow is optional and owned by the caller: pass ``loggers=[...]`` to :func:`train`, or set
``mlflow_run_id`` (+ ``MLFLOW_TRACKING_URI``) so rank 0 logs step/epoch metrics into that run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from shoprank.storage import RESULT_OBJECT
from shoprank.training.config import TrainConfig, TrainConfigError

log = logging.getLogger("shoprank.training")

SPLITS = ("train", "val", "test")


class TrainingTerminated(RuntimeError):
    """The process got SIGTERM; ``last.ckpt`` was saved (and mirrored) so a rerun resumes."""


# ---------------------------------------------------------------------------------------
# environment helpers
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Process placement as set by torchrun (all zeros/ones for a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> "DistEnv":
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )

    @property
    def is_torchrun(self) -> bool:
        return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (cgroup cpusets, ``taskset``,
    Kubernetes CPU pinning), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(num_threads: int | None, local_world_size: int = 1) -> int:
    """Intra-op threads per process: ``num_threads`` (``SHOPRANK_TRAIN_THREADS``) when set,
    else the worker's cores (:func:`available_cores`) divided among the processes on this node."""
    import torch

    n = num_threads or max(1, available_cores() // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def resolve_precision(precision: str | None, accelerator: str = "auto") -> str:
    """``precision`` if given; else bf16-mixed (or 16-mixed) on CUDA and 32-true on CPU."""
    if precision:
        return precision
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def default_checkpoint_dir(run_key: str | None) -> Path:
    """Same path on every worker for a run key, so a restarted run finds its local state."""
    safe = (run_key or f"adhoc-{os.getpid()}").replace("/", "_")
    return Path(tempfile.gettempdir()) / "shoprank" / "checkpoints" / safe


def build_command(
    config_path: str | Path,
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "shoprank",
    node_rank: int | None = None,
    max_restarts: int = 0,
    python: str = sys.executable,
) -> list[str]:
    """argv for running training as a subprocess: plain Python for one process, else torchrun.

    One node: ``torchrun --standalone --nproc_per_node=N``.  Several nodes: the *same*
    command on every node, ``--nnodes=M --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT
    --rdzv_id=ID`` (``node_rank`` is optional with c10d: ranks are assigned at rendezvous;
    give it to pin rank 0, the one that logs and checkpoints, to a node).
    """
    entry = ["-m", "shoprank.training", "--config-json", str(config_path)]
    if nproc_per_node < 1 or nnodes < 1:
        raise TrainConfigError(f"nproc_per_node={nproc_per_node} and nnodes={nnodes} must be >= 1")
    if nproc_per_node * nnodes <= 1:
        return [python, *entry]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise TrainConfigError(
                "multi-node training needs rdzv_endpoint (host:port reachable by all nodes): "
                "set it in the config or SHOPRANK_RDZV_ENDPOINT"
            )
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
        if node_rank is not None:
            cmd.append(f"--node_rank={node_rank}")
    else:
        cmd += ["--standalone"]
    if max_restarts:
        cmd.append(f"--max_restarts={max_restarts}")
    return [*cmd, *entry]


def launch_options(config: TrainConfig, environ: Mapping[str, str] | None = None,
                   default_rdzv_id: str | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`build_command` for a config: the config first, then the env.

    Env fallbacks (set them on the worker, e.g. in its compose service or pod spec):
    ``SHOPRANK_RDZV_ENDPOINT`` (host:port), ``SHOPRANK_RDZV_ID``, ``SHOPRANK_NODE_RANK``.
    """
    from shoprank.config import Settings

    worker = Settings.from_env(environ).training  # the settings tree's training group
    node_rank = config.node_rank
    if node_rank is None and worker.node_rank is not None:
        if worker.node_rank >= config.num_nodes:
            raise TrainConfigError(f"SHOPRANK_NODE_RANK={worker.node_rank!r}: must be an integer in "
                                   f"[0, {config.num_nodes})")
        node_rank = worker.node_rank
    rdzv_id = config.rdzv_id or worker.rdzv_id or default_rdzv_id or config.run_key or "shoprank"
    return {
        "nproc_per_node": config.devices,
        "nnodes": config.num_nodes,
        "rdzv_endpoint": config.rdzv_endpoint or worker.rdzv_endpoint or None,
        "rdzv_id": "".join(c if c.isalnum() or c in "-_." else "-" for c in rdzv_id),
        "node_rank": node_rank,
    }


# ---------------------------------------------------------------------------------------
# data loading
# ---------------------------------------------------------------------------------------
def load_splits(config: TrainConfig, storage: Any | None = None) -> dict[str, pd.DataFrame | None]:
    """train (required), val and test (optional) frames from S3 or local parquet."""
    out: dict[str, pd.DataFrame | None] = {}
    if config.snapshot:
        from shoprank.storage import Storage, dataset_prefix

        storage = storage or Storage.from_env()
        prefix = dataset_prefix(config.snapshot)
        for split in SPLITS:
            key = f"{prefix}{split}.parquet"
            if storage.exists(key):
                out[split] = storage.read_parquet(key)
            elif split == "train":
                raise FileNotFoundError(
                    f"snapshot {config.snapshot!r} has no training split: {storage.uri(key)} does not exist"
                )
            else:
                out[split] = None
        return out
    if not config.train_path:
        raise TrainConfigError("no data: set snapshot (S3) or train_path (local parquet)")
    for split in SPLITS:
        path = getattr(config, f"{split}_path")
        if path is None:
            out[split] = None
            continue
        if not Path(path).exists():
            raise FileNotFoundError(f"{split}_path {path} does not exist")
        out[split] = pd.read_parquet(path)
    return out


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run reports (written as JSON by rank 0)."""

    status: str
    run_key: str | None
    best_val_ndcg_at_10: float | None
    val_history: list[dict[str, float]]
    global_step: int
    resumed_from_step: int | None
    epochs_completed: int
    stopped_early: bool
    train_pairs: int
    train_pairs_per_s: float
    timings: dict[str, float]
    model_dir: str | None
    checkpoint_uri: str | None
    world_size: int
    precision: str
    accelerator: str
    config: dict[str, Any] = field(default_factory=dict)
    max_steps: int = -1  # the step cap (-1: none)
    steps_per_epoch: int | None = None  # optimizer steps in one pass over the training split
    epochs_run: float | None = None  # global_step / steps_per_epoch (what the run really saw)
    fusion: dict[str, Any] = field(default_factory=dict)  # shoprank.fusion.Fusion of the exported model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str), encoding="utf-8")
        tmp.replace(path)
        return path


# ---------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------
def _prepare_checkpoints(
    config: TrainConfig, ckpt_dir: Path, storage: Any | None, dist: DistEnv
) -> str | None:
    """Fetch the run's checkpoints; return the ``ckpt_path`` to resume from (or None)."""
    from shoprank.storage import checkpoint_prefix

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if storage is not None:
        prefix = checkpoint_prefix(config.run_key or "")
        if config.resume and storage.exists(prefix + "last.ckpt"):
            resume_dir = ckpt_dir / "resume"
            resume_dir.mkdir(exist_ok=True)
            local = resume_dir / f"last-rank{dist.rank}.ckpt"
            t0 = time.perf_counter()
            storage.download_file(prefix + "last.ckpt", str(local))
            if dist.rank == 0 and storage.exists(prefix + "best.ckpt"):
                storage.download_file(prefix + "best.ckpt", str(ckpt_dir / "best.ckpt"))
            log.info(
                "resuming from %s (%.0f MB, fetched in %.1fs)",
                storage.uri(prefix + "last.ckpt"), local.stat().st_size / 1e6, time.perf_counter() - t0,
            )
            return str(local)
        if dist.rank == 0:  # fresh run: local leftovers of an older run with this key are stale
            for stale in ckpt_dir.glob("*.ckpt"):
                stale.unlink()
        return None
    local_last = ckpt_dir / "last.ckpt"
    if config.resume and local_last.exists():
        log.info("resuming from local checkpoint %s (no S3 mirror for this run)", local_last)
        return str(local_last)
    return None


def _checkpoint_step(path: str) -> int | None:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    except Exception:  # pragma: no cover - unreadable checkpoint is reported by Lightning itself
        return None


# ---------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------
def build_trainer(
    config: TrainConfig,
    ckpt_dir: Path,
    *,
    dist: DistEnv | None = None,
    loggers: Sequence[Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    checkpoint_io: Any | None = None,
):
    """A Lightning Trainer wired with our callbacks. Returns (trainer, best_cb, progress, early_stop)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from shoprank.training.callbacks import ProgressLogger, SaveOnSigterm
    from shoprank.training.module import VAL_METRIC

    dist = dist or DistEnv.from_env()
    devices, num_nodes = config.devices, config.num_nodes
    if dist.is_torchrun:
        devices, num_nodes = dist.local_world_size, max(1, dist.world_size // dist.local_world_size)
        if (devices, num_nodes) != (config.devices, config.num_nodes):
            log.info("torchrun placement: devices=%d num_nodes=%d (config said %d/%d)",
                     devices, num_nodes, config.devices, config.num_nodes)
    distributed = devices * num_nodes > 1
    precision = resolve_precision(config.precision, config.accelerator)

    progress = ProgressLogger(config.log_every_n_steps)
    # best.ckpt only feeds the export (weights): no optimizer state, a third of last.ckpt's size
    # in S3 and on the worker's disk; resuming restores everything from last.ckpt
    best_cb = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="best", monitor=VAL_METRIC, mode="max", save_top_k=1,
        save_last=False, auto_insert_metric_name=False, enable_version_counter=False, save_weights_only=True,
    )
    all_callbacks: list[Any] = [progress, best_cb, SaveOnSigterm(ckpt_dir / "last.ckpt")]
    # every N optimizer steps (or minutes): only last.ckpt (save_top_k=0), what a restart resumes from
    trigger: dict[str, Any] = {}
    if config.checkpoint_every_minutes:
        trigger = {"train_time_interval": timedelta(minutes=config.checkpoint_every_minutes)}
    elif config.checkpoint_every_n_steps > 0:
        trigger = {"every_n_train_steps": config.checkpoint_every_n_steps}
    if trigger:
        all_callbacks.append(
            ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=0, save_last=True, monitor=None,
                            enable_version_counter=False, **trigger)
        )
    early_stop = None
    if config.early_stopping_patience > 0:
        early_stop = EarlyStopping(
            monitor=VAL_METRIC, mode="max", patience=config.early_stopping_patience,
            check_on_train_epoch_end=False, verbose=False,
        )
        all_callbacks.append(early_stop)
    all_callbacks.extend(callbacks or [])

    val_kwargs: dict[str, Any] = {}
    if isinstance(config.val_check_interval, int) and not isinstance(config.val_check_interval, bool):
        val_kwargs = {"val_check_interval": config.val_check_interval, "check_val_every_n_epoch": None}
    elif config.val_check_interval is not None:
        val_kwargs = {"val_check_interval": float(config.val_check_interval)}

    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if distributed else "auto",
        precision=precision,
        max_epochs=config.epochs,
        max_steps=config.max_steps,
        gradient_clip_val=config.gradient_clip_val,
        callbacks=all_callbacks,
        logger=list(loggers) if loggers else False,
        log_every_n_steps=config.log_every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # our samplers shard by rank themselves (and resume)
        default_root_dir=str(ckpt_dir),
        plugins=[checkpoint_io] if checkpoint_io is not None else None,
        **val_kwargs,
    )
    return trainer, best_cb, progress, early_stop


def _export_model(module: Any, tokenizer: Any, best_path: Path | None, output_dir: Path, meta: dict[str, Any]) -> None:
    import torch

    if best_path is not None and best_path.exists():
        ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
        module.load_state_dict(ckpt["state_dict"])
        log.info("exporting best weights from %s (step %s)", best_path, ckpt.get("global_step"))
    else:
        log.info("no best checkpoint: exporting the final weights")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    module.model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    from shoprank.models import TRAINING_META_FILE

    (output_dir / TRAINING_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    *,
    data: dict[str, pd.DataFrame | None] | None = None,
    storage: Any | None = None,
    loggers: Sequence[Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    model: Any | None = None,
    tokenizer: Any | None = None,
) -> TrainResult:
    """Train (or resume) one run; see the module docstring.

    ``data`` (``{"train": df, "val": df | None, "test": df | None}``) bypasses loading from
    S3/parquet; ``model``/``tokenizer`` bypass loading ``base_model`` (tests use a tiny BERT).
    ``storage`` defaults to ``Storage.from_env()`` when S3 is needed (snapshot or checkpoints).
    """
    import lightning as L

    from shoprank.models import load_cross_encoder, load_tokenizer, resolve_base_model
    from shoprank.storage import checkpoint_prefix
    from shoprank.training.data import RankingDataModule
    from shoprank.training.module import VAL_METRIC, CrossEncoderModule

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    dist = DistEnv.from_env()
    threads = configure_threads(config.num_threads, dist.local_world_size if dist.is_torchrun else config.devices)
    L.seed_everything(config.seed, workers=True, verbose=False)
    log.info("training run %s (rank %d/%d, %d threads): %s", config.run_key, dist.rank, dist.world_size, threads,
             json.dumps({k: v for k, v in config.to_dict().items() if v is not None}, sort_keys=True))

    use_s3 = config.s3_checkpoints and bool(config.run_key)
    if config.s3_checkpoints and not config.run_key:
        log.warning("no run_key: checkpoints stay local and a restarted run cannot resume from S3")
    if storage is None and (use_s3 or (data is None and config.snapshot)):
        from shoprank.storage import Storage

        storage = Storage.from_env()

    # ---- data
    t = time.perf_counter()
    frames = data if data is not None else load_splits(config, storage)
    timings["load_data_s"] = time.perf_counter() - t

    # ---- model + tokenizer
    t = time.perf_counter()
    source = config.init_from or config.base_model
    if tokenizer is None:
        tok_source = config.init_from if config.init_from and _has_tokenizer(config.init_from) else config.base_model
        tokenizer = load_tokenizer(tok_source)
    if model is None:
        if config.init_from:
            log.info("warm start from %s (weights only; fresh optimizer and schedule)", resolve_base_model(config.init_from))
        model = load_cross_encoder(source)
    module = CrossEncoderModule(
        model=model, loss=config.loss, lr=config.lr, weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
    )
    datamodule = RankingDataModule(
        frames["train"], frames.get("val"), frames.get("test"), tokenizer=tokenizer,
        max_length=config.max_length, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        loss=config.loss, list_size=config.list_size, seed=config.seed, num_workers=config.num_workers,
        val_fraction=config.val_fraction,
    )
    datamodule.setup("fit")
    timings["setup_s"] = time.perf_counter() - t

    # ---- checkpoints / resume
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else default_checkpoint_dir(config.run_key)
    ckpt_dir = ckpt_dir.expanduser().resolve()
    s3_storage = storage if use_s3 else None
    if s3_storage is not None and config.resume:
        done = _completed_result(config, s3_storage)
        if done is not None:
            return _reexport_completed(config, done, module, tokenizer, ckpt_dir, s3_storage, dist,
                                       datamodule.val_df, storage)
    t = time.perf_counter()
    resume_path = _prepare_checkpoints(config, ckpt_dir, s3_storage, dist)
    resumed_from = _checkpoint_step(resume_path) if resume_path else None
    timings["resume_fetch_s"] = time.perf_counter() - t
    checkpoint_io = None
    if s3_storage is not None:
        from shoprank.training.callbacks import S3MirrorCheckpointIO

        checkpoint_io = S3MirrorCheckpointIO(s3_storage, checkpoint_prefix(config.run_key or ""))

    all_loggers = list(loggers or [])
    if config.mlflow_run_id:
        from shoprank.training.callbacks import RunMLFlowLogger

        all_loggers.append(RunMLFlowLogger(config.mlflow_run_id, tracking_uri=config.mlflow_tracking_uri))

    trainer, best_cb, progress, early_stop = build_trainer(
        config, ckpt_dir, dist=dist, loggers=all_loggers, callbacks=callbacks, checkpoint_io=checkpoint_io
    )

    # ---- fit
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Lightning warns that a plain DataLoader cannot resume mid-epoch; ours does (the
            # datamodule's state records the position and the sampler skips what was trained).
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
    except SIGTERMException:
        raise TrainingTerminated(
            f"terminated by SIGTERM at step {trainer.global_step}; last.ckpt saved"
            + (f" to {s3_storage.uri(checkpoint_prefix(config.run_key or ''))}" if s3_storage is not None else "")
            + ": run again with the same run_key to resume"
        ) from None
    timings["fit_s"] = time.perf_counter() - t
    status = "interrupted" if trainer.interrupted else "ok"

    best_score = best_cb.best_model_score
    best_val = float(best_score) if best_score is not None else None
    if status == "ok" and (not module.val_history or module.val_history[-1]["step"] != trainer.global_step):
        # max_steps ended the run between validations: validate the final weights too, so a
        # short run still reports val_ndcg@10 and the final weights compete for "best"
        t = time.perf_counter()
        log.info("training stopped at step %d between validations: validating the final weights", trainer.global_step)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        final = module.val_history[-1][VAL_METRIC] if module.val_history else None
        if final is not None and (best_val is None or final > best_val):
            best_val = final
            trainer.save_checkpoint(str(ckpt_dir / "best.ckpt"), weights_only=True)  # mirrored to S3 like any best.ckpt
            best_cb.best_model_path = str(ckpt_dir / "best.ckpt")
        timings["final_validation_s"] = time.perf_counter() - t
    result = TrainResult(
        status=status,
        run_key=config.run_key,
        best_val_ndcg_at_10=best_val,
        val_history=[{k.replace("@", "_at_"): v for k, v in h.items()} for h in module.val_history],
        global_step=int(trainer.global_step),
        resumed_from_step=resumed_from,
        epochs_completed=int(trainer.current_epoch),
        stopped_early=bool(early_stop is not None and early_stop.stopped_epoch > 0),
        train_pairs=progress.pairs_seen,
        train_pairs_per_s=round(progress.pairs_per_second, 2),
        timings=timings,
        model_dir=None,
        checkpoint_uri=s3_storage.uri(checkpoint_prefix(config.run_key or "")) if s3_storage is not None else None,
        world_size=int(trainer.world_size),
        precision=str(trainer.precision),
        accelerator=type(trainer.accelerator).__name__,
        config=config.to_dict(),
        max_steps=int(config.max_steps),
    )
    try:
        per_epoch = int(trainer.num_training_batches)
    except (TypeError, ValueError, OverflowError):  # inf for an iterable without a length
        per_epoch = 0
    if per_epoch > 0:
        result.steps_per_epoch = per_epoch
        result.epochs_run = round(result.global_step / per_epoch, 3)
    if not trainer.is_global_zero:
        return result

    # ---- export (rank 0)
    t = time.perf_counter()
    best_path = Path(best_cb.best_model_path) if best_cb.best_model_path else None
    if best_path is not None and not best_path.exists() and (ckpt_dir / best_path.name).exists():
        best_path = ckpt_dir / best_path.name  # resumed on another worker: dirpath changed
    output_dir = Path(config.output_dir).expanduser().resolve()
    best_step = next((h["step"] for h in module.val_history if best_val is not None
                      and abs(h[VAL_METRIC] - best_val) < 1e-9), None)
    meta = {
        "base_model": config.base_model, "init_from": config.init_from, "max_length": config.max_length,
        "loss": config.loss, "run_key": config.run_key, "snapshot": config.snapshot,
        VAL_METRIC.replace("@", "_at_"): best_val, "best_step": best_step, "global_step": result.global_step,
    }
    _export_model(module, tokenizer, best_path, output_dir, meta)
    result.fusion = _fit_fusion(config, datamodule.val_df, output_dir, storage)
    result.model_dir = str(output_dir)
    timings["export_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    if s3_storage is not None and status == "ok":
        # marks the run complete: a retry with the same run_key re-exports instead of retraining
        prefix = checkpoint_prefix(config.run_key or "")
        s3_storage.put_bytes(prefix + RESULT_OBJECT, json.dumps(result.to_dict(), default=str).encode(),
                             "application/json")
        if not config.keep_last_checkpoint and s3_storage.exists(prefix + "best.ckpt"):
            s3_storage.delete_prefix(prefix + "last.ckpt")  # a retry re-exports from best.ckpt
            log.info("run complete: removed %s (keep_last_checkpoint=false)", s3_storage.uri(prefix + "last.ckpt"))
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # S3 holds the copies
    elif (ckpt_dir / "resume").exists():
        shutil.rmtree(ckpt_dir / "resume", ignore_errors=True)
    log.info(
        "training %s: step %d, epochs %d, best %s %s, %.1f pairs/s, model in %s",
        status, result.global_step, result.epochs_completed, VAL_METRIC,
        "n/a" if best_val is None else f"{best_val:.4f}", result.train_pairs_per_s, output_dir,
    )
    if config.result_json:
        result.write(config.result_json)
        log.info("result written to %s", config.result_json)
    return result


def _completed_result(config: TrainConfig, storage: Any) -> dict[str, Any] | None:
    from shoprank.storage import checkpoint_prefix

    key = checkpoint_prefix(config.run_key or "") + RESULT_OBJECT
    if not storage.exists(key):
        return None
    return json.loads(storage.get_bytes(key))


def _reexport_completed(
    config: TrainConfig, done: dict[str, Any], module: Any, tokenizer: Any, ckpt_dir: Path, storage: Any,
    dist: DistEnv, val_df: pd.DataFrame | None = None, data_storage: Any | None = None,
) -> TrainResult:
    """The run finished before (e.g. an Airflow retry after a later failure): export, don't retrain."""
    from shoprank.models import TRAINING_META_FILE
    from shoprank.storage import checkpoint_prefix

    prefix = checkpoint_prefix(config.run_key or "")
    log.info("run %s already completed (%s exists): re-exporting its best model, not retraining",
             config.run_key, storage.uri(prefix + RESULT_OBJECT))
    fields_ = {k: v for k, v in done.items() if k in TrainResult.__dataclass_fields__}
    result = TrainResult(**fields_)
    if dist.rank != 0:
        return result
    t = time.perf_counter()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    best_path: Path | None = ckpt_dir / "best.ckpt"
    if storage.exists(prefix + "best.ckpt"):
        storage.download_file(prefix + "best.ckpt", str(best_path))
    elif storage.exists(prefix + "last.ckpt"):
        storage.download_file(prefix + "last.ckpt", str(best_path))
    else:
        raise FileNotFoundError(f"run {config.run_key} is marked complete but {storage.uri(prefix)} has no checkpoint")
    output_dir = Path(config.output_dir).expanduser().resolve()
    meta = {"base_model": config.base_model, "init_from": config.init_from, "max_length": config.max_length,
            "loss": config.loss, "run_key": config.run_key, "snapshot": config.snapshot,
            "val_ndcg_at_10": result.best_val_ndcg_at_10, "global_step": result.global_step}
    _export_model(module, tokenizer, best_path, output_dir, meta)
    assert (output_dir / TRAINING_META_FILE).exists()
    result.fusion = _fit_fusion(config, val_df, output_dir, data_storage or storage)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    result.model_dir = str(output_dir)
    result.timings = {**result.timings, "reexport_s": time.perf_counter() - t}
    if config.result_json:
        result.write(config.result_json)
    return result


def lexical_stats_for(config: TrainConfig, storage: Any | None):
    """The catalogue BM25 statistics for the fusion: ``lexical_stats_path``, else the snapshot's."""
    from shoprank.lexical import SNAPSHOT_STATS, Bm25Stats

    if config.lexical_stats_path:
        return Bm25Stats.load(config.lexical_stats_path)
    if config.snapshot and storage is not None:
        from shoprank.storage import dataset_prefix

        key = dataset_prefix(config.snapshot) + SNAPSHOT_STATS
        if storage.exists(key):
            return Bm25Stats.from_json(storage.get_bytes(key))
    return None


def _fit_fusion(config: TrainConfig, val_df: pd.DataFrame | None, output_dir: Path, storage: Any | None) -> dict:
    """Fit the lexical fusion on the validation split and save it beside the weights (shoprank.fusion)."""
    from shoprank import fusion as fz

    if config.fusion == "off" or val_df is None or not len(val_df):
        chosen = fz.Fusion(reason="fusion off" if config.fusion == "off" else "no validation split")
        fz.save(output_dir, chosen, None)
        return asdict(chosen)
    from shoprank.evaluation import CrossEncoderScorer
    from shoprank.serving.export import ndcg_at_10

    t = time.perf_counter()
    stats = lexical_stats_for(config, storage)
    scorer = CrossEncoderScorer.from_dir(output_dir, batch_size=config.eval_batch_size)
    chosen = fz.fit_fusion(val_df, scorer(val_df), stats, ndcg_at_10)
    fz.save(output_dir, chosen, stats)
    log.info("fusion (%.1fs): %s", time.perf_counter() - t, chosen.reason)
    return asdict(chosen)


def _has_tokenizer(path: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _route_library_logs() -> None:
    """Lightning installs its own stream handlers; send its records through ours instead."""
    import lightning  # noqa: F401  (import first so its handlers exist)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            lg = logging.getLogger(name)
            lg.handlers.clear()
            lg.propagate = True


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TrainConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _config_from_s3(key: str) -> dict[str, Any]:
    from shoprank.storage import Storage, StorageError

    storage = Storage.from_env()
    try:
        values = json.loads(storage.get_bytes(key))
    except StorageError as exc:
        raise TrainConfigError(f"cannot read the training config {storage.uri(key)}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TrainConfigError(f"{storage.uri(key)} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise TrainConfigError(f"{storage.uri(key)} must hold a JSON object")
    return TrainConfig.from_dict(values).to_dict()


def node_command(config_key: str, launch: dict[str, Any], python: str = "python") -> list[str]:
    """What every *other* node of a multi-node run starts: the same torchrun, config from S3."""
    cmd = build_command("-", python=python, **{**launch, "node_rank": None})
    return [*cmd[: cmd.index("--config-json")], "--config-s3", config_key]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shoprank.training",
        description="Train (or resume) the shoprank cross-encoder. Run as a subprocess or under torchrun.",
    )
    parser.add_argument("--config-json", help="JSON file with TrainConfig options")
    parser.add_argument("--config-s3", metavar="KEY",
                        help="the same, read from this key of the shoprank bucket (multi-node: the other nodes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option (value parsed as JSON when possible); repeatable")
    parser.add_argument("--log-level", default=None, help="default: SHOPRANK_LOG_LEVEL (INFO)")
    args = parser.parse_args(argv)

    dist = DistEnv.from_env()
    from shoprank.config import get_settings

    level = (args.log_level or get_settings().general.log_level).upper() if dist.rank == 0 else "WARNING"
    logging.basicConfig(
        level=level, stream=sys.stderr, force=True,
        format=f"%(asctime)s %(levelname)s [rank {dist.rank}] %(name)s: %(message)s",
    )
    for handler in logging.root.handlers:  # libraries with their own INFO level too: ranks > 0 warn only
        handler.setLevel(level)
    _route_library_logs()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    try:
        values: dict[str, Any] = {}
        if args.config_json:
            values = TrainConfig.from_json(args.config_json).to_dict()
        elif args.config_s3:
            values = _config_from_s3(args.config_s3)
        values.update(_parse_overrides(args.set))
        if not values.get("mlflow_tracking_uri") and os.environ.get("MLFLOW_TRACKING_URI"):
            values["mlflow_tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
        config = TrainConfig.from_dict(values)
    except TrainConfigError as exc:
        log.error("bad training configuration: %s", exc)
        return 2

    try:
        result = train(config)
    except TrainingTerminated as exc:
        log.warning("%s", exc)
        return 143
    except Exception as exc:
        log.exception("training failed: %s", exc)
        if dist.rank == 0 and config.result_json:
            Path(config.result_json).parent.mkdir(parents=True, exist_ok=True)
            Path(config.result_json).write_text(
                json.dumps({"status": "failed", "error": f"{type(exc).__name__}: {exc}", "run_key": config.run_key})
            )
        return 1
    return 0 if result.status == "ok" else 3
