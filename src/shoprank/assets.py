"""The datasets as Airflow assets: one place names them, and reads the day a run processes.

Two kinds of asset per dataset, both ``s3://<bucket>/<zone>/<dataset>``:

* ``shoprank-<dataset>-validated`` (``validated/<dataset>``): a validate task that promoted a
  partition emits an event for it, with ``partition_key`` = the partition's date and
  ``extra`` = ``{"dataset", "date", "rows", "status", "data_docs"}``. A failed (quarantined)
  or skipped validation emits nothing.
* ``shoprank-feedback-raw`` (``raw/feedback``): a producer (the ranking API's uploader, an ETL
  job, ``shoprank events landed --date D``, or curl against ``POST /api/v2/assets/events``)
  says "day D's feedback has landed" with ``partition_key`` = D and ``extra`` = ``{"date": D}``.
  With ``SHOPRANK_DAILY_TRIGGER=asset`` the daily update is scheduled on it: one run per day.

Asset events are partitioned by the day (Airflow 3.2+ partition keys): a partition-aware
consumer (``PartitionedAssetTimetable``) gets one run per date, with the date as the run's
``partition_key``. Airflow does not queue a plain asset-scheduled DAG for a partitioned event.

Everything here is plain Python (Airflow is imported only to build ``Asset`` objects).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable

GROUP = "shoprank"
DAILY_DAG_ID = "shoprank_daily_update"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class AssetDateError(ValueError):
    """A run cannot tell which day it processes (no logical date, no usable partition key or
    asset-event date), or an asset event carries a date that is not YYYY-MM-DD."""


# ---- naming ------------------------------------------------------------------------------------

def asset_name(dataset: str, zone: str = "validated") -> str:
    """``shoprank-feedback-validated``, ``shoprank-feedback-raw``, ..."""
    if zone not in ("raw", "validated"):
        raise ValueError(f"zone must be raw or validated, not {zone!r}")
    return f"shoprank-{dataset}-{zone}"


def asset_uri(bucket: str, dataset: str, zone: str = "validated") -> str:
    """``s3://<bucket>/<zone>/<dataset>``: the prefix whose ``dt=YYYY-MM-DD/`` partitions the events are about."""
    return f"s3://{bucket}/{zone}/{dataset}"


def validated_asset(bucket: str, dataset: str):
    """The Airflow ``Asset`` of a dataset's validated partitions."""
    from airflow.sdk import Asset

    return Asset(name=asset_name(dataset), uri=asset_uri(bucket, dataset), group=GROUP)


def raw_asset(bucket: str, dataset: str = "feedback"):
    """The Airflow ``Asset`` a producer announces a landed raw partition on."""
    from airflow.sdk import Asset

    return Asset(name=asset_name(dataset, "raw"), uri=asset_uri(bucket, dataset, "raw"), group=GROUP)


# ---- event contents ------------------------------------------------------------------------------

def parse_day(value: Any, what: str = "date") -> str:
    """``value`` as a YYYY-MM-DD string (a date, a datetime, or such a string), else :class:`AssetDateError`."""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str) and _DAY.fullmatch(value.strip()):
        try:
            return dt.date.fromisoformat(value.strip()).isoformat()
        except ValueError:
            pass
    raise AssetDateError(f"{what} {value!r} is not a date in YYYY-MM-DD form")


def landed_extra(day: Any) -> dict[str, str]:
    """``extra`` of a "raw partition landed" event."""
    return {"date": parse_day(day)}


def validated_extra(result: dict, docs_uri: Callable[[str], str] | None = None) -> dict:
    """``extra`` of a "partition validated" event, from a validate task's result
    (:func:`shoprank.workflow.outcome_dict`); ``docs_uri`` turns the Data Docs key into a URI."""
    docs = result.get("data_docs") or ""
    return {"dataset": result["dataset"], "date": parse_day(result["date"], "validated partition date"),
            "rows": int(result.get("rows") or 0), "status": str(result.get("status") or ""),
            "data_docs": docs_uri(docs) if (docs and docs_uri) else docs}


# ---- which day a run processes ------------------------------------------------------------------

def _events(events: Any) -> list:
    if events is None:
        return []
    if isinstance(events, Mapping):  # Airflow's triggering_asset_events: asset -> [event, ...]
        return [e for key in events for e in (events[key] or [])]
    return list(events) if isinstance(events, Iterable) else [events]


