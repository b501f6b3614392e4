"""A small client for Airflow 3's public REST API (``/api/v2``), used by the demo and tests.

Auth: ``POST /auth/token`` with the simple auth manager's user/password returns a JWT.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

TERMINAL_RUN_STATES = {"success", "failed"}


class AirflowAPIError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str):
        super().__init__(f"Airflow API {method} {path} -> HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class AirflowClient:
    base_url: str
    username: str
    password: str
    timeout: float = 30.0
    _token: str | None = field(default=None, repr=False)

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        req = urllib.request.Request(self.base_url.rstrip("/") + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and auth and self._token is not None:
                self._token = None  # expired: fetch a new one once
                return self._request(method, path, body, auth)
            raise AirflowAPIError(exc.code, method, path, exc.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            out = self._request("POST", "/auth/token", {"username": self.username, "password": self.password},
                                auth=False)
            self._token = out["access_token"]
        return self._token

    # dags & runs
    def health(self) -> dict:
        return self._request("GET", "/api/v2/monitor/health", auth=False)

    def dag(self, dag_id: str) -> dict:
        return self._request("GET", f"/api/v2/dags/{dag_id}")

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict:
        """Wait until the dag-processor has parsed ``dag_id`` (fresh stacks need a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.dag(dag_id)
            except AirflowAPIError as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    errors = self._request("GET", "/api/v2/importErrors")
                    raise AirflowAPIError(exc.status, "GET", f"/api/v2/dags/{dag_id}",
                                          f"DAG not available; import errors: {errors}") from None
            time.sleep(1.0)

    def unpause(self, dag_id: str) -> None:
        self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None, logical_date: str | None = None,
                run_id: str | None = None) -> dict:
        body: dict[str, Any] = {"logical_date": logical_date, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self._request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)

    def run(self, dag_id: str, run_id: str) -> dict:
        return self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def runs(self, dag_id: str, run_type: str | None = None, order_by: str = "-logical_date") -> list[dict]:
        """The DAG's runs, newest logical date first (also runs made by `airflow dags test`).
        ``run_type``: only those (``asset_triggered``, ``manual``, ``scheduled``, ``backfill``);
        asset-triggered runs have no logical date: order them with ``order_by="-id"``."""
        query = {"order_by": order_by, "limit": 100, **({"run_type": run_type} if run_type else {})}
        return self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns?{urllib.parse.urlencode(query)}")["dag_runs"]

    def clear_run(self, dag_id: str, run_id: str) -> dict:
        """Re-run every task of a DAG run (what "Clear" does in the UI)."""
        return self._request("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances",
                             {"dry_run": False, "dag_run_id": run_id, "only_failed": False,
                              "reset_dag_runs": True, "include_downstream": True})

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        out = self._request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances")
        return out["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600.0,
                     until: Callable[[dict], bool] | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
        """Poll a run until it is finished (or ``until(run)`` holds); print task progress."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            run = self.run(dag_id, run_id)
            if progress:
                states = self.task_states(dag_id, run_id)
                summary = ", ".join(f"{t}={s}" for t, s in states.items() if s)
                if summary != last:
                    progress(f"  [{dag_id}] {run['state']}: {summary}")
                    last = summary
            if (until and until(run)) or run["state"] in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f}s")
            time.sleep(2.0)

    def task_log_lines(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> list[str]:
        """The task's log so far, as text lines (Airflow 3 returns structured entries)."""
        out = self._request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                   f"/taskInstances/{task_id}/logs/{try_number}?full_content=true")
        content = (out or {}).get("content", [])
        if isinstance(content, str):
            return content.splitlines()
        lines = []
        for entry in content:
            if isinstance(entry, dict):
                lines.append(str(entry.get("event", "")))
            else:
                lines.append(str(entry))
        return lines

    def extra_links(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, str | None]:
        """The task instance's extra links, name -> URL (None: no URL for this task instance)."""
        out = self._request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                   f"/taskInstances/{task_id}/links?map_index={map_index}")
        return dict(out["extra_links"])

    # assets
    def assets(self, name_pattern: str | None = None) -> list[dict]:
        """Assets whose name contains ``name_pattern`` (all of them without)."""
        query = {"limit": 100, **({"name_pattern": name_pattern} if name_pattern else {})}
        return self._request("GET", f"/api/v2/assets?{urllib.parse.urlencode(query)}")["assets"]

    def asset_by_name(self, name: str) -> dict | None:
        """The asset named exactly ``name`` (with its id, uri and scheduled_dags), or None."""
        return next((a for a in self.assets(name) if a["name"] == name), None)

    def create_asset_event(self, asset_id: int, extra: dict | None = None, partition_key: str | None = None) -> dict:
        """``POST /api/v2/assets/events``: what a producer posts when data has landed; Airflow
        queues the DAGs scheduled on the asset (``extra`` gains ``from_rest_api: true``)."""
        body: dict[str, Any] = {"asset_id": asset_id, "extra": extra or {}}
        if partition_key is not None:
            body["partition_key"] = partition_key
        return self._request("POST", "/api/v2/assets/events", body)

    def asset_events(self, name_pattern: str | None = None, source_dag_id: str | None = None,
                     source_run_id: str | None = None, limit: int = 100) -> list[dict]:
        """Asset events, newest first, filtered by asset name (contains) and by producing DAG / run."""
        query: dict[str, Any] = {"order_by": "-timestamp", "limit": limit}
        query.update({k: v for k, v in (("name_pattern", name_pattern), ("source_dag_id", source_dag_id),
                                        ("source_run_id", source_run_id)) if v})
        return self._request("GET", f"/api/v2/assets/events?{urllib.parse.urlencode(query)}")["asset_events"]

    # human in the loop
    def hitl_details(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict:
        return self._request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                   f"/taskInstances/{task_id}/{map_index}/hitlDetails")

    def answer(self, dag_id: str, run_id: str, task_id: str, option: str, params_input: dict | None = None,
               map_index: int = -1) -> dict:
        return self._request(
            "PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                     f"/taskInstances/{task_id}/{map_index}/hitlDetails",
            {"chosen_options": [option], "params_input": params_input or {}})


def client_for(settings, user: str = "admin") -> AirflowClient:
    """A client for the embedded stack: ``admin`` with the generated admin password, or another
    user of ``SHOPRANK_AIRFLOW_USERS`` with the password generated for it
    (``$SHOPRANK_HOME/airflow/passwords.json``)."""
    import json

    from shoprank.stack import secret

    if user == "admin":
        return AirflowClient(settings.airflow_url, "admin", secret(settings, "SHOPRANK_AIRFLOW_ADMIN_PASSWORD"))
    path = settings.home / "airflow" / "passwords.json"
    passwords = json.loads(path.read_text()) if path.is_file() else {}
    if user not in passwords:
        raise AirflowAPIError(401, "LOGIN", user, f"no password for Airflow user {user!r} in {path}: add the user to "
                                                  "SHOPRANK_AIRFLOW_USERS and restart the stack")
    return AirflowClient(settings.airflow_url, user, passwords[user])
