"""Datasets as Airflow assets: names, event contents, the day a run processes, `events landed`."""

from __future__ import annotations

import datetime as dt
import types

import pendulum
import pytest

from shoprank import assets
from shoprank.assets import AssetDateError, day_from_asset_events, resolve_day


def _event(extra=None, partition_key=None):
    """Shaped like Airflow's AssetEventDagRunReference (attributes, not keys)."""
    return types.SimpleNamespace(extra=extra or {}, partition_key=partition_key)


def test_names_and_uris():
    assert assets.asset_name("feedback") == "shoprank-feedback-validated"
    assert assets.asset_name("feedback", "raw") == "shoprank-feedback-raw"
    assert assets.asset_uri("b1", "catalog") == "s3://b1/validated/catalog"
    raw = assets.raw_asset("b1")
    assert (raw.name, raw.uri, raw.group) == ("shoprank-feedback-raw", "s3://b1/raw/feedback", "shoprank")
    assert assets.validated_asset("b1", "queries").uri == "s3://b1/validated/queries"
    with pytest.raises(ValueError):
        assets.asset_name("feedback", "quarantine")


def test_validated_extra_reads_the_validate_result():
    result = {"dataset": "feedback", "date": "2026-11-20", "success": True, "status": "promoted", "rows": 812,
              "data_docs": "reports/data-docs/x.html"}
    extra = assets.validated_extra(result, lambda key: f"s3://b1/{key}")
    assert extra == {"dataset": "feedback", "date": "2026-11-20", "rows": 812, "status": "promoted",
                     "data_docs": "s3://b1/reports/data-docs/x.html"}
    assert assets.validated_extra({**result, "data_docs": None})["data_docs"] == ""
    with pytest.raises(AssetDateError):
        assets.validated_extra({**result, "date": "20.11.2026"})


def test_day_from_asset_events_reads_extra_date():
    # Airflow's triggering_asset_events: a mapping asset -> events
    events = {assets.raw_asset("b1"): [_event({"date": "2026-11-20", "from_rest_api": True})]}
    assert day_from_asset_events(events) == "2026-11-20"
    assert day_from_asset_events([{"extra": {"date": "2026-11-20"}}]) == "2026-11-20"  # plain dicts too


def test_several_days_process_the_oldest_and_name_the_others():
    notes = []
    events = [_event({"date": "2026-11-21"}), _event({"date": "2026-11-19"}), _event({"date": "2026-11-21"})]
    assert day_from_asset_events(events, notes.append) == "2026-11-19"
    assert len(notes) == 1 and "2026-11-21" in notes[0] and "shoprank events landed --date 2026-11-21" in notes[0]


@pytest.mark.parametrize("bad", ["2026-13-01", "20.11.2026", "2026-11-20T00:00:00", "", 20261120, None])
def test_a_bad_date_is_refused_with_its_value(bad):
    with pytest.raises(AssetDateError, match="YYYY-MM-DD") as err:
        day_from_asset_events([_event({"date": bad})])
    assert repr(bad) in str(err.value)


def test_no_date_at_all_is_a_clear_error():
    with pytest.raises(AssetDateError, match="extra.date"):
        day_from_asset_events([_event({"from_rest_api": True})])
    with pytest.raises(AssetDateError, match="extra.date"):
        day_from_asset_events({})


def test_resolve_day_logical_date_then_partition_key_then_events():
    logical = pendulum.datetime(2026, 11, 20, tz="UTC")
    landed = [_event({"date": "2026-11-18"})]
    assert resolve_day(logical, "2026-11-19", landed) == "2026-11-20"  # clock / manual / backfill run
    assert resolve_day(dt.datetime(2026, 11, 20, 0, 0), None, None) == "2026-11-20"
    notes = []
    assert resolve_day(None, "2026-11-19", landed, notes.append) == "2026-11-19"  # asset-triggered run
    assert notes and "2026-11-18" in notes[0]
    assert resolve_day(None, None, landed) == "2026-11-18"  # events without a partition key
    with pytest.raises(AssetDateError, match="partition key"):
        resolve_day(None, "us|2026-11-19", landed)
    with pytest.raises(AssetDateError, match="no logical date, no partition key"):
        resolve_day(None, None, {})


