"""Summarise what is stored: complete partitions per dataset and zone, with row counts.

Never fails on what producers dropped: folders that are not ``dt=YYYY-MM-DD`` partitions
(``dt=2026-02-30``, ``date=...``), partitions without their ``_SUCCESS`` marker and files
that cannot be read are listed with their S3 key under ``"problems"`` (and logged), and every
other dataset and partition is still counted.  Only an unreachable S3 (``StorageError``)
stops it.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging

import pyarrow.parquet as pq

from shoprank.storage import DATASETS, Storage, partition_prefix

log = logging.getLogger(__name__)


def _rows(key: str, data: bytes) -> int:
    """Rows of one data file (Parquet footer, or CSV records after the header)."""
    lower = key.lower()
    if lower.endswith((".parquet", ".pq")):
        return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    if lower.endswith((".csv", ".csv.gz")):
        if lower.endswith(".gz"):
            data = gzip.decompress(data)
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
        return max(0, sum(1 for _ in reader) - 1)
    raise ValueError("not a .parquet or .csv file")


def inventory(storage: Storage, zones: tuple[str, ...] = ("raw", "validated")) -> dict:
    """``{zone: {dataset: {date: rows}}, "problems": [...]}``; logs one line per dataset.

    ``problems`` lists ``{"key", "problem"}`` for stray folders, incomplete partitions and
    files that could not be counted."""
    out: dict = {}
    problems: list[dict[str, str]] = []

    def problem(key: str, text: str) -> None:
        problems.append({"key": storage.uri(key), "problem": text})
        log.warning("%s: %s", storage.uri(key), text)

    for zone in zones:
        out[zone] = {}
        for dataset in DATASETS:
            scan = storage.scan_partitions(zone, dataset)
            for key, text in scan.malformed:
                problem(key, f"ignored, {text}")
            for day in scan.incomplete:
                problem(partition_prefix(zone, dataset, day), "no _SUCCESS marker yet: not complete, not counted")
            days = scan.complete
            if not days:
                continue
            rows = {}
            for day in days:
                n = 0
                for key in storage.partition_files(zone, dataset, day):
                    data = storage.get_bytes(key)
                    try:
                        n += _rows(key, data)
                    except Exception as exc:  # noqa: BLE001  (a bad file is reported, never fatal)
                        problem(key, f"rows not counted: {type(exc).__name__}: {str(exc)[:200]}")
                rows[day] = n
            out[zone][dataset] = rows
            log.info("%s/%s: %d partitions (%s .. %s), %d rows", zone, dataset, len(days), days[0], days[-1],
                     sum(rows.values()))
    quarantined = storage.list_keys("quarantine/")
    if quarantined:
        log.warning("%d objects in quarantine/ (see the reports there)", len(quarantined))
    out["problems"] = problems
    return out
