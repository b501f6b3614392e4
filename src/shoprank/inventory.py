"""Summarise what is stored: complete partitions per dataset and zone, with row counts."""

from __future__ import annotations

import io
import logging

import pyarrow.parquet as pq

from shoprank.storage import DATASETS, Storage

log = logging.getLogger(__name__)


def inventory(storage: Storage, zones: tuple[str, ...] = ("raw", "validated")) -> dict:
    """{zone: {dataset: {date: rows}}}; logs one line per dataset."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for zone in zones:
        out[zone] = {}
        for dataset in DATASETS:
            days = storage.list_partitions(zone, dataset)
            if not days:
                continue
            rows = {}
            for day in days:
                n = 0
                for key in storage.partition_files(zone, dataset, day):
                    if key.endswith(".parquet"):
                        n += pq.ParquetFile(io.BytesIO(storage.get_bytes(key))).metadata.num_rows
                rows[day] = n
            out[zone][dataset] = rows
            log.info("%s/%s: %d partitions (%s .. %s), %d rows", zone, dataset, len(days), days[0], days[-1],
                     sum(rows.values()))
    quarantined = storage.list_keys("quarantine/")
    if quarantined:
        log.warning("%d objects in quarantine/ (see the reports there)", len(quarantined))
    return out
