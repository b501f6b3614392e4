"""Glue between Airflow tasks and the plain-Python product code.

DAG files stay thin: each task calls one function from here or from the product modules.
Credentials reach tasks through the Airflow connection ``shoprank_s3`` (type ``aws``:
login = access key, password = secret key, extra ``endpoint_url`` / ``region_name``), not
through code or DAG params.  Without that connection, the usual env / .env settings apply.
"""

from __future__ import annotations

import logging

from shoprank.config import Settings, get_settings

log = logging.getLogger(__name__)

S3_CONN_ID = "shoprank_s3"


def task_settings(conn_id: str = S3_CONN_ID) -> Settings:
    """Settings for code running inside an Airflow task."""
    settings = get_settings()
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # connection not defined: fall back to env settings
        log.info("Airflow connection %r not available (%s); using environment settings", conn_id, exc)
        return settings
    extra = conn.extra_dejson or {}
    return settings.replaced(
        aws_access_key_id=conn.login or settings.aws_access_key_id,
        aws_secret_access_key=conn.password or settings.aws_secret_access_key,
        s3_endpoint_url=extra.get("endpoint_url", settings.s3_endpoint_url) or None,  # "" = AWS
        aws_region=extra.get("region_name", settings.aws_region),
    )


def task_storage(conn_id: str = S3_CONN_ID):
    from shoprank.storage import Storage

    return Storage(task_settings(conn_id))


def lineage_from_context(context: dict) -> "Lineage":
    from shoprank.workflow import Lineage

    ti = context["ti"]
    logical = context.get("logical_date")
    return Lineage(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, try_number=int(ti.try_number or 1),
                   logical_date=logical.isoformat() if logical else None)


def daily_schedule(settings: Settings | None = None):
    """The schedule of ``shoprank_daily_update``, by ``SHOPRANK_DAILY_TRIGGER``:

    * ``schedule`` (default): ``CronDataIntervalTimetable("0 0 * * *")``, the run of day D starts
      when D is over, with logical date D (catchup and ``airflow backfill create`` work).
    * ``asset``: ``PartitionedAssetTimetable`` on the raw feedback asset
      (:func:`shoprank.assets.raw_asset`): each "day D landed" event (``partition_key`` = D)
      queues one run for D, with no logical date and partition key D; events for several days
      become several runs, in order (``max_active_runs=1``), never one run mixing days.

    Not the DAG's own ``validated`` feedback asset (its validate task emits it: that would
    loop). Not ``AssetOrTimeSchedule`` (clock OR event): every day would run twice, and it is
    not partition-aware, so a partitioned event would not even trigger it. Not an
    ``AssetWatcher`` on the raw prefix: it needs an event trigger (a message queue fed by S3
    event notifications) that the embedded S3 server does not have; such a watcher, or any
    producer, can post the same partitioned event instead."""
    settings = settings or get_settings()
    if settings.daily.trigger == "asset":
        from airflow.sdk import PartitionedAssetTimetable

        from shoprank.assets import raw_asset

        return PartitionedAssetTimetable(assets=raw_asset(settings.bucket, "feedback"))
    from airflow.timetables.interval import CronDataIntervalTimetable

    # data-interval semantics: the run for day D starts after D ends, with logical date D
    return CronDataIntervalTimetable("0 0 * * *", timezone="UTC")


def run_day(context=None) -> str:
    """The day a daily run processes: logical date, else partition key, else the triggering
    asset events' ``extra["date"]`` (:func:`shoprank.assets.resolve_day`)."""
    from shoprank.assets import resolve_day

    if context is None:
        from airflow.sdk import get_current_context

        context = get_current_context()
    return resolve_day(context.get("logical_date"), context.get("partition_key"),
                       context.get("triggering_asset_events"))


def emit_validated(context, result: dict, storage=None) -> dict:
    """Attach the asset event of a validated partition to the task's ``validated`` outlet:
    partition key = the partition's date, extra = :func:`shoprank.assets.validated_extra`.
    Airflow records it when the task succeeds; a failed or skipped task records none."""
    from shoprank.assets import asset_name, validated_extra

    name = asset_name(result["dataset"])
    asset = next((o for o in context["outlets"] if getattr(o, "name", None) == name), None)
    if asset is None:
        raise RuntimeError(f"task {context['ti'].task_id} has no outlet {name!r}: declare "
                           f"outlets=[shoprank.assets.validated_asset(bucket, {result['dataset']!r})]")
    extra = validated_extra(result, storage.uri if storage is not None else None)
    accessor = context["outlet_events"][asset]
    accessor.extra.update(extra)
    accessor.add_partitions(extra["date"])
    return extra


