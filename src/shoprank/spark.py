"""Spark for the feedback path: the session, the engine choice and how a partition reaches Spark.

One module owns this so validation (:mod:`shoprank.validation.spark_engine`) and the label
derivation (:mod:`shoprank.labels_spark`) start Spark and read S3 the same way.

* **Engine choice** (:func:`choose_engine`): ``SHOPRANK_FEEDBACK_ENGINE=pandas|spark|auto``;
  ``auto`` sends a Parquet day of at least ``SHOPRANK_SPARK_MIN_MB`` to Spark when pyspark is
  installed, everything else to pandas (small days, CSV / JSON uploads: the pandas reader
  reports a bad cell by file, row and column, which Spark cannot).
* **Session** (:func:`spark_session`): master ``SHOPRANK_SPARK_MASTER`` (``local[*]`` by
  default: an in-process JVM, no service), UTC, a small shuffle partition count, the UI off,
  ``SHOPRANK_SPARK_CONF`` on top.  A cluster is a master URL; nothing else changes.
* **Reading S3** (:class:`SparkInput`): local masters get the partition *staged*: its objects
  streamed to the driver's disk with boto3 managed transfers (multipart, never whole in
  memory), so the embedded default needs no Hadoop S3 connector.  Cluster masters read
  ``s3a://bucket/key`` themselves (``SHOPRANK_SPARK_READ=s3a``; the cluster needs hadoop-aws and
  the ``spark.hadoop.fs.s3a.*`` settings, see docs/scale.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from shoprank.config import EngineSettings, Settings

log = logging.getLogger(__name__)

MB = 1024 * 1024


def spark_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("pyspark") is None:
        return False
    return shutil.which("java") is not None or bool(os.environ.get("JAVA_HOME"))


def choose_engine(engine: EngineSettings, keys: Sequence[str],
                  sizes: Callable[[], dict[str, int]] | None = None) -> tuple[str, str]:
    """``("pandas" | "spark", why)`` for a day made of ``keys``; ``sizes()`` lists their sizes in
    bytes, called only when ``auto`` has to weigh an all-Parquet day (one listing, no reads)."""
    mode = engine.feedback_engine
    parquet = bool(keys) and all(k.lower().endswith(".parquet") for k in keys)
    if mode == "pandas":
        return "pandas", "SHOPRANK_FEEDBACK_ENGINE=pandas"
    if mode == "spark":
        if not parquet:
            return "pandas", ("SHOPRANK_FEEDBACK_ENGINE=spark, but the day is not all Parquet: the pandas reader "
                              "checks CSV / JSON uploads cell by cell")
        return "spark", "SHOPRANK_FEEDBACK_ENGINE=spark"
    if not parquet:
        return "pandas", "auto: the day is not all Parquet"
    known = sizes() if sizes is not None else {}
    size_mb = sum(known.get(k, 0) for k in keys) / MB
    if size_mb < engine.spark_min_mb:
        return "pandas", f"auto: {size_mb:.1f} MB < {engine.spark_min_mb:g} MB"
    if not spark_available():
        log.warning("the day is %.0f MB of Parquet (SHOPRANK_SPARK_MIN_MB=%g) but pyspark or Java is missing: "
                    "validating it in pandas needs about 1.2 GB of memory per million events", size_mb,
                    engine.spark_min_mb)
        return "pandas", f"auto: {size_mb:.1f} MB, but pyspark / Java are not installed"
    return "spark", f"auto: {size_mb:.1f} MB of Parquet >= {engine.spark_min_mb:g} MB"


def is_local(master: str) -> bool:
    return master.strip().startswith("local")


def staged(engine: EngineSettings) -> bool:
    """Does Spark read staged local copies (True) or ``s3a://`` (False)?"""
    return engine.spark_read == "stage" or (engine.spark_read == "auto" and is_local(engine.spark_master))


_LOCAL_DIR: list[str] = []


def _process_local_dir() -> str:
    """One scratch folder per process for Spark's shuffle and spill files (the session outlives a
    task's :class:`SparkInput`), removed when the process exits."""
    if not _LOCAL_DIR:
        import atexit

        _LOCAL_DIR.append(tempfile.mkdtemp(prefix="shoprank-spark-local-"))
        atexit.register(shutil.rmtree, _LOCAL_DIR[0], True)
    return _LOCAL_DIR[0]


