"""The steps of the train and daily-update DAGs, as plain functions.

Each function is one Airflow task: it takes and returns JSON-able values (they travel as
XCom), does its I/O through ``shoprank.storage`` / MLflow, and runs without Airflow, so the
CLI and the tests call exactly what the DAGs call.  Training itself runs in a subprocess
(``python -m shoprank.training`` or ``torchrun``), never in the task process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoprank.config import REPO_ROOT, Settings, get_settings
from shoprank.storage import Storage

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


class StepError(RuntimeError):
    """A pipeline step failed in a way the message explains."""


@dataclass(frozen=True)
class Lineage:
    """Where a run comes from; written to MLflow tags and version tags."""

    dag_id: str = "cli"
    run_id: str = "manual"
    task_id: str = ""
    try_number: int = 1
    logical_date: str | None = None
    key: str | None = None  # override, e.g. "<dag>/<date>" so re-runs of a date share it

    @property
    def run_key(self) -> str:
        """Stable across retries of one DAG run: the checkpoint/resume/idempotency key."""
        return self.key or f"{self.dag_id}/{self.run_id}"

    def tags(self) -> dict[str, str]:
        return {"airflow.dag_id": self.dag_id, "airflow.run_id": self.run_id, "airflow.task_id": self.task_id,
                "airflow.try_number": str(self.try_number), "airflow.logical_date": self.logical_date or "",
                "git_sha": git_sha()}


def git_sha() -> str:
    sha = get_settings().general.git_sha
    if sha:
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_ui_link(settings: Settings, run_id: str, experiment_id: str | None = None) -> str:
    from shoprank.links import mlflow_ui_base, run_url

    return run_url(mlflow_ui_base(settings), run_id, experiment_id)


# ---- validation -----------------------------------------------------------------------------

def validate_latest(storage: Storage, dataset: str, run_id: str, on_or_before: str | None = None) -> dict:
    """Validate the newest raw partition of ``dataset`` (on or before a date)."""
    from shoprank.validation import validate_partition

    day = storage.latest_partition("raw", dataset, on_or_before or None)
    if day is None:
        raise StepError(f"no raw partition of {dataset!r} under s3://{storage.bucket}/raw/{dataset}/"
                        + (f" on or before {on_or_before}" if on_or_before else "")
                        + ": drop your files there (see README 'Bring your own data') or run `shoprank generate`")
    outcome = validate_partition(storage, dataset, day, run_id=run_id)
    return outcome_dict(outcome, dataset, day)


def outcome_dict(outcome: Any, dataset: str, day: str) -> dict:
    return {"dataset": dataset, "date": day, "success": bool(outcome.success), "status": outcome.status,
            "rows": int(outcome.row_count or 0), "data_docs": outcome.docs_page_key,
            "data_docs_index": outcome.docs_index_key, "validated_prefix": outcome.validated_prefix,
            "warnings": list(outcome.warnings or [])[:20]}


# ---- snapshot ---------------------------------------------------------------------------------

def make_snapshot(storage: Storage, snapshot: str | None = None, on_or_before: str | None = None,
                  seed: int = 42, **params: Any) -> dict:
    """An existing snapshot by name, or a new one from the latest validated data; ``params`` are
    :class:`shoprank.datasets.SnapshotParams` fields (``n_negatives``, ``n_hard_negatives``, ...)."""
    from dataclasses import asdict

    from shoprank.datasets import SnapshotParams, build_snapshot

    if snapshot:
        key = f"datasets/{snapshot}/manifest.json"
        if not storage.exists(key):
            raise StepError(f"snapshot {snapshot!r} does not exist (no {storage.uri(key)}); "
                            "leave the form field empty to build one from the latest validated data")
        return json.loads(storage.get_bytes(key))
    return asdict(build_snapshot(storage, SnapshotParams(seed=seed, **params), day=on_or_before))


# ---- training -----------------------------------------------------------------------------------

def _stream(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> tuple[int, str]:
    """Run a child process, forwarding its output line by line (shows in the task log)."""
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            print(line, flush=True)
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return rc, "\n".join(tail)


def find_or_create_run(settings: Settings, lineage: Lineage, run_name: str) -> tuple[str, str]:
    """One MLflow run per DAG run: a retry continues the run of its first try."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(settings.mlflow_experiment)
    client = MlflowClient(settings.mlflow_tracking_uri)
    found = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`shoprank.run_key` = '{lineage.run_key}'", max_results=1)
    if found:
        run = found[0]
        log.info("continuing MLflow run %s of %s", run.info.run_id, lineage.run_key)
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, experiment.experiment_id
    run = client.create_run(experiment.experiment_id, run_name=run_name,
                            tags={"shoprank.run_key": lineage.run_key, **lineage.tags()})
    return run.info.run_id, experiment.experiment_id


