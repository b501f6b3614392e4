"""Storage against a real S3 server over HTTP (rclone serve s3)."""
import pandas as pd
import pytest

from shoprank.storage import Storage, StorageError

pytestmark = pytest.mark.integration


def test_bucket_round_trip(storage):
    df = pd.DataFrame({"product_id": ["p1", "p2"], "price": [1.5, 2.0]})
    keys = storage.write_partition(df, "raw", "catalog", "2026-11-01")
    assert keys == ["raw/catalog/dt=2026-11-01/part-00000.parquet"]
    assert storage.list_partitions("raw", "catalog") == ["2026-11-01"]
    back = storage.read_partition("raw", "catalog", "2026-11-01")
    pd.testing.assert_frame_equal(back, df)
    # atomic writes leave no temporary objects behind
    assert storage.list_keys("_tmp/") == []


def test_partition_rewrite_replaces_old_parts(storage):
    big = pd.DataFrame({"x": range(10)})
    storage.write_partition(big, "raw", "feedback", "2026-11-02", rows_per_file=4)
    assert len(storage.partition_files("raw", "feedback", "2026-11-02")) == 3
    storage.write_partition(big.head(2), "raw", "feedback", "2026-11-02")
    assert len(storage.read_partition("raw", "feedback", "2026-11-02")) == 2


def test_wrong_credentials_are_rejected(storage):
    bad = Storage(storage.settings.replaced(aws_secret_access_key="not-the-secret"))
    with pytest.raises(StorageError, match="refused the credentials"):
        bad.list_keys("raw/")


def test_missing_object_is_a_clear_error(storage):
    with pytest.raises(StorageError, match="not found"):
        storage.get_bytes("raw/nothing/here.parquet")


def test_unreachable_endpoint_is_a_clear_error(storage):
    from shoprank.stack import free_port

    dead = Storage(storage.settings.replaced(s3_endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError, match="cannot reach S3"):
        dead.exists("x")
