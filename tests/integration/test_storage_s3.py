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


def test_files_stream_in_parts_and_are_never_read_whole(storage, tmp_path):
    """Checkpoints and weights go through boto3 managed transfers: multipart above the threshold
    (so objects above S3's 5 GB single-PUT limit work), streamed from and to disk."""
    import hashlib
    import os
    import tracemalloc

    small = Storage(storage.settings.replaced(SHOPRANK_S3_MULTIPART_THRESHOLD_MB=5, SHOPRANK_S3_MULTIPART_CHUNK_MB=5))
    src = tmp_path / "big.ckpt"
    size = 48 * 1024 * 1024
    with open(src, "wb") as fh:
        for _ in range(size // (1024 * 1024)):
            fh.write(os.urandom(1024 * 1024))
    tracemalloc.start()
    small.upload_file(str(src), "checkpoints/big/last.ckpt")
    _, peak_up = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    head = small._s3.head_object(Bucket=small.bucket, Key="checkpoints/big/last.ckpt")
    assert head["ContentLength"] == size
    assert small.list_keys("_tmp/") == []  # the temporary upload key is gone
    dst = tmp_path / "back.ckpt"
    tracemalloc.start()
    small.download_file("checkpoints/big/last.ckpt", str(dst))
    _, peak_down = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(dst) == digest(src)
    # whole-object reads would peak at >= the object's size
    assert peak_up < size / 2 and peak_down < size / 2, (peak_up, peak_down)
    small.copy("checkpoints/big/last.ckpt", "checkpoints/big/copy.ckpt")
    assert small._s3.head_object(Bucket=small.bucket, Key="checkpoints/big/copy.ckpt")["ContentLength"] == size


def test_parquet_and_hashes_stream_through_files(storage, tmp_path):
    """Data objects too: parquet is written and read through a temp file with the managed
    transfers (multipart above the threshold), hashed and counted without a whole-object read."""
    import hashlib
    import tracemalloc

    import numpy as np
    import pandas as pd

    small = Storage(storage.settings.replaced(SHOPRANK_S3_MULTIPART_THRESHOLD_MB=5, SHOPRANK_S3_MULTIPART_CHUNK_MB=5))
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"event_id": [f"{i:032x}" for i in rng.integers(0, 2**62, 300_000)],
                       "x": rng.random(300_000)})
    key = "raw/feedback/dt=2026-11-01/part-00000.parquet"
    small.write_parquet(df, key)
    size = small._s3.head_object(Bucket=small.bucket, Key=key)["ContentLength"]
    assert size > 5 * 1024 * 1024  # went up in parts
    assert small.list_keys("_tmp/") == []
    pd.testing.assert_frame_equal(small.read_parquet(key), df)
    assert list(small.read_parquet(key, columns=["x"]).columns) == ["x"]
    assert small.parquet_rows(key) == len(df)
    tracemalloc.start()
    digest = small.sha256(key)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert digest == hashlib.sha256(small.get_bytes(key)).hexdigest()
    assert peak < size / 2, (peak, size)
    with small.local_copy(key) as path:
        kept = path
        assert pd.read_parquet(path).shape == df.shape
    import os

    assert not os.path.exists(kept)  # the temp copy is gone