def train_model(settings: Settings, snapshot: dict, train_params: dict, lineage: Lineage,
                data_docs: list[str] | None = None, workdir: str | None = None,
                extra_params: dict | None = None) -> dict:
    """Train in a subprocess (torchrun when devices x nodes > 1) and log the model to MLflow.

    Without ``workdir`` the local working folder (config, exported model) is removed afterwards:
    the model is in MLflow and the checkpoints a retry resumes from are in S3."""
    run_id, experiment_id = find_or_create_run(settings, lineage, run_name=f"train {snapshot['snapshot']}")
    work = Path(workdir or tempfile.mkdtemp(prefix="shoprank-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _train_in(settings, snapshot, train_params, lineage, data_docs, extra_params, run_id,
                         experiment_id, work)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _train_in(settings: Settings, snapshot: dict, train_params: dict, lineage: Lineage,
              data_docs: list[str] | None, extra_params: dict | None, run_id: str, experiment_id: str,
              work: Path) -> dict:
    import mlflow

    from shoprank.training import TrainConfig
    from shoprank.training.run import build_command, launch_options

    params = {k: v for k, v in train_params.items() if v not in (None, "")}
    config = TrainConfig.from_settings(
        settings, **params, snapshot=snapshot["snapshot"], run_key=lineage.run_key,
        output_dir=str(work / "model"), result_json=str(work / "result.json"), mlflow_run_id=run_id)
    config_path = config.to_json(work / "train_config.json")
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    tags = {"data_snapshot": snapshot["snapshot"], "mlflow.note.content": _run_note(snapshot, lineage, data_docs)}
    if data_docs:
        tags["data_docs"] = " ".join(data_docs)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    logged = set(client.get_run(run_id).data.params)  # a retry must not re-log (params are immutable)
    run_params = {**config.to_dict(), "global_batch_size": config.global_batch_size}
    for key, value in run_params.items():
        if key in ("mlflow_run_id", "mlflow_tracking_uri", "output_dir", "result_json", "checkpoint_dir",
                   "rdzv_endpoint", "rdzv_id", "node_rank") or key in logged:
            continue
        client.log_param(run_id, key, "" if value is None else str(value)[:500])
    for key, value in (extra_params or {}).items():
        if key not in logged:
            client.log_param(run_id, key, str(value)[:500])
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps(snapshot, indent=2))
        client.log_artifact(run_id, str(manifest), "data")
    log_snapshot_inputs(client, run_id, settings, snapshot["snapshot"], ("train", "val"), "training")
    # daily runs: online metrics per A/B arm from the day's feedback (shoprank.serving.online)
    for key, value in (snapshot.get("online_metrics") or {}).items():
        client.log_metric(run_id, key, float(value))
    if data_docs:
        log_data_docs(client, run_id, Storage(settings), data_docs)

    # devices x nodes > 1: torchrun (multi-node: rendezvous from the config or SHOPRANK_RDZV_*)
    launch = launch_options(config, default_rdzv_id=lineage.run_key)
    cmd = build_command(config_path, **launch)
    env = dict(os.environ)
    env.update(settings.as_env())
    env.setdefault("PYTHONUNBUFFERED", "1")
    if config.num_nodes > 1:  # the other nodes read the same config from S3 (docs/distributed.md)
        from shoprank.storage import checkpoint_prefix
        from shoprank.training.run import node_command

        key = checkpoint_prefix(lineage.run_key) + "train_config.json"
        Storage(settings).put_bytes(key, config_path.read_bytes(), "application/json")
        log.info("multi-node run: start on each of the other %d node(s): %s", config.num_nodes - 1,
                 " ".join(node_command(key, launch)))
    log.info("training: %s", " ".join(cmd))
    t0 = time.monotonic()
    rc, tail = _stream(cmd, env)
    if rc != 0:
        client.set_tag(run_id, "shoprank.last_failure", f"training exited with {rc}")
        raise StepError(f"training subprocess exited with code {rc} after {time.monotonic() - t0:.0f}s; "
                        f"a retry of this task resumes from checkpoints/{lineage.run_key}/. Last output:\n{tail}")
    if not (work / "result.json").exists() and config.num_nodes > 1:
        # multi-node: global rank 0 (result + model) ran on another node and marked the run complete
        # in S3; one local process re-exports its best checkpoint here instead of training again
        log.info("rank 0 ran on another node: re-exporting the completed run from S3")
        rc, tail = _stream(build_command(config_path), env)
        if rc != 0:
            raise StepError(f"re-export of the multi-node run failed (exit {rc}). Last output:\n{tail}")
    result = json.loads((work / "result.json").read_text())
    _log_validation_curve(client, run_id, result.get("val_history") or [])
    for key in ("best_val_ndcg_at_10", "global_step", "epochs_completed", "epochs_run", "steps_per_epoch",
                "train_pairs", "train_pairs_per_s"):
        if result.get(key) is not None:
            client.log_metric(run_id, key, float(result[key]))
    fusion = result.get("fusion") or {}
    if fusion.get("kind"):
        client.set_tag(run_id, "fusion", f"{fusion['kind']}: {fusion.get('reason', '')}"[:5000])
        for kind, value in (fusion.get("val_ndcg_at_10") or {}).items():
            client.log_metric(run_id, f"fusion_val_ndcg_at_10_{kind}", float(value))
        for name, value in (fusion.get("weights") or {}).items():
            client.log_metric(run_id, f"fusion_weight_{name}", float(value))
    model_uri = client.get_run(run_id).data.tags.get("shoprank.model_uri")
    if model_uri:
        log.info("run %s already logged its model (%s); reusing it", run_id, model_uri)
    else:
        model_uri = log_model(settings, run_id, Path(result["model_dir"]), snapshot)
        client.set_tag(run_id, "shoprank.model_uri", model_uri)
    return {"mlflow_run_id": run_id, "experiment_id": experiment_id, "model_uri": model_uri,
            "snapshot": snapshot["snapshot"], "train_result": {k: result.get(k) for k in (
                "best_val_ndcg_at_10", "global_step", "resumed_from_step", "epochs_completed", "stopped_early",
                "train_pairs_per_s", "world_size", "precision", "max_steps", "steps_per_epoch", "epochs_run",
                "train_pairs", "fusion")},
            "params": {k: config.to_dict()[k] for k in ("base_model", "loss", "epochs", "lr", "batch_size",
                                                         "max_length", "devices", "num_nodes", "init_from")}}


