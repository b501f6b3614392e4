"""MLflow model registry: register, aliases, tags, promotion, rejection, rollback, audit.

No stages (deprecated in MLflow): a version's role is given by aliases

* ``challenger``: the newest registered candidate;
* ``champion``: the model serving traffic;
* ``previous``: the champion before the last promotion (rollback target by default).

Where things live, so the registered model's page in the MLflow UI stays readable:

* **metrics** on the version's run and its LoggedModel (where MLflow shows metrics), plus the
  run's ``train.*`` and ``gate.<check>`` tags and its params; :meth:`Registry.evidence` joins
  them with the version's tags for the gate, the approval card and the demo;
* **a handful of version tags**: lineage ids (``mlflow_run_id``, ``airflow.run_key``,
  ``data_snapshot``; the run has the Airflow ids and git sha), what the gate needs to be sure
  of (``validation_status``, ``champion_compared``), the gate's verdict (``gate_eligible``,
  ``gate_auto_promote``, ``gate_reasons``) and who promoted (``promoted_by``/``_at``) or
  rejected it (``rejected_by``, ``rejection_reason``);
* **the audit trail** in S3: one JSON object per alias move or rejection under
  ``audit/registry/<model>/`` (append-only: a new object per record, never rewritten), with a
  readable summary of the roles and the latest moves kept in the registered model's
  description (what the MLflow UI shows at the top of the model page).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from shoprank.config import Settings
from shoprank.storage import Storage

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
# run tags that belong to a version's evidence (the rest of the run's tags is MLflow's own):
# what was trained, each gate check, the Airflow lineage, the git sha and the Data Docs pages
EVIDENCE_RUN_TAG_PREFIXES = ("train.", "gate.", "airflow.", "git_sha", "data_docs")
DESCRIPTION = ("shoprank cross-encoder ranker. Aliases: champion (serving), challenger (newest candidate), "
               "previous (rollback target). Metrics: each version's run (Source run) and its logged model.")
SUMMARY_MOVES = 10  # alias moves listed in the model's description (all of them: `shoprank registry audit`)


def logged_model_id(model_uri: str | None) -> str | None:
    """The LoggedModel id of a ``models:/m-...`` URI (MLflow 3), else None."""
    return model_uri.split("/", 1)[1] if model_uri and model_uri.startswith("models:/m-") else None

class RegistryError(RuntimeError):
    """Unknown version or alias, or a move the rules forbid."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)[:4900]
    return str(value)[:4900]


