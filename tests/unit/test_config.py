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


def test_readme_documents_every_setting():
    from shoprank.config import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    for name, _default, _doc in settings_table():
        assert f"`{name}`" in readme, f"{name} missing from the README configuration table"
    example = (REPO_ROOT / ".env.example").read_text()
    for name, _default, _doc in settings_table():
        assert name in example, f"{name} missing from .env.example"
