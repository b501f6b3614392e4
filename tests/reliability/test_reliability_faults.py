"""Server faults on PRIVATE real servers (own Stack, own ports): S3 stopped in the middle of
a large write, MLflow stopped in the middle of a registration and of a promotion.  The
servers are really stopped (Stack.stop) at a precise point chosen by a forwarding proxy
(tests/reliability/faults.py), then started again, and the step is retried."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from shoprank.registry import Registry
from shoprank.stack import Stack, prepared_settings
from shoprank.storage import SUCCESS_MARKER, Storage, StorageError, partition_prefix
from shoprank.workflow import Lineage, apply_approval, gate_version, log_evaluation, register_model

from .conftest import log_const_model, private_stack_env
from .faults import CuttingHttpProxy, CuttingTcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.slow]

QUIET = {"progress": lambda _m: None}
APPROVE = {"chosen_options": ["Approve"], "responded_by_user": {"name": "alice"}, "params_input": {}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    st = Stack(prepared_settings(private_stack_env(tmp_path_factory.mktemp("faults"))))
    try:
        yield st
    finally:
        st.down(progress=lambda _m: None)


# ---- S3 ------------------------------------------------------------------------------------------
def test_s3_stopped_during_a_large_write_fails_cleanly_and_retry_succeeds(stack):
    """Fault: the S3 server is stopped after 8 MiB of a 24 MiB object went over the wire.
    Expected: botocore retries, then StorageError saying S3 is unreachable and naming the key;
    after a restart nothing is visible at the final key; writing again succeeds byte for byte."""
    stack.up(("s3",), **QUIET)
    direct = Storage(stack.settings)
    direct.ensure_bucket()
    proxy = CuttingTcpProxy(stack.settings.s3_port, cut_after_bytes=8 << 20, on_cut=lambda: stack.stop("s3"))
    via = Storage(stack.settings.replaced(s3_endpoint_url=proxy.url))
    blob = os.urandom(24 << 20)
    t0 = time.monotonic()
    try:
        with pytest.raises(StorageError) as err:
            via.put_bytes("raw/big/blob.bin", blob)
    finally:
        proxy.close()
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert "raw/big/blob.bin" in msg and proxy.url.split("//")[1] in msg, msg
    assert "lost the connection to S3" in msg or "cannot reach S3" in msg, msg
    assert proxy.refused_after_cut >= 2, "the client must retry before giving up"
    print(f"S3 write fault: StorageError after {elapsed:.1f}s and {proxy.refused_after_cut} retried connections")

    assert proxy.cut_done.wait(60)
    stack.up(("s3",), **QUIET)
    assert not direct.exists("raw/big/blob.bin"), "no partial object at the final key"
    assert direct.list_keys("raw/") == []
    print(f"leftover temporary objects under _tmp/ (invisible to readers): {len(direct.list_keys('_tmp/'))}")
    direct.put_bytes("raw/big/blob.bin", blob)
    assert direct.get_bytes("raw/big/blob.bin") == blob


def test_s3_stopped_during_a_partition_write_leaves_no_complete_partition(stack):
    """Fault: S3 stops while the 2nd of 3 Parquet parts of a raw partition is being written.
    Expected: StorageError; no ``_SUCCESS`` marker, so readers do not see the partition
    (list_partitions); parts already written are whole; a retry after restart completes it."""
    stack.up(("s3",), **QUIET)
    direct = Storage(stack.settings)
    direct.ensure_bucket()
    rng = np.random.default_rng(0)
    n = 90_000
    df = pd.DataFrame({"event_id": [f"e{i}" for i in range(n)],
                       "payload": [rng.bytes(24).hex() for _ in range(n)]}).astype("string")
    rows = n // 3
    buf = io.BytesIO()
    df.iloc[:rows].to_parquet(buf, index=False)
    part = len(buf.getvalue())
    proxy = CuttingTcpProxy(stack.settings.s3_port, cut_after_bytes=int(part * 1.5),
                            on_cut=lambda: stack.stop("s3"))
    via = Storage(stack.settings.replaced(s3_endpoint_url=proxy.url))
    try:
        with pytest.raises(StorageError, match="lost the connection to S3|cannot reach S3"):
            via.write_partition(df, "raw", "feedback", "2026-11-20", rows_per_file=rows)
    finally:
        proxy.close()

    assert proxy.cut_done.wait(60)
    stack.up(("s3",), **QUIET)
    prefix = partition_prefix("raw", "feedback", "2026-11-20")
    keys = direct.list_keys(prefix)
    assert prefix + SUCCESS_MARKER not in keys
    assert "2026-11-20" not in direct.list_partitions("raw", "feedback")
    for i, key in enumerate(keys):  # whatever landed is a whole part, never a torn one
        assert direct.read_parquet(key).equals(df.iloc[i * rows:(i + 1) * rows].reset_index(drop=True))
    assert len(keys) < 3
    direct.write_partition(df, "raw", "feedback", "2026-11-20", rows_per_file=rows)
    assert direct.list_partitions("raw", "feedback") == ["2026-11-20"]
    assert direct.read_partition("raw", "feedback", "2026-11-20").equals(df)


# ---- MLflow --------------------------------------------------------------------------------------
@pytest.fixture()
def fast_mlflow_retries(monkeypatch):
    # the client's default (7 retries, backoff 2) waits minutes for a dead server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    for name, value in {"SHOPRANK_GATE_MUST_BEAT_BM25": "true", "SHOPRANK_GATE_MAX_REGRESSION": "0.01",
                        "SHOPRANK_GATE_MAX_LATENCY_MS": "4000", "SHOPRANK_GATE_MAX_LATENCY_RATIO": "1.25",
                        "SHOPRANK_GATE_MIN_TEST_QUERIES": "100", "SHOPRANK_AUTO_PROMOTE": "false"}.items():
        monkeypatch.setenv(name, value)


def _trained(settings) -> dict:
    """A logged model whose run holds EVALUATED's metrics (what evaluate_model logs)."""
    from mlflow import MlflowClient

    model_uri, run_id = log_const_model(settings.mlflow_tracking_uri, fresh=True)
    log_evaluation(MlflowClient(settings.mlflow_tracking_uri), run_id, EVALUATED["metrics"],
                   EVALUATED["champion_compared"])
    return {"model_uri": model_uri, "mlflow_run_id": run_id, "snapshot": "snap-fault", "params": {}}