def log_data_docs(client, run_id: str, storage: Storage, page_keys: list[str]) -> None:
    """Copy the GX Data Docs pages of the batches a run used into the run (viewable in the MLflow UI)."""
    with tempfile.TemporaryDirectory() as tmp:
        for key in page_keys:
            if not key or not storage.exists(key):
                continue
            target = Path(tmp) / key.split("reports/data-docs/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(key, str(target))
        if any(Path(tmp).iterdir()):
            client.log_artifacts(run_id, tmp, "data-docs")


def _log_validation_curve(client, run_id: str, history: list[dict]) -> None:
    from shoprank.evaluation import plot_validation_curve

    if not history:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_validation_curve(history, Path(tmp) / "val_ndcg_curve.png")
        client.log_artifact(run_id, str(path), "plots")


def _run_note(snapshot: dict, lineage: Lineage, data_docs: list[str] | None) -> str:
    lines = [f"Trained by Airflow DAG `{lineage.dag_id}`, run `{lineage.run_id}`.",
             f"Data snapshot `{snapshot['snapshot']}`: rows {snapshot.get('rows')}."]
    if data_docs:
        lines.append("Data Docs: " + ", ".join(data_docs))
    return "\n\n".join(lines)


def log_model(settings: Settings, run_id: str, model_dir: Path, snapshot: dict) -> str:
    import mlflow

    from shoprank.mlflow_model import log_cross_encoder

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return log_cross_encoder(run_id, model_dir, name=MODEL_ARTIFACT)


# ---- gate, approval, promotion ------------------------------------------------------------------

def _registry(settings: Settings, storage: Storage | None = None):
    from shoprank.registry import Registry

    return Registry(settings, storage)


def gate_version(settings: Settings, version: str, auto_promote_allowed: bool = False) -> dict:
    """Evaluate the gate on a version's tags, write the outcome as tags, build the approval card."""
    from dataclasses import replace

    from shoprank.promotion import GatePolicy, approval_card, evaluate_gate

    registry = _registry(settings)
    champion = registry.version_by_alias("champion")
    if champion is not None and champion.version == str(version):
        # a re-run of a date/run that already promoted this version: nothing to decide
        return {"version": str(version), "eligible": False, "auto_promote": False, "already_champion": True,
                "reasons": [f"version {version} is already the champion"], "checks": {},
                "card": f"Version {version} is already the champion; nothing to approve."}
    tags = registry.evidence(version)
    policy = GatePolicy.from_env()
    if not auto_promote_allowed:
        policy = replace(policy, auto_promote=False)
    decision = evaluate_gate(tags, policy)
    # the verdict on the version; each check's outcome on the run, beside the metrics it read
    verdict = decision.as_tags()
    registry.set_tags(version, {k: v for k, v in verdict.items() if not k.startswith("gate.")})
    for key, value in verdict.items():
        if key.startswith("gate.") and tags.get("mlflow_run_id"):
            registry.client.set_tag(tags["mlflow_run_id"], key, value)
    links = {"MLflow run": mlflow_ui_link(settings, tags.get("mlflow_run_id", ""), tags.get("experiment_id"))}
    if champion is not None and champion.run_id:
        from shoprank.links import compare_runs_url, mlflow_ui_base

        links["Compare with champion run"] = compare_runs_url(
            mlflow_ui_base(settings), [tags.get("mlflow_run_id", ""), champion.run_id], [tags.get("experiment_id", "")])
    if tags.get("data_docs"):
        # the pages were copied into the run (artifacts/data-docs/), which the MLflow UI renders
        links["Data Docs"] = mlflow_ui_link(settings, tags.get("mlflow_run_id", ""), tags.get("experiment_id")) \
            + "/artifacts"
    card = approval_card(str(version), {**tags, **decision.as_tags()},
                         champion.version if champion else None, links)
    return {"version": str(version), "eligible": decision.eligible, "auto_promote": decision.auto_promote,
            "reasons": decision.reasons, "checks": decision.checks, "card": card}


def _headline_metrics(tags: dict) -> dict:
    return {k: tags[k] for k in ("ndcg_at_10", "mrr_at_10", "delta_ndcg_at_10_vs_bm25",
                                 "delta_ndcg_at_10_vs_champion") if k in tags}


def apply_approval(settings: Settings, storage: Storage, version: str, answer: dict, airflow_run: str) -> dict:
    """After the approval task: a person chose Approve -> move ``champion``."""
    chosen = (answer or {}).get("chosen_options") or []
    if chosen != ["Approve"]:
        raise StepError(f"promote ran without an approval (answer: {answer!r}); refusing to move champion")
    registry = _registry(settings, storage)
    who = (answer.get("responded_by_user") or {}).get("name") or (answer.get("responded_by_user") or {}).get("id")
    comment = (answer.get("params_input") or {}).get("comment") or "approved in Airflow"
    return registry.promote(version, actor=who or "unknown", reason=comment, airflow_run=airflow_run,
                            metrics=_headline_metrics(registry.evidence(version)), approval=answer)


def apply_auto_promotion(settings: Settings, storage: Storage, version: str, decision: dict,
                         airflow_run: str) -> dict:
    """Promote without a person: only when the gate said so under the auto-promotion policy."""
    if not (decision.get("eligible") and decision.get("auto_promote")):
        raise StepError(f"version {version} is not cleared for auto-promotion: {decision.get('reasons')}")
    registry = _registry(settings, storage)
    return registry.promote(version, actor="auto-promotion policy", reason=decision["checks"].get("auto_promote", ""),
                            airflow_run=airflow_run, metrics=_headline_metrics(registry.evidence(version)))


def record_rejection(settings: Settings, storage: Storage, version: str, answer: dict | None, decision: dict,
                     airflow_run: str) -> dict:
    """Runs after every decision: records a person's Reject (or a timeout) in tags + audit."""
    registry = _registry(settings, storage)
    if decision.get("already_champion"):
        return {"outcome": "already champion"}
    if not decision.get("eligible", False):
        return {"outcome": "not eligible", "reasons": decision.get("reasons", [])}
    if answer is None:
        if decision.get("auto_promote"):
            return {"outcome": "auto-promoted"}
        return {"outcome": "no answer"}
    chosen = answer.get("chosen_options") or []
    if chosen == ["Approve"]:
        return {"outcome": "approved"}
    user = answer.get("responded_by_user") or {}
    who = user.get("name") or user.get("id") or "timeout (default: Reject)"
    why = (answer.get("params_input") or {}).get("comment") or "rejected in Airflow"
    record = registry.reject(version, actor=who, reason=why, airflow_run=airflow_run)
    return {"outcome": "rejected", "record": record}


# ---- evaluation & registration ------------------------------------------------------------------

def train_summary(trained: dict) -> dict[str, str]:
    """What was actually trained, for the approval card and the version (``train.*`` tags)."""
    r = trained.get("train_result") or {}
    out = {}
    for key in ("global_step", "max_steps", "steps_per_epoch", "epochs_run", "train_pairs", "stopped_early"):
        if r.get(key) is not None:
            out[f"train.{key}"] = str(r[key])
    fusion = r.get("fusion") or {}
    if fusion.get("kind"):
        out["train.fusion"] = fusion["kind"]
        out["train.fusion_reason"] = str(fusion.get("reason", ""))[:400]
    return out


def _mlflow_key(name: str) -> str:
    import re

    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def evaluate_model(settings: Settings, storage: Storage, trained: dict, extra_test: dict | None = None) -> dict:
    """Score the snapshot's test split with the packaged challenger, BM25 and the champion.

    Metrics go to the training run (same names in every run, so MLflow's compare view lines
    them up); the champion is pinned by version number so the comparison is reproducible.
    ``extra_test`` = {"name": split_key} adds another evaluation set (e.g. recent feedback),
    logged with that name as a prefix.
    """
    from mlflow import MlflowClient

    from shoprank.datasets import load_lexical_stats, load_split
    from shoprank.evaluation import BM25Scorer, evaluate, plot_slice_metrics
    from shoprank.evaluation.latency import median_ms, paired_ratio, ranking_request, timed_rounds
    from shoprank.evaluation.score_cache import cached_scorer
    from shoprank.mlflow_model import load_scorer
    from shoprank.promotion import GatePolicy
    from shoprank.registry import logged_model_id

    client = MlflowClient(settings.mlflow_tracking_uri)
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    registry = _registry(settings)
    champion = registry.version_by_alias("champion")
    bm25 = BM25Scorer(load_lexical_stats(storage, trained["snapshot"]))
    models = {"challenger": (load_scorer(trained["model_uri"]), logged_model_id(trained["model_uri"]))}
    if champion is not None:
        models["champion"] = (load_scorer(f"models:/{registry.name}/{champion.version}"),
                              logged_model_id(getattr(champion, "source", None)))
    # the models themselves are timed; their scores on an evaluation split are reused from S3
    # when the same model already scored the same rows (evaluation.score_cache)
    cached = {name: cached_scorer(fn, storage, key) for name, (fn, key) in models.items()}
    scorers = {"challenger": cached["challenger"], "bm25": bm25}  # the report's column order
    if "champion" in cached:
        scorers["champion"] = cached["champion"]
    sets = {"": load_split(storage, trained["snapshot"], "test")}
    for name, key in (extra_test or {}).items():
        sets[name + "_"] = storage.read_parquet(key)
    run_id = trained["mlflow_run_id"]
    metrics: dict[str, float] = {}
    summaries = []
    for prefix, test in sets.items():
        print(f"scoring the {prefix.rstrip('_') or 'test'} split: {len(test)} pairs, {test['query'].nunique()} queries, "
              f"with {', '.join(scorers)}", flush=True)
        report = evaluate(test, scorers, baseline_names=("bm25", "champion"))
        for k, v in report.to_dict(candidate="challenger").items():
            metrics[_mlflow_key(prefix + k)] = float(v)
        summaries.append(f"== {prefix or 'test'} ==\n{report.summary()}")
        with tempfile.TemporaryDirectory() as tmp:
            for col in ("query_freq_bucket", "category"):
                path = plot_slice_metrics(report, Path(tmp) / f"{prefix}slices_{col}.png", slice_column=col)
                client.log_artifact(run_id, str(path), "plots")
    # serving latency: one ranking request, challenger and champion timed side by side (evaluation.latency)
    policy = GatePolicy.from_env()
    request = ranking_request(sets[""], policy.latency_candidates)
    rounds = timed_rounds({name: fn for name, (fn, _key) in models.items()}, request)
    timed = median_ms(rounds)
    metrics["latency_candidates"] = float(policy.latency_candidates)
    metrics["latency_ms_per_request"] = timed["challenger"]
    if "champion" in timed:
        metrics["champion_latency_ms_per_request"] = timed["champion"]
        metrics["latency_ratio_vs_champion"] = paired_ratio(rounds, "challenger", "champion")
    summaries.append(f"latency (median of 7 side-by-side rounds after warm-up, ratio paired per round, "
                     f"{policy.latency_candidates} "
                     "candidates per request): " + ", ".join(f"{k} {v:.0f} ms" for k, v in timed.items()))
    # on the run, and on the LoggedModel (MLflow 3's model view, search_logged_models) with the
    # test split as the dataset they were measured on
    test_set = log_snapshot_inputs(client, run_id, settings, trained["snapshot"], ("test",), "evaluation")[0]
    champion_compared = champion.version if champion else "none"  # explicit: the gate reads it
    log_evaluation(client, run_id, metrics, champion_compared, logged_model_id(trained.get("model_uri")), test_set)
    client.set_tag(run_id, "bm25_mode", bm25.mode)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "evaluation.txt").write_text("\n\n".join(summaries))
        client.log_artifact(run_id, str(Path(tmp) / "evaluation.txt"), "evaluation")
    for line in summaries:
        print(line)
    print(f"MLflow run: {mlflow_ui_link(settings, run_id, trained.get('experiment_id'))}")
    return {"metrics": metrics, "champion_version": champion.version if champion else None,
            "champion_compared": champion_compared, "bm25_mode": bm25.mode}


