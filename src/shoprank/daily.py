"""The daily incremental update: yesterday's feedback -> training signal -> warm-started challenger.

For a logical date D (one Airflow run per date):

1. ``raw/feedback/dt=D`` is validated (feedback suite); an empty partition skips the day.
2. ``shoprank.labels`` turns the validated events into graded (query, product) pairs
   (dedupe, bot filter, position-bias correction), saved to ``derived/labels/dt=D/``.
3. A daily snapshot ``datasets/daily-D/`` is built: the new pairs minus a holdout of whole
   queries (evaluation on recent feedback), mixed with a replay sample of the golden
   snapshot's training data (``replay_ratio`` of the rows, whole queries) so the model does
   not forget; validation and test are the golden snapshot's, so every day is measured on
   the same fixed golden test set.  **No evaluation query reaches training:** pairs of
   queries in the golden val or test split are dropped from the day's new pairs (counted in
   the manifest as ``rows.dropped_eval_queries``) before the holdout is drawn, replayed
   golden training rows of holdout queries are dropped, and
   :func:`shoprank.datasets.check_no_leakage` refuses the snapshot if any query of the
   train split is still in val, test or the holdout.
4. Mode: **warm start** from the current ``@champion`` weights (not its optimizer state), or
   a **full retrain** from the base model when there is no champion, when the day's data
   drifted beyond the drift thresholds (``SHOPRANK_DRIFT_*``), or when the last full run is older than
   ``full_retrain_every_days``.

Idempotency rule: everything for date D is keyed by D (``shoprank_daily_update/D``): the
snapshot, the checkpoints, the MLflow run and the model version.  Re-running a date reuses
the finished training (with the day's snapshot and warm/full decision as they were) and the
registered version instead of creating duplicates, and the labels are a pure function of the
deduplicated events, so nothing is double counted.  A date whose training did not finish is
prepared again from scratch.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass


from shoprank.config import Settings
from shoprank.storage import RESULT_OBJECT, Storage, checkpoint_prefix, dataset_prefix

log = logging.getLogger(__name__)

DAG_ID = "shoprank_daily_update"


@dataclass(frozen=True)
class UpdatePolicy:
    """The daily update's policy; :meth:`from_env` reads the settings tree's ``daily`` group."""

    replay_ratio: float = 0.5
    holdout_fraction: float = 0.2
    max_holdout_rows: int = 2000
    full_retrain_every_days: int = 30
    min_pairs: int = 20
    warm_steps: int = 60
    full_steps: int = 300
    seed: int = 42
    # how long after the end of day D the run of D waits for an incomplete feedback partition
    # (parts without _SUCCESS) before it skips the day; 0: skip at once
    wait_hours: float = 6.0

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> "UpdatePolicy":
        """The policy of the settings tree's ``daily`` group (``SHOPRANK_DAILY_*``)."""
        from shoprank.config import get_settings

        settings = settings or get_settings()
        d = settings.daily
        return cls(replay_ratio=d.replay_ratio, holdout_fraction=d.holdout_fraction,
                   max_holdout_rows=d.max_holdout_rows, full_retrain_every_days=d.full_retrain_every_days,
                   min_pairs=d.min_pairs, warm_steps=d.max_steps, full_steps=d.full_max_steps,
                   seed=settings.seed, wait_hours=d.wait_hours)

    def feedback_wait(self) -> FeedbackWait:
        """Poke every 10 minutes; the sensor's own timeout is a backstop (the readiness rule
        gives up at ``wait_hours`` after the day ended, which for a late catch-up run is at once)."""
        return FeedbackWait(poke_seconds=600.0, timeout_seconds=max(self.wait_hours, 1.0) * 3600 + 86400)


@dataclass(frozen=True)
class FeedbackWait:
    """The daily DAG's ``wait_for_feedback`` sensor settings (reschedule mode)."""

    poke_seconds: float
    timeout_seconds: float


@dataclass(frozen=True)
class FeedbackReadiness:
    """Whether day D's raw feedback can be validated now (see :func:`feedback_readiness`)."""

    state: str  # "ready" (complete, or nothing there: validation decides), "wait" or "give_up"
    message: str

    @property
    def done(self) -> bool:
        return self.state != "wait"


