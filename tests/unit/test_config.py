import os

import pytest

from shoprank.config import ConfigError, Settings, settings_table


def test_defaults_point_at_embedded_stack(tmp_path):
    s = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none")})
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert s.airflow_url == "http://127.0.0.1:8080"
    assert s.aws_access_key_id is None
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        s.require_s3_credentials()


def test_precedence_env_over_dotenv_over_stack_env(tmp_path):
    (tmp_path / "stack.env").write_text("AWS_ACCESS_KEY_ID=from-stack\nSHOPRANK_BUCKET=stackbucket\nSHOPRANK_S3_PORT=9100\n")
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nexport SHOPRANK_BUCKET='dotenvbucket'\nAWS_SECRET_ACCESS_KEY=\"s3cr3t\"\n")
    s = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(dotenv),
                           "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert s.aws_access_key_id == "from-stack"
    assert s.aws_secret_access_key == "s3cr3t"
    assert s.bucket == "dotenvbucket"
    assert s.s3_endpoint_url == "http://127.0.0.1:9100"
    assert s.mlflow_tracking_uri == "http://mlflow:5000"


def test_empty_endpoint_means_aws(tmp_path):
    s = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_S3_ENDPOINT_URL": "",
                           "SHOPRANK_ENV_FILE": str(tmp_path / "none")})
    assert s.s3_endpoint_url is None


@pytest.mark.parametrize("env,match", [
    ({"SHOPRANK_S3_PORT": "nine"}, "SHOPRANK_S3_PORT"),
    ({"SHOPRANK_BUCKET": "Bad/Bucket"}, "SHOPRANK_BUCKET"),
])
def test_bad_settings_name_the_variable(tmp_path, env, match):
    with pytest.raises(ConfigError, match=match):
        Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none"), **env})


def test_malformed_env_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("GOOD=1\nthis line has no equals\n")
    with pytest.raises(ConfigError, match="bad.env:2"):
        Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(bad)})


def test_secrets_never_in_public_dict_or_repr(tmp_path):
    s = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
                           "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "topsecret"})
    assert "topsecret" not in repr(s)
    assert "topsecret" not in str(s.public_dict())
    assert "AKIAEXAMPLE" not in str(s.public_dict())
    assert s.as_env()["AWS_SECRET_ACCESS_KEY"] == "topsecret"  # for child processes only
    assert "AWS_SECRET_ACCESS_KEY" not in s.as_env(secrets=False)
    admin = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
                               "SHOPRANK_AIRFLOW_ADMIN_PASSWORD": "adm1n", "MLFLOW_AUTH_ADMIN_PASSWORD": "mlfl0w",
                               "SHOPRANK_SERVE_EVENTS_TOKEN": "t0ken", "MLFLOW_TRACKING_PASSWORD": "p1pe"})
    child = admin.as_env()  # what the training subprocess gets: the pipeline's own secrets only
    assert child["MLFLOW_TRACKING_PASSWORD"] == "p1pe"
    assert not {"SHOPRANK_AIRFLOW_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "SHOPRANK_SERVE_EVENTS_TOKEN"} & set(child)


def test_readme_configuration_table_is_generated_from_the_tree():
    import re

    from shoprank.config import REPO_ROOT, VARIABLES, compose_variables, markdown_table

    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- config-table:start[^>]*-->\n\n(.*?)\n<!-- config-table:end -->", readme, re.S)
    assert block, "README lost its generated configuration table"
    assert block.group(1) == markdown_table(), "README table is stale: paste `shoprank config --table`"
    example = (REPO_ROOT / ".env.example").read_text()
    for name in re.findall(r"^#?\s*(SHOPRANK_[A-Z0-9_]+)=", example, re.M):
        assert name in VARIABLES or name in compose_variables(), f".env.example names an unknown setting {name}"
    for name in ("SHOPRANK_APPROVERS", "SHOPRANK_GATE_MAX_REGRESSION", "SHOPRANK_DAILY_MAX_STEPS"):
        assert name in example


def test_library_options_all_have_a_variable():
    """Every field of ValidationOptions / DriftOptions / ServeConfig is settable through the tree."""
    from shoprank.config import VARIABLES
    from shoprank.serving.app import ServeConfig
    from shoprank.validation.options import DriftOptions, ValidationOptions

    for f in ValidationOptions.__dataclass_fields__:
        if f not in ("drift", "now"):
            assert f"SHOPRANK_VALIDATION_{f.upper()}" in VARIABLES, f
    for f in DriftOptions.__dataclass_fields__:
        assert f"SHOPRANK_DRIFT_{f.upper()}" in VARIABLES, f
    for f in ServeConfig.__dataclass_fields__:
        assert ServeConfig.env_name(f) in VARIABLES, f


def test_bad_value_names_variable_value_and_source(tmp_path):
    dotenv = tmp_path / "policy.env"
    dotenv.write_text("SHOPRANK_GATE_MAX_REGRESSION=abc\n")
    with pytest.raises(ConfigError, match=r"SHOPRANK_GATE_MAX_REGRESSION='abc' \(from \.env .*policy\.env\)"):
        Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(dotenv)})
    with pytest.raises(ConfigError, match="SHOPRANK_APPROVAL_TIMEOUT_HOURS='-1'.*greater than 0"):
        Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
                           "SHOPRANK_APPROVAL_TIMEOUT_HOURS": "-1"})


