"""Dataset snapshots: validated raw data -> train/val/test splits in ``datasets/<snapshot>/``.

Rules (documented in the README):

* Splits are **by query**, never by row: a query and all its judged products land in one
  split, decided by a seeded hash of the query text, so the split of a query never changes
  when more data arrives.
* Queries are normalised first (:func:`shoprank.data.contracts.normalize_queries`: NFKC,
  lower case, single spaces), so "Red Shoes" and "red  shoes" are one query in one split,
  exactly as training, evaluation and serving see them.
* **Candidates of the same kind in every split.**  Real judgment lists are mostly relevant
  products; the products a model must push down in serving are the rest of the catalogue.
  So every split gets, per query, its judged products plus ``n_negatives`` products sampled
  at random from the catalogue (fixed seed, grade 0, weight 1): train, val and test alike.
  The **train** split also gets up to ``n_hard_negatives`` *hard negatives*: products that
  Lucene BM25 over the catalogue ranks in its top ``hard_negative_pool`` for the query but
  that nobody judged.  **Unjudged-product policy:** an unjudged product is taken as
  irrelevant (grade 0), but a hard negative is only *probably* irrelevant (judgment lists
  are samples of a lexical engine's top results, so that is where unlabelled relevant
  products hide): it gets the loss weight ``unjudged_weight`` (default 0.5), and products
  whose text equals a judged relevant product's text are never used as negatives.  Val
  and test get no hard negatives: they measure what the shop's candidates look like, the
  judged list plus the catalogue.
* **No leakage.**  :func:`check_no_leakage` refuses a snapshot whose train split shares a
  query with its val, test (or recent-holdout) split, naming how many and which; every
  path that writes a training split calls it (this module, ``shoprank.daily``).
* ``lexical.json`` holds the catalogue's BM25 statistics (:class:`shoprank.lexical.Bm25Stats`):
  the BM25 baseline of every evaluation on this snapshot and the lexical features of the
  trained ranker use them.
* Slices: ``query_freq_bucket`` (head = queries making up the first 50% of search traffic,
  torso = the next 30%, tail = the rest, from the ``queries`` dataset) and ``category``.
* The snapshot id is a hash of the source partitions' content and the parameters: the same
  inputs give the same snapshot (idempotent per logical date); ``manifest.json`` lists row
  counts, source partitions and their hashes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from shoprank.data.contracts import normalize_queries, product_text
from shoprank.lexical import SNAPSHOT_STATS, Bm25Stats, CatalogueIndex
from shoprank.storage import Storage, StorageError, dataset_prefix

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SNAPSHOT_COLUMNS = ["query", "product_id", "text", "grade", "weight", "query_freq_bucket", "category"]


@dataclass(frozen=True)
class SnapshotParams:
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    n_negatives: int = 20  # random catalogue negatives per query, every split
    n_hard_negatives: int = 10  # unjudged BM25 top products per train query
    hard_negative_pool: int = 50  # ... drawn from BM25's top this many
    unjudged_weight: float = 0.5  # loss weight of a hard negative (probably, not surely, irrelevant)
    seed: int = 42
    zone: str = "validated"
    text_template: str | None = None  # product text template (None: contracts' default)

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
        if self.n_negatives < 0 or self.n_hard_negatives < 0 or self.hard_negative_pool < self.n_hard_negatives:
            raise ValueError("n_negatives and n_hard_negatives must be >= 0 and hard_negative_pool >= "
                             "n_hard_negatives")
        if not 0 < self.unjudged_weight <= 1:
            raise ValueError(f"unjudged_weight={self.unjudged_weight}: must be in (0, 1]")


class LeakageError(ValueError):
    """A training split shares queries with an evaluation split (val / test / holdout)."""


def check_no_leakage(train: pd.DataFrame, protected: dict[str, pd.DataFrame | set[str] | None],
                     what: str = "snapshot") -> None:
    """Refuse when a query of ``train`` is in any ``protected`` split (by normalised query text)."""
    train_q = set(normalize_queries(pd.Series(train["query"], dtype="string")).dropna())
    problems = []
    for name, other in protected.items():
        if other is None:
            continue
        other_q = set(other) if isinstance(other, set) else set(other["query"].astype(str))
        other_q = set(normalize_queries(pd.Series(sorted(other_q), dtype="string")).dropna())
        shared = sorted(train_q & other_q)
        if shared:
            shown = ", ".join(repr(q) for q in shared[:10]) + (" ..." if len(shared) > 10 else "")
            problems.append(f"{len(shared)} queries of the {name} split are in the train split: {shown}")
    if problems:
        raise LeakageError(f"{what} refused, evaluation queries would reach training: " + "; ".join(problems))


@dataclass
class Manifest:
    snapshot: str
    created_at: str
    params: dict
    sources: dict = field(default_factory=dict)  # dataset -> {date, files: {key: sha256}}
    rows: dict = field(default_factory=dict)  # split -> rows
    queries: dict = field(default_factory=dict)  # split -> distinct queries

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def split_of(query: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split for a query (stable across runs and data growth)."""
    h = int(hashlib.sha256(f"{seed}:{query}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def frequency_buckets(queries: pd.DataFrame) -> pd.Series:
    """head / torso / tail per query from its share of search traffic."""
    q = queries.sort_values(["frequency", "query"], ascending=[False, True])
    # share of traffic from strictly more frequent queries (integer sums: no float drift)
    before = (q["frequency"].cumsum() - q["frequency"]) / max(int(q["frequency"].sum()), 1)
    bucket = np.where(before < 0.5, "head", np.where(before < 0.8, "torso", "tail"))
    return pd.Series(bucket, index=q["query"].values, name="query_freq_bucket")


def build_splits(catalog: pd.DataFrame, judgments: pd.DataFrame, queries: pd.DataFrame | None,
                 params: SnapshotParams, index: CatalogueIndex | None = None) -> dict[str, pd.DataFrame]:
    """Pure function: frames in, split frames out (see module docstring for the rules)."""
    products = catalog.drop_duplicates("product_id").set_index("product_id")
    texts = product_text(products.reset_index(), params.text_template).set_axis(products.index)
    known = judgments[judgments["product_id"].isin(products.index)].copy()
    dropped = len(judgments) - len(known)
    if dropped:
        log.warning("%d judgments refer to products missing from the catalogue; left out", dropped)
    known["query"] = normalize_queries(known["query"].astype("string"))
    known = known[known["query"].fillna("") != ""]
    known = known.drop_duplicates(["query", "product_id"], keep="last")
    known["text"] = texts.reindex(known["product_id"]).values
    known["grade"] = known["grade"].astype("int64")
    known["weight"] = 1.0
    if queries is not None and len(queries):
        queries = queries.assign(query=normalize_queries(queries["query"].astype("string")))
        queries = queries.groupby("query", as_index=False).agg(frequency=("frequency", "sum"),
                                                                category=("category", "first"))
        buckets = frequency_buckets(queries)
        qcat = queries.set_index("query")["category"]
    else:
        buckets = pd.Series(dtype="string")
        qcat = pd.Series(dtype="string")
    known["query_freq_bucket"] = buckets.reindex(known["query"]).fillna("tail").values
    # the query's category, else the category of its best-graded product
    best_cat = (known.sort_values(["grade", "product_id"], ascending=[False, True], kind="stable").drop_duplicates("query")
                .set_index("query")["product_id"].map(products["category"]))
    cat = qcat.reindex(known["query"]).astype("object")
    cat = cat.where(cat.notna(), best_cat.reindex(known["query"]).values)
    known["category"] = cat.fillna("unknown").astype(str).str.split(" > ").str[0].values
    known["split"] = [split_of(q, params.seed, params.val_fraction, params.test_fraction) for q in known["query"]]

    if params.n_hard_negatives and index is None:
        index = catalogue_index(catalog, params.text_template)
    out: dict[str, pd.DataFrame] = {}
    for i, split in enumerate(SPLITS):
        part = known[known["split"] == split]
        extra = []
        if len(part) and params.n_negatives > 0:
            extra.append(_sampled_negatives(part, products, texts, params.n_negatives, params.seed + i))
        if split == "train" and len(part) and params.n_hard_negatives > 0:
            extra.append(_hard_negatives(part, texts, index, params))
        if extra:  # judged rows first, then random, then hard negatives: one row per product
            part = pd.concat([part, *extra], ignore_index=True).drop_duplicates(["query", "product_id"])
        out[split] = (part[SNAPSHOT_COLUMNS].sort_values(["query", "product_id"]).reset_index(drop=True)
                      .astype({"query": "string", "product_id": "string", "text": "string",
                               "query_freq_bucket": "string", "category": "string"}))
    check_no_leakage(out["train"], {"val": out["val"], "test": out["test"]})
    return out


def catalogue_index(catalog: pd.DataFrame, text_template: str | None = None) -> CatalogueIndex:
    """BM25 index (and statistics) over the catalogue's product texts, one document per product."""
    products = catalog.drop_duplicates("product_id")
    texts = product_text(products, text_template).astype(str).tolist()
    return CatalogueIndex(products["product_id"].astype(str).tolist(), texts)


def _negative_rows(query: str, first: pd.Series, pids, texts: pd.Series, weight: float) -> list[tuple]:
    return [(query, pid, texts[pid], 0, weight, first["query_freq_bucket"], first["category"]) for pid in pids]


def _excluded(group: pd.DataFrame) -> tuple[set, set]:
    """Judged product ids of a query, and the texts of its relevant ones (near-duplicates)."""
    return set(group["product_id"]), set(group.loc[group["grade"] > 0, "text"].astype(str))


def _sampled_negatives(part: pd.DataFrame, products: pd.DataFrame, texts: pd.Series, n: int,
                       seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = products.index.to_numpy()
    rows = []
    for query, group in part.groupby("query", sort=True):
        judged, relevant_texts = _excluded(group)
        pick = rng.choice(ids, size=min(len(ids), n + len(judged) + 5), replace=False)
        pick = [p for p in pick if p not in judged and texts[p] not in relevant_texts][:n]
        rows += _negative_rows(query, group.iloc[0], pick, texts, 1.0)
    return pd.DataFrame(rows, columns=SNAPSHOT_COLUMNS)


def _hard_negatives(part: pd.DataFrame, texts: pd.Series, index: CatalogueIndex,
                    params: SnapshotParams) -> pd.DataFrame:
    rng = np.random.default_rng(params.seed + 100)
    rows = []
    for query, group in part.groupby("query", sort=True):
        judged, relevant_texts = _excluded(group)
        pool = [p for p in index.top_k(query, params.hard_negative_pool)
                if p not in judged and texts[p] not in relevant_texts]
        if len(pool) > params.n_hard_negatives:
            pool = [pool[i] for i in sorted(rng.choice(len(pool), params.n_hard_negatives, replace=False))]
        rows += _negative_rows(query, group.iloc[0], pool, texts, params.unjudged_weight)
    return pd.DataFrame(rows, columns=SNAPSHOT_COLUMNS)


def _latest(storage: Storage, zone: str, dataset: str, day: str | None) -> str:
    latest = storage.latest_partition(zone, dataset, day)
    if latest is None:
        raise StorageError(
            f"no {zone} partition of {dataset!r} in s3://{storage.bucket}/{zone}/{dataset}/"
            + (f" on or before {day}" if day else "")
            + ": run validation first (shoprank validate / the train DAG's validate tasks)"
        )
    return latest


def build_snapshot(storage: Storage, params: SnapshotParams = SnapshotParams(), day: str | dt.date | None = None,
                   snapshot: str | None = None) -> Manifest:
    """Read the latest partitions (on or before ``day``), write the splits and manifest."""
    day = day.isoformat() if isinstance(day, dt.date) else day
    frames, sources = {}, {}
    for dataset in ("catalog", "judgments", "queries"):
        try:
            latest = _latest(storage, params.zone, dataset, day)
        except StorageError:
            if dataset == "queries":
                frames[dataset] = None  # optional: slices fall back to "tail"
                continue
            raise
        files = storage.partition_files(params.zone, dataset, latest)
        sources[dataset] = {"date": latest,
                            "files": {k: storage.sha256(k) for k in files}}
        frames[dataset] = storage.read_partition(params.zone, dataset, latest)
    fingerprint = hashlib.sha256(json.dumps([sources, asdict(params)], sort_keys=True).encode()).hexdigest()[:10]
    snapshot = snapshot or f"{sources['judgments']['date']}-{fingerprint}"
    prefix = dataset_prefix(snapshot)
    if storage.exists(prefix + "manifest.json"):
        log.info("snapshot %s already exists (same inputs and parameters); reusing it", snapshot)
        return Manifest(**json.loads(storage.get_bytes(prefix + "manifest.json")))
    index = catalogue_index(frames["catalog"], params.text_template)
    splits = build_splits(frames["catalog"], frames["judgments"], frames["queries"], params, index=index)
    manifest = Manifest(snapshot=snapshot, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                        params=asdict(params), sources=sources)
    storage.put_bytes(prefix + SNAPSHOT_STATS, index.stats.to_json().encode(), "application/json")
    for split, df in splits.items():
        storage.write_parquet(df, f"{prefix}{split}.parquet")
        manifest.rows[split] = int(len(df))
        manifest.queries[split] = int(df["query"].nunique())
        log.info("snapshot %s: %s = %d rows, %d queries", snapshot, split, len(df), df["query"].nunique())
    if not manifest.rows["train"] or not manifest.rows["test"]:
        raise ValueError(f"snapshot {snapshot} has an empty split: {manifest.rows}; add more judged queries")
    storage.put_bytes(prefix + "manifest.json", manifest.to_json().encode(), "application/json")  # last: marks complete
    return manifest


def load_split(storage: Storage, snapshot: str, split: str) -> pd.DataFrame:
    return storage.read_parquet(f"{dataset_prefix(snapshot)}{split}.parquet")


def load_lexical_stats(storage: Storage, snapshot: str) -> Bm25Stats | None:
    """The catalogue BM25 statistics of a snapshot (None for snapshots made before they existed)."""
    key = dataset_prefix(snapshot) + SNAPSHOT_STATS
    if not storage.exists(key):
        log.warning("snapshot %s has no %s (made by an older shoprank): BM25 falls back to per-candidate "
                    "statistics; rebuild the snapshot for the catalogue BM25 a search engine computes",
                    snapshot, SNAPSHOT_STATS)
        return None
    return Bm25Stats.from_json(storage.get_bytes(key))


def latest_snapshot(storage: Storage) -> str:
    keys = [k for k in storage.list_keys("datasets/") if k.endswith("/manifest.json")]
    if not keys:
        raise StorageError("no dataset snapshot in datasets/: build one first (train DAG / shoprank snapshot)")
    manifests = [json.loads(storage.get_bytes(k)) for k in keys]
    return max(manifests, key=lambda m: m["created_at"])["snapshot"]