@dataclass
class Registry:
    settings: Settings
    storage: Storage | None = None

    def __post_init__(self) -> None:
        self.client = MlflowClient(tracking_uri=self.settings.mlflow_tracking_uri,
                                   registry_uri=self.settings.mlflow_tracking_uri)
        self.name = self.settings.registered_model

    def _storage(self) -> Storage:
        """The audit trail's home; built from the settings when none was given."""
        if self.storage is None:
            self.storage = Storage(self.settings)
        return self.storage

    # ---- lookup ---------------------------------------------------------------------------
    def version_by_alias(self, alias: str):
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def version(self, version: str | int):
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException:
            known = self.known_versions()
            raise RegistryError(
                f"model {self.name!r} has no version {version!r}; known versions: {known or 'none'}"
            ) from None

    def known_versions(self) -> list[str]:
        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException:
            return []
        return sorted((v.version for v in found), key=int)

    def resolve(self, ref: str | int) -> str:
        """A version number or an alias (``previous``, ``champion``...) -> version number."""
        ref = str(ref)
        if ref.isdigit():
            return self.version(ref).version
        mv = self.version_by_alias(ref)
        if mv is None:
            raise RegistryError(f"model {self.name!r} has no alias {ref!r}; known versions: "
                                f"{self.known_versions() or 'none'}")
        return mv.version

    # ---- registration -----------------------------------------------------------------------
    def register(self, model_uri: str, run_id: str, tags: dict[str, Any], description: str = "") -> str:
        """Create a version from a logged model, tag it and point ``challenger`` at it."""
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description=DESCRIPTION)
        model_id = logged_model_id(model_uri)
        # tags travel with the create call: a version never exists without them (its
        # ``airflow.run_key`` tag is what makes a retried registration find it instead of
        # creating a duplicate when the server died half-way)
        mv = self.client.create_model_version(self.name, model_uri, run_id=run_id, description=description,
                                              model_id=model_id,
                                              tags={k: _tag_value(v) for k, v in tags.items()})
        self._move(CHALLENGER, mv.version, actor="pipeline", reason="registered", extra={"run_id": run_id})
        return mv.version

    def ensure_challenger(self, version: str, run_id: str = "") -> None:
        """Point ``challenger`` at ``version`` unless it already points there or at a newer version."""
        current = self.version_by_alias(CHALLENGER)
        if current is None or int(current.version) < int(version):
            self._move(CHALLENGER, str(version), actor="pipeline", reason="registered (retry)",
                       extra={"run_id": run_id})

    def set_tags(self, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, _tag_value(value))

    def tags(self, version: str) -> dict[str, str]:
        return dict(self.version(version).tags)

    def evidence(self, version: str) -> dict[str, str]:
        """Everything recorded about a version, as strings: its run's experiment, metrics
        (formatted like tags), params (``param.<name>``) and its ``train.*``, ``gate.*``,
        ``airflow.*``, ``git_sha`` and ``data_docs`` tags, then the version's own tags on top.  What the gate, the approval card and the demo read; a value the run
        never logged is simply absent (the gate fails closed on it)."""
        mv = self.version(version)
        run_id = mv.run_id or mv.tags.get("mlflow_run_id")
        out: dict[str, str] = {}
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as exc:
                log.warning("version %s: its run %s cannot be read (%s); its metrics count as missing",
                            version, run_id, exc)
            else:
                out["experiment_id"] = run.info.experiment_id
                out.update({k: _tag_value(v) for k, v in run.data.metrics.items()})
                out.update({f"param.{k}": v for k, v in run.data.params.items()})
                out.update({k: v for k, v in run.data.tags.items() if k.startswith(EVIDENCE_RUN_TAG_PREFIXES)})
        out.update(mv.tags)
        return out

    # ---- promotion ------------------------------------------------------------------------------
    def promote(self, version: str, actor: str, reason: str = "", airflow_run: str | None = None,
                metrics: dict[str, Any] | None = None, approval: dict | None = None) -> dict:
        """``champion`` -> version; old champion -> ``previous``; tags + audit record.

        Refused (:class:`RegistryError`) unless the version's tags record a gate pass
        (``gate_eligible=true``) evaluated against the current champion, and either
        ``approval`` is a person's Approve answer or the gate cleared it for auto-promotion
        (``gate_auto_promote=true``).
        """
        version = self.version(version).version
        old = self.version_by_alias(CHAMPION)
        if old is not None and old.version == version:
            raise RegistryError(f"version {version} is already the champion")
        self._check_promotable(version, old.version if old else None, approval)
        if old is not None:
            self._move(PREVIOUS, old.version, actor, f"replaced by version {version}", airflow_run)
        record = self._move(CHAMPION, version, actor, reason or "approved", airflow_run, metrics,
                            extra={"previous_champion": old.version if old else None})
        # who and when; the why and the Airflow run are in the audit record
        self.set_tags(version, {"promoted_by": actor, "promoted_at": record["ts"]})
        return record

    def _check_promotable(self, version: str, champion: str | None, approval: dict | None) -> None:
        tags = self.tags(version)
        if tags.get("gate_eligible") != "true":
            raise RegistryError(
                f"version {version} has not passed the promotion gate (gate_eligible="
                f"{tags.get('gate_eligible', 'missing')}: {tags.get('gate_reasons', 'the gate never ran')}); "
                "champion not moved")
        compared = tags.get("champion_compared")
        if compared is not None and compared != (champion or "none"):
            raise RegistryError(
                f"version {version} was compared with version {compared} but the champion is now version "
                f"{champion or 'none'}: re-evaluate and re-gate it first; champion not moved")
        if approval is None:
            if tags.get("gate_auto_promote") != "true":
                raise RegistryError(f"version {version} needs a person's approval: the gate did not clear it "
                                    "for auto-promotion; champion not moved")
        elif (approval.get("chosen_options") or []) != ["Approve"]:
            raise RegistryError(f"version {version}: the answer {approval.get('chosen_options')!r} is not an "
                                "approval; champion not moved")

    def reject(self, version: str, actor: str, reason: str, airflow_run: str | None = None) -> dict:
        """Record a rejection; ``challenger`` stays on the version so it can be inspected."""
        version = self.version(version).version
        self.set_tags(version, {"rejected_by": actor, "rejection_reason": reason})
        return self._audit("reject", CHALLENGER, version, actor, reason, airflow_run)

    def rollback(self, target: str = PREVIOUS, actor: str = "unknown", reason: str = "rollback",
                 airflow_run: str | None = None) -> dict:
        """Move ``champion`` back to ``target`` (a version number or an alias).

        Any version that was champion before (tag ``promoted_by``) or passed the gate is a
        valid target; a version the gate failed and nobody promoted is refused.
        """
        version = self.resolve(target)
        current = self.version_by_alias(CHAMPION)
        if current is not None and current.version == version:
            raise RegistryError(f"version {version} is already the champion; nothing to roll back")
        tags = self.tags(version)
        if not tags.get("promoted_by") and tags.get("gate_eligible") != "true":
            raise RegistryError(f"version {version} was never champion and did not pass the gate "
                                f"({tags.get('gate_reasons', 'the gate never ran')}); pick an earlier champion")
        if current is not None:
            self._move(PREVIOUS, current.version, actor, f"rolled back to version {version}", airflow_run)
        return self._move(CHAMPION, version, actor, reason, airflow_run,
                          extra={"rolled_back_from": current.version if current else None}, action="rollback")

    # ---- audit ------------------------------------------------------------------------------
    def _move(self, alias: str, version: str, actor: str, reason: str, airflow_run: str | None = None,
              metrics: dict | None = None, extra: dict | None = None, action: str = "set_alias") -> dict:
        self.client.set_registered_model_alias(self.name, alias, str(version))
        log.info("alias %s of %s -> version %s (%s, by %s)", alias, self.name, version, reason, actor)
        return self._audit(action, alias, str(version), actor, reason, airflow_run, metrics, extra)

    def _audit(self, action: str, alias: str, version: str, actor: str, reason: str, airflow_run: str | None,
               metrics: dict | None = None, extra: dict | None = None) -> dict:
        record = {"ts": _now(), "model": self.name, "action": action, "alias": alias, "version": version,
                  "actor": actor, "reason": reason, "airflow_run": airflow_run, "metrics": metrics or {},
                  **(extra or {})}
        key = f"audit/registry/{self.name}/{record['ts']}-{uuid.uuid4().hex[:8]}.json"
        self._storage().put_bytes(key, json.dumps(record, sort_keys=True).encode(), "application/json")
        self._write_summary()
        return record

    def audit_trail(self) -> list[dict]:
        """All records, oldest first, from S3."""
        storage = self._storage()
        return [json.loads(storage.get_bytes(k)) for k in storage.list_keys(f"audit/registry/{self.name}/")]

    def _write_summary(self) -> None:
        """The model's description: the roles now and the latest moves, in words (the MLflow UI
        shows it at the top of the model page).  Derived from S3 and rewritten on every move;
        a failure here never undoes or hides a move (the S3 record is already written)."""
        try:
            roles = []
            for alias in (CHAMPION, CHALLENGER, PREVIOUS):
                mv = self.version_by_alias(alias)
                roles.append(f"**{alias}**: {'version ' + mv.version if mv else 'none'}")
            moves = [summary_line(r) for r in self.audit_trail()[-SUMMARY_MOVES:]]
            text = "\n".join([DESCRIPTION, "", " · ".join(roles), "",
                               f"Latest moves (all of them: `shoprank registry audit`, or "
                               f"s3://{self.settings.bucket}/audit/registry/{self.name}/):", "",
                               *(f"- {m}" for m in reversed(moves))])
            self.client.update_registered_model(self.name, description=text)
        except Exception as exc:  # noqa: BLE001 - the summary is a view of the trail, not the trail
            log.warning("could not update the description of %s: %s", self.name, exc)


def summary_line(record: dict) -> str:
    """One audit record in words: ``2026-12-03 14:02 UTC: version 4 -> champion by alice (reason)``."""
    ts = str(record.get("ts", ""))
    when = f"{ts[:10]} {ts[11:16]} UTC" if len(ts) >= 16 else ts
    what = {"reject": f"version {record.get('version')} rejected",
            "rollback": f"rolled back: version {record.get('version')} -> {record.get('alias')}"}.get(
        record.get("action"), f"version {record.get('version')} -> {record.get('alias')}")
    reason = f" ({record['reason']})" if record.get("reason") else ""
    return f"{when}: {what} by {record.get('actor', 'unknown')}{reason}"
