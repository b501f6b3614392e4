"""`shoprank demo` / `make demo`: the whole story on the embedded stack.

1. start the local stack (S3, MLflow, Airflow) and print its URLs;
2. generate a synthetic marketplace into ``raw/`` for day 0;
3. trigger the ``shoprank_train`` DAG over Airflow's REST API (as the UI does), wait for
   its approval step, approve it (as a person would in *Required Actions*), and show the
   ``champion`` alias move in MLflow;
4. close the loop for ``days`` days: serve rankings from the champion to simulated shoppers
   (clicks follow hidden true relevance with position bias), write that day's feedback,
   run ``shoprank_daily_update`` for the date and answer its approval; then one day of
   corrupted feedback, which is quarantined and leaves the champion unchanged;
5. print the NDCG@10 trajectory on the golden test set (queries that never entered any
   training data) and where to look; leave the stack running.

Along the way it relays training progress from the Airflow task log, prints every gate
verdict with its reasons and what to change, and never ends in a traceback: a refusal is a
result (the story goes on without that model), and only something broken (a failed task, a
corrupted day that got through) makes it exit non-zero, with the reason.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time

from shoprank.airflow_client import AirflowClient, client_for
from shoprank.stack import Stack, prepared_settings
from shoprank.storage import Storage

TRAIN_DAG = "shoprank_train"


# log lines of long tasks worth showing in the terminal (training progress, evaluation, fusion)
RELAYED = re.compile(r"(step \d+/\d+ .*eta|validation at step|fusion|scoring the|latency \(|training (ok|starts)|"
                     r"snapshot .* rows|NDCG@10)")
RELAYED_TASKS = ("train", "evaluate", "snapshot", "prepare")


class LogRelay:
    """Prints the new progress lines of running long tasks (the Airflow task log, over REST)."""

    def __init__(self, client: AirflowClient, dag_id: str, run_id: str, progress=print):
        self.client, self.dag_id, self.run_id, self.progress = client, dag_id, run_id, progress
        self.seen: dict[tuple[str, int], int] = {}

    def poll(self, tis: dict[str, dict]) -> None:
        for task_id in RELAYED_TASKS:
            ti = tis.get(task_id)
            if not ti or ti.get("state") not in ("running", "success", "up_for_retry", "failed"):
                continue
            key = (task_id, int(ti.get("try_number") or 1))
            if ti.get("state") != "running" and key in self.seen and self.seen[key] < 0:
                continue  # finished and fully relayed
            try:
                lines = self.client.task_log_lines(self.dag_id, self.run_id, task_id, key[1])
            except Exception:  # the log may not exist yet; progress is a nicety, never a failure
                continue
            start = max(self.seen.get(key, 0), 0)
            for line in lines[start:]:
                if RELAYED.search(line):
                    self.progress(f"    {task_id}: {line.strip()[:200]}")
            self.seen[key] = len(lines) if ti.get("state") == "running" else -1


def wait_for_state(client: AirflowClient, dag_id: str, run_id: str, task_id: str, states: set[str],
                   timeout: float = 3600, progress=print, relay: LogRelay | None = None) -> dict:
    """Wait until a task reaches one of ``states`` (or the run ends); print progress."""
    deadline = time.monotonic() + timeout
    last = None
    relay = relay or LogRelay(client, dag_id, run_id, progress)
    while time.monotonic() < deadline:
        tis = {ti["task_id"]: ti for ti in client.task_instances(dag_id, run_id)}
        summary = ", ".join(f"{t}={ti['state']}" for t, ti in tis.items() if ti["state"])
        if summary != last:
            progress(f"  [{dag_id}] {summary}")
            last = summary
        relay.poll(tis)
        ti = tis.get(task_id)
        if ti and ti["state"] in states:
            return ti
        run = client.run(dag_id, run_id)
        if run["state"] in ("success", "failed"):
            raise RunEnded(run, tis)
        time.sleep(3)
    raise TimeoutError(f"{task_id} of {dag_id} did not reach {states} within {timeout:.0f}s")


class RunEnded(RuntimeError):
    """The DAG run finished before the awaited task got there (e.g. the gate refused the model)."""

    def __init__(self, run: dict, tis: dict[str, dict]):
        self.run, self.states = run, {t: ti.get("state") for t, ti in tis.items()}
        super().__init__(f"{run.get('dag_id')} run {run.get('dag_run_id')} ended {run.get('state')}: {self.states}")


def answer_approval(client: AirflowClient, dag_id: str, run_id: str, option: str, comment: str,
                    progress=print) -> dict:
    """Answer the approval step like a person would (after it has settled; see BRIEF 6)."""
    wait_for_state(client, dag_id, run_id, "approve", {"awaiting_input", "deferred"}, progress=progress)
    time.sleep(5)  # an answer within ~0.3 s of awaiting_input fails the task
    details = client.hitl_details(dag_id, run_id, "approve")
    progress(f"  approval card:\n{details.get('body', '')}")
    return client.answer(dag_id, run_id, "approve", option, {"comment": comment})


def train_and_approve(client: AirflowClient, conf: dict, progress=print, option: str = "Approve",
                      timeout: float = 3600) -> tuple[str, dict]:
    """Trigger the train DAG and answer its approval; a run the gate stops ends without asking."""
    client.wait_for_dag(TRAIN_DAG)
    client.unpause(TRAIN_DAG)
    run = client.trigger(TRAIN_DAG, conf=conf)
    run_id = run["dag_run_id"]
    progress(f"triggered {TRAIN_DAG} run {run_id}")
    try:
        answer_approval(client, TRAIN_DAG, run_id, option, f"demo: {option.lower()}d after reading the card",
                        progress=progress)
    except RunEnded as ended:
        return run_id, ended.run
    final = client.wait_for_run(TRAIN_DAG, run_id, timeout=timeout, progress=progress)
    return run_id, final


def gate_verdict(registry, airflow_run_key: str) -> tuple[str | None, dict]:
    """(version, evidence) registered by a DAG run (None when it registered nothing)."""
    for v in registry.client.search_model_versions(f"name='{registry.name}'"):
        if v.tags.get("airflow.run_key") == airflow_run_key:
            return v.version, registry.evidence(v.version)
    return None, {}


ADVICE = {
    "beats_bm25": "train longer (max_steps), keep fusion=auto, add judged queries, or check the data",
    "enough_evidence": "judge more queries (or raise the test fraction) so the test split has enough to decide",
    "no_regression_vs_champion": "the champion stays; more steps or more feedback days may beat it",
    "serving_latency": "a smaller base model or shorter max_length, or a wider SHOPRANK_GATE_MAX_LATENCY_* budget",
    "data_validation": "fix the data named in the quarantine report and re-run",
}


def print_verdict(version: str | None, tags: dict, progress=print) -> bool:
    """Print a version's gate verdict with reasons and what to change; True when eligible."""
    if version is None:
        progress("   no model version was registered (see the task logs)")
        return False
    eligible = tags.get("gate_eligible") == "true"
    ndcg, bm25 = tags.get("ndcg_at_10"), tags.get("bm25_ndcg_at_10")
    progress(f"   version {version}: NDCG@10 {_num(ndcg)} vs BM25 {_num(bm25)} (delta 95% CI "
             f"[{_num(tags.get('delta_ndcg_at_10_vs_bm25_lo'), '+')}, {_num(tags.get('delta_ndcg_at_10_vs_bm25_hi'), '+')}])"
             f" on {_num(tags.get('n_queries'), 'n')} golden test queries; ranking score: {tags.get('train.fusion', 'n/a')}")
    progress(f"   gate: {'ELIGIBLE' if eligible else 'REFUSED'}")
    for check in sorted(k for k in tags if k.startswith("gate.")):
        progress(f"     {check[5:]}: {tags[check]}")
    if not eligible:
        for check in sorted(k for k in tags if k.startswith("gate.") and tags[k].startswith("fail")):
            progress(f"     what to change ({check[5:]}): {ADVICE.get(check[5:], 'see the approval card')}")
    return eligible