def feedback_readiness(storage: Storage, day: str, now: dt.datetime | None = None,
                       policy: UpdatePolicy | None = None) -> FeedbackReadiness:
    """Is ``raw/feedback/dt=D/`` ready for the daily run of D?

    * complete (``_SUCCESS``), or no data file at all: ``ready`` (validation then validates it,
      or skips an empty day as before);
    * data files but no ``_SUCCESS`` (an upload in progress; the ranking API marks a day only
      after it ended plus its grace): ``wait`` until ``wait_hours`` after the end of D, then
      ``give_up``: the run skips the day, saying how to run it once the marker exists. An
      incomplete partition is never validated nor promoted."""
    from shoprank.storage import partition_prefix

    policy = policy or UpdatePolicy.from_env()
    now = now or dt.datetime.now(dt.timezone.utc)
    listing = storage.partition_listing("raw", "feedback", day)
    if listing.complete or not (listing.data or listing.nested):
        return FeedbackReadiness("ready", f"raw feedback of {day}: "
                                 + ("complete (_SUCCESS)" if listing.complete else "no data files"))
    deadline = dt.datetime.combine(dt.date.fromisoformat(day) + dt.timedelta(days=1), dt.time(),
                                   tzinfo=dt.timezone.utc) + dt.timedelta(hours=policy.wait_hours)
    n = len(listing.data) + len(listing.nested)
    marker = storage.uri(partition_prefix("raw", "feedback", day) + "_SUCCESS")
    if now < deadline:
        return FeedbackReadiness("wait", f"raw feedback of {day} is not complete yet: {n} data file(s), no "
                                 f"{marker}; waiting until {deadline:%Y-%m-%d %H:%M} UTC "
                                 "(SHOPRANK_DAILY_WAIT_HOURS after the day ended)")
    return FeedbackReadiness("give_up", f"raw feedback of {day} is still not complete {policy.wait_hours:g} h after "
                             f"the day ended: {n} data file(s), no {marker}. The day is skipped, nothing was "
                             "validated or promoted. When the upload is complete, write that empty marker and "
                             f"clear this run (Airflow UI: Clear) or trigger {DAG_ID} for {day} again.")


class NotEnoughSignal(RuntimeError):
    """The day's feedback produced too few labelled pairs to train on (the DAG skips)."""


def golden_snapshot(settings: Settings, storage: Storage) -> str:
    """The snapshot whose test split is the fixed yardstick: the champion's, else the latest."""
    from shoprank.datasets import latest_snapshot
    from shoprank.registry import Registry

    champion = Registry(settings).version_by_alias("champion")
    if champion is not None:
        tags = champion.tags
        return tags.get("golden_snapshot") or tags.get("data_snapshot")
    return latest_snapshot(storage)


def choose_mode(settings: Settings, day: str, drifted: bool, policy: UpdatePolicy) -> tuple[str, str]:
    from shoprank.registry import Registry

    champion = Registry(settings).version_by_alias("champion")
    if champion is None:
        return "full", "no champion yet"
    if drifted:
        return "full", "the day's data drifted beyond the drift thresholds"
    last_full = champion.tags.get("last_full_retrain_date") or champion.tags.get("airflow.logical_date", "")[:10]
    if last_full:
        age = (dt.date.fromisoformat(day) - dt.date.fromisoformat(last_full[:10])).days
        if age >= policy.full_retrain_every_days:
            return "full", f"last full retrain {last_full} is {age} days old (>= {policy.full_retrain_every_days})"
    return "warm", f"warm start from champion version {champion.version}"


def run_key(day: str, variant: str = "") -> str:
    """The key of day D's training (checkpoints, MLflow run, model version): ``shoprank_daily_update/D``.
    A ``variant`` (e.g. the benchmark's "full-retrain" of the same day) gets its own key and snapshot."""
    return f"{DAG_ID}/{day}" + (f"/{variant}" if variant else "")


def snapshot_name(day: str, variant: str = "") -> str:
    return f"daily-{day}" + (f"-{variant}" if variant else "")


