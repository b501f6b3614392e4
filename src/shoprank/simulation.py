"""Closing the loop on synthetic data: rank shopper traffic with the champion, log feedback.

The synthetic marketplace is regenerated from the parameters saved next to it in S3
(``raw/_synthetic/marketplace.json``, written by ``shoprank generate`` and the demo), so the
simulator knows the hidden true relevance that drives clicks.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import numpy as np
import pandas as pd

from shoprank.config import Settings
from shoprank.data.contracts import product_text
from shoprank.storage import Storage

log = logging.getLogger(__name__)

PARAMS_KEY = "raw/_synthetic/marketplace.json"


def save_marketplace_params(storage: Storage, **params) -> None:
    """Record the ``generate_marketplace`` arguments (n_products, n_queries, seed, start, profile,
    synonym_rate, typo_rate, inflection_rate) so :func:`load_marketplace` rebuilds the same shop."""
    storage.put_bytes(PARAMS_KEY, json.dumps(params, default=str).encode(), "application/json")


def load_marketplace(storage: Storage):
    from shoprank.data.synthetic import generate_marketplace

    if not storage.exists(PARAMS_KEY):
        raise RuntimeError(f"{storage.uri(PARAMS_KEY)} is missing: run `shoprank generate` first")
    p = json.loads(storage.get_bytes(PARAMS_KEY))
    # parameters written before profiles existed: the default profile and its rates
    return generate_marketplace(n_products=p["n_products"], n_queries=p["n_queries"], seed=p["seed"],
                                start=dt.date.fromisoformat(p["start"]), profile=p.get("profile", "default"),
                                synonym_rate=p.get("synonym_rate"), typo_rate=p.get("typo_rate"),
                                inflection_rate=p.get("inflection_rate"))


def champion_rank_fn(settings: Settings):
    """(rank_fn, model_version) scoring candidates with the registered champion."""
    import mlflow

    from shoprank.mlflow_model import load_pyfunc
    from shoprank.registry import Registry

    registry = Registry(settings)
    champion = registry.version_by_alias("champion")
    if champion is None:
        raise RuntimeError("no champion to serve: train and approve a model first")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = load_pyfunc(f"models:/{registry.name}/{champion.version}")

    def rank(query: str, candidates: pd.DataFrame) -> np.ndarray:
        texts = product_text(candidates, settings.product_text_template).values
        frame = pd.DataFrame({"query": [query] * len(candidates), "text": texts})
        return np.asarray(model.predict(frame), dtype=np.float64)

    return rank, champion.version


def bm25_rank_fn():
    from shoprank.evaluation import BM25Scorer

    scorer = BM25Scorer()

    def rank(query: str, candidates: pd.DataFrame) -> np.ndarray:
        return scorer(pd.DataFrame({"query": [query] * len(candidates), "text": product_text(candidates).values}))

    return rank


def simulate_and_write(settings: Settings, day: dt.date | str, n_sessions: int = 80, seed: int = 0,
                       ranker: str = "champion", bot_fraction: float = 0.0, n_events: int | None = None) -> dict:
    """Simulate ``day`` against ``ranker`` and write raw/feedback/dt=day/ (with that day's catalogue).

    ``n_sessions`` sessions are played one request at a time (:func:`~shoprank.data.simulator.
    simulate_day`, any ranker: champion, bm25, oracle, random).  With ``n_events`` the day is
    generated in bulk instead (:func:`~shoprank.data.bulk_simulator.write_day_bulk`: about that
    many events, vectorised, written 1M events per part; rankers random and oracle only).
    """
    from shoprank.data.bulk_simulator import RANKERS as BULK_RANKERS
    from shoprank.data.simulator import oracle_rank_fn, random_rank_fn, simulate_day, write_day

    if n_events is not None and ranker not in BULK_RANKERS:
        raise ValueError(f"bulk simulation (n_events) ranks with {' or '.join(BULK_RANKERS)}, not {ranker}: "
                         "the champion and BM25 rank one request at a time (pass n_sessions instead)")
    storage = Storage(settings)
    market = load_marketplace(storage)
    rank_fn, version = random_rank_fn, None  # the bulk path ranks by name (random / oracle), not with a rank_fn
    if n_events is None:
        if ranker == "champion":
            rank_fn, version = champion_rank_fn(settings)
        elif ranker == "bm25":
            rank_fn = bm25_rank_fn()
        elif ranker == "oracle":
            rank_fn = oracle_rank_fn(market)
    day = day.isoformat() if isinstance(day, dt.date) else day
    # The catalogue of that day (new products appear: cold start) goes in with the feedback.
    from shoprank.data.contracts import CATALOG

    storage.write_partition(CATALOG.conform(market.catalog_for_day(day)), "raw", "catalog", day)
    from shoprank.serving.auth import user_hash_key

    # the key serving pseudonymises with (env / .env / stack.env; read, never generated)
    key = user_hash_key(home=settings.home)
    candidates = dict(n_category_candidates=8, n_fresh_candidates=2, n_random_candidates=6)
    if n_events is not None:
        from shoprank.data.bulk_simulator import write_day_bulk

        bulk = write_day_bulk(storage, market, day, n_events=n_events, seed=seed, ranker=ranker,
                              bot_fraction=bot_fraction, hmac_key=key, **candidates)
        log.info("simulated %s in bulk with ranker %s: %s", day, ranker, bulk.by_type)
        return {"date": day, "ranker": ranker, "model_version": None, "events": bulk.events,
                "by_type": dict(bulk.by_type), "mode": "bulk", "sessions": bulk.sessions, "parts": bulk.parts}
    events = simulate_day(market, day, rank_fn, n_sessions=n_sessions, seed=seed, model_version=version,
                          bot_fraction=bot_fraction, hmac_key=key, **candidates)
    write_day(storage, market, day, events)
    counts = events["event_type"].value_counts().to_dict()
    log.info("simulated %s with ranker %s (version %s): %s", day, ranker, version, counts)
    return {"date": day, "ranker": ranker, "model_version": version, "events": int(len(events)),
            "by_type": {k: int(v) for k, v in counts.items()}}