def test_unknown_name_warns_with_the_closest_known_one(tmp_path, caplog):
    import shoprank.config as config

    config._WARNED.discard("SHOPRANK_GATE_MAX_REGRESSON")
    with caplog.at_level("WARNING", logger="shoprank.config"):
        Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
                           "SHOPRANK_GATE_MAX_REGRESSON": "0.5", "SHOPRANK_REDIS_PASSWORD": "compose-only"})
    text = caplog.text
    assert "SHOPRANK_GATE_MAX_REGRESSON" in text and "did you mean SHOPRANK_GATE_MAX_REGRESSION?" in text
    assert "SHOPRANK_REDIS_PASSWORD" not in text  # read by docker compose: known


def test_policy_in_dotenv_reaches_every_reader_and_the_airflow_processes(tmp_path, monkeypatch):
    """.env policy used to be read by hand-written os.environ readers only: set in .env it did nothing."""
    from shoprank.daily import UpdatePolicy
    from shoprank.promotion import GatePolicy
    from shoprank.stack import airflow_env
    from shoprank.validation.options import ValidationOptions

    for key in list(os.environ):
        if key.startswith(("SHOPRANK_", "AWS_", "MLFLOW_")):
            monkeypatch.delenv(key)
    dotenv = tmp_path / ".env"
    dotenv.write_text("SHOPRANK_APPROVERS=alice\nSHOPRANK_GATE_MAX_REGRESSION=0.03\nSHOPRANK_DAILY_MAX_STEPS=7\n"
                      "SHOPRANK_DRIFT_MODE=block\nSHOPRANK_SERVE_MAX_CANDIDATES=99\n"
                      "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n")
    for key, value in {"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(dotenv),
                       "SHOPRANK_AIRFLOW_FERNET_KEY": "x", "SHOPRANK_AIRFLOW_JWT_SECRET": "x",
                       "SHOPRANK_AIRFLOW_ADMIN_PASSWORD": "x", "MLFLOW_TRACKING_USERNAME": "u",
                       "MLFLOW_TRACKING_PASSWORD": "p"}.items():
        monkeypatch.setenv(key, value)
    s = Settings.from_env()
    assert s.approval.names == ["alice"] and s.source_of("SHOPRANK_APPROVERS") == f".env {dotenv}"
    assert GatePolicy.from_env().max_regression_vs_champion == 0.03
    assert UpdatePolicy.from_env().warm_steps == 7
    assert ValidationOptions.from_env().drift.mode == "block"
    from shoprank.serving.app import ServeConfig

    assert ServeConfig.from_env().max_candidates == 99
    env = airflow_env(s)
    assert env["SHOPRANK_APPROVERS"] == "alice" and env["SHOPRANK_GATE_MAX_REGRESSION"] == "0.03"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # credentials only through the connection
    # a child started with that environment (and no .env) resolves the same values
    child = Settings.from_env({**env, "SHOPRANK_ENV_FILE": str(tmp_path / "none")})
    assert child.approval.names == ["alice"] and child.gate.max_regression == 0.03 and child.daily.max_steps == 7


def test_config_command_prints_sources_and_hides_secrets(tmp_path, monkeypatch, capsys):
    from shoprank.cli import main

    for key in list(os.environ):
        if key.startswith(("SHOPRANK_", "AWS_", "MLFLOW_")):
            monkeypatch.delenv(key)
    dotenv = tmp_path / ".env"
    dotenv.write_text("SHOPRANK_BUCKET=from-dotenv\nAWS_SECRET_ACCESS_KEY=topsecret\n")
    monkeypatch.setenv("SHOPRANK_HOME", str(tmp_path))
    monkeypatch.setenv("SHOPRANK_ENV_FILE", str(dotenv))
    monkeypatch.setenv("SHOPRANK_SEED", "7")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "topsecret" not in out and "***" in out
    line = next(ln for ln in out.splitlines() if "SHOPRANK_BUCKET" in ln)
    assert "from-dotenv" in line and f".env {dotenv}" in line
    assert "(environment)" in next(ln for ln in out.splitlines() if "SHOPRANK_SEED" in ln)
    assert "(default)" in next(ln for ln in out.splitlines() if "SHOPRANK_GATE_MAX_REGRESSION" in ln)