def approvers() -> list[dict[str, str]] | None:
    """Users allowed to answer the approval (SHOPRANK_APPROVERS="alice,bob"); None = any user."""
    from shoprank.config import get_settings

    return [{"id": n, "name": n} for n in get_settings().approval.names] or None


def approval_timeout():
    """How long the approval waits (SHOPRANK_APPROVAL_TIMEOUT_HOURS, default 24); then: Reject."""
    import datetime as dt

    from shoprank.config import get_settings

    return dt.timedelta(hours=get_settings().approval.timeout_hours)


def promotion_tasks(registered, auto_promote_allowed: bool = False):
    """gate -> approve (Airflow HITL) -> promote, then record_decision (runs in every case);
    after a promotion (by a person or the auto-promotion policy) also ``export`` (ONNX + int8).

    ``registered`` is the XComArg of the register task (dict with ``version``).  Returns the
    last task so callers can chain more work after the decision.
    """
    from airflow.sdk import Param, task

    from shoprank.airflow_operators import RecordedApprovalOperator

    @task.branch
    def gate(reg: dict, **context) -> list[str]:
        """Eligible -> ask a person (or auto-promote when the policy allows); else end here."""
        from shoprank.workflow import gate_version

        decision = gate_version(task_settings(), reg["version"], auto_promote_allowed=auto_promote_allowed)
        context["ti"].xcom_push(key="decision", value=decision)
        print(decision["card"])
        if not decision["eligible"]:
            print("not eligible, nobody is asked: " + "; ".join(decision["reasons"]))
            return ["record_decision"]
        return ["auto_promote" if decision["auto_promote"] else "approve", "record_decision"]

    @task
    def auto_promote(reg: dict, **context) -> dict:
        from shoprank.workflow import apply_auto_promotion

        decision = context["ti"].xcom_pull(task_ids="gate", key="decision") or {}
        return apply_auto_promotion(task_settings(), task_storage(), reg["version"], decision,
                                    airflow_run=context["ti"].run_id)

    approve = RecordedApprovalOperator(
        task_id="approve",
        subject="Promote shoprank model version {{ ti.xcom_pull(task_ids='register')['version'] }} to champion?",
        body="{{ ti.xcom_pull(task_ids='gate', key='decision')['card'] }}",
        defaults="Reject",
        response_timeout=approval_timeout(),
        assigned_users=approvers(),
        params={"comment": Param("", type="string", description="Why (recorded in the audit trail)")},
    )

    @task
    def promote(reg: dict, **context) -> dict:
        from shoprank.workflow import apply_approval

        answer = context["ti"].xcom_pull(task_ids="approve", key="answer") or {}
        return apply_approval(task_settings(), task_storage(), reg["version"], answer,
                              airflow_run=context["ti"].run_id)

    # runs after every decision of a run that got this far (not when the run was skipped
    # earlier, e.g. an empty feedback day), and fails the run if promotion failed
    @task(trigger_rule="none_failed_min_one_success")
    def record_decision(reg: dict, **context) -> dict:
        from shoprank.workflow import record_rejection

        ti = context["ti"]
        answer = ti.xcom_pull(task_ids="approve", key="answer")
        decision = ti.xcom_pull(task_ids="gate", key="decision") or {}
        return record_rejection(task_settings(), task_storage(), reg["version"], answer, decision,
                                airflow_run=ti.run_id)

    # only after a promotion: no edge from register, so a run that promoted nothing (not
    # eligible, rejected, timed out) skips it; a refused export is logged, not a failure
    @task(trigger_rule="none_failed_min_one_success", retries=1)
    def export(**context) -> dict:
        """ONNX fp32 + int8 export of the new champion, checked against PyTorch (see serving.export)."""
        from shoprank.serving.export import export as export_version

        version = context["ti"].xcom_pull(task_ids="register")["version"]
        report = export_version(task_settings(), task_storage(), version)
        return {k: report[k] for k in ("version", "status", "accepted", "refused", "reused") if k in report}

    g = gate(registered)
    a = auto_promote(registered)
    p = promote(registered)
    r = record_decision(registered)
    g >> approve >> p >> r
    g >> a >> r
    g >> r
    [p, a] >> export()
    return r