def prepare_update(settings: Settings, storage: Storage, day: str, drifted: bool = False,
                   policy: UpdatePolicy | None = None, variant: str = "") -> dict:
    """Steps 2-4 of the module docstring; returns the daily snapshot manifest + decisions.
    Train it under ``run_key(day, variant)``."""
    from shoprank.datasets import check_no_leakage, load_split
    from shoprank.lexical import SNAPSHOT_STATS
    from shoprank.labels import LabelParams, holdout_split, mix_with_replay, to_training_rows

    policy = policy or UpdatePolicy.from_env()
    reused = finished_manifest(storage, day, variant)
    if reused is not None:
        return reused
    params = LabelParams()
    result, online, label_engine = derive_day_labels(settings, storage, day, params)
    storage.write_parquet(result.pairs, f"derived/labels/dt={day}/pairs.parquet")
    cat_day = storage.latest_partition("validated", "catalog", day)
    if cat_day is None:
        raise NotEnoughSignal(f"no validated catalogue on or before {day}: cannot attach product text")
    catalog = storage.read_partition("validated", "catalog", cat_day)
    q_day = storage.latest_partition("validated", "queries", day)
    queries = storage.read_partition("validated", "queries", q_day) if q_day else None
    rows = to_training_rows(result.pairs, catalog, queries, text_template=settings.product_text_template)
    if len(rows) < policy.min_pairs:
        raise NotEnoughSignal(f"feedback of {day} gave {len(rows)} labelled pairs (< {policy.min_pairs}); "
                              "nothing to learn today")
    golden = golden_snapshot(settings, storage)
    golden_val, golden_test = load_split(storage, golden, "val"), load_split(storage, golden, "test")
    evaluation_queries = set(golden_val["query"].astype(str)) | set(golden_test["query"].astype(str))
    in_eval = rows["query"].astype(str).isin(evaluation_queries)
    if in_eval.any():
        log.info("%d of the day's pairs (%d queries) belong to golden val/test queries: left out of training and "
                 "of the holdout", int(in_eval.sum()), rows.loc[in_eval, "query"].nunique())
    dropped_eval = int(in_eval.sum())
    rows = rows[~in_eval].reset_index(drop=True)
    if len(rows) < policy.min_pairs:
        raise NotEnoughSignal(f"feedback of {day} gave {len(rows)} labelled pairs outside the golden val/test "
                              f"queries (< {policy.min_pairs}); nothing to learn today")
    train_new, holdout = holdout_split(rows, policy.holdout_fraction, policy.seed, policy.max_holdout_rows)
    replay = load_split(storage, golden, "train")
    replay = replay[~replay["query"].astype(str).isin(set(holdout["query"].astype(str)))]
    mode, reason = choose_mode(settings, day, drifted, policy)
    if mode == "full":  # from the base model: all of the golden training data plus the new pairs
        mixed = mix_with_replay(train_new, replay, 1.0 - len(train_new) / max(len(train_new) + len(replay), 1),
                                policy.seed)
    else:
        mixed = mix_with_replay(train_new, replay, policy.replay_ratio, policy.seed)
    from shoprank.registry import Registry

    champion = Registry(settings).version_by_alias("champion")
    champion_last_full = (champion.tags.get("last_full_retrain_date", "") if champion else "")
    snapshot = snapshot_name(day, variant)
    check_no_leakage(mixed, {"val": golden_val, "test": golden_test, "recent_holdout": holdout},
                     what=f"daily snapshot {snapshot}")
    prefix = dataset_prefix(snapshot)
    storage.write_parquet(mixed.reset_index(drop=True), prefix + "train.parquet")
    storage.write_parquet(golden_val, prefix + "val.parquet")
    storage.write_parquet(golden_test, prefix + "test.parquet")
    storage.write_parquet(holdout.reset_index(drop=True), prefix + "recent_holdout.parquet")
    stats_key = dataset_prefix(golden) + SNAPSHOT_STATS
    if storage.exists(stats_key):  # the golden catalogue statistics: BM25 on the same test set as ever
        storage.put_bytes(prefix + SNAPSHOT_STATS, storage.get_bytes(stats_key), "application/json")
    manifest = {
        "snapshot": snapshot, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "golden_snapshot": golden, "mode": mode, "mode_reason": reason,
        "rows": {"train": int(len(mixed)), "new": int(len(train_new)), "replay": int(len(mixed) - len(train_new)),
                 "recent_holdout": int(len(holdout)), "test": None,
                 "dropped_eval_queries": dropped_eval},
        "sources": {"feedback": day, "catalog": cat_day, "queries": q_day},
        "label_params": params.as_params(),
        "label_engine": label_engine,
        "label_stats": {k: v for k, v in result.as_metrics().items()},
        "online_metrics": online,
        "update_policy": asdict(policy),
        "recent_holdout_key": prefix + "recent_holdout.parquet",
        "champion_version": champion.version if champion else None,
        "champion_last_full": champion_last_full,
    }
    storage.put_bytes(prefix + "manifest.json", json.dumps(manifest, indent=2, default=str).encode(),
                      "application/json")
    log.info("daily snapshot %s: %s new + %s replay rows, %s holdout rows; mode %s (%s)", snapshot,
             manifest["rows"]["new"], manifest["rows"]["replay"], manifest["rows"]["recent_holdout"], mode, reason)
    return manifest


def finished_manifest(storage: Storage, day: str, variant: str = "") -> dict | None:
    """The stored manifest of day D when D's training already finished, else None.

    A re-run of a finished date (Clear in the UI, ``airflow dags test``, a backfill) keeps the
    day's snapshot and decisions as they were: the registered version was trained on exactly
    those files. Deciding again could differ (e.g. the day's own version is champion by now,
    which would turn a full retrain into a warm start) and would rewrite what the lineage
    points to."""
    key = dataset_prefix(snapshot_name(day, variant)) + "manifest.json"
    done = checkpoint_prefix(run_key(day, variant)) + RESULT_OBJECT
    if not (storage.exists(key) and storage.exists(done)):
        return None
    manifest = json.loads(storage.get_bytes(key))
    log.info("%s was already trained (%s): reusing its snapshot %s and its decisions (mode %s), not deriving them "
             "again", day, storage.uri(done), manifest["snapshot"], manifest["mode"])
    return manifest