EVALUATED = {"metrics": {"ndcg_at_10": 0.6, "delta_ndcg_at_10_vs_bm25_lo": 0.05, "n_queries": 150.0,
                         "latency_candidates": 50.0, "latency_ms_per_request": 300.0},
             "champion_version": None, "champion_compared": "none"}


def test_mlflow_stopped_right_after_creating_the_version_then_retry(stack, fast_mlflow_retries):
    """Fault: MLflow is stopped right after it answered model-versions/create (before the
    challenger alias and audit).  Expected: register_model fails with an error naming the
    server; after a restart the retry (same DAG run key) finds that version instead of
    creating a second one, points challenger at it; no version is champion; one audit record."""
    stack.up(("s3", "mlflow"), **QUIET)
    settings = stack.settings.replaced(registered_model="fault-register")
    trained = _trained(settings)
    proxy = CuttingHttpProxy(
        settings.mlflow_port, on_cut=lambda: stack.stop("mlflow"),
        cut_on=lambda m, p: "after" if m == "POST" and "/model-versions/create" in p else None)
    via = settings.replaced(mlflow_tracking_uri=proxy.url)
    storage = Storage(settings)
    lineage = Lineage(dag_id="shoprank_train", run_id="manual__fault", key="shoprank_train/manual__fault")
    try:
        with pytest.raises(MlflowException) as err:
            register_model(via, storage, trained, EVALUATED, lineage)
        assert f"127.0.0.1:{proxy.port}" in str(err.value)
        assert proxy.cut.is_set() and proxy.failed_after_cut >= 1
        assert proxy.cut_done.wait(60)

        stack.up(("mlflow",), **QUIET)
        proxy.restore()
        reg = Registry(settings, storage)
        assert reg.known_versions() == ["1"]  # created before the cut, with its run key
        assert reg.tags("1")["airflow.run_key"] == lineage.run_key
        assert reg.version_by_alias("challenger") is None and reg.version_by_alias("champion") is None

        again = register_model(via, storage, trained, EVALUATED, lineage)  # the Airflow retry
    finally:
        proxy.close()
    assert again == {"version": "1", "reused": True}
    assert reg.known_versions() == ["1"], "no duplicate version for the same DAG run"
    assert reg.version_by_alias("challenger").version == "1"
    assert reg.version_by_alias("champion") is None
    trail = reg.audit_trail()
    assert [(r["alias"], r["version"]) for r in trail] == [("challenger", "1")]


def test_mlflow_stopped_during_promotion_then_retry(stack, fast_mlflow_retries):
    """Fault: MLflow is stopped just before the request that moves ``champion`` (approved,
    gated version).  Expected: a clear error, no version holds ``champion``, no champion
    record in the audit trail; after a restart the same approval completes: exactly one
    champion move, audited."""
    stack.up(("s3", "mlflow"), **QUIET)
    settings = stack.settings.replaced(registered_model="fault-promote")
    storage = Storage(settings)
    lineage = Lineage(dag_id="shoprank_train", run_id="manual__p", key="shoprank_train/manual__p")
    v = register_model(settings, storage, _trained(settings), EVALUATED, lineage,
                       validation_status="passed")["version"]
    assert gate_version(settings, v)["eligible"]
    proxy = CuttingHttpProxy(
        settings.mlflow_port, on_cut=lambda: stack.stop("mlflow"),
        cut_on=lambda m, p: "before" if m == "POST" and p.endswith("/registered-models/alias") else None)
    via = settings.replaced(mlflow_tracking_uri=proxy.url)
    try:
        with pytest.raises(MlflowException) as err:
            apply_approval(via, storage, v, APPROVE, airflow_run="manual__p")
        assert f"127.0.0.1:{proxy.port}" in str(err.value)
        assert proxy.cut_done.wait(60)
        stack.up(("mlflow",), **QUIET)
        proxy.restore()
        reg = Registry(settings, storage)
        assert reg.version_by_alias("champion") is None
        assert [r for r in reg.audit_trail() if r["alias"] == "champion"] == []

        apply_approval(via, storage, v, APPROVE, airflow_run="manual__p")  # the retry
    finally:
        proxy.close()
    assert reg.version_by_alias("champion").version == v
    moves = [(r["action"], r["version"], r["actor"]) for r in reg.audit_trail() if r["alias"] == "champion"]
    assert moves == [("set_alias", v, "alice")]
    assert reg.known_versions() == [v]
