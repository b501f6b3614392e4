"""Benchmark: validate 1M feedback events end to end from S3.

Starts a private ``rclone serve s3`` (the embedded stack's S3 service, real HTTP) under a
temporary SHOPRANK_HOME, writes a catalogue and two days of feedback to ``raw/``, then
runs ``validate_partition`` for day 1 (cold: includes the ~4 s Great Expectations import)
and day 2 (warm; with row-count check, referential integrity and drift against day 1).
"End to end" = list + download + parse the raw Parquet files, derived columns, the GX
suite, Data Docs build + upload, drift report, then the validated partition (Parquet,
_SUCCESS, _validation.json) written back to S3.

    .venv/bin/python bench/bench_validation.py [--events 1000000] [--no-docs] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time

from shoprank.stack import Stack, free_port, prepared_settings
from shoprank.storage import Storage
from shoprank.validation import ValidationOptions, samples, validate_partition

D1, D2 = "2026-11-20", "2026-11-21"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(next(line.split()[1] for line in fh if line.startswith("MemTotal")))
            mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--no-docs", action="store_true", help="skip Data Docs build/upload")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    home = tempfile.mkdtemp(prefix="shoprank-bench-")
    env = {"SHOPRANK_HOME": home, "SHOPRANK_S3_PORT": str(free_port()), "SHOPRANK_BUCKET": "bench",
           "SHOPRANK_ENV_FILE": os.path.join(home, "no.env"), "PATH": os.environ.get("PATH", "")}
    stack = Stack(prepared_settings(env))
    stack.up(("s3",), progress=lambda msg: print(f"[stack] {msg}", file=sys.stderr))
    try:
        storage = Storage(stack.settings)
        storage.ensure_bucket()
        options = ValidationOptions(now=dt.datetime(2026, 11, 22, 6, tzinfo=dt.timezone.utc),
                                    build_docs=not args.no_docs)
        t = time.perf_counter()
        cat = samples.catalog(args.products, day=D1)
        days = {d: samples.feedback(args.events, day=d, ids=cat["product_id"], seed=i) for i, d in enumerate((D1, D2))}
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        for d, fb in days.items():
            storage.write_partition(cat, "raw", "catalog", d)
            storage.write_partition(fb, "raw", "feedback", d)  # 500k rows per Parquet file
        raw_bytes = sum(len(storage.get_bytes(k)) for k in storage.partition_files("raw", "feedback", D2))
        upload_s = time.perf_counter() - t

        results = {}
        for d in (D1, D2):
            validate_partition(storage, "catalog", d, f"bench-{d}", options)
            t = time.perf_counter()
            outcome = validate_partition(storage, "feedback", d, f"bench-{d}", options)
            results[d] = {"wall_s": round(time.perf_counter() - t, 2), "rows": outcome.row_count,
                          "checks": len(outcome.checks), "timings": outcome.timings,
                          "drift": (outcome.drift or {}).get("status")}
        report = {
            "benchmark": "validate_partition(feedback), S3 -> validated/ + reports",
            "machine": machine(),
            "events": args.events,
            "raw_parquet_mb": round(raw_bytes / 1e6, 1),
            "data_docs": not args.no_docs,
            "generate_s": round(gen_s, 2),
            "upload_raw_s": round(upload_s, 2),
            "cold_day1": results[D1],
            "warm_day2": results[D2],
        }
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=2)
        return 0
    finally:
        stack.down(progress=lambda msg: print(f"[stack] {msg}", file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
