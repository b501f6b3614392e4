"""The only module that talks to S3.

Layout (one bucket, prefixes; see the README "Data layout" section)::

    raw/<dataset>/dt=YYYY-MM-DD/part-*.parquet         what producers drop
    validated/<dataset>/dt=YYYY-MM-DD/part-*.parquet   batches that passed validation
    quarantine/<dataset>/dt=YYYY-MM-DD/<run_id>/        failed batch + its report
    reports/data-docs/                                  Great Expectations Data Docs
    datasets/<snapshot>/{train,val,test}.parquet        training snapshots + manifest
    checkpoints/<run>/                                  Lightning checkpoints
    mlflow-artifacts/                                   MLflow proxied artifacts

Writes are atomic per object: data goes to a temporary key under ``_tmp/`` first, then is
copied server-side to its final key, so a reader never sees a half-written object under a
real prefix.  A partition is complete when its ``_SUCCESS`` marker exists.  Transient
errors are retried with exponential backoff by botocore's ``standard`` retry mode.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import boto3
import pandas as pd
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from shoprank.config import Settings, get_settings

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

DATASETS = ("catalog", "judgments", "feedback", "queries", "users")
SUCCESS_MARKER = "_SUCCESS"
TMP_PREFIX = "_tmp/"
COPY_MULTIPART_ABOVE = 5 * 1024**3  # CopyObject's limit; below it one request copies (every S3 server supports it)


class StorageError(RuntimeError):
    """S3 is unreachable, refused the credentials, or an object is missing."""


def _date_str(day: dt.date | str) -> str:
    if isinstance(day, str):
        try:
            day = dt.date.fromisoformat(day)
        except ValueError:
            raise StorageError(f"date {day!r} is not in YYYY-MM-DD form") from None
    return day.isoformat()


def partition_prefix(zone: str, dataset: str, day: dt.date | str) -> str:
    """``raw/feedback/dt=2026-11-22/`` and friends."""
    if zone not in ("raw", "validated"):
        raise ValueError(f"unknown zone {zone!r}")
    return f"{zone}/{dataset}/dt={_date_str(day)}/"


def quarantine_prefix(dataset: str, day: dt.date | str, run_id: str) -> str:
    safe_run = run_id.replace("/", "_").replace(":", "_").replace("+", "_")
    return f"quarantine/{dataset}/dt={_date_str(day)}/{safe_run}/"


def dataset_prefix(snapshot: str) -> str:
    return f"datasets/{snapshot}/"


def checkpoint_prefix(run: str) -> str:
    return f"checkpoints/{run.replace('/', '_')}/"


RESULT_OBJECT = "result.json"  # checkpoints/<run>/result.json marks a completed training run


def _client(settings: Settings):
    key, secret = settings.require_s3_credentials()
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=settings.aws_region,
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"},
            signature_version="s3v4",
        ),
    )


def _explain(exc: Exception, settings: Settings, what: str) -> StorageError:
    where = settings.s3_endpoint_url or "AWS S3"
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"cannot reach S3 at {where} while trying to {what}: is the server running? "
            "(`shoprank stack up` starts the embedded one; otherwise check SHOPRANK_S3_ENDPOINT_URL)"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(
                f"S3 at {where} refused the credentials ({code}) while trying to {what}: "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        if code in ("NoSuchBucket",):
            return StorageError(
                f"bucket {settings.bucket!r} does not exist at {where}: create it or set SHOPRANK_BUCKET"
            )
        if code in ("NoSuchKey", "404"):
            return StorageError(f"not found in s3://{settings.bucket}: {what}")
        return StorageError(f"S3 error {code} at {where} while trying to {what}: {exc}")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # closed / reset / timed out, after retries
        return StorageError(
            f"lost the connection to S3 at {where} while trying to {what} ({type(exc).__name__}, after "
            "retries): is the server running? Writes are atomic: a failed write leaves nothing under its key")
    return StorageError(f"S3 failure at {where} while trying to {what}: {exc}")


# ---- what counts as a partition, and what counts as data -----------------------------------
_DAY_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CHECKSUM_SUFFIXES = (".crc", ".md5", ".sha1", ".sha256")


def parse_partition_folder(folder: str) -> tuple[str | None, str | None]:
    """``"dt=2026-11-20"`` -> ``("2026-11-20", None)``; anything else -> ``(None, problem)``."""
    name, sep, value = folder.partition("=")
    if name == "dt" and _DAY_RE.fullmatch(value):
        try:
            dt.date.fromisoformat(value)
            return value, None
        except ValueError:
            return None, f"{value!r} is not a real calendar date (partition folders are dt=YYYY-MM-DD)"
    guess = value if sep else folder
    hint = ""
    if _DAY_RE.fullmatch(guess.strip()):
        try:
            dt.date.fromisoformat(guess.strip())
            hint = f"; rename it to dt={guess.strip()}/"
        except ValueError:
            hint = f"; {guess.strip()!r} is not a real calendar date either"
    if name == "dt":
        return None, f"{value!r} is not a date in YYYY-MM-DD form (partition folders are dt=YYYY-MM-DD){hint}"
    return None, f"not a partition folder: partitions are named dt=YYYY-MM-DD{hint}"


def non_data_reason(rel: str) -> str | None:
    """Why a key (relative to its partition folder) is not data, or None when it may be data.

    The rule: folder markers (keys ending in ``/`` or ``_$folder$``), anything whose name or
    folder starts with ``_`` or ``.`` (``_SUCCESS``, ``_validation.json``, ``_committed_*``,
    Spark's ``_temporary/``, hidden files) and checksum side files (``.crc``, ``.md5``, ...).
    """
    if rel == "" or rel.endswith("/"):
        return "folder marker (an S3 console 'folder'), not data"
    if rel.endswith("_$folder$"):
        return "folder marker (_$folder$), not data"
    parts = rel.split("/")
    for part in parts[:-1]:
        if part.startswith(("_", ".")):
            return f"inside {part}/ (folders starting with '_' or '.' are job metadata, e.g. Spark's _temporary/)"
    name = parts[-1]
    if name == SUCCESS_MARKER:
        return "completeness marker"
    if name.startswith("_"):
        return "metadata file (name starts with '_')"
    if name.startswith("."):
        return "hidden file (name starts with '.')"
    if name.lower().endswith(_CHECKSUM_SUFFIXES):
        return "checksum side file, not data"
    return None


@dataclass
class PartitionListing:
    """One partition's keys, sorted by rule."""

    prefix: str
    data: list[str] = field(default_factory=list)  # data files directly under the folder
    nested: list[str] = field(default_factory=list)  # data-looking files in a subfolder (not read)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (key, why it is not data)
    complete: bool = False  # the _SUCCESS marker exists

    def ignored_lines(self) -> list[str]:
        return [f"{key}: {why}" for key, why in self.ignored]


def classify_partition_keys(prefix: str, keys: list[str]) -> PartitionListing:
    out = PartitionListing(prefix)
    for key in keys:
        rel = key[len(prefix):]
        if rel == SUCCESS_MARKER:
            out.complete = True
        why = non_data_reason(rel)
        if why is not None:
            out.ignored.append((key, why))
        elif "/" in rel:
            out.nested.append(key)
        else:
            out.data.append(key)
    return out


@dataclass
class PartitionScan:
    """The folders under ``<zone>/<dataset>/``."""

    prefix: str
    complete: list[str] = field(default_factory=list)  # days with _SUCCESS, oldest first
    incomplete: list[str] = field(default_factory=list)  # days with keys but no _SUCCESS
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (folder key, problem)


def scan_partition_keys(prefix: str, keys: list[str]) -> PartitionScan:
    scan = PartitionScan(prefix)
    complete, seen, bad = set(), set(), {}
    for key in keys:
        rel = key[len(prefix):]
        if rel == "":
            continue  # the dataset folder's own marker
        folder, slash, rest = rel.partition("/")
        if folder.startswith(("_", ".")) or (not slash and non_data_reason(rel) is not None):
            continue  # job metadata next to the partitions (e.g. Spark's _SUCCESS at the root)
        if not slash:
            bad.setdefault(key, "a file directly under the dataset folder, outside any dt=YYYY-MM-DD/ partition")
            continue
        day, problem = parse_partition_folder(folder)
        if day is None:
            bad.setdefault(prefix + folder + "/", problem or "not a partition folder")
            continue
        seen.add(day)
        if rest == SUCCESS_MARKER:
            complete.add(day)
    scan.complete = sorted(complete)
    scan.incomplete = sorted(seen - complete)
    scan.malformed = sorted(bad.items())
    return scan


@dataclass
class Storage:
    """Thin, typed wrapper around one bucket."""

    settings: Settings

    def __post_init__(self) -> None:
        self._s3 = _client(self.settings)
        self.bucket = self.settings.bucket

    @classmethod
    def from_env(cls) -> "Storage":
        return cls(get_settings())

    # ---- basics -------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise _explain(exc, self.settings, f"check bucket {self.bucket}") from exc
        except BotoCoreError as exc:
            raise _explain(exc, self.settings, f"check bucket {self.bucket}") from exc
        try:
            self._s3.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _explain(exc, self.settings, f"create bucket {self.bucket}") from exc

    def _via_temp_key(self, key: str, what: str, write: Callable[[str], None], publish: Callable[[str], None]) -> str:
        """Atomic write: ``write`` a temp key, ``publish`` it to ``key`` with a server-side copy,
        delete the temp key; S3 errors become a :class:`StorageError` saying ``what`` failed."""
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            write(tmp)
            publish(tmp)
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, self.settings, what) from exc
        finally:
            try:
                self._s3.delete_object(Bucket=self.bucket, Key=tmp)
            except (ClientError, BotoCoreError):
                log.warning("could not delete temporary object %s", tmp)
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Atomic write of a small object (one PUT, one CopyObject)."""
        return self._via_temp_key(
            key, f"write {key}",
            lambda tmp: self._s3.put_object(Bucket=self.bucket, Key=tmp, Body=data, ContentType=content_type),
            lambda tmp: self._s3.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": tmp},
                                             ContentType=content_type, MetadataDirective="REPLACE"))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, self.settings, f"read {key}") from exc

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _explain(exc, self.settings, f"check {key}") from exc
        except BotoCoreError as exc:
            raise _explain(exc, self.settings, f"check {key}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        """``{key: bytes}`` of every object under ``prefix`` (one listing, nothing read)."""
        out: dict[str, int] = {}
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                out.update((obj["Key"], int(obj.get("Size", 0))) for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, self.settings, f"list {prefix}") from exc
        return out

    def scan_partitions(self, zone: str, dataset: str) -> "PartitionScan":
        """Every folder under ``<zone>/<dataset>/``, sorted into complete, incomplete (no
        ``_SUCCESS``) and malformed (not ``dt=YYYY-MM-DD`` with a real date) partitions."""
        return scan_partition_keys(f"{zone}/{dataset}/", self.list_keys(f"{zone}/{dataset}/"))

    def list_partitions(self, zone: str, dataset: str) -> list[str]:
        """Dates (YYYY-MM-DD) of complete partitions of a dataset, oldest first.

        Only ``dt=YYYY-MM-DD`` folders holding a ``_SUCCESS`` marker count; malformed folders
        (``dt=2026-02-30``, ``date=...``) never do (see :meth:`scan_partitions`)."""
        return self.scan_partitions(zone, dataset).complete

    def latest_partition(self, zone: str, dataset: str, on_or_before: str | None = None) -> str | None:
        """Newest complete partition date of a dataset (on or before a date), or None.

        Malformed partition folders are never chosen; they are logged with their key."""
        scan = self.scan_partitions(zone, dataset)
        for key, problem in scan.malformed:
            log.warning("ignored %s: %s", self.uri(key), problem)
        if isinstance(on_or_before, dt.date):
            on_or_before = on_or_before.isoformat()
        days = [d for d in scan.complete if on_or_before is None or d <= on_or_before]
        return days[-1] if days else None

    def partition_listing(self, zone: str, dataset: str, day: dt.date | str) -> "PartitionListing":
        """The keys of one partition, sorted by rule into data files, files in subfolders,
        keys that are not data (markers, ``_temporary/``, ``.crc``, ...) and completeness."""
        prefix = partition_prefix(zone, dataset, day)
        return classify_partition_keys(prefix, self.list_keys(prefix))

    def copy(self, src_key: str, dst_key: str) -> None:
        try:
            self._managed_copy(src_key, dst_key)
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, self.settings, f"copy {src_key} to {dst_key}") from exc

    def copy_prefix(self, src_prefix: str, dst_prefix: str) -> list[str]:
        copied = []
        for key in self.list_keys(src_prefix):
            dst = dst_prefix + key[len(src_prefix) :]
            self.copy(key, dst)
            copied.append(dst)
        return copied

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            try:
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
            except (ClientError, BotoCoreError) as exc:
                raise _explain(exc, self.settings, f"delete {prefix}") from exc
        return len(keys)

    # ---- files: boto3 managed transfers (streamed, multipart above the threshold) ----------
    def _transfer(self, multipart_threshold: int | None = None):
        from boto3.s3.transfer import TransferConfig

        mb = 1024 * 1024
        return TransferConfig(multipart_threshold=multipart_threshold or self.settings.storage.multipart_threshold_mb * mb,
                              multipart_chunksize=self.settings.storage.multipart_chunk_mb * mb,
                              max_concurrency=4, max_io_queue=16, use_threads=True)  # bounded memory

    def upload_file(self, path: str, key: str) -> str:
        """Stream a local file to ``key`` (never read whole into memory; multipart above
        ``SHOPRANK_S3_MULTIPART_THRESHOLD_MB``, so objects above S3's 5 GB single-PUT limit
        work); it appears under ``key`` only once complete (temp key, then a server-side copy)."""
        return self._via_temp_key(
            key, f"upload {path} to {key}",
            lambda tmp: self._s3.upload_file(str(path), self.bucket, tmp, Config=self._transfer()),
            lambda tmp: self._managed_copy(tmp, key))

    def download_file(self, key: str, path: str) -> None:
        """Stream ``key`` to a local file (in parts above the threshold)."""
        try:
            self._s3.download_file(self.bucket, key, str(path), Config=self._transfer())
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, self.settings, f"download {key}") from exc

    def _managed_copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy: one CopyObject up to 5 GB, a multipart copy above (S3's limit)."""
        self._s3.copy({"Bucket": self.bucket, "Key": src_key}, self.bucket, dst_key,
                      Config=self._transfer(multipart_threshold=COPY_MULTIPART_ABOVE))

    # ---- parquet ----------------------------------------------------------------------
    # written to / read from a local temporary file and moved with the managed transfers above,
    # so an object is never held as one bytes buffer beside its DataFrame
    def write_parquet(self, data: "pd.DataFrame | pa.Table", key: str) -> str:
        """A DataFrame (pandas metadata, no index) or an Arrow table (as is) as one Parquet object."""
        with tempfile.TemporaryDirectory(prefix="shoprank-s3-") as tmp:
            path = os.path.join(tmp, "part.parquet")
            if isinstance(data, pd.DataFrame):
                data.to_parquet(path, index=False)
            else:
                import pyarrow.parquet as pq

                pq.write_table(data, path, compression="snappy")
            return self.upload_file(path, key)

    def read_parquet(self, key: str, columns: list[str] | None = None) -> pd.DataFrame:
        with self.local_copy(key) as path:
            return pd.read_parquet(path, columns=columns)

    @contextmanager
    def local_copy(self, key: str) -> Iterator[str]:
        """``key`` streamed to a temporary local file (deleted on exit): for readers that
        want a file (pyarrow, GX, engines) rather than bytes in memory."""
        with tempfile.TemporaryDirectory(prefix="shoprank-s3-") as tmp:
            path = os.path.join(tmp, key.rsplit("/", 1)[-1] or "object")
            self.download_file(key, path)
            yield path

    def parquet_rows(self, key: str) -> int:
        """Rows of a parquet object, from its footer (the object is streamed to a temp file)."""
        import pyarrow.parquet as pq

        with self.local_copy(key) as path:
            return pq.read_metadata(path).num_rows

    def sha256(self, key: str) -> str:
        """SHA-256 of an object, streamed in 1 MiB chunks."""
        import hashlib

        digest = hashlib.sha256()
        try:
            for chunk in self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].iter_chunks(1024 * 1024):
                digest.update(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise _explain(exc, self.settings, f"read {key}") from exc
        return digest.hexdigest()

    def write_partition(self, df: pd.DataFrame, zone: str, dataset: str, day: dt.date | str,
                        rows_per_file: int = 500_000) -> list[str]:
        """Replace a partition: delete old parts, write new parts, then the _SUCCESS marker."""
        n_files = max(1, -(-len(df) // rows_per_file))
        return self.write_partition_parts(
            zone, dataset, day, (df.iloc[i * rows_per_file : (i + 1) * rows_per_file] for i in range(n_files)))

    def write_partition_parts(self, zone: str, dataset: str, day: dt.date | str,
                              parts: "Iterable[pd.DataFrame | pa.Table]") -> list[str]:
        """Replace a partition from parts produced one at a time (a generator keeps a day that
        does not fit in memory streaming): delete old parts, write each part as it comes
        (``part-00000.parquet``, ...), then the _SUCCESS marker."""
        prefix = partition_prefix(zone, dataset, day)
        self.delete_prefix(prefix)
        keys = []
        for i, part in enumerate(parts):
            key = f"{prefix}part-{i:05d}.parquet"
            self.write_parquet(part, key)
            keys.append(key)
        self.put_bytes(prefix + SUCCESS_MARKER, b"")
        return keys

    def partition_files(self, zone: str, dataset: str, day: dt.date | str) -> list[str]:
        """Data files directly under the partition folder (non-data keys ignored by rule)."""
        return self.partition_listing(zone, dataset, day).data

    def read_partition(self, zone: str, dataset: str, day: dt.date | str) -> pd.DataFrame:
        keys = [k for k in self.partition_files(zone, dataset, day) if k.endswith(".parquet")]
        if not keys:
            raise StorageError(f"no parquet files in s3://{self.bucket}/{partition_prefix(zone, dataset, day)}")
        frames = [self.read_parquet(k) for k in keys]
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def iter_partitions(self, zone: str, dataset: str) -> Iterator[tuple[str, pd.DataFrame]]:
        for day in self.list_partitions(zone, dataset):
            yield day, self.read_partition(zone, dataset, day)