def log_evaluation(client, run_id: str, metrics: dict[str, float], champion_compared: str,
                   model_id: str | None = None, test_set=None) -> None:
    """The evaluation's metrics on the run and its LoggedModel (measured on ``test_set``, an
    MLflow dataset), and which champion they were compared with.  NaN values are not logged:
    the gate reads them as missing and fails closed."""
    dataset = {"dataset_name": test_set.name, "dataset_digest": test_set.digest} if test_set is not None else {}
    for k, v in metrics.items():
        if v == v:  # skip NaN
            client.log_metric(run_id, k, float(v), model_id=model_id, **dataset)
    client.set_tag(run_id, "champion_version", champion_compared)


def log_snapshot_inputs(client, run_id: str, settings: Settings, snapshot: str, splits: tuple[str, ...],
                        context: str) -> list:
    """Log splits of a snapshot as MLflow dataset inputs of the run (the run page's "Datasets"),
    each named ``<snapshot>/<split>`` with its S3 URI as source; returns the datasets."""
    import hashlib

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from shoprank.storage import dataset_prefix

    datasets = []
    for split in splits:
        uri = f"s3://{settings.bucket}/{dataset_prefix(snapshot)}{split}.parquet"
        name = f"{snapshot}/{split}"
        datasets.append(MetaDataset(resolve_dataset_source(uri), name=name,
                                    digest=hashlib.sha256(uri.encode()).hexdigest()[:8]))
    try:
        client.log_inputs(run_id, datasets=[DatasetInput(d._to_mlflow_entity(),
                                                          tags=[InputTag("mlflow.data.context", context)])
                                            for d in datasets])
    except Exception as exc:  # lineage display only: never fail training or evaluation for it
        log.warning("could not log the dataset inputs of %s: %s", run_id, exc)
    return datasets