def _num(value, kind: str = "") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.0f}" if kind == "n" else (f"{v:+.4f}" if kind == "+" else f"{v:.4f}")


DEMO_PROFILE = "realistic"


def run_demo(days: int = 3, products: int = 1500, queries: int = 600, keep_running: bool = True) -> int:
    """The whole story; returns the exit code (0 unless something is broken). Never raises."""
    t0 = time.monotonic()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars between the story's lines
    try:
        return _story(days, products, queries, keep_running)
    except KeyboardInterrupt:
        print("\ninterrupted; the stack is left running (shoprank stack down stops it)")
        return 130
    except Exception as exc:  # the demo explains, it does not print a traceback
        print(f"\nthe demo stopped because something is broken: {type(exc).__name__}: {exc}")
        print("  look at the task logs in the Airflow UI and $SHOPRANK_HOME/logs/; "
              "`shoprank stack status` shows the services")
        return 1
    finally:
        print(f"\ndemo took {(time.monotonic() - t0) / 60:.1f} minutes")


def _story(days: int, products: int, queries: int, keep_running: bool) -> int:
    from shoprank.cli import print_urls
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.registry import Registry

    settings = prepared_settings()
    stack = Stack(settings)
    print("== 1. starting the local stack")
    stack.up()
    print_urls(stack)
    storage = Storage(settings)
    storage.ensure_bucket()
    # past dates, clear of the daily DAG's own run for yesterday
    day0 = dt.date.today() - dt.timedelta(days=days + 10)
    print(f"== 2. generating a synthetic marketplace for {day0} ({products} products, {queries} queries)")
    # The realistic profile (the one bench/bench_ranking_recipe.py measures): judgment lists
    # drawn mostly from a search engine's top results, keyword-stuffed listings and accessories
    # among the products, brand / model-code queries and typos. A shop's BM25 is strong here,
    # so the fine-tuned cross-encoder has to earn its promotion.
    market = generate_marketplace(n_products=products, n_queries=queries, seed=settings.seed, start=day0,
                                  profile=DEMO_PROFILE)
    market.write_to_storage(storage, day0)
    from shoprank.simulation import save_marketplace_params

    save_marketplace_params(storage, n_products=products, n_queries=queries, seed=settings.seed,
                            start=day0.isoformat(), profile=DEMO_PROFILE)
    print(f"   {len(market.catalog)} products, {len(market.queries)} queries, {len(market.judgments)} judgments "
          f"-> s3://{settings.bucket}/raw/")

    client = client_for(settings)
    registry = Registry(settings, storage)
    print("== 3. training DAG (validate -> snapshot -> train -> evaluate -> register -> gate -> approve)")
    # the step budget of the recipe benchmark (bench/README.md); the loss and fusion are the
    # form's defaults (listwise, fusion=auto)
    conf = {"epochs": 3, "max_steps": 200, "batch_size": 16, "lr": 5e-5, "max_length": 64,
            "data_date": day0.isoformat()}
    run_id, final = train_and_approve(client, conf)
    print(f"   {TRAIN_DAG} run {run_id}: {final['state']}")
    version, tags = gate_verdict(registry, f"{TRAIN_DAG}/{run_id}")
    eligible = print_verdict(version, tags)
    problems: list[str] = []
    if final["state"] != "success":
        problems.append(f"{TRAIN_DAG} run {run_id} ended {final['state']}: {client.task_states(TRAIN_DAG, run_id)}")
    champion = registry.version_by_alias("champion")
    trajectory = []
    if champion is not None:
        ctags = registry.evidence(champion.version)
        print(f"== 4. champion is version {champion.version}")
        trajectory.append((day0.isoformat(), "train: promoted", champion.version, float(ctags["ndcg_at_10"])))
    else:
        why = "the gate refused it (above)" if version and not eligible else "no version was approved"
        print(f"== 4. no champion: {why}. The story goes on: shoppers are served by BM25 and each daily "
              "update retrains from the base model")
        trajectory.append((day0.isoformat(), "train: refused", None, None))
    daily, daily_problems = daily_loop(client, settings, storage, registry, day0, days)
    trajectory += daily
    problems += daily_problems
    print("\n== NDCG@10 of the champion on the golden test queries (never in any training data), day by day")
    print(f"   {'date':<12}{'step':<26}{'champion':<10}{'NDCG@10':>8}")
    for day, step, version_, ndcg in trajectory:
        shown = f"{ndcg:>8.4f}" if ndcg is not None else f"{'-':>8}"
        print(f"   {day:<12}{step:<26}{('v' + str(version_)) if version_ else 'none':<10}{shown}")
    print_urls(stack)
    champion = registry.version_by_alias("champion")  # the current one, after the daily updates
    if champion is not None:
        ctags = registry.evidence(champion.version)
        print(f"  MLflow run of the champion (v{champion.version}): {settings.mlflow_tracking_uri}/#/experiments/"
              f"{ctags.get('experiment_id', '')}/runs/{ctags.get('mlflow_run_id', '')}")
    print(f"  Registered model: {settings.mlflow_tracking_uri}/#/models/{settings.registered_model}")
    if not keep_running:
        stack.down()
    if problems:
        print("\nthe demo found problems:\n- " + "\n- ".join(problems))
        return 1
    return 0