def spark_session(settings: Settings, app: str = "shoprank-feedback", storage=None):
    """The (process-wide, reused) SparkSession for ``settings.engine``; its settings apply when
    the process first creates it.  For s3a, the endpoint and keys are ``storage``'s (the ones
    the task already resolved from the environment or its Airflow connection), else
    ``settings``'."""
    from pyspark.sql import SparkSession

    eng = settings.engine
    b = (SparkSession.builder.master(eng.spark_master).appName(app)
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.session.timeZone", "UTC")
         .config("spark.sql.shuffle.partitions", str(eng.spark_shuffle_partitions))
         .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
         .config("spark.sql.adaptive.enabled", "true")
         # AQE merges small shuffle partitions up to this size; at Spark's 64 MB a 2-core driver
         # with its default 1 GB heap got ~3 large tasks per shuffle that spilled to disk
         .config("spark.sql.adaptive.advisoryPartitionSizeInBytes", "16m"))
    b = b.config("spark.local.dir", _process_local_dir())
    if not staged(eng):
        creds = storage.settings if storage is not None else settings
        b = b.config("spark.hadoop.fs.s3a.path.style.access", "true")
        if creds.s3_endpoint_url:
            b = b.config("spark.hadoop.fs.s3a.endpoint", creds.s3_endpoint_url)
        if creds.aws_access_key_id:  # from env / Airflow connection, never from code
            b = (b.config("spark.hadoop.fs.s3a.access.key", creds.aws_access_key_id)
                 .config("spark.hadoop.fs.s3a.secret.key", creds.aws_secret_access_key or ""))
    for key, value in eng.conf_pairs().items():
        b = b.config(key, value)
    logging.getLogger("py4j").setLevel(logging.WARNING)  # its INFO lines at interpreter exit go to closed streams
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


class SparkInput(contextlib.AbstractContextManager):
    """Paths Spark reads for some S3 keys, and a scratch folder, for one task.

    Staged (local masters): each key is streamed to ``<tmp>/<group>/<n>-<name>`` with managed
    transfers; s3a: the keys become ``s3a://bucket/key``.  :meth:`scratch` folders hold what
    Spark writes before it is uploaded (under ``tmp/spark/`` in the bucket for s3a).  All of it
    is removed on exit."""

    def __init__(self, settings: Settings, storage) -> None:
        self.storage = storage
        self.staged = staged(settings.engine)
        self.tmp = Path(tempfile.mkdtemp(prefix="shoprank-spark-"))

    def paths(self, keys: Sequence[str], group: str = "in") -> list[str]:
        if not self.staged:
            return [f"s3a://{self.storage.bucket}/{k}" for k in keys]
        folder = self.tmp / group
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for i, key in enumerate(keys):
            path = folder / f"{i:05d}-{key.rsplit('/', 1)[-1]}"
            self.storage.download_file(key, str(path))
            out.append(str(path))
        return out

    def scratch(self, name: str) -> str:
        """A folder Spark writes to (local when staged, else an S3 temp prefix under ``tmp/``)."""
        if self.staged:
            return str(self.tmp / name)
        return f"s3a://{self.storage.bucket}/tmp/spark/{self.tmp.name}/{name}"

    def written_parts(self, folder: str) -> Iterator[str]:
        """The Parquet files Spark wrote to ``folder``, as local paths (downloaded when on S3)."""
        if self.staged:
            yield from sorted(str(p) for p in Path(folder).glob("*.parquet"))
            return
        prefix = folder.split(f"s3a://{self.storage.bucket}/", 1)[1].rstrip("/") + "/"
        for key in sorted(k for k in self.storage.list_keys(prefix) if k.endswith(".parquet")):
            with self.storage.local_copy(key) as path:
                yield path

    def __exit__(self, *exc) -> None:
        if not self.staged:
            with contextlib.suppress(Exception):
                self.storage.delete_prefix(f"tmp/spark/{self.tmp.name}/")
        shutil.rmtree(self.tmp, ignore_errors=True)


ROW_SHIFT = 1 << 40  # rows per file an input-order id can address (no Parquet file holds 10^12 rows)


def read_parquet_in_order(spark, paths: Sequence[str], column: str):
    """The Parquet files ``paths`` as one DataFrame plus ``column``, each row's place in the order
    pandas concatenates them: file number x 2^40 + row in file (Parquet's ``_metadata``).
    ``monotonically_increasing_id`` does not give that order: Spark reads the largest files
    first.  Files, not folders, with distinct base names; schemas are merged (a column missing
    from some files is null there, as in ``pd.concat``)."""
    from pyspark.sql import functions as F

    names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in paths]
    if not names:
        raise ValueError("read_parquet_in_order needs at least one Parquet file")
    if len(set(names)) != len(names):
        raise ValueError(f"read_parquet_in_order: file names must be distinct, got {names}")
    df = spark.read.option("mergeSchema", "true").parquet(*[str(p) for p in paths])
    file_no = F.create_map(*[x for i, name in enumerate(names) for x in (F.lit(name), F.lit(i))])
    return df.withColumn(column, file_no[F.col("_metadata.file_name")].cast("long") * F.lit(ROW_SHIFT)
                         + F.col("_metadata.row_index"))