def validation_status(validated: list[dict]) -> str:
    """``passed`` when every validate task of the run returned a successful outcome, else what failed."""
    if not validated:
        return "missing: no validation result reached this step"
    failed = [f"{v.get('dataset', '?')} dt={v.get('date', '?')} ({v.get('status', 'no status')})"
              for v in validated if not v.get("success")]
    return "passed" if not failed else "failed: " + ", ".join(failed)


def register_model(settings: Settings, storage: Storage, trained: dict, evaluated: dict, lineage: Lineage,
                   validation_status: str | None = None, data_docs: list[str] | None = None,
                   extra_tags: dict | None = None) -> dict:
    """Create the model version (idempotent per DAG run), tag it, point ``challenger`` at it."""
    registry = _registry(settings, storage)
    # the version keeps a handful of tags (the MLflow model page stays readable); metrics are on
    # the run and its LoggedModel, and what was trained goes on the run as train.* tags
    # (Registry.evidence joins them back for the gate and the approval card)
    run_id = trained["mlflow_run_id"]
    client = registry.client
    for key, value in train_summary(trained).items():
        client.set_tag(run_id, key, value)
    tags: dict[str, Any] = {"data_snapshot": trained["snapshot"], "mlflow_run_id": run_id,
                            "airflow.run_key": lineage.run_key, **(extra_tags or {})}
    if validation_status is not None:  # absent: the gate fails closed on it
        tags["validation_status"] = validation_status
    if evaluated.get("champion_compared") is not None:  # absent: the gate fails closed on it
        tags["champion_compared"] = evaluated["champion_compared"]
    if data_docs:  # the run has them too (train step); the approval card links them
        client.set_tag(run_id, "data_docs", " ".join(data_docs))
    for v in client.search_model_versions(f"name='{registry.name}'"):
        if v.tags.get("airflow.run_key") == lineage.run_key:
            log.info("version %s was already registered by %s; reusing it", v.version, lineage.run_key)
            # the run's metrics are those of this evaluation: the version says which champion
            # and which data validation they belong to
            registry.set_tags(v.version, {k: tags[k] for k in ("validation_status", "champion_compared")
                                          if k in tags})
            registry.ensure_challenger(v.version, run_id=run_id)  # a try that died half-way
            return {"version": v.version, "reused": True}
    version = registry.register(trained["model_uri"], run_id, tags,
                                description=f"snapshot {trained['snapshot']}, DAG run {lineage.run_key}")
    print(f"registered {registry.name} version {version} (alias challenger)")
    return {"version": version, "reused": False}