DAILY_DAG = "shoprank_daily_update"


def daily_run(client: AirflowClient, day: dt.date, progress=print) -> tuple[str, dict, dict]:
    """Trigger the daily update for ``day``; approve when it asks (eligible challenger)."""
    client.wait_for_dag(DAILY_DAG)
    client.unpause(DAILY_DAG)
    run_id = client.trigger(DAILY_DAG, logical_date=f"{day.isoformat()}T00:00:00+00:00")["dag_run_id"]
    progress(f"triggered {DAILY_DAG} for {day}")
    relay = LogRelay(client, DAILY_DAG, run_id, progress)
    deadline = time.monotonic() + 3600
    answered = False
    last = None
    while time.monotonic() < deadline:
        run = client.run(DAILY_DAG, run_id)
        tis = {ti["task_id"]: ti for ti in client.task_instances(DAILY_DAG, run_id)}
        states = {t: ti.get("state") for t, ti in tis.items()}
        summary = ", ".join(f"{t}={st}" for t, st in states.items() if st)
        if summary != last:
            progress(f"  [{DAILY_DAG}] {summary}")
            last = summary
        relay.poll(tis)
        if run["state"] in ("success", "failed"):
            return run_id, run, states
        if not answered and states.get("approve") in ("awaiting_input", "deferred"):
            answer_approval(client, DAILY_DAG, run_id, "Approve", "demo: daily update approved", progress=progress)
            answered = True
        time.sleep(3)
    raise TimeoutError(f"{DAILY_DAG} for {day} did not finish in an hour")


