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
5. print the NDCG@10 trajectory on the golden test set and where to look; leave the stack
   running.
"""

from __future__ import annotations

import datetime as dt
import time

from shoprank.airflow_client import AirflowClient, client_for
from shoprank.stack import Stack, prepared_settings
from shoprank.storage import Storage

TRAIN_DAG = "shoprank_train"


def wait_for_state(client: AirflowClient, dag_id: str, run_id: str, task_id: str, states: set[str],
                   timeout: float = 1800, progress=print) -> dict:
    """Wait until a task reaches one of ``states`` (or the run ends); print progress."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        tis = {ti["task_id"]: ti for ti in client.task_instances(dag_id, run_id)}
        summary = ", ".join(f"{t}={ti['state']}" for t, ti in tis.items() if ti["state"])
        if summary != last:
            progress(f"  [{dag_id}] {summary}")
            last = summary
        ti = tis.get(task_id)
        if ti and ti["state"] in states:
            return ti
        run = client.run(dag_id, run_id)
        if run["state"] in ("success", "failed"):
            raise RuntimeError(f"{dag_id} run {run_id} ended ({run['state']}) before {task_id} reached {states}: "
                               f"{summary}")
        time.sleep(3)
    raise TimeoutError(f"{task_id} of {dag_id} did not reach {states} within {timeout:.0f}s")


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
    client.wait_for_dag(TRAIN_DAG)
    client.unpause(TRAIN_DAG)
    run = client.trigger(TRAIN_DAG, conf=conf)
    run_id = run["dag_run_id"]
    progress(f"triggered {TRAIN_DAG} run {run_id}")
    answer_approval(client, TRAIN_DAG, run_id, option, f"demo: {option.lower()}d after reading the card",
                    progress=progress)
    final = client.wait_for_run(TRAIN_DAG, run_id, timeout=timeout, progress=progress)
    return run_id, final