def _field(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, Mapping) else getattr(event, name, None)


def day_from_asset_events(events: Any, note: Callable[[str], None] = print) -> str:
    """The day named by asset events' ``extra["date"]`` (Airflow's ``triggering_asset_events``,
    or a list of events or dicts).

    Every date must be YYYY-MM-DD (else :class:`AssetDateError`); no date at all is an
    :class:`AssetDateError` too. Several different days (a plain asset-scheduled run that
    consumed a backlog): the **oldest** is processed, and each other day is passed to ``note``
    with how to run it (each day is its own run; a partition-aware schedule never mixes days)."""
    days: set[str] = set()
    for event in _events(events):
        extra = _field(event, "extra") or {}
        if "date" in extra:
            days.add(parse_day(extra["date"], "asset event extra.date"))
    if not days:
        raise AssetDateError("no triggering asset event carries extra.date (YYYY-MM-DD): announce a day with "
                             "`shoprank events landed --date D`, or trigger the DAG with a logical date")
    day, *others = sorted(days)
    for other in others:
        note(f"the triggering asset events also name {other}; this run processes {day} only. Run {other} "
             f"with `shoprank events landed --date {other}` or trigger {DAILY_DAG_ID} with logical date {other}")
    return day


def resolve_day(logical_date: Any = None, partition_key: Any = None, events: Any = None,
                note: Callable[[str], None] = print) -> str:
    """The day a daily run processes, whichever way it started:

    1. its logical date (a clock run, a manual trigger or backfill with a logical date);
    2. else its partition key (a run of ``SHOPRANK_DAILY_TRIGGER=asset``: one run per landed day,
       or a manual trigger with a partition key);
    3. else the triggering asset events' ``extra["date"]`` (:func:`day_from_asset_events`).

    Idempotency holds across these: everything for a day is keyed by the day
    (:func:`shoprank.daily.run_key`), not by the run."""
    if logical_date is not None:
        return parse_day(logical_date, "logical date")
    if partition_key not in (None, ""):
        day = parse_day(partition_key, "partition key")
        named = {parse_day((_field(e, "extra") or {})["date"], "asset event extra.date")
                 for e in _events(events) if "date" in (_field(e, "extra") or {})}
        if named - {day}:
            note(f"partition key {day} wins over the asset events' extra.date {', '.join(sorted(named - {day}))}")
        return day
    if not _events(events):
        raise AssetDateError("this run has no logical date, no partition key and no triggering asset event: "
                             "trigger it with a logical date (the day to process), or announce the day with "
                             "`shoprank events landed --date D`")
    return day_from_asset_events(events, note)


# ---- producers -------------------------------------------------------------------------------------

def announce_landed(client, bucket: str, day: Any, dataset: str = "feedback") -> dict:
    """Post "raw ``dataset`` of ``day`` has landed" (``POST /api/v2/assets/events``) with
    ``partition_key`` = day and ``extra`` = ``{"date": day}``. Returns the event, the asset and
    the DAGs scheduled on it (empty when the daily update runs on its clock schedule)."""
    from shoprank.airflow_client import AirflowAPIError

    day = parse_day(day)
    name = asset_name(dataset, "raw")
    asset = client.asset_by_name(name)
    if asset is None:
        raise AirflowAPIError(404, "GET", f"/api/v2/assets?name_pattern={name}",
                              f"Airflow has no asset {name!r}: it is registered when the dag-processor parses "
                              f"{DAILY_DAG_ID} (is the DAG folder deployed and parsed?)")
    if asset.get("uri") != asset_uri(bucket, dataset, "raw"):
        raise AirflowAPIError(409, "GET", f"/api/v2/assets?name_pattern={name}",
                              f"asset {name!r} is {asset.get('uri')}, not {asset_uri(bucket, dataset, 'raw')}: "
                              "this Airflow serves another bucket (SHOPRANK_BUCKET)")
    event = client.create_asset_event(asset["id"], extra=landed_extra(day), partition_key=day)
    scheduled = sorted(d["dag_id"] for d in asset.get("scheduled_dags") or [])
    return {"day": day, "asset": asset, "event": event, "scheduled_dags": scheduled}
