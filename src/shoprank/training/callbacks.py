"""Callbacks and plugins around the Lightning loop.

* :class:`ProgressLogger`: plain log lines (step, loss, lr, pairs/s, ETA) every N steps,
  readable in Airflow task logs (Lightning's progress bar is not).
* :class:`SaveOnSigterm`: writes ``last.ckpt`` when the process is told to stop.
* :class:`S3MirrorCheckpointIO`: a CheckpointIO plugin that writes checkpoints locally as
  usual, then mirrors ``last.ckpt`` / ``best.ckpt`` to ``checkpoints/<run>/`` through
  :mod:`shoprank.storage` (atomic per object).  Lightning calls CheckpointIO on global rank 0
  only, so only rank 0 uploads.
* :class:`RunMLFlowLogger`: Lightning's MLFlowLogger bound to a run the caller created; it
  does not end that run and it writes ``@`` in metric names as ``_at_`` (``val_ndcg_at_10``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

MIRRORED_CHECKPOINTS = ("last.ckpt", "best.ckpt")


class ProgressLogger(L.Callback):
    """Logs ``step/loss/lr/pairs per second`` every ``every_n_steps`` optimizer steps (rank 0).

    Throughput counts training batches only (forward, backward, optimizer step and the loop
    around them), not validation or checkpoint time; it is multiplied by the world size, the
    ranks running in lockstep.  Totals are kept in :attr:`pairs_seen` / :attr:`train_seconds`.
    """

    def __init__(self, every_n_steps: int = 20):
        super().__init__()
        self.every_n_steps = max(1, every_n_steps)
        self.pairs_seen = 0
        self.train_seconds = 0.0
        self._window_pairs = 0
        self._window_seconds = 0.0
        self._t0: float | None = None
        self._fit_start = 0.0
        self.start_step = 0

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = int(trainer.global_step)
        if trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            log.info(
                "training starts at step %d (of %s), epoch %d, %d batches/epoch, world size %d",
                self.start_step, total, trainer.current_epoch, trainer.num_training_batches, trainer.world_size,
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        n = int(batch["input_ids"].shape[0]) * trainer.world_size
        self.pairs_seen += n
        self.train_seconds += dt
        self._window_pairs += n
        self._window_seconds += dt
        step = int(trainer.global_step)
        if step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        rate = self._window_pairs / self._window_seconds if self._window_seconds > 0 else 0.0
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        done = step - self.start_step
        elapsed = time.monotonic() - self._fit_start
        eta = elapsed / done * (total - step) if done > 0 else float("nan")
        log.info(
            "step %d/%d epoch %d batch %d/%d loss %.4f lr %.3g pairs/s %.1f elapsed %.0fs eta %.0fs",
            step, total, trainer.current_epoch, batch_idx + 1, trainer.num_training_batches,
            float(loss), lr, rate, elapsed, eta,
        )
        self._window_pairs, self._window_seconds = 0, 0.0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        log.info(
            "validation at step %d epoch %d: %s",
            trainer.global_step, trainer.current_epoch,
            " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())),
        )


class SaveOnSigterm(L.Callback):
    """On SIGTERM (Airflow timeout / mark-failed, spot preemption) save ``last.ckpt`` once more.

    Lightning finishes the running batch, then raises ``SIGTERMException``; this writes the
    checkpoint at that clean batch boundary (and, through the CheckpointIO plugin, to S3), so a
    terminated run loses at most one batch.  Other exceptions do not trigger a save.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = str(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        log.warning("SIGTERM received at step %d: saving %s before exiting", trainer.global_step, self.path)
        trainer.save_checkpoint(self.path)


class S3MirrorCheckpointIO(TorchCheckpointIO):
    """Save checkpoints locally (torch.save), then upload the mirrored ones to S3.

    ``storage`` is a :class:`shoprank.storage.Storage`; ``prefix`` is
    ``checkpoints/<run>/``.  Uploads are atomic (temporary key + server-side copy), so a
    killed process leaves the previous ``last.ckpt`` intact in S3.
    """

    def __init__(self, storage: Any, prefix: str, names: tuple[str, ...] = MIRRORED_CHECKPOINTS):
        super().__init__()
        self.storage = storage
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.names = names
        self.uploads = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        t0 = time.perf_counter()
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        name = Path(path).name
        if name not in self.names:
            return
        t1 = time.perf_counter()
        key = self.prefix + name
        self.storage.upload_file(str(path), key)
        self.uploads += 1
        log.info(
            "checkpoint step %s -> %s (%.0f MB, save %.1fs, upload %.1fs)",
            checkpoint.get("global_step"), self.storage.uri(key), os.path.getsize(path) / 1e6,
            t1 - t0, time.perf_counter() - t1,
        )


class RunMLFlowLogger(MLFlowLogger):
    """MLFlowLogger that logs into an existing run (``run_id``) owned by the caller.

    * metric names: ``@`` becomes ``_at_`` (MLflow rejects ``@``), so ``val_ndcg@10`` is
      logged as ``val_ndcg_at_10``, matching the evaluation report's names;
    * ``finalize`` does not mark the run finished or failed: the caller does that.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, **kwargs: Any):
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            raise ValueError("mlflow_run_id given but no tracking URI: set MLFLOW_TRACKING_URI")
        super().__init__(tracking_uri=tracking_uri, run_id=run_id, **kwargs)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized and self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
