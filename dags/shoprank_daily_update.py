"""Daily incremental update from yesterday's feedback logs.

One run per day D, processing the feedback of day D. What starts it (SHOPRANK_DAILY_TRIGGER):
`schedule` (default) the clock, once D is over, with logical date D (catchup: missed days run
in order, one at a time); `asset` a "D landed" event on the asset `shoprank-feedback-raw`
(`shoprank events landed --date D`), one run per day with partition key D. A manual trigger
with a logical date works in both modes.

wait_for_feedback (an upload in progress waits for its _SUCCESS marker) -> validate_catalog (of
day D, if delivered; else skipped) -> validate_feedback (D's late events merged first) -> prepare
(labels, replay mix, warm/full decision) -> train (warm start from @champion) -> evaluate (golden
test set + recent-feedback holdout) -> register -> gate -> auto-promote (if SHOPRANK_AUTO_PROMOTE
and significant) or approve (HITL) -> promote.

An empty feedback partition skips the day (not a failure); an incomplete one (parts, no
`_SUCCESS`) waits up to SHOPRANK_DAILY_WAIT_HOURS after D ended, then skips; a bad one is quarantined and the
run fails with the report, leaving the champion untouched. Re-running a date reuses that
date's training and model version (see shoprank.daily), however the run started. Backfill a
range with `airflow backfill create --dag-id shoprank_daily_update --from-date ... --to-date ...`
(schedule mode), or announce each day (asset mode). The validate tasks emit the validated
partitions as asset events (shoprank.assets).
"""

from __future__ import annotations

from dataclasses import replace

import pendulum
from airflow.sdk import PokeReturnValue, dag, get_current_context, task

from shoprank.airflow_support import (daily_schedule, emit_validated, lineage_from_context, promotion_tasks,
                                      run_day, task_settings, task_storage)
from shoprank.assets import raw_asset, validated_asset
from shoprank.config import get_settings
from shoprank.daily import UpdatePolicy

SETTINGS = get_settings()
WAIT = UpdatePolicy.from_env(SETTINGS).feedback_wait()
START = pendulum.parse(SETTINGS.daily.start_date, tz="UTC")
CATCHUP = SETTINGS.daily.catchup
TRAIN_QUEUE = SETTINGS.airflow.train_queue
BUCKET = SETTINGS.bucket


def _day() -> str:
    """The feedback day a run processes: its logical date (clock, manual, backfill), else its
    partition key (asset-triggered), else the triggering asset events' extra date."""
    return run_day(get_current_context())


