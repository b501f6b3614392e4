"""Small, clean, contract-conforming frames for tests, benchmarks and demos of validation.

Not the synthetic marketplace (``shoprank.data.synthetic`` simulates shoppers); these are
just valid rows, fast to build (1M feedback events in about a second), deterministic for a
seed, and easy to break on purpose.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from shoprank.data.contracts import CATALOG, FEEDBACK, JUDGMENTS, QUERIES

CATEGORIES = ["Electronics > Phones", "Electronics > Laptops", "Home > Kitchen", "Home > Garden",
              "Sports > Running", "Fashion > Shoes", "Toys > Puzzles", "Books > Fiction"]
BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", None]
WORDS = ["red", "blue", "cheap", "wireless", "running", "kids", "leather", "smart", "mini", "pro"]
NOUNS = ["phone", "laptop", "kettle", "shoes", "puzzle", "novel", "lamp", "chair", "watch", "bag"]
CLICK_PROB = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.07, 0.06, 0.05, 0.05])


def _day(day: dt.date | str) -> pd.Timestamp:
    return pd.Timestamp(str(day), tz="UTC")


def product_ids(n: int) -> np.ndarray:
    return np.char.add("p", np.char.zfill(np.arange(n).astype(str), 6))


def query_vocabulary() -> list[str]:
    return [f"{w} {n}" for w in WORDS for n in NOUNS]


def catalog(n: int = 500, day: dt.date | str = "2026-11-20", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = product_ids(n)
    cat = rng.choice(CATEGORIES, n)
    noun = rng.choice(NOUNS, n)
    df = pd.DataFrame({
        "product_id": ids,
        "title": np.char.add(np.char.add(rng.choice(WORDS, n).astype(str), " "), noun.astype(str)),
        "description": [f"A fine {x}." for x in noun],
        "category": cat,
        "brand": rng.choice(np.array(BRANDS, dtype=object), n),
        "attributes": [f'{{"color": "{c}"}}' for c in rng.choice(["red", "blue", "black"], n)],
        "price": np.round(rng.lognormal(3.5, 0.8, n), 2),
        "created_at": _day(day) - pd.to_timedelta(rng.integers(3600, 400 * 86400, n), unit="s"),
    })
    return CATALOG.conform(df)


def queries(day: dt.date | str = "2026-11-20", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    q = query_vocabulary()
    df = pd.DataFrame({"query": q, "frequency": rng.zipf(1.5, len(q)).clip(1, 100_000),
                       "category": rng.choice(np.array(CATEGORIES + [None], dtype=object), len(q))})
    return QUERIES.conform(df)


def judgments(ids: np.ndarray | list[str], n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    q = np.array(query_vocabulary())
    pairs = pd.DataFrame({"query": rng.choice(q, n * 2), "product_id": rng.choice(np.asarray(ids), n * 2)})
    pairs = pairs.drop_duplicates().head(n).reset_index(drop=True)
    pairs["grade"] = rng.integers(0, 4, len(pairs))
    pairs["source"] = rng.choice(["human", "derived"], len(pairs))
    return JUDGMENTS.conform(pairs)


def feedback(n_events: int = 2_000, day: dt.date | str = "2026-11-20", ids: np.ndarray | list[str] | None = None,
             seed: int = 0, slate: int = 10, requests_per_session: int = 3) -> pd.DataFrame:
    """Search sessions: each request shows ``slate`` products (impressions at positions 1..slate),
    clicks follow a position-biased rate, some clicks lead to add_to_cart and purchase."""
    rng = np.random.default_rng(seed)
    ids = product_ids(500) if ids is None else np.asarray(ids)
    n_req = max(1, int(n_events / (slate * 1.12)) + 1)
    start = _day(day)
    req = np.arange(n_req)
    session = req // requests_per_session
    req_t = rng.integers(0, 86_400 - 900, n_req)
    vocab = np.array(query_vocabulary())
    req_query = vocab[rng.zipf(1.3, n_req).clip(1, len(vocab)) - 1]
    # impressions
    r = np.repeat(req, slate)
    pos = np.tile(np.arange(1, slate + 1), n_req)
    prod = rng.choice(ids, n_req * slate)
    kind = np.full(n_req * slate, "impression", dtype=object)
    t = req_t[r].astype(np.int64)
    click = rng.random(n_req * slate) < CLICK_PROB[(pos - 1) % len(CLICK_PROB)]
    atc = click & (rng.random(n_req * slate) < 0.2)
    buy = atc & (rng.random(n_req * slate) < 0.3)
    parts = [(r, pos, prod, kind, t)]
    for mask, name, delay in ((click, "click", 5), (atc, "add_to_cart", 60), (buy, "purchase", 300)):
        parts.append((r[mask], pos[mask], prod[mask], np.full(mask.sum(), name, dtype=object), t[mask] + delay))
    r, pos, prod, kind, t = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((t, r))[:n_events]
    r, pos, prod, kind, t = r[order], pos[order], prod[order], kind[order], t[order]
    n = len(r)
    df = pd.DataFrame({
        "event_id": np.char.add(f"e{seed}-", np.arange(n).astype(str)),
        "ts": start + pd.to_timedelta(t * 1_000_000 + rng.integers(0, 1_000_000, n), unit="us"),
        "request_id": np.char.add("r", r.astype(str)),
        "session_id": np.char.add("s", session[r].astype(str)),
        "user_id": np.char.add("u", (session[r] % 997).astype(str)),
        "query": req_query[r],
        "product_id": prod,
        "position": pos.astype("int64"),
        "event_type": kind,
        "model_version": "3",
    })
    return FEEDBACK.conform(df)
