"""`shoprank` command line: every option documented, per-action help, hints for misused positionals."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import types

import pytest

from shoprank import cli
from shoprank.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the root and every (sub-)subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, path + (name,))


def _help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_every_option_and_positional_is_documented():
    parsers = list(_walk(build_parser()))
    assert {p for p, _ in parsers} >= {(), ("stack",), ("stack", "up"), ("registry", "rollback"),
                                       ("events", "merge-late"), ("validate",), ("demo",), ("simulate",)}
    missing, undescribed = [], []
    for path, parser in parsers:
        if path and not (parser.description or "").strip():
            undescribed.append(" ".join(path))
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                # each choice is listed with a one-line summary
                listed = {a.dest for a in action._choices_actions}
                missing += [f"{' '.join(path)} {name}" for name in action.choices if name not in listed]
                continue
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path) or 'shoprank'} {action.option_strings or action.dest}")
    assert not missing, f"options without help: {missing}"
    assert not undescribed, f"subcommands without a description: {undescribed}"


def test_help_shows_defaults_and_formats(capsys):
    text = " ".join(_help_of(["simulate", "--help"], capsys).split())
    assert "YYYY-MM-DD" in text and "(default: 80)" in text and "(default: champion)" in text
    assert "--seed N random seed" in text and "integer (default: 0)" in text  # 0 is a default too
    text = " ".join(_help_of(["demo", "--help"], capsys).split())
    assert "(default: 3)" in text and "(default: 1500)" in text and "default 600" in text
    text = " ".join(_help_of(["validate", "--help"], capsys).split())
    assert "--date YYYY-MM-DD" in text and "manual__" in text and "example" in text
    # no "(default: None)" / "(default: False)" noise anywhere
    for path, parser in _walk(build_parser()):
        assert "(default: None)" not in parser.format_help(), path
        assert "(default: False)" not in parser.format_help(), path


def test_registry_rollback_help_is_its_own(capsys):
    out = _help_of(["registry", "rollback", "--help"], capsys)
    assert "usage: shoprank registry rollback" in out
    assert "--target" in out and "--reason" in out and "--actor" in out
    assert "{status,audit,rollback}" not in out and "registry ACTION" not in out
    group = _help_of(["registry", "--help"], capsys)
    assert "rollback" in group and "audit" in group
    assert "--target VERSION" not in group  # the group lists actions; their options are in their own help


def test_positional_given_as_a_flag_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--dataset", "catalog", "--date", "2026-11-20"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --dataset" in err
    assert "hint: dataset is positional (no --dataset): shoprank validate catalog --date 2026-11-20" in err


@pytest.mark.parametrize("argv, suggestion", [
    (["validate", "--dataset=catalog", "--date", "2026-11-20"], "shoprank validate catalog --date 2026-11-20"),
    (["stack", "--action", "up"], "shoprank stack up"),
    (["registry", "--action", "rollback", "--target", "3"], "shoprank registry rollback --target 3"),
    (["import", "--path", "/data", "esci", "--date", "2026-11-01"], "shoprank import esci /data --date 2026-11-01"),
    (["--command", "stack", "status"], "shoprank stack status"),
])
def test_hint_suggests_a_command_line_that_parses(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is positional" in err and err.rstrip().endswith(suggestion), err
    build_parser().parse_args(suggestion.split()[1:])  # and the suggestion parses


def test_other_errors_have_no_hint(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["validate", "catalog", "--bogus", "--date", "2026-11-20"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: shoprank validate" in err and "unrecognized arguments: --bogus" in err and "hint" not in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["events", "merge-late"])
    assert "required: --date" in capsys.readouterr().err


def test_existing_invocations_still_parse():
    p = build_parser()
    a = p.parse_args(["registry", "rollback", "--target", "3"])
    assert (a.func, a.action, a.target, a.reason, a.actor) == (cli.cmd_registry, "rollback", "3", None, None)
    for action in ("status", "audit"):
        a = p.parse_args(["registry", action])
        assert (a.action, a.target, a.reason, a.actor) == (action, None, None, None)
    a = p.parse_args(["registry", "rollback", "--target", "previous", "--reason", "bad v4", "--actor", "ops"])
    assert (a.target, a.reason, a.actor) == ("previous", "bad v4", "ops")
    a = p.parse_args(["stack", "up"])
    assert (a.func, a.action, a.services) == (cli.cmd_stack, "up", None)
    assert p.parse_args(["stack", "up", "--services", "s3", "mlflow"]).services == ["s3", "mlflow"]
    for action in ("down", "status"):
        assert p.parse_args(["stack", action]).action == action
    a = p.parse_args(["events", "merge-late", "--date", "2026-11-20"])
    assert (a.func, a.action, a.date) == (cli.cmd_events, "merge-late", dt.date(2026, 11, 20))
    a = p.parse_args(["events", "pending"])
    assert (a.action, a.date) == ("pending", None)
    a = p.parse_args(["validate", "queries", "--date", "2026-11-20", "--run-id", "cli-x"])
    assert (a.dataset, a.date, a.run_id) == ("queries", dt.date(2026, 11, 20), "cli-x")
    assert p.parse_args(["validate", "catalog", "--date", "2026-11-20"]).run_id is None
    a = p.parse_args(["-v", "simulate", "--date", "2026-11-02", "--ranker", "bm25", "--bot-fraction", "0.1"])
    assert (a.verbose, a.sessions, a.seed, a.ranker, a.bot_fraction) == (True, 80, 0, "bm25", 0.1)
    a = p.parse_args(["demo"])
    assert (a.days, a.products, a.queries) == (3, 1500, 600)
    a = p.parse_args(["mlflow-user", "add", "alice"])
    assert (a.action, a.username) == ("add", "alice")
    a = p.parse_args(["export"])
    assert (a.version, a.force, a.tolerance) == ("champion", False, None)
    a = p.parse_args(["generate"])
    assert (a.products, a.queries, a.seed, a.date, a.profile) == (2000, 600, 42, dt.date.today(), "default")
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "--date", "20-11-2026"])


class _FakeRegistry:
    name = "shoprank-ranker"
    calls: list = []

    def __init__(self, settings, storage):
        pass

    def rollback(self, target, actor, reason):
        self.calls.append((target, actor, reason))
        return {"version": "3" if target != "previous" else "2", "rolled_back_from": "4"}

    def version_by_alias(self, alias):
        return types.SimpleNamespace(version="4") if alias == "champion" else None

    def audit_trail(self):
        return [{"ts": "2026-11-20T10:00:00", "action": "rollback", "alias": "champion", "version": "3",
                 "actor": "ops", "reason": "bad v4"}]


def test_registry_actions_print_what_they_did(monkeypatch, capsys):
    import shoprank.mlflow_auth
    import shoprank.registry
    import shoprank.storage

    monkeypatch.setattr(cli, "get_settings", lambda: object())
    monkeypatch.setattr(shoprank.registry, "Registry", _FakeRegistry)
    monkeypatch.setattr(shoprank.storage, "Storage", lambda settings: None)
    monkeypatch.setattr(shoprank.mlflow_auth, "export_credentials", lambda: None)
    monkeypatch.setenv("USER", "tester")
    _FakeRegistry.calls = []

    assert cli.main(["registry", "rollback", "--target", "3"]) == 0
    assert capsys.readouterr().out == "champion of shoprank-ranker is now version 3 (was 4)\n"
    assert cli.main(["registry", "rollback"]) == 0
    assert _FakeRegistry.calls == [("3", "tester", "rollback from CLI"), ("previous", "tester", "rollback from CLI")]
    capsys.readouterr()
    assert cli.main(["registry", "status"]) == 0
    assert capsys.readouterr().out == "champion    version 4\nchallenger  -\nprevious    -\n"
    assert cli.main(["registry", "audit"]) == 0
    # one line per record, in the words of the MLflow model page's summary (registry.summary_line)
    assert capsys.readouterr().out == "2026-11-20 10:00 UTC: rolled back: version 3 -> champion by ops (bad v4)\n"


def test_airflow_env_turns_off_mlflow_progress_bars(tmp_path, monkeypatch):
    """MLflow's tqdm bars go to stderr, which Airflow task logs show at error level."""
    from shoprank.config import Settings
    from shoprank.stack import airflow_env

    for key in list(os.environ):
        if key.startswith(("SHOPRANK_", "AIRFLOW", "MLFLOW_", "AWS_", "HF_")):
            monkeypatch.delenv(key)
    settings = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
                                  "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    for key in ("SHOPRANK_AIRFLOW_FERNET_KEY", "SHOPRANK_AIRFLOW_JWT_SECRET", "SHOPRANK_AIRFLOW_ADMIN_PASSWORD"):
        monkeypatch.setenv(key, "x")  # as test_compose does; any stack.env lands in tmp_path
    env = airflow_env(settings)
    assert env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"

    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"])
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False  # the name and value MLflow reads