def test_run_day_reads_the_airflow_context():
    from shoprank.airflow_support import run_day

    asset_run = {"partition_key": "2026-11-19", "triggering_asset_events": {}}  # no logical_date key at all
    assert run_day(asset_run) == "2026-11-19"
    assert run_day({"logical_date": pendulum.datetime(2026, 11, 20, tz="UTC"), "partition_key": None}) == "2026-11-20"


def test_emit_validated_sets_extra_and_partition_key():
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from shoprank.airflow_support import emit_validated

    outlet = assets.validated_asset("b1", "catalog")
    ctx = {"outlets": [outlet], "outlet_events": OutletEventAccessors(), "ti": types.SimpleNamespace(task_id="t")}
    result = {"dataset": "catalog", "date": "2026-11-20", "rows": 3, "status": "promoted", "data_docs": ""}
    emit_validated(ctx, result)
    accessor = ctx["outlet_events"][outlet]
    assert accessor.extra["date"] == "2026-11-20" and accessor.extra["rows"] == 3
    assert accessor.partition_keys == {"2026-11-20"}
    with pytest.raises(RuntimeError, match="no outlet 'shoprank-feedback-validated'"):
        emit_validated(ctx, {**result, "dataset": "feedback"})


class _FakeAirflow:
    def __init__(self, asset):
        self.asset, self.posted = asset, []

    def asset_by_name(self, name):
        return self.asset if self.asset and self.asset["name"] == name else None

    def create_asset_event(self, asset_id, extra=None, partition_key=None):
        self.posted.append((asset_id, extra, partition_key))
        return {"id": 41, "asset_id": asset_id, "extra": extra, "partition_key": partition_key}


RAW = {"id": 7, "name": "shoprank-feedback-raw", "uri": "s3://b1/raw/feedback",
       "scheduled_dags": [{"dag_id": "shoprank_daily_update"}]}


def test_announce_landed_posts_a_partitioned_event():
    from shoprank.airflow_client import AirflowAPIError

    client = _FakeAirflow(RAW)
    out = assets.announce_landed(client, "b1", dt.date(2026, 11, 20))
    assert client.posted == [(7, {"date": "2026-11-20"}, "2026-11-20")]
    assert out["scheduled_dags"] == ["shoprank_daily_update"] and out["event"]["id"] == 41
    with pytest.raises(AirflowAPIError, match="another bucket"):
        assets.announce_landed(client, "other-bucket", "2026-11-20")
    with pytest.raises(AirflowAPIError, match="no asset 'shoprank-feedback-raw'"):
        assets.announce_landed(_FakeAirflow(None), "b1", "2026-11-20")
    with pytest.raises(AssetDateError):
        assets.announce_landed(client, "b1", "2026-11-31")


def test_cli_events_landed(monkeypatch, capsys):
    import shoprank.airflow_client
    import shoprank.mlflow_auth
    from shoprank import cli

    client = _FakeAirflow(RAW)
    settings = types.SimpleNamespace(bucket="b1", airflow_url="http://airflow")
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    monkeypatch.setattr(shoprank.airflow_client, "client_for", lambda s: client)
    monkeypatch.setattr(shoprank.mlflow_auth, "export_credentials", lambda: None)
    args = cli.build_parser().parse_args(["events", "landed", "--date", "2026-11-20"])
    assert (args.func, args.action, args.date) == (cli.cmd_events, "landed", dt.date(2026, 11, 20))
    assert cli.main(["events", "landed", "--date", "2026-11-20"]) == 0
    out = capsys.readouterr().out
    assert "landed for 2026-11-20" in out and "queues a run of shoprank_daily_update" in out
    client.asset = {**RAW, "scheduled_dags": []}  # the clock schedule: recorded only
    assert cli.main(["events", "landed", "--date", "2026-11-21"]) == 0
    assert "SHOPRANK_DAILY_TRIGGER=schedule" in capsys.readouterr().out
    client.asset = None
    assert cli.main(["events", "landed", "--date", "2026-11-21"]) == 2
    assert "no asset 'shoprank-feedback-raw'" in capsys.readouterr().err