def run_demo(days: int = 3, products: int = 1500, queries: int = 200, keep_running: bool = True) -> int:
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.registry import Registry

    settings = prepared_settings()
    stack = Stack(settings)
    print("== 1. starting the local stack")
    stack.up()
    storage = Storage(settings)
    storage.ensure_bucket()
    # past dates, clear of the daily DAG's own run for yesterday
    day0 = dt.date.today() - dt.timedelta(days=days + 10)
    print(f"== 2. generating a synthetic marketplace for {day0} ({products} products, {queries} queries)")
    # Shoppers who often use other words than the catalogue (synonyms) and make typos: where
    # lexical BM25 fails and a fine-tuned cross-encoder earns its keep.
    rates = {"synonym_rate": 0.8, "typo_rate": 0.3}
    market = generate_marketplace(n_products=products, n_queries=queries, seed=settings.seed, start=day0, **rates)
    market.write_to_storage(storage, day0)
    from shoprank.simulation import save_marketplace_params

    save_marketplace_params(storage, n_products=products, n_queries=queries, seed=settings.seed,
                            start=day0.isoformat(), **rates)
    print(f"   {len(market.catalog)} products, {len(market.queries)} queries, {len(market.judgments)} judgments "
          f"-> s3://{settings.bucket}/raw/")

    client = client_for(settings)
    print("== 3. training DAG (validate -> snapshot -> train -> evaluate -> register -> gate -> approve)")
    conf = {"epochs": 1, "max_steps": 150, "batch_size": 16, "lr": 5e-5, "max_length": 64,
            "data_date": day0.isoformat()}
    run_id, final = train_and_approve(client, conf)
    print(f"   {TRAIN_DAG} run {run_id}: {final['state']}")
    registry = Registry(settings, storage)
    champion = registry.version_by_alias("champion")
    if final["state"] != "success" or champion is None:
        print("the training run did not produce a champion; see the task logs in the Airflow UI")
        return 1
    tags = registry.tags(champion.version)
    print(f"== 4. champion is version {champion.version}: NDCG@10 {float(tags['ndcg_at_10']):.4f} "
          f"vs BM25 {float(tags.get('bm25_ndcg_at_10', 'nan')):.4f} "
          f"(delta 95% CI [{float(tags.get('delta_ndcg_at_10_vs_bm25_lo', 'nan')):+.4f}, "
          f"{float(tags.get('delta_ndcg_at_10_vs_bm25_hi', 'nan')):+.4f}])")
    trajectory = [(day0.isoformat(), "train", champion.version, float(tags["ndcg_at_10"]))]
    daily, problems = daily_loop(client, settings, storage, registry, day0, days)
    trajectory += daily
    print("\n== NDCG@10 of the champion on the golden test set, day by day")
    print(f"   {'date':<12}{'step':<26}{'champion':<10}{'NDCG@10':>8}")
    for day, step, version, ndcg in trajectory:
        print(f"   {day:<12}{step:<26}{'v' + str(version):<10}{ndcg:>8.4f}")
    from shoprank.cli import print_urls

    print_urls(stack)
    print(f"  MLflow run of the champion: {settings.mlflow_tracking_uri}/#/experiments/"
          f"{tags.get('experiment_id', '')}/runs/{tags.get('mlflow_run_id', '')}")
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
    deadline = time.monotonic() + 3600
    answered = False
    while time.monotonic() < deadline:
        run = client.run(DAILY_DAG, run_id)
        states = client.task_states(DAILY_DAG, run_id)
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
    from shoprank.simulation import simulate_and_write

    out, problems = [], []
    for i in range(1, days + 1):
        day = day0 + dt.timedelta(days=i)
        sim = simulate_and_write(settings, day, n_sessions=60, seed=i, ranker="champion")
        print(f"== day {day}: {sim['events']} events served by champion v{sim['model_version']} {sim['by_type']}")
        run_id, run, states = daily_run(client, day)
        champion = registry.version_by_alias("champion")
        tags = registry.tags(champion.version)
        promoted = "success" in (states.get("promote"), states.get("auto_promote"))
        step = "daily: promoted" if promoted else "daily: not promoted"
        print(f"   {DAILY_DAG} {day}: {run['state']}; champion v{champion.version}")
        if run["state"] != "success":
            problems.append(f"{DAILY_DAG} for {day} ended {run['state']}: {states}")
        out.append((day.isoformat(), step, champion.version, float(tags["ndcg_at_10"])))
    # a corrupted day: quarantined, the model does not change
    bad_day = day0 + dt.timedelta(days=days + 1)
    before = registry.version_by_alias("champion").version
    simulate_and_write(settings, bad_day, n_sessions=20, seed=99, ranker="champion")
    events = storage.read_partition("raw", "feedback", bad_day)
    events.loc[events.index[: len(events) // 3], "event_type"] = "hover"  # not in the contract
    events.loc[events.index[: len(events) // 5], "position"] = -1
    storage.write_partition(events, "raw", "feedback", bad_day)
    print(f"== day {bad_day}: corrupted feedback (unknown event types, negative positions)")
    run_id, run, states = daily_run(client, bad_day)
    after = registry.version_by_alias("champion").version
    quarantined = storage.list_keys(f"quarantine/feedback/dt={bad_day.isoformat()}/")
    print(f"   {DAILY_DAG} {bad_day}: {run['state']} (validate_feedback={states.get('validate_feedback')}); "
          f"champion v{before} -> v{after}; {len(quarantined)} objects in quarantine/feedback/dt={bad_day}/")
    if run["state"] != "failed" or states.get("validate_feedback") != "failed" or not quarantined or after != before:
        problems.append(f"the corrupted day {bad_day} was not stopped by validation: {states}")
    out.append((bad_day.isoformat(), "corrupted: quarantined", after,
                float(registry.tags(after)["ndcg_at_10"])))
    return out, problems