def daily_loop(client: AirflowClient, settings, storage: Storage, registry, day0: dt.date,
               days: int) -> tuple[list, list[str]]:
    """(trajectory rows, problems): a failed daily run or a corrupted day that got through."""
    from shoprank.daily import run_key
    from shoprank.simulation import simulate_and_write

    out, problems = [], []
    for i in range(1, days + 1):
        day = day0 + dt.timedelta(days=i)
        ranker = "champion" if registry.version_by_alias("champion") is not None else "bm25"
        sim = simulate_and_write(settings, day, n_sessions=60, seed=i, ranker=ranker)
        served = f"champion v{sim['model_version']}" if ranker == "champion" else "BM25 (no champion yet)"
        print(f"== day {day}: {sim['events']} events served by {served} {sim['by_type']}")
        run_id, run, states = daily_run(client, day)
        promoted = "success" in (states.get("promote"), states.get("auto_promote"))
        print(f"   {DAILY_DAG} {day}: {run['state']}; {'promoted' if promoted else 'not promoted'}")
        version, tags = gate_verdict(registry, run_key(day.isoformat()))
        if states.get("prepare") == "skipped":
            print("   skipped: too little new signal today (see the prepare task log)")
        else:
            print_verdict(version, tags)
        if run["state"] != "success":
            problems.append(f"{DAILY_DAG} for {day} ended {run['state']}: {states}")
        champion = registry.version_by_alias("champion")
        ndcg = float(registry.evidence(champion.version)["ndcg_at_10"]) if champion is not None else None
        out.append((day.isoformat(), "daily: promoted" if promoted else "daily: not promoted",
                    champion.version if champion else None, ndcg))
    # a corrupted day: quarantined, the model does not change
    bad_day = day0 + dt.timedelta(days=days + 1)
    champion = registry.version_by_alias("champion")
    before = champion.version if champion else None
    simulate_and_write(settings, bad_day, n_sessions=20, seed=99, ranker="champion" if champion else "bm25")
    events = storage.read_partition("raw", "feedback", bad_day)
    events.loc[events.index[: len(events) // 3], "event_type"] = "hover"  # not in the contract
    events.loc[events.index[: len(events) // 5], "position"] = -1
    storage.write_partition(events, "raw", "feedback", bad_day)
    print(f"== day {bad_day}: corrupted feedback (unknown event types, negative positions)")
    run_id, run, states = daily_run(client, bad_day)
    champion = registry.version_by_alias("champion")
    after = champion.version if champion else None
    quarantined = storage.list_keys(f"quarantine/feedback/dt={bad_day.isoformat()}/")
    print(f"   {DAILY_DAG} {bad_day}: {run['state']} (validate_feedback={states.get('validate_feedback')}); "
          f"champion {before} -> {after}; {len(quarantined)} objects in quarantine/feedback/dt={bad_day}/ "
          "(expected: the run fails at validation, nothing else moves)")
    if run["state"] != "failed" or states.get("validate_feedback") != "failed" or not quarantined or after != before:
        problems.append(f"the corrupted day {bad_day} was not stopped by validation: {states}")
    out.append((bad_day.isoformat(), "corrupted: quarantined", after,
                float(registry.evidence(after)["ndcg_at_10"]) if after else None))
    return out, problems