@dag(
    dag_id="shoprank_daily_update",
    schedule=daily_schedule(SETTINGS),  # the clock, or "D landed" asset events: see daily_schedule
    start_date=START,
    catchup=CATCHUP,
    max_active_runs=1,
    tags=["shoprank", "daily"],
    doc_md=__doc__,
)
def shoprank_daily_update():
    @task(outlets=[validated_asset(BUCKET, "catalog")])
    def validate_catalog() -> dict:
        """The day's catalogue first (new products appear daily): feedback is checked against it.
        None delivered (or empty): skipped, so no asset event; the latest validated one is used."""
        from airflow.sdk.exceptions import AirflowSkipException

        from shoprank.validation import EmptyPartition, validate_partition
        from shoprank.workflow import outcome_dict

        day, storage, ctx = _day(), task_storage(), get_current_context()
        if day not in storage.list_partitions("raw", "catalog"):
            raise AirflowSkipException(f"no catalogue partition for {day}: feedback is checked against the latest "
                                       "validated one")
        try:
            outcome = validate_partition(storage, "catalog", day, run_id=ctx["ti"].run_id)
        except EmptyPartition as exc:
            raise AirflowSkipException(f"empty catalogue partition for {day} ({exc}); using the latest validated "
                                       "one") from None
        print(outcome.summary())
        result = outcome_dict(outcome, "catalog", day)
        emit_validated(ctx, result, storage)
        return result

    @task.sensor(poke_interval=WAIT.poke_seconds, timeout=WAIT.timeout_seconds, mode="reschedule",
                 inlets=[raw_asset(BUCKET, "feedback")])
    def wait_for_feedback() -> PokeReturnValue:
        """An upload still in progress (parts, no _SUCCESS) waits; after SHOPRANK_DAILY_WAIT_HOURS the day is skipped."""
        from airflow.sdk.exceptions import AirflowSkipException

        from shoprank.daily import feedback_readiness

        ready = feedback_readiness(task_storage(), _day())
        print(ready.message)
        if ready.state == "give_up":
            raise AirflowSkipException(ready.message)
        return PokeReturnValue(is_done=ready.done)

    # runs after the sensor even when there was no catalogue to validate (validate_catalog skipped)
    @task(outlets=[validated_asset(BUCKET, "feedback")], trigger_rule="none_failed_min_one_success")
    def validate_feedback() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from shoprank.serving.events import late_event_days, merge_late_events
        from shoprank.validation import EmptyPartition, validate_partition
        from shoprank.workflow import outcome_dict

        day, storage, ctx = _day(), task_storage(), get_current_context()
        merge_late_events(storage, day)  # a re-run of D validates D's late events with the rest
        for late in late_event_days(storage, before=day):
            print(f"late events of {late} wait in raw/feedback_late/dt={late}/: `shoprank events merge-late "
                  f"--date {late}`, then re-run {late} to validate them")
        try:
            outcome = validate_partition(storage, "feedback", day, run_id=ctx["ti"].run_id)
        except EmptyPartition as exc:
            print(f"skipping {day}: {exc}")
            raise AirflowSkipException(f"no feedback for {day}: {exc}") from None
        result = outcome_dict(outcome, "feedback", day)
        emit_validated(ctx, result, storage)
        # drift beyond the thresholds (in the default "warn" mode) switches the day to a full retrain
        result["drifted"] = list((outcome.drift or {}).get("drifted_metrics", []))
        print(outcome.summary())
        return result

    @task
    def prepare(validated: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from shoprank.daily import NotEnoughSignal, prepare_update

        try:
            return prepare_update(task_settings(), task_storage(), _day(), drifted=bool(validated.get("drifted")))
        except NotEnoughSignal as exc:
            print(f"skipping: {exc}")
            raise AirflowSkipException(str(exc)) from None

    @task(queue=TRAIN_QUEUE, retries=2, retry_delay=pendulum.duration(seconds=10))
    def train(manifest: dict, validated: dict) -> dict:
        from shoprank.daily import run_key, train_update

        lineage = replace(lineage_from_context(get_current_context()), key=run_key(_day()))
        docs = [validated["data_docs"]] if validated.get("data_docs") else None
        return train_update(task_settings(), manifest, lineage, data_docs=docs)

    @task
    def evaluate(trained: dict, manifest: dict) -> dict:
        from shoprank.workflow import evaluate_model

        return evaluate_model(task_settings(), task_storage(), trained,
                              extra_test={"recent": manifest["recent_holdout_key"]})

    @task
    def register(trained: dict, evaluated: dict, manifest: dict, validated: dict) -> dict:
        from shoprank.daily import run_key
        from shoprank.workflow import register_model, validation_status

        day = _day()
        lineage = replace(lineage_from_context(get_current_context()), key=run_key(day))
        tags = {"golden_snapshot": manifest["golden_snapshot"], "daily.date": day, "daily.mode": manifest["mode"],
                "last_full_retrain_date": day if manifest["mode"] == "full" else
                manifest.get("champion_last_full", "")}
        return register_model(task_settings(), task_storage(), trained, evaluated, lineage,
                              validation_status=validation_status([validated]), extra_tags=tags)

    validated = validate_feedback()
    waited = wait_for_feedback()
    waited >> validate_catalog() >> validated
    waited >> validated
    manifest = prepare(validated)
    trained = train(manifest, validated)
    evaluated = evaluate(trained, manifest)
    registered = register(trained, evaluated, manifest, validated)
    promotion_tasks(registered, auto_promote_allowed=True)


shoprank_daily_update()