def derive_day_labels(settings: Settings, storage: Storage, day: str, params) -> tuple:
    """(:class:`~shoprank.labels.LabelResult`, online metrics per arm, engine) of day D's validated feedback.

    The engine is :func:`shoprank.spark.choose_engine`'s (``SHOPRANK_FEEDBACK_ENGINE``, and for
    ``auto`` the day's Parquet size against ``SHOPRANK_SPARK_MIN_MB``): pandas reads the day into
    memory (:func:`shoprank.labels.derive_labels`); Spark gets the files staged to local disk (or
    read over s3a) and runs :func:`shoprank.labels_spark.derive_labels_spark`, which gives the same
    pairs and stats."""
    from shoprank.labels import derive_labels
    from shoprank.spark import choose_engine
    from shoprank.storage import partition_prefix

    keys = [k for k in storage.partition_files("validated", "feedback", day) if k.endswith(".parquet")]
    engine, why = choose_engine(settings.engine, keys,
                                lambda: storage.sizes(partition_prefix("validated", "feedback", day)))
    log.info("labels of %s: %s engine (%s)", day, engine, why)
    if engine == "spark":
        return (*_labels_on_spark(settings, storage, keys, params), engine)
    events = storage.read_partition("validated", "feedback", day)
    return derive_labels(events, params), _online_metrics(events), engine


def _labels_on_spark(settings: Settings, storage: Storage, keys: list[str], params) -> tuple:
    """The day's files staged (or read over s3a), derived and measured on the process's session."""
    from shoprank.labels_spark import derive_labels_spark, online_metrics_by_arm_spark, read_events
    from shoprank.spark import SparkInput, spark_session

    with SparkInput(settings, storage) as staged:
        spark = spark_session(settings, storage=storage)
        events = read_events(spark, staged.paths(keys))
        result = derive_labels_spark(spark, events, params)
        online = _online_metrics(events, online_metrics_by_arm_spark)
    return result, online


def _online_metrics(events, compute=None) -> dict[str, float]:
    """Per-arm online metrics of the day (``online_<arm>_<metric>``); never fails the update.
    ``compute``: ``online_metrics_by_arm`` (pandas events, the default) or its Spark twin."""
    from shoprank.serving.online import online_metrics_by_arm

    try:
        metrics = (compute or online_metrics_by_arm)(events)
    except Exception as exc:  # a metrics problem must not block training
        log.warning("online metrics per arm not computed: %s", exc)
        return {}
    for key in sorted(k for k in metrics if k.endswith(("_requests", "_ctr", "_mrr"))):
        log.info("%s = %.4g", key, metrics[key])
    return metrics


def train_params(manifest: dict) -> dict:
    """Trainer parameters of a daily update: the policy's step budget per mode, a lower learning
    rate for a warm start than for a full retrain (from the base model)."""
    policy = manifest["update_policy"]
    warm = manifest["mode"] == "warm"
    from shoprank.training.config import DEFAULT_LOSS

    return {"epochs": 1, "batch_size": 16, "lr": 2e-5 if warm else 5e-5, "loss": DEFAULT_LOSS,
            "max_steps": int(policy["warm_steps"] if warm else policy["full_steps"])}


def train_update(settings: Settings, manifest: dict, lineage, data_docs: list[str] | None = None) -> dict:
    """The daily ``train`` task: warm start from ``@champion`` (weights downloaded to a temporary
    folder, removed afterwards) or a full retrain, with the label derivation and the mode in
    the run's params. Returns :func:`shoprank.workflow.train_model`'s result."""
    import shutil
    import tempfile

    from shoprank.workflow import train_model

    params = train_params(manifest)
    extra = {**manifest["label_params"], "daily.mode": manifest["mode"], "daily.mode_reason": manifest["mode_reason"],
             "daily.replay_ratio": manifest["update_policy"]["replay_ratio"]}
    tmp = None
    try:
        if manifest["mode"] == "warm":
            tmp = tempfile.mkdtemp(prefix="shoprank-champion-")
            init_dir, version = champion_init_dir(settings, tmp)
            params["init_from"] = init_dir
            extra["daily.warm_start_from_version"] = version
        return train_model(settings, manifest, params, lineage, data_docs=data_docs, extra_params=extra)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def champion_init_dir(settings: Settings, workdir: str) -> tuple[str, str]:
    """Download the champion's weights for a warm start; (local HF model dir, version)."""
    from shoprank.mlflow_model import download_weights
    from shoprank.registry import Registry

    registry = Registry(settings)
    champion = registry.version_by_alias("champion")
    if champion is None:
        raise RuntimeError("warm start needs a champion, and there is none")
    return download_weights(settings, f"models:/{registry.name}/{champion.version}", workdir), champion.version
